"""Local `evaluate` metric modules for Uni-MoE evaluation, loaded by path (no Hub access needed).

    from trl_scripts.evaluation.metrics import load_metric
    load_metric("exact_match").compute(predictions=[...], references=[...], groups=[...])

Each module lives in `metrics/<name>/<name>.py` and returns plain floats: `exact_match`, `vqa_accuracy`,
`mcq_accuracy`, `bleu` (captions, sacrebleu) and `wer` (jiwer).
"""

from pathlib import Path

import evaluate


METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    return sorted(path.parent.name for path in METRICS_DIR.glob("*/*.py") if path.stem == path.parent.name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` on the packaged module `name`; `kwargs` go to `evaluate.load` (e.g. `experiment_id`)."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no metric {name!r}: the packaged metrics are {available_metrics()}")
    return evaluate.load(str(path), **kwargs)


__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]
