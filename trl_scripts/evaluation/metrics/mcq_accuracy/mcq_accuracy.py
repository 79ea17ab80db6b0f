"""Multiple-choice accuracy: the chosen option is read from free-form output, optionally per group."""

import re
import string

import evaluate

from trl_scripts.evaluation.metrics import common


_DESCRIPTION = """
Multiple-choice accuracy (MMBench, ScienceQA, SEED-Bench style). The option a model chose is read from its free-form
output, in this order, the first rule that gives a valid option letter winning:

1. the whole answer is a letter, bracketed or not: "B", "(b)", "B.", "[C]";
2. the answer starts with a letter followed by ".", ")", "]" or ":": "B. a seed", "(C) red";
3. a letter after "answer", "option" or "choice": "The answer is (B)", "Answer: C", "option D is correct";
4. with the options' texts known: the answer equals one option's text, or contains exactly one of them (ignoring
   those inside a longer matched option), compared after lower-casing and removing punctuation and articles;
5. exactly one distinct option letter standing alone in the answer ("I think B"); a capital "A" or "I" followed by a
   lower-case word is read as the article or pronoun.

Valid letters are the options' letters when known, else A-Z. A reference is an option letter ("B", "(B)", "B.") or an
option's text (resolved to its letter when the options are known); a reference text that matches no option letter is
compared with the normalised answer text instead (correct when the answer contains it as a phrase).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]` or `list[list[str]]`): the correct option (letter or text); several are all accepted.
    options (`list`, optional): per prediction, None, the option texts in letter order (`["a seed", "a leaf"]` is
        A, B) or a `{letter: text}` dict.
    groups (`list[str]`, optional): a group name per prediction (e.g. its modality); adds `mcq_accuracy/<group>`.
Returns:
    mcq_accuracy (`float`): in [0, 1]; plus `mcq_accuracy/<group>` per group when `groups` is given.
    mcq_unparsed (`float`): the fraction of answers from which no option could be read (counted as wrong).
Examples:
    >>> metric = load_metric("mcq_accuracy")
    >>> metric.compute(predictions=["The answer is (B).", "a seed"], references=["B", "A"],
    ...                options=[None, ["a seed", "a leaf"]])
    {'mcq_accuracy': 1.0, 'mcq_unparsed': 0.0}
"""

_CITATION = """
@article{liu2023mmbench,
  title={MMBench: Is Your Multi-modal Model an All-around Player?},
  author={Liu, Yuan and Duan, Haodong and Zhang, Yuanhan and Li, Bo and others},
  journal={arXiv preprint arXiv:2307.06281}, year={2023}
}
"""

_WHOLE_LETTER = re.compile(r"^[\s(\[]*([A-Za-z])[\s)\].:]*$")
_LEADING_LETTER = re.compile(r"^[\s(\[]*([A-Z])\s*[.)\]:]")
_AFTER_KEYWORD = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is|would be|should be|will be))?\s*[:=]?\s*[(\[]?([A-Z])(?![A-Za-z0-9'])"
)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
def as_option_dict(options) -> dict[str, str]:
    """None, a list of option texts (A, B, ... in order) or a {letter: text} dict -> {letter: text}."""
    if not options:
        return {}
    if isinstance(options, dict):
        return {str(letter).strip().upper(): str(text) for letter, text in options.items() if text is not None}
    if len(options) > 26:
        raise ValueError(f"{len(options)} options: at most 26 (A-Z) are supported")
    return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(options)}


def _contains_phrase(text: str, phrase: str) -> bool:
    return bool(phrase) and re.search(rf"(?<!\S){re.escape(phrase)}(?!\S)", text) is not None


def extract_choice(prediction: str, options=None) -> str | None:
    """The option letter a free-form answer chose (see the description), or None."""
    options = as_option_dict(options)
    valid = set(options) or set(string.ascii_uppercase)
    text = " ".join(prediction.split())
    if not text:
        return None
    whole = _WHOLE_LETTER.match(text)
    if whole and whole.group(1).upper() in valid:
        return whole.group(1).upper()
    leading = _LEADING_LETTER.match(text)
    if leading and leading.group(1) in valid:
        return leading.group(1)
    for match in _AFTER_KEYWORD.finditer(text):
        if match.group(1) in valid:
            return match.group(1)
    if options:
        answer = common.normalize_answer(text)
        texts = {letter: common.normalize_answer(option) for letter, option in options.items()}
        exact = [letter for letter, option in texts.items() if option and option == answer]
        if len(exact) == 1:
            return exact[0]
        found = [letter for letter, option in texts.items() if _contains_phrase(answer, option)]
        # "dark red" also contains the option "red": keep only matches that are not part of a longer match
        found = [a for a in found if not any(a != b and _contains_phrase(texts[b], texts[a]) for b in found)]
        if len(found) == 1:
            return found[0]
    letters = set()
    for match in _STANDALONE_LETTER.finditer(text):
        letter, rest = match.group(1), text[match.end() :]
        if letter in ("A", "I") and re.match(r"\s+[a-z]", rest):
            continue
        if letter in valid:
            letters.add(letter)
    return letters.pop() if len(letters) == 1 else None


def resolve_reference(reference: str, options=None) -> str | None:
    """A reference's option letter: given as a letter, or as the text of one of the options; None otherwise."""
    options = as_option_dict(options)
    whole = _WHOLE_LETTER.match(reference.strip())
    if whole and (not options or whole.group(1).upper() in options):
        return whole.group(1).upper()
    matches = [letter for letter, text in options.items() if common.normalize_answer(text) == common.normalize_answer(reference)]
    return matches[0] if len(matches) == 1 else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MCQAccuracy(common.MultiReferenceMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=common.MULTI_REFERENCE_FEATURES,
        )

    def _compute(self, predictions, references, options=None, groups=None):
        if options is not None and len(options) != len(predictions):
            raise ValueError(
                f"got {len(options)} option lists for {len(predictions)} predictions; give one per prediction"
            )
        scores, unparsed = [], 0
        for index, (prediction, refs) in enumerate(zip(predictions, references)):
            if not refs or not all(ref.strip() for ref in refs):
                raise ValueError(f"sample {index} has no (or an empty) reference")
            sample_options = options[index] if options is not None else None
            choice = extract_choice(prediction, sample_options)
            unparsed += choice is None
            correct = False
            for ref in refs:
                letter = resolve_reference(ref, sample_options)
                if letter is not None:
                    correct |= choice == letter
                else:
                    correct |= _contains_phrase(common.normalize_answer(prediction), common.normalize_answer(ref))
            scores.append(float(correct))
        result = common.grouped_means("mcq_accuracy", scores, groups)
        result["mcq_unparsed"] = float(unparsed / len(predictions)) if predictions else 0.0
        return result
