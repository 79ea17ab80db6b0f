"""Expert and tensor parallelism through transformers' DistributedConfig: two gloo processes on CPU via torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import REPO_ROOT, UTILS_DIR
from tests.utils.models import make_tiny_model, random_ids


def run_torchrun(mode: str, implementation: str, checkpoint: Path, ids: torch.Tensor, tmp_path: Path) -> list[dict]:
    torch.save(ids, tmp_path / "ids.pt")
    worker = UTILS_DIR / "parallel_worker.py"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), mode, implementation, str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "logits")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return [json.loads((tmp_path / f"logits.rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("mode, implementation", [("ep", "grouped_mm"), ("ep", "eager"), ("tp", "grouped_mm")])
def test_torchrun_parallel_matches_single_process(mode, implementation, tmp_path):
    model = make_tiny_model(moe_layers="even", num_shared_experts=1)
    model.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(ids).logits

    reports = run_torchrun(mode, implementation, tmp_path / "ckpt", ids, tmp_path)
    text = model.config.text_config
    full_q = [text.num_attention_heads * text.head_dim, text.hidden_size]
    for report in reports:
        assert report["world_size"] == 2
        if mode == "ep":  # DistributedConfig(ep_size=2, fsdp_size=2): each rank holds half of the experts
            assert report["expert_parallel"]
            assert report["local_experts"] == [text.num_experts // 2]
            assert report["local_gate_up_shape"][0] == text.num_experts // 2
        else:  # DistributedConfig(tp_size=2): attention and expert weights split across the two ranks
            assert report["local_q_proj_shape"] == [full_q[0] // 2, full_q[1]]
            assert report["local_gate_up_shape"][1] == 2 * text.moe_intermediate_size // 2
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"logits.rank{rank}.pt"), expected, atol=1e-5, rtol=0)


def test_ddp_stage_with_the_accelerate_config(tmp_path):
    """`accelerate launch` with configuration/accelerate/ddp.yaml: two gloo processes on a CPU-only machine."""
    import socket

    from tests.utils.data import write_training_rows

    train = write_training_rows(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = REPO_ROOT
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "configuration/accelerate/ddp.yaml"),
         "--main_process_port", str(port), "-m", "trl_scripts.train", "--stage", "1", "--model_name_or_path", "tiny",
         "--train_files", train, "--media_root", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
         "--per_device_train_batch_size", "1", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage 1 on 2 process(es), distributed" in result.stderr
    from modeling_unimoe import UniMoEForCausalLM

    assert UniMoEForCausalLM.from_pretrained(tmp_path / "out").config.audio_towers == ["whisper", "beats"]
