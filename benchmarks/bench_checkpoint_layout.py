"""Saving and loading a checkpoint in the fused expert layout (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, our
default) against the original per-expert layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`,
`save_pretrained(..., save_original_format=True)`), which transformers' conversion mapping stacks at every load.
Both reload to the same logits (checked).

    python benchmarks/bench_checkpoint_layout.py [--preset small] [--repeats 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts import load_preset


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UniMoEForCausalLM(load_preset(args.preset)).eval()
    ids = torch.randint(3, model.config.text_config.vocab_size, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, original in (("fused", False), ("per-expert", True)):
            folder = Path(root) / name
            save_s, _ = best_of(args.repeats, lambda: model.save_pretrained(folder, save_original_format=original))
            load_s, loaded = best_of(args.repeats, lambda: UniMoEForCausalLM.from_pretrained(folder))
            with torch.no_grad():
                torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
            tensors = sum(len(safe_open(str(f), "pt").keys()) for f in folder.glob("*.safetensors"))
            rows.append((name, save_s, load_s, tensors))
    base = rows[0][2]
    print(f"preset={args.preset} ({model.num_parameters() / 1e6:.1f} M params) threads={torch.get_num_threads()} best of {args.repeats}")
    print(f"{'layout':<12} {'save s':>7} {'load s':>7} {'load ratio':>10} {'tensors':>8}")
    for name, save_s, load_s, tensors in rows:
        print(f"{name:<12} {save_s:7.2f} {load_s:7.2f} {load_s / base:10.2f} {tensors:8d}")


if __name__ == "__main__":
    main()
