"""Greedy decoding speed against what the original Uni-MoE v1 code had to do: its KV-cache path was broken, so
every step re-ran the whole sequence, and with media it re-encoded every image and audio window at every step.
Everything is measured in the same run, same model and prompt.

1. Text: decoding with the KV cache versus without it.
2. Image + audio prompt: media encoded once at prefill then the KV cache (ours) versus the media re-encoded and the
   sequence re-run at every step.

    python benchmarks/bench_generate.py [--preset small] [--new_tokens 128] [--prompt_tokens 32 608]
        [--media_new_tokens 64] [--dtype float32]

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
    parser.add_argument("--media_new_tokens", type=int, default=64)
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


    if config.vision_config is not None and config.audio_towers:
        media_benchmark(model, config, args)


def media_prompt(model, config, device) -> dict:
    """An image + 30 s audio prompt, built as tensors (the placeholders already expanded)."""
    vision = config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    audio_tokens = config.num_query_tokens * len(config.audio_towers)  # one 30 s window
    text = torch.randint(3, config.text_config.vocab_size - 3, (16,))
    ids = torch.cat([text[:4], torch.full((image_tokens,), config.image_token_id), torch.full((audio_tokens,), config.audio_token_id), text[4:]])
    inputs = {"input_ids": ids[None].to(device), "pixel_values": torch.randn(1, 3, vision.image_size, vision.image_size, device=device)}
    if "whisper" in config.audio_towers:
        inputs["input_features"] = torch.randn(1, config.speech_config.num_mel_bins, 3000, device=device)
    if "beats" in config.audio_towers:
        inputs["input_values"] = torch.randn(1, 2998, 128, device=device)
        inputs["input_values_mask"] = torch.ones(1, 2998, dtype=torch.long, device=device)
    return {name: value.to(model.dtype) if value.is_floating_point() else value for name, value in inputs.items()}


@torch.no_grad()
def reencoding_decode(model, inputs: dict, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """The original v1 loop: every step runs the towers on all media and the LM on the whole sequence."""
    ids = inputs["input_ids"]
    media = {name: value for name, value in inputs.items() if name != "input_ids"}
    start = time.perf_counter()
    prefill = None
    for _ in range(new_tokens):
        next_token = model(input_ids=ids, **media, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        prefill = prefill if prefill is not None else time.perf_counter() - start
    return prefill, time.perf_counter() - start, ids


@torch.no_grad()
def cached_decode(model, inputs: dict, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    start = time.perf_counter()
    model(**inputs, logits_to_keep=1)  # the prefill alone, timed separately
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=model.config.text_config.pad_token_id,
    )
    return prefill, time.perf_counter() - start, output


def media_benchmark(model, config, args):
    inputs = media_prompt(model, config, args.device)
    cached_decode(model, inputs, 2)  # warm-up
    prefill_ours, total_ours, ours = cached_decode(model, inputs, args.media_new_tokens)
    prefill_orig, total_orig, original = reencoding_decode(model, inputs, args.media_new_tokens)
    prompt = inputs["input_ids"].shape[1]
    print(f"\nimage + 30 s audio prompt ({prompt} tokens: image, audio through {config.audio_towers}), "
          f"{args.media_new_tokens} new tokens")
    header = f"{'decoding':>36} {'prefill s':>9} {'total s':>8} {'tokens/s':>9} {'speed-up':>9} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    print(f"{'media re-encoded every step (v1)':>36} {prefill_orig:>9.3f} {total_orig:>8.2f} "
          f"{args.media_new_tokens / total_orig:>9.1f} {1.0:>9.2f} {'':>11}")
    print(f"{'media encoded once + KV cache':>36} {prefill_ours:>9.3f} {total_ours:>8.2f} "
          f"{args.media_new_tokens / total_ours:>9.1f} {total_orig / total_ours:>9.2f} {str(torch.equal(ours, original)):>11}")


if __name__ == "__main__":
    main()
