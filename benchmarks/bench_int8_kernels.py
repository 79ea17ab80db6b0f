"""Which int8 kernel carries a decoding step on this CPU: matrix products of a few rows against eight weights, per kernel,
as speed-ups over fp32 `F.linear` measured in the same run.

Kernels:
- `bf16`: bfloat16 weights and inputs, `F.linear`.
- `unimoe_int8`: this package's `int8_linear`: int8 weights with per-row scales, per-token int8 activations,
  `torch._int_mm` (plain int8 tensors).
- `fbgemm (deprecated)`: the packed kernel behind `torch.ao.quantization.quantize_dynamic`
  (`torch.ops.quantized.linear_dynamic`); it needs the quantized dtypes torch 2.13 deprecates (pytorch/pytorch#184982).
- `torchao <config>`: torchao's `quantize_` with `Int8WeightOnlyConfig` and `Int8DynamicActivationInt8WeightConfig`,
  when torchao is installed (it is not a dependency of this package).

    python benchmarks/bench_int8_kernels.py [--rows 1 4 16] [--threads 2]
"""

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from modeling_unimoe.quantization_unimoe import int8_linear, quantize_rows
from timing import best_seconds


# [out, in]: the `small` preset's experts (gate_up, down) and a 2048-wide projection
SHAPES = [(2816, 512), (512, 1408), (2048, 2048)]


def fbgemm_kernel(weights):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation of quantized dtypes, which this kernel needs
        packed = []
        for weight in weights:
            quantized, scale = quantize_rows(weight)
            zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(quantized, scale.double(), zero_points, 0)
            packed.append(torch.ops.quantized.linear_prepack(qweight, None))
    return lambda inputs: [torch.ops.quantized.linear_dynamic(inputs, p, True) for p in packed]


def torchao_kernels(weights) -> dict:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    layers = nn.ModuleList()
    for weight in weights:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data.copy_(weight)
        layers.append(layer)
    kernels = {}
    for config in (Int8WeightOnlyConfig(), Int8DynamicActivationInt8WeightConfig()):
        quantized = copy.deepcopy(layers)
        quantize_(quantized, config)
        kernels[f"torchao {type(config).__name__}"] = lambda inputs, layers=quantized: [layer(inputs) for layer in layers]
    return kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    header = None
    for rows in args.rows:
        for out_features, in_features in SHAPES:
            weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(8)]
            inputs = torch.randn(rows, in_features)
            quantized = [quantize_rows(weight) for weight in weights]
            bf16_weights, bf16_inputs = [weight.bfloat16() for weight in weights], inputs.bfloat16()
            kernels = {
                "fp32": lambda x: [F.linear(x, weight) for weight in weights],
                "bf16": lambda x: [F.linear(bf16_inputs, weight) for weight in bf16_weights],
                "unimoe_int8": lambda x: [int8_linear(x, weight, scale) for weight, scale in quantized],
                "fbgemm (deprecated)": fbgemm_kernel(weights),
                **torchao_kernels(weights),
            }
            with torch.inference_mode():
                seconds = {name: best_seconds(lambda kernel=kernel: kernel(inputs), args.repeats) for name, kernel in kernels.items()}
            if header is None:
                header = list(kernels)
                print(f"speed-up over fp32 F.linear, eight [out, in] weights, {args.threads} threads")
                print("| rows | [out, in] | fp32 (us per weight) | " + " | ".join(header[1:]) + " |")
                print("|---|---|---|" + "---|" * (len(header) - 1))
            ratios = " | ".join(f"{seconds['fp32'] / seconds[name]:.2f}" for name in header[1:])
            print(f"| {rows} | [{out_features}, {in_features}] | {seconds['fp32'] / 8 * 1e6:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
