"""What the packaged metric modules share: answer normalisation, one or several string references per prediction,
per-group means.

The modules import this as `from trl_scripts.evaluation.metrics import common` (a module, not a class: `evaluate` takes the
first `EvaluationModule` subclass in a metric script's namespace as its metric).
"""

import re
import string
from collections import defaultdict

import datasets
import evaluate


MULTI_REFERENCE_FEATURES = datasets.Features(
    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
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


class MultiReferenceMetric(evaluate.Metric):
    """A metric whose references are each a string or a list of strings (`MULTI_REFERENCE_FEATURES`).

    evaluate picks one input format from the first sample; wrapping lone strings first lets a batch mix both forms.
    """

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (each a string or a list of strings)."""
        super().add_batch(predictions=predictions, references=as_reference_lists(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference (a string or a list of strings)."""
        super().add(prediction=prediction, reference=[reference] if isinstance(reference, str) else reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the metric over the added and the given predictions and references."""
        return super().compute(predictions=predictions, references=as_reference_lists(references), **kwargs)
