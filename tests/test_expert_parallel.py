"""Expert parallelism through transformers' DistributedConfig, two gloo processes on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_tiny_model, random_ids


def test_torchrun_expert_parallel_matches_single_process(tmp_path):
    model = make_tiny_model(moe_layers="even")
    model.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(2, 12)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits

    worker = Path(__file__).with_name("ep_worker.py")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "logits")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"logits.rank{rank}.json").read_text()) for rank in (0, 1)]
    num_experts = model.config.text_config.num_experts
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["world_size"] == 2 and report["expert_parallel"]
        assert report["local_experts"] == [num_experts // 2]  # each rank holds half of the experts
        assert report["local_gate_up_shape"][0] == num_experts // 2
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"logits.rank{rank}.pt"), expected, atol=1e-5, rtol=0)
