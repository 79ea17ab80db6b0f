"""Word and character error rates through jiwer, after a simple text normalisation."""

import datasets
import evaluate
import jiwer


_DESCRIPTION = """
Corpus word error rate (substitutions + deletions + insertions over reference words) and character error rate,
computed by jiwer. By default both sides are normalised first (lower case, punctuation removed, whitespace
collapsed), so "Seven." and "seven" agree; pass `normalize=False` to score the raw strings.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcriptions.
    references (`list[str]`): reference transcripts (none may be empty after normalisation).
    normalize (`bool`, default True): lower-case and strip punctuation before scoring.
Returns:
    wer (`float`): corpus WER (can exceed 1 with many insertions).
    cer (`float`): corpus CER.
Examples:
    >>> metric = load_metric("wer")
    >>> metric.compute(predictions=["the cat sat"], references=["The cat sat down."])
    {'wer': 0.25, 'cer': 0.3125}
"""

_CITATION = """
@inproceedings{morris2004,
  title={From WER and RIL to MER and WIL: improved evaluation measures for connected speech recognition},
  author={Morris, Andrew Cameron and Maier, Viktoria and Green, Phil}, booktitle={INTERSPEECH}, year={2004}
}
"""

_NORMALIZE_TEXT = jiwer.Compose(
    [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            reference_urls=["https://github.com/jitsi/jiwer"],
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, normalize=True):
        if normalize:
            predictions = [_NORMALIZE_TEXT(text) for text in predictions]
            references = [_NORMALIZE_TEXT(text) for text in references]
        for index, reference in enumerate(references):
            if not reference.strip():
                raise ValueError(
                    f"sample {index} has an empty reference transcript{' after normalisation' if normalize else ''}"
                )
        words = jiwer.process_words(references, predictions)
        characters = jiwer.process_characters(references, predictions)
        return {"wer": float(words.wer), "cer": float(characters.cer)}
