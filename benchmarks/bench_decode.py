"""Greedy decoding against the machine's memory bandwidth and against transformers' in-tree MoE model, in one run.

A decoding step reads every weight it uses once: attention, norms, routers, the experts the batch's tokens chose, the LM
head, and the KV cache so far. On a CPU that read, not the arithmetic, bounds the step. This script measures the
machine's bandwidth (a STREAM-like copy and read of large tensors), computes the bytes each step reads from the config,
and reports each configuration's tokens/s, its achieved GB/s and their ratio to the measured read bandwidth.

The in-tree baseline is transformers' `MixtralForCausalLM` of the same shapes with our weights copied in: LLaMA
attention, softmax-then-top-k routing renormalised (our `topk_softmax`), SwiGLU experts in the same fused layout. Its
logits are checked against ours before anything is timed.

Configurations: ours with the dynamic cache (the default: transformers' grouped_mm experts), with the eager experts
kernel (`set_experts_implementation("eager")`: float32 CPU products in oneDNN), with a static cache, with a static cache
and the decoding step compiled (`torch.compile`, fullgraph; the eager experts then run as transformers' batched
experts), the int8 language model (`quantization_config={"quant_method": "unimoe_int8"}`; its step reads one byte per
weight) with the dynamic cache and compiled, and Mixtral with the dynamic cache. Before the table: the resident weight
memory of the float and the int8 model (parameters and buffers). The first rows per batch size time the step's weight
products alone (`product_seconds`), in torch's `F.linear` and, in float32, in the eager experts' `_expert_linear`
(oneDNN): the rate these kernels reach on the step's shapes, the ceiling of any step built from them.

    python benchmarks/bench_decode.py [--preset small] [--batch_sizes 1 4 16] [--dtypes float32 bfloat16]
"""

import argparse
import copy
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.configuration_utils import CompileConfig

from modeling_unimoe import UniMoEForCausalLM, quantize_language_model
from modeling_unimoe.modeling_unimoe import _expert_linear
from timing import best_seconds
from trl_scripts import load_preset


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict:
    """GB/s of a large copy (bytes read + written) and of a large read (a sum), best of `repeats`, as STREAM does."""
    source = torch.rand(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    nbytes = source.numel() * source.element_size()
    copy = best_seconds(lambda: target.copy_(source), repeats)
    read = best_seconds(lambda: source.sum(), repeats)
    return {"copy": 2 * nbytes / copy / 1e9, "read": nbytes / read / 1e9}


def bytes_per_step(config, batch: int, context: int, element_size: int, kv_element_size: int | None = None) -> int:
    """Bytes one decoding step reads: attention, norms and routers of every layer, the experts the batch chose (the
    expected number of distinct experts under uniform routing: E (1 - (1 - k / E)^B)), dense FFNs, the final norm, the
    LM head, the batch's embedding rows, and the KV cache of `context` positions per row. Weights take `element_size`
    bytes each, the cache `kv_element_size` (default: the same; an int8 model's per-row scales are left out, < 1 %)."""
    text = config.get_text_config()
    hidden, head_dim = text.hidden_size, text.head_dim
    products = sum(rows * columns * count for (rows, columns), count in step_products(config, batch).items())
    norms_and_routers = text.num_hidden_layers * 2 * hidden + len(text.sparse_layer_indices) * text.num_experts * hidden + hidden
    weights = products + norms_and_routers + batch * hidden  # + the batch's embedding rows
    kv_cache = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * context * batch
    return int(weights * element_size + kv_cache * (kv_element_size or element_size))


def step_products(config, batch: int) -> dict:
    """The weight products of one decoding step: {(out, in): how many}, as `bytes_per_step` counts them (attention
    projections of every layer, the expected distinct experts' two fused products per sparse layer, dense FFNs, the
    LM head); routers and norms (a few KB) are left out."""
    text = config.get_text_config()
    hidden, head_dim = text.hidden_size, text.head_dim
    sparse = len(text.sparse_layer_indices)
    dense = text.num_hidden_layers - sparse
    distinct = text.num_experts * (1 - (1 - text.num_experts_per_tok / text.num_experts) ** batch)
    products = {}
    for shape, count in [
        ((text.num_attention_heads * head_dim, hidden), 1), ((text.num_key_value_heads * head_dim, hidden), 2),
        ((hidden, text.num_attention_heads * head_dim), 1),
    ]:  # fmt: skip
        products[shape] = products.get(shape, 0) + count * text.num_hidden_layers
    products[(2 * text.moe_intermediate_size, hidden)] = distinct * sparse
    products[(hidden, text.moe_intermediate_size)] = distinct * sparse
    if dense:
        products[(2 * text.intermediate_size, hidden)] = dense
        products[(hidden, text.intermediate_size)] = dense
    products[(text.vocab_size, hidden)] = 1
    return products


def product_seconds(config, batch: int, dtype: torch.dtype, linear=torch.nn.functional.linear, repeats: int = 5) -> float:
    """Seconds the step's weight products alone take in `linear` (torch's `F.linear` by default) on `batch` rows: each
    shape timed over copies that overflow the caches (>= 256 MB), as a decoding step reads each weight once."""
    total = 0.0
    for (rows, columns), count in step_products(config, batch).items():
        copies = max(1, int(256e6 // (rows * columns * torch.finfo(dtype).bits // 8)))
        weights = [torch.randn(rows, columns).to(dtype) for _ in range(copies)]
        inputs = torch.randn(batch, columns).to(dtype)
        seconds = best_seconds(lambda: [linear(inputs, weight) for weight in weights], repeats)
        total += count * seconds / copies
    return total


def mixtral_twin(model: UniMoEForCausalLM) -> MixtralForCausalLM:
    """transformers' Mixtral with our language model's shapes and weights (`topk_softmax` routing, no shared experts)."""
    text = model.config.get_text_config()
    if text.router_type != "topk_softmax" or text.num_shared_experts or text.sparse_layer_indices != list(range(text.num_hidden_layers)):
        raise ValueError("the Mixtral twin needs topk_softmax routing, no shared experts and experts in every layer")
    config = MixtralConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.moe_intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim, num_local_experts=text.num_experts,
        num_experts_per_tok=text.num_experts_per_tok, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, rope_parameters=text.rope_parameters, tie_word_embeddings=False,
        hidden_act=text.hidden_act, pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )
    twin = MixtralForCausalLM(config).to(model.dtype).eval()
    state = {key.replace("model.language_model.", "model."): value for key, value in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    return twin


class StepClock(StoppingCriteria):
    """Records the time of each decoding step (`generate` asks its stopping criteria once per new token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def decode_seconds(model, ids: torch.Tensor, new_tokens: int, repeats: int, **generate_kwargs) -> float:
    """Seconds per decoding step: the median gap between consecutive new tokens, past the first two (prefill,
    compilation), the least of `repeats` runs after a warm-up run."""
    kwargs = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, **generate_kwargs}
    results = []
    for run in range(repeats + 1):
        clock = StepClock()
        model.generate(ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
        gaps = sorted(later - earlier for earlier, later in zip(clock.times[2:], clock.times[3:]))
        if run:  # the first run warms up (and compiles)
            results.append(gaps[len(gaps) // 2])
    return min(results)


def compiled_kwargs() -> dict:
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    return {"cache_implementation": "static", "compile_config": config}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompt_length", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    bandwidth = measure_bandwidth()
    print(f"memory bandwidth: copy {bandwidth['copy']:.1f} GB/s, read {bandwidth['read']:.1f} GB/s ({torch.get_num_threads()} threads)")
    print("| dtype | batch | configuration | tokens/s | bytes/step (MB) | GB/s | of read bandwidth | time vs Mixtral | speed-up vs default |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = UniMoEForCausalLM(load_preset(args.preset, text_only=True)).to(dtype).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02)
        twin = mixtral_twin(model)
        int8 = quantize_language_model(copy.deepcopy(model))
        float_bytes, int8_bytes = model.get_memory_footprint(), int8.get_memory_footprint()
        print(f"{dtype_name}: resident weights {float_bytes / 1e6:.0f} MB, int8 {int8_bytes / 1e6:.0f} MB ({int8_bytes / float_bytes:.2f}x)")
        check = torch.randint(3, model.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours, theirs = model(check).logits.float(), twin(check).logits.float()
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if not torch.allclose(ours, theirs, atol=tolerance, rtol=0):
            raise SystemExit(f"{dtype_name}: logits differ from Mixtral's by {(ours - theirs).abs().max():.3g}")
        eager = copy.deepcopy(model)
        eager.set_experts_implementation("eager")
        configurations = {
            "ours, dynamic cache (default)": (model, {}),
            "ours, eager experts, dynamic cache": (eager, {}),
            "ours, static cache": (model, {"cache_implementation": "static"}),
            "ours, static cache + torch.compile": (model, compiled_kwargs()),
            "ours, eager experts, static cache + torch.compile": (eager, compiled_kwargs()),
            "ours, int8 (unimoe_int8), dynamic cache": (int8, {}),
            "ours, int8, static cache + torch.compile": (int8, compiled_kwargs()),
            "Mixtral (transformers), dynamic cache": (twin, {}),
        }
        for batch in args.batch_sizes:
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(6, vocab, (batch, args.prompt_length), generator=torch.Generator().manual_seed(2))
            seconds = {name: decode_seconds(m, ids, args.new_tokens, args.repeats, **kw) for name, (m, kw) in configurations.items()}
            context = args.prompt_length + args.new_tokens // 2
            element_size = torch.finfo(dtype).bits // 8
            product_bytes = bytes_per_step(model.config, batch, 0, element_size)
            kernels = (("F.linear", torch.nn.functional.linear), ("the eager experts' `_expert_linear`", _expert_linear))
            for kernel, linear in kernels if dtype == torch.float32 else kernels[:1]:  # the same kernel in bf16
                products = product_seconds(model.config, batch, dtype, linear)
                print(
                    f"| {dtype_name} | {batch} | the step's weight products alone ({kernel}; no cache, no other op) | "
                    f"{batch / products:.1f} | {product_bytes / 1e6:.0f} | {product_bytes / products / 1e9:.1f} | "
                    f"{product_bytes / products / 1e9 / bandwidth['read']:.2f} | "
                    f"{products / seconds['Mixtral (transformers), dynamic cache']:.2f} | "
                    f"{seconds['ours, dynamic cache (default)'] / products:.2f} |"
                )
            for name, step in seconds.items():
                weight_size = 1 if "int8" in name else element_size
                step_bytes = bytes_per_step(model.config, batch, context, weight_size, element_size)
                achieved = step_bytes / step / 1e9
                print(
                    f"| {dtype_name} | {batch} | {name} | {batch / step:.1f} | {step_bytes / 1e6:.0f} | {achieved:.1f} | "
                    f"{achieved / bandwidth['read']:.2f} | {step / seconds['Mixtral (transformers), dynamic cache']:.2f} | "
                    f"{seconds['ours, dynamic cache (default)'] / step:.2f} |"
                )
        torch._dynamo.reset()
    print("time vs Mixtral < 1: faster than transformers' in-tree model; of read bandwidth: 1.0 = the memory limit; "
          "speed-up vs default: the default's step time over this one's")


if __name__ == "__main__":
    main()
