"""VQA accuracy (Antol et al. 2015; the VQA v2 / TextVQA / OK-VQA / VizWiz evaluation), optionally per group."""

import itertools
import re

import evaluate

from trl_scripts.evaluation.metrics import common


_DESCRIPTION = """
The VQA accuracy: an answer is fully correct when at least 3 of the human annotators gave it. With n > 1 references
(usually the 10 human answers) the score of a prediction is averaged over the n leave-one-out subsets of n - 1
references: mean_i min(1, #{j != i : ref_j == prediction} / 3), which for 10 answers is the official average over the
10-choose-9 subsets. With a single reference it is a plain match. Predictions and references go through the official
answer normalisation first: newlines and tabs to spaces, punctuation removed or replaced by a space (as the official
evaluation does), periods not followed by a digit removed, lower case, number words "none"/"zero".."ten" to digits,
articles "a", "an", "the" removed, and apostrophe-less contractions restored ("dont" -> "don't").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[list[str]]` or `list[str]`): the human answers of each question (10 for VQA v2), or one answer.
    groups (`list[str]`, optional): a group name per prediction (e.g. its modality); adds `vqa_accuracy/<group>`.
Returns:
    vqa_accuracy (`float`): in [0, 1]; plus `vqa_accuracy/<group>` for each group when `groups` is given.
Examples:
    >>> metric = load_metric("vqa_accuracy")
    >>> metric.compute(predictions=["Two."], references=[["2"] * 2 + ["3"] * 8])
    {'vqa_accuracy': 0.6}
"""

_CITATION = """
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV}, year={2015}
}
"""

# The official evaluation's punctuation list (no apostrophe, colon or period: periods are handled separately).
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" (a misspelt look-behind that never applies) strips every period that is
# not followed by a digit; written here as what it does.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The contractions the official evaluation restores; it maps their spellings with apostrophes missing to these forms.
# (Its capitalised "I" forms are left out: they never match a lower-cased answer.)
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've needn't
not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of `word` with one or more of its apostrophes dropped."""
    pieces = word.split("'")
    variants = []
    for kept in itertools.product((True, False), repeat=len(pieces) - 1):
        if all(kept):
            continue
        variant = pieces[0]
        for keep, piece in zip(kept, pieces[1:]):
            variant += ("'" if keep else "") + piece
        variants.append(variant)
    return variants


_CONTRACTIONS = {variant: word for word in _CANONICAL_CONTRACTIONS for variant in _apostrophe_variants(word)}


def _process_punctuation(text: str) -> str:
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # a mark next to a space (or any text with "1,000"-style numbers) is dropped; one inside a word splits it
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(answer))


def vqa_score(prediction: str, references: list[str]) -> float:
    """The VQA accuracy of one prediction against its human answers (see the description)."""
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(reference) for reference in references]
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = sum(answer == prediction for answer in answers)
    # leaving out answer i removes one match when answer i itself matches
    return sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in answers) / len(answers)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(common.MultiReferenceMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            reference_urls=["https://visualqa.org/evaluation.html"],
            features=common.MULTI_REFERENCE_FEATURES,
        )

    def _compute(self, predictions, references, groups=None):
        scores = []
        for index, (prediction, refs) in enumerate(zip(predictions, references)):
            if not refs:
                raise ValueError(f"sample {index} has no reference answer")
            scores.append(vqa_score(prediction, refs))
        return common.grouped_means("vqa_accuracy", scores, groups)
