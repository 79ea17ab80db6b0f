"""torchrun worker for tests/models/test_parallelism.py: load a saved checkpoint expert- or tensor-parallel, save logits."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def local_shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.to_local().shape if hasattr(tensor, "to_local") else tensor.shape)


def main(mode: str, implementation: str, checkpoint: str, inputs: str, output: str) -> None:
    config = DistributedConfig(ep_size=2, fsdp_size=2) if mode == "ep" else DistributedConfig(tp_size=2)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, trust_remote_code=True, distributed_config=config, experts_implementation=implementation
    ).eval()
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    with torch.no_grad():
        logits = model(torch.load(inputs)).logits
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    rank = dist.get_rank()
    report = {
        "world_size": dist.get_world_size(),
        "local_experts": sorted({m.num_experts for m in experts}),
        "expert_parallel": all(m._is_expert_parallel for m in experts),
        "local_gate_up_shape": local_shape(experts[0].gate_up_proj),
        "local_q_proj_shape": local_shape(model.model.language_model.layers[0].self_attn.q_proj.weight),
    }
    torch.save(logits, f"{output}.rank{rank}.pt")
    with open(f"{output}.rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
