"""Exact match after SQuAD-style normalisation, optionally per group (e.g. per modality)."""

import re
import string
from collections import defaultdict

import datasets
import evaluate


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

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def grouped_means(name: str, scores: list[float], groups: list[str] | None) -> dict[str, float]:
    """{name: mean} plus {name/group: mean of that group} for each group."""
    result = {name: float(sum(scores) / len(scores)) if scores else 0.0}
    if groups is None:
        return result
    if len(groups) != len(scores):
        raise ValueError(f"got {len(groups)} groups for {len(scores)} predictions; give one group per prediction")
    by_group = defaultdict(list)
    for group, score in zip(groups, scores):
        by_group[str(group)].append(score)
    for group in sorted(by_group):
        result[f"{name}/{group}"] = float(sum(by_group[group]) / len(by_group[group]))
    return result


def as_reference_lists(references):
    """One reference string -> a one-element list, so that single and several references can be mixed."""
    return None if references is None else [[ref] if isinstance(ref, str) else ref for ref in references]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    # evaluate picks one input format from the first sample; wrapping lone strings first lets a batch mix both forms
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (each a string or a list of strings)."""
        super().add_batch(predictions=predictions, references=as_reference_lists(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference (a string or a list of strings)."""
        super().add(prediction=prediction, reference=[reference] if isinstance(reference, str) else reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the metric over the added and the given predictions and references."""
        return super().compute(predictions=predictions, references=as_reference_lists(references), **kwargs)

    def _compute(self, predictions, references, groups=None, normalize=True):
        clean = normalize_answer if normalize else str.strip
        scores = []
        for index, (prediction, refs) in enumerate(zip(predictions, references)):
            if not refs:
                raise ValueError(f"sample {index} has no reference")
            scores.append(float(clean(prediction) in {clean(ref) for ref in refs}))
        return grouped_means("exact_match", scores, groups)
