"""Greedy decoding speed with the KV cache against decoding without it (what the original Uni-MoE v1 code had to do:
its cache path was broken, so every step re-ran the whole sequence). Both in the same run, same model and prompt.

    python benchmarks/bench_generate.py [--preset small] [--new_tokens 128] [--prompt_tokens 32 608] [--dtype float32]

608 prompt tokens is one CLIP-L/336 image (576 soft tokens) plus a short question, a typical Uni-MoE prompt.
"""

import argparse
import time

import torch

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts import load_preset


def decode(model, prompt, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    output = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
        pad_token_id=model.config.text_config.pad_token_id,
    )
    return time.perf_counter() - start, output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[32, 608])
    parser.add_argument("--experts_implementation", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_preset(args.preset)
    model = UniMoEForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    model.set_experts_implementation(args.experts_implementation)
    text = config.text_config
    total = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} ({total / 1e6:.1f} M params, {text.num_experts} experts top-{text.num_experts_per_tok}, "
          f"{text.num_hidden_layers} layers) device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"experts={args.experts_implementation} new tokens={args.new_tokens}")
    header = f"{'prompt':>6} {'decoding':>24} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    for prompt_tokens in args.prompt_tokens:
        prompt = torch.randint(3, text.vocab_size, (1, prompt_tokens), device=args.device)
        decode(model, prompt, 4, use_cache=True)  # warm-up
        cached_time, cached = decode(model, prompt, args.new_tokens, use_cache=True)
        uncached_time, uncached = decode(model, prompt, args.new_tokens, use_cache=False)
        same = torch.equal(cached, uncached)
        print(f"{prompt_tokens:>6} {'no cache (original v1)':>24} {uncached_time:>8.2f} {args.new_tokens / uncached_time:>9.1f} "
              f"{1.0:>9.2f} {'':>11}")
        print(f"{prompt_tokens:>6} {'KV cache (DynamicCache)':>24} {cached_time:>8.2f} {args.new_tokens / cached_time:>9.1f} "
              f"{uncached_time / cached_time:>9.2f} {str(same):>11}", flush=True)


if __name__ == "__main__":
    main()
