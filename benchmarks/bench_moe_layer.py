"""MoE block speed against a dense SwiGLU FFN of the same active size, measured in the same run.

The dense baseline has intermediate width k * moe_intermediate_size, so it does the same FLOPs per token as the
routed experts. Ratio = dense time / MoE time (1.0 = as fast as dense; > 1 faster).

Two dense baselines: the LLaMA FFN as users run it (`nn.Linear`, whose float32 CPU products are MKL GEMMs), and the same
FFN through the eager experts kernel as one expert that every token takes with weight 1 ("dense, same kernel": the
products of `_expert_linear`, oneDNN in float32 on CPU, and no router, sort, gather or scatter). The MoE time against
the second is the cost of routing alone.

    python benchmarks/bench_moe_layer.py [--tokens 1 16 256 4096] [--experts 4 8 16] [--dtype float32|bfloat16]
"""

import argparse
import time

import torch

from modeling_unimoe import UniMoETextConfig
from modeling_unimoe.modeling_unimoe import UniMoEGroupedExpertsFunction, UniMoEMLP, UniMoESparseMoeBlock


class DenseThroughExpertsKernel(torch.nn.Module):
    """A dense SwiGLU FFN run by `UniMoEGroupedExpertsFunction` as one expert that every token takes with weight 1."""

    def __init__(self, dense: UniMoEMLP):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).detach()[None].clone())
        self.down_proj = torch.nn.Parameter(dense.down_proj.weight.detach()[None].clone())
        self.act_fn = dense.act_fn

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        ones = flat.new_ones(flat.shape[0])
        output = UniMoEGroupedExpertsFunction.apply(
            flat, ones, self.gate_up_proj, None, self.down_proj, None, [flat.shape[0]], self.act_fn, True
        )
        return output.reshape(hidden_states.shape)


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-N seconds per function, running them in turns so machine noise hits all of them alike.

    The minimum is the least noisy estimate of a CPU-bound kernel's cost on a shared machine.
    """
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def step(module, hidden, backward: bool):
    def run():
        if backward:
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            output = module(hidden)
            (output[0] if isinstance(output, tuple) else output).sum().backward()  # the MoE block also returns router logits
        else:
            with torch.no_grad():
                module(hidden)

    return run


def build(num_experts: int, args, device, dtype):
    config = UniMoETextConfig(
        hidden_size=args.hidden, intermediate_size=args.top_k * args.moe_intermediate, moe_intermediate_size=args.moe_intermediate,
        num_experts=num_experts, num_experts_per_tok=args.top_k, num_attention_heads=8, num_hidden_layers=1,
    )
    torch.manual_seed(0)
    moe = UniMoESparseMoeBlock(config)
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.02)
    dense = UniMoEMLP(config, config.intermediate_size)
    return config, moe.to(device, dtype), dense.to(device, dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe_intermediate", type=int, default=1024)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"moe_intermediate={args.moe_intermediate} k={args.top_k}; dense baseline intermediate={args.top_k * args.moe_intermediate}")
    header = (
        f"{'E':>3} {'T':>5} {'pass':>8} {'dense ms':>9} {'same kernel':>11} {'eager ms':>9} {'ratio':>6} {'vs same':>7} "
        f"{'grouped ms':>10} {'ratio':>6} {'expert MB touched':>17}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for num_experts in args.experts:
        config, moe, dense = build(num_experts, args, device, dtype)
        dense_kernel = DenseThroughExpertsKernel(dense)
        with torch.no_grad():
            probe = torch.randn(1, 8, args.hidden, device=device, dtype=dtype)
            torch.testing.assert_close(dense_kernel(probe), dense(probe), rtol=1e-2, atol=1e-3)
        expert_bytes = moe.experts.gate_up_proj[0].numel() * 3 // 2 * moe.experts.gate_up_proj.element_size()
        for tokens in args.tokens:
            hidden = torch.randn(1, tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
            # distinct experts a batch of this size can touch: the weight bytes a step must read
            touched = min(num_experts, tokens * args.top_k) * expert_bytes / 2**20
            repeats = args.repeats if tokens >= 256 else args.repeats * 10
            for backward in (False, True):

                def moe_with(implementation):
                    run = step(moe, hidden, backward)

                    def timed_run():
                        config._experts_implementation = implementation
                        run()

                    return timed_run

                times = timed_interleaved(
                    {
                        "dense": step(dense, hidden, backward),
                        "dense, same kernel": step(dense_kernel, hidden, backward),
                        "eager": moe_with("eager"),
                        "grouped_mm": moe_with("grouped_mm"),
                    },
                    repeats,
                )
                dense_time, same_kernel, row = times.pop("dense"), times.pop("dense, same kernel"), times
                results[(num_experts, tokens, backward)] = (dense_time, row)
                print(
                    f"{num_experts:>3} {tokens:>5} {'fwd+bwd' if backward else 'fwd':>8} {dense_time * 1e3:>9.2f} "
                    f"{same_kernel * 1e3:>11.2f} {row['eager'] * 1e3:>9.2f} {dense_time / row['eager']:>6.2f} "
                    f"{same_kernel / row['eager']:>7.2f} {row['grouped_mm'] * 1e3:>10.2f} "
                    f"{dense_time / row['grouped_mm']:>6.2f} {touched:>17.1f}",
                    flush=True,
                )

    largest = max(args.tokens)
    if len(args.experts) > 1:
        print(f"\nGrowth of MoE time from E={args.experts[0]} to E={args.experts[-1]} at T={largest} (sparse compute: ~1.0):")
        for backward in (False, True):
            for implementation in ("eager", "grouped_mm"):
                first = results[(args.experts[0], largest, backward)][1][implementation]
                last = results[(args.experts[-1], largest, backward)][1][implementation]
                print(f"  {'fwd+bwd' if backward else 'fwd':>8} {implementation:>10}: x{last / first:.2f}")


if __name__ == "__main__":
    main()
