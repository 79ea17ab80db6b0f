"""A text-only training step (forward + backward) as this package runs it, against the same step with dummy media
pushed through every tower, which the original Uni-MoE code did for every sample so that each branch stayed in the
graph (a zero image, an 8-frame zero video, one speech window and one BEATs window per sample, their features
multiplied by zero and added to the loss). Towers frozen, connectors and LM trainable, as in Uni-MoE's stages.

    python benchmarks/bench_text_only_step.py [--preset small] [--batch 4] [--tokens 128] [--repeats 3]
"""

import argparse
import time

import torch

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts import load_preset


def dummy_media_penalty(model, batch: int) -> torch.Tensor:
    """What the original added per step: every tower and connector run on dummy inputs, contributing exactly 0."""
    backbone, config = model.model, model.config
    size = config.vision_config.image_size
    terms = [
        backbone.get_image_features(torch.zeros(batch, 3, size, size)).pooler_output,
        backbone.get_video_features(torch.zeros(batch, 8, 3, size, size)).pooler_output,
    ]
    if "whisper" in config.audio_towers:
        terms.append(backbone.get_speech_features(torch.ones(batch, config.speech_config.num_mel_bins, 3000)).pooler_output)
    if "beats" in config.audio_towers:
        terms.append(backbone.get_sound_features(torch.ones(batch, 2998, 128)).pooler_output)
    return sum(term.sum() * 0.0 for term in terms)


def step(model, ids, with_dummy_media: bool):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss
    if with_dummy_media:
        loss = loss + dummy_media_penalty(model, ids.shape[0])
    loss.backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = UniMoEForCausalLM(load_preset(args.preset)).train()
    for name in ("vision_tower", "speech_tower", "audio_tower"):
        if hasattr(model.model, name):
            getattr(model.model, name).requires_grad_(False).eval()
    ids = torch.randint(3, model.config.text_config.vocab_size - 3, (args.batch, args.tokens))

    times = {True: [], False: []}
    for with_dummy in (False, True):
        step(model, ids, with_dummy)  # warm-up
    for _ in range(args.repeats):
        for with_dummy in (False, True):
            start = time.perf_counter()
            step(model, ids, with_dummy)
            times[with_dummy].append(time.perf_counter() - start)
    ours, original = min(times[False]), min(times[True])
    print(f"preset={args.preset} batch={args.batch} x {args.tokens} text tokens, threads={torch.get_num_threads()}, best of {args.repeats}")
    header = f"{'training step':>42} {'seconds':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    print(f"{'text only + dummy media in every tower (v1)':>42} {original:>8.3f} {1.0:>6.2f}")
    print(f"{'text only, no tower touched (ours)':>42} {ours:>8.3f} {original / ours:>6.2f}")


if __name__ == "__main__":
    main()
