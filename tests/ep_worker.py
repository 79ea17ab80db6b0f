"""torchrun worker for tests/test_expert_parallel.py: load a saved checkpoint with expert parallelism, save logits."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def main(checkpoint: str, inputs: str, output: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, trust_remote_code=True, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2)
    ).eval()
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    with torch.no_grad():
        logits = model(torch.load(inputs)).logits
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_experts": sorted({m.num_experts for m in experts}),
        "expert_parallel": all(m._is_expert_parallel for m in experts),
        "local_gate_up_shape": list(experts[0].gate_up_proj.to_local().shape if hasattr(experts[0].gate_up_proj, "to_local") else experts[0].gate_up_proj.shape),
    }
    torch.save(logits, f"{output}.rank{report['rank']}.pt")
    with open(f"{output}.rank{report['rank']}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
