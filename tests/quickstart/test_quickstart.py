"""The quickstart (`make demo`) end to end on a handful of items: every output it promises, and its routing shares."""

import json

import pytest
import torch

from trl_scripts.quickstart.run import QuickstartArguments, eval_samples, routing_shares, run


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    args = QuickstartArguments(
        output_dir=str(out), num_train_per_task=2, num_eval_per_task=2, warmup_epochs=1, stage1_epochs=1,
        stage2_epochs=1, stage3_epochs=1, batch_size=4,
    )
    return out, run(args)


def test_quickstart_writes_everything_it_reports(quickstart):
    out, summary = quickstart
    checkpoint = out / "stage3"
    for path in (checkpoint / "config.json", checkpoint / "routing_heatmap.png", checkpoint / "eval_results.json",
                 out / "loss_curve.png", out / "eval" / "metrics.json", out / "eval" / "predictions.jsonl"):
        assert path.is_file() and path.stat().st_size > 0, path
    assert json.loads((checkpoint / "experts.json").read_text()) == ["image", "video", "audio", "speech"]
    metrics = summary["metrics"]
    assert {f"exact_match/{m}" for m in ("image", "video", "audio", "speech")} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert len(summary["answers"]) == 4 and all(isinstance(answer, str) for answer in summary["answers"])
    predictions = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 7 * 2  # every held-out row of the seven tasks scored, none dropped
    shares = torch.tensor(summary["own_expert_share"])  # [modalities, sparse layers, experts]
    assert shares.shape == (4, 4, 4)
    torch.testing.assert_close(shares.sum(dim=-1), torch.ones(4, 4))


def test_routing_shares_do_not_depend_on_batching(quickstart):
    from modeling_unimoe import UniMoEForCausalLM, UniMoEProcessor

    out, summary = quickstart
    model = UniMoEForCausalLM.from_pretrained(out / "stage3").eval()
    processor = UniMoEProcessor.from_pretrained(out / "stage3")
    samples = eval_samples(json.loads((out / "data" / "eval.json").read_text()), out / "data", "")
    one_by_one = routing_shares(model, processor, samples, batch_size=1)  # no padding at all
    batched = routing_shares(model, processor, samples, batch_size=5)  # left padding, mixed modalities per batch
    torch.testing.assert_close(batched, one_by_one)
    torch.testing.assert_close(batched, torch.tensor(summary["own_expert_share"]))
