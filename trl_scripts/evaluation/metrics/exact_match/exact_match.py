"""Exact match after SQuAD-style normalisation, optionally per group (e.g. per modality)."""


import evaluate

from trl_scripts.evaluation.metrics import common


_DESCRIPTION = """
The fraction of predictions that equal one of their references after normalisation: lower case, punctuation removed,
the articles "a", "an" and "the" removed, whitespace collapsed (the SQuAD answer normalisation). A sample may have
several acceptable references; it counts as correct when any of them matches.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]` or `list[list[str]]`): one reference or a list of acceptable references per prediction.
    groups (`list[str]`, optional): a group name per prediction (e.g. its modality); adds `exact_match/<group>`.
    normalize (`bool`, default True): compare normalised strings; False compares the stripped strings as given.
Returns:
    exact_match (`float`): in [0, 1]; plus `exact_match/<group>` for each group when `groups` is given.
Examples:
    >>> metric = load_metric("exact_match")
    >>> metric.compute(predictions=["The Cat.", "dog"], references=[["cat", "kitten"], "bird"])
    {'exact_match': 0.5}
"""

_CITATION = """
@inproceedings{rajpurkar2016squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP}, year={2016}
}
"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(common.MultiReferenceMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=common.MULTI_REFERENCE_FEATURES,
        )

    def _compute(self, predictions, references, groups=None, normalize=True):
        clean = common.normalize_answer if normalize else str.strip
        scores = []
        for index, (prediction, refs) in enumerate(zip(predictions, references)):
            if not refs:
                raise ValueError(f"sample {index} has no reference")
            scores.append(float(clean(prediction) in {clean(ref) for ref in refs}))
        return common.grouped_means("exact_match", scores, groups)
