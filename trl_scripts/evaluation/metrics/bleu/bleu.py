"""Corpus BLEU for captions through sacrebleu, with any number of references per caption."""

import evaluate

from trl_scripts.evaluation.metrics import common
import sacrebleu


_DESCRIPTION = """
Corpus-level BLEU-4 (Papineni et al. 2002) as computed by sacrebleu (Post 2018): its 13a tokenizer, exponential
smoothing and brevity penalty, so the numbers are comparable with published sacrebleu scores. Each caption may have a
different number of references (COCO has about 5, Clotho 5, many test sets 1). The score is on sacrebleu's 0-100
scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated captions.
    references (`list[list[str]]` or `list[str]`): the reference captions of each prediction.
    lowercase (`bool`, default False): case-insensitive BLEU.
    tokenize (`str`, default "13a"): a sacrebleu tokenizer ("13a", "intl", "char", "none", ...).
    effective_order (`bool`, default True): leave out n-gram orders that no caption is long enough to have (a corpus
        of 3-word captions has no 4-grams, and plain BLEU-4 would then be 0 whatever the captions say).
Returns:
    bleu (`float`): corpus BLEU in [0, 100].
Examples:
    >>> metric = load_metric("bleu")
    >>> metric.compute(predictions=["a red circle on white"], references=[["a red circle on white", "red disc"]])
    {'bleu': 100.00000000000004}
"""

_CITATION = """
@inproceedings{post-2018-call,
  title={A Call for Clarity in Reporting {BLEU} Scores}, author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation}, year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(common.MultiReferenceMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            reference_urls=["https://github.com/mjpost/sacrebleu"],
            features=common.MULTI_REFERENCE_FEATURES,
        )

    def _compute(self, predictions, references, lowercase=False, tokenize="13a", effective_order=True):
        for index, refs in enumerate(references):
            if not refs or not any(ref.strip() for ref in refs):
                raise ValueError(f"sample {index} has no (or only empty) reference captions")
        # sacrebleu takes reference streams (the k-th reference of every caption); None fills a shorter list
        width = max((len(refs) for refs in references), default=0)
        streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
        bleu = sacrebleu.BLEU(lowercase=lowercase, tokenize=tokenize, effective_order=effective_order)
        score = bleu.corpus_score(list(predictions), streams)
        return {"bleu": float(score.score)}
