"""Stage-3 training throughput (samples/s) and peak memory on the `tiny` and `small` presets, for text-only,
single-modality and mixed batches, with the eager and grouped_mm experts, measured in the same run. Ratio = against
the text-only batch with eager experts of the same preset.

The stage-3 model is built as training builds it (a dense model upcycled to 4 experts top-2, LoRA on attention and
experts, routers and connectors trained); batches come from the processor on synthetic media.

    python benchmarks/bench_train.py [--presets tiny small] [--batch 4] [--steps 3]
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modeling_unimoe import UniMoEForCausalLM, UniMoEProcessor
from trl_scripts import load_preset
from trl_scripts.training.presets import CHAT_TEMPLATE_PATH, TINY_TOKENIZER_DIR
from trl_scripts.training.stages import prepare_stage3
from trl_scripts.training.upcycling import upcycle_unimoe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.utils.media import tone  # noqa: E402


def processor_for(config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.model_max_length = 10_000
    # the `small` preset uses the last vocabulary ids as placeholders: give the tiny tokenizer's ids to its config
    config.image_token_id, config.video_token_id, config.audio_token_id = (
        tokenizer.image_token_id, tokenizer.video_token_id, tokenizer.audio_token_id)
    return UniMoEProcessor.from_model_config(config, tokenizer, chat_template=CHAT_TEMPLATE_PATH.read_text(), num_frames=4)


def batches(processor, size: int) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    frames = [image] * 4
    def chat(content):
        return [{"role": "user", "content": content + [{"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}]
    kinds = {
        "text only": [chat([])] * size,
        "image": [chat([{"type": "image", "image": image}])] * size,
        "audio (2 s)": [chat([{"type": "audio", "audio": tone(2.0)}])] * size,
        "mixed": [chat([{"type": "image", "image": image}]), chat([{"type": "video", "video": frames}]),
                  chat([{"type": "audio", "audio": tone(2.0)}]), chat([])] * (size // 4),
    }
    return {
        name: processor.apply_chat_template(convs, tokenize=True, return_dict=True, return_labels=True, processor_kwargs={"padding": True})
        for name, convs in kinds.items()
    }


def train_steps(model, optimizer, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(**batch, output_router_logits=True).loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} batch={args.batch} steps={args.steps} (after one warm-up step)")
    header = f"{'preset':<6} {'batch':<12} {'experts':<10} {'samples/s':>9} {'ratio':>6} {'peak RSS MB':>11}"
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        torch.manual_seed(0)
        config = load_preset(preset, moe_layers=[])
        processor = processor_for(config)
        dense = UniMoEForCausalLM(config)
        model = prepare_stage3(upcycle_unimoe(dense, num_experts=4, num_experts_per_tok=2)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        baseline = None
        for name, batch in batches(processor, args.batch).items():
            for implementation in ("eager", "grouped_mm"):
                model.set_experts_implementation(implementation)
                train_steps(model, optimizer, batch, 1)
                seconds = train_steps(model, optimizer, batch, args.steps)
                rate = args.steps * args.batch / seconds
                baseline = baseline or rate
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{preset:<6} {name:<12} {implementation:<10} {rate:>9.2f} {rate / baseline:>6.2f} {peak:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
