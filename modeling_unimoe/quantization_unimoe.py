"""Int8 quantisation of the Uni-MoE language model, fused experts included, as a transformers quantizer.

    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True,
                                                 quantization_config={"quant_method": "unimoe_int8"})

Every matrix the language model multiplies by at each decoding step is stored in int8 with one scale per output row
(symmetric, per channel; the scales in the model's dtype): the attention projections, dense and shared-expert FFNs, the
routed experts' 3-D `gate_up_proj` / `down_proj`, the token embedding (one scale per token) and the LM head.
Activations are quantised to int8 per token when they arrive (dynamic quantisation), and the product runs in
`torch._int_mm` (int8 x int8 -> int32), then takes both scales. The routers, norms and the modality towers and
connectors stay in the model's dtype: routers and norms are a few kilobytes, and the towers run once per media input in
the prefill, not at every decoding step. The int8 weights are frozen parameters (parameter counts stay the float
model's); inputs get gradients (straight through the activation rounding), the int8 weights none.

Why not torchao or bitsandbytes: bitsandbytes quantises `nn.Linear` only, so fused 3-D experts stay in full precision.
torchao 0.18's int8 configs run slower than fp32 on CPU at these shapes (0.23-1.14x at batch 1, `benchmarks/
bench_int8_kernels.py`), and the fbgemm packed kernels behind `quantize_dynamic` need the quantized dtypes torch 2.13
deprecates (pytorch/pytorch#184982). `torch._int_mm` on plain int8 tensors is the maintained kernel torchao's own
`Int8Tensor` calls; on CPU it runs the batch-1 matrix-vector products 2.8-10x faster than fp32.

A quantised model saves int8 tensors and scales (`model.save_pretrained`), and a saved one loads again through the same
class: its `config.json` carries `quantization_config`. `Trainer` does not train it (`is_trainable` is False);
`model.dequantize()` returns to floating point (the rounding stays).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin


QUANT_METHOD = "unimoe_int8"
_INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one scale per row of the last two dimensions.

    weight [..., O, I] (float) -> (int8 [..., O, I], scale [..., O] in `weight.dtype`); `weight ~= int8 * scale[...,
    None]`. The scales keep the model's dtype, so a saved int8 model reloads bit for bit in any dtype. An all-zero row
    gets scale 1 (its int8 values are 0). Raises `ValueError` for a weight with NaN or infinite values.
    """
    if not torch.isfinite(weight).all():
        raise ValueError(f"cannot quantise a weight of shape {list(weight.shape)} with NaN or infinite values")
    scale = (weight.detach().float().abs().amax(dim=-1) / _INT8_MAX).to(weight.dtype)  # [..., O]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(weight.detach().float() / scale.float().unsqueeze(-1)).clamp_(-_INT8_MAX, _INT8_MAX)
    return quantized.to(torch.int8), scale


def _runs_int_mm(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def dequantize_rows(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """int8 [..., O, I] and scales [..., O] -> fp32 [..., O, I]."""
    return weight.float() * weight_scale.float().unsqueeze(-1)


class UniMoEInt8LinearFunction(torch.autograd.Function):
    """The int8 product; its backward gives the inputs the gradient of the dequantised weight's product (the
    activation rounding passes the gradient straight through, as bitsandbytes' int8 matmul does). The int8 weights
    themselves take no gradient."""

    @staticmethod
    def forward(ctx, flat, weight, weight_scale):
        # flat [T, I] fp32; weight int8 [O, I]; weight_scale [O]
        ctx.save_for_backward(weight, weight_scale)
        if flat.shape[0] == 0 or not _runs_int_mm(flat):
            return F.linear(flat, dequantize_rows(weight, weight_scale))
        input_scale = flat.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / _INT8_MAX
        quantized = torch.round(flat / input_scale).to(torch.int8)  # [T, I], within [-127, 127] by construction
        return torch._int_mm(quantized, weight.t()).float().mul_(input_scale).mul_(weight_scale.float())  # [T, O]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        weight, weight_scale = ctx.saved_tensors
        return grad_output @ dequantize_rows(weight, weight_scale), None, None


def int8_linear(inputs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """`inputs @ (weight * weight_scale[:, None]).T` with int8 weights and per-token int8 activations.

    inputs [..., I] (float); weight int8 [O, I]; weight_scale [O]. Returns [..., O] in `inputs.dtype`. Each row of
    `inputs` is scaled by its own absolute maximum to [-127, 127] (dynamic, per token). On CPU the int8 product runs in
    `torch._int_mm`; elsewhere (its CUDA kernel needs more than 16 rows) the weight is dequantised for the product.
    Differentiable in `inputs` (see `UniMoEInt8LinearFunction`), so a float module before the language model (a tower, a
    connector, LoRA on them) trains against a frozen int8 language model.
    """
    out_features, in_features = weight.shape
    if inputs.shape[-1] != in_features:
        raise ValueError(f"int8_linear: inputs have {inputs.shape[-1]} features, the weight expects {in_features}")
    output = UniMoEInt8LinearFunction.apply(inputs.reshape(-1, in_features).float(), weight, weight_scale)  # [T, O]
    return output.to(inputs.dtype).reshape(*inputs.shape[:-1], out_features)


class UniMoEInt8Linear(nn.Module):
    """An `nn.Linear` with int8 weights: `weight` int8 [out, in] and optional `bias` [out] (frozen parameters, so
    parameter counts stay those of the float model), buffer `weight_scale` [out] in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "UniMoEInt8Linear":
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        quantized, module.weight_scale = quantize_rows(weight)
        module.weight = _frozen(quantized)
        if linear.bias is not None:
            module.bias = _frozen(linear.bias.detach().clone())
        return module

    def to_float(self, dtype: torch.dtype) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=dtype)
        linear.weight.data.copy_(dequantize_rows(self.weight, self.weight_scale))
        if self.bias is not None:
            linear.bias.data.copy_(self.bias)
        return linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = int8_linear(hidden_states, self.weight, self.weight_scale)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class UniMoEInt8Embedding(nn.Module):
    """An `nn.Embedding` with int8 rows: buffers `weight` int8 [vocab, hidden] and `weight_scale` [vocab]. A lookup
    dequantises only the rows it reads, to the scales' dtype (the model's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = _frozen(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "UniMoEInt8Embedding":
        weight = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, weight.dtype, weight.device)
        quantized, module.weight_scale = quantize_rows(weight)
        module.weight = _frozen(quantized)
        return module

    def to_float(self, dtype: torch.dtype) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=self.weight.device, dtype=dtype)
        embedding.weight.data.copy_(dequantize_rows(self.weight, self.weight_scale))
        return embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).float()  # [..., hidden]; IndexError past the vocabulary, as nn.Embedding
        return (rows * self.weight_scale.float()[input_ids].unsqueeze(-1)).to(self.weight_scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, int8"


class UniMoEInt8Experts(nn.Module):
    """`UniMoEExperts` with int8 weights: `gate_up_proj` int8 [E, 2I, H] with buffer `gate_up_proj_scale` [E, 2I], and
    `down_proj` int8 [E, H, I] with `down_proj_scale` [E, H] (weights frozen parameters, scales in the model's dtype).
    Same routing contract: `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`; each
    expert multiplies only the token rows routed to it."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn, dtype=torch.float32, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        int8, scale = dict(dtype=torch.int8, device=device), dict(dtype=dtype, device=device)
        self.gate_up_proj = _frozen(torch.empty(num_experts, 2 * intermediate_dim, hidden_dim, **int8))
        self.register_buffer("gate_up_proj_scale", torch.empty(num_experts, 2 * intermediate_dim, **scale))
        self.down_proj = _frozen(torch.empty(num_experts, hidden_dim, intermediate_dim, **int8))
        self.register_buffer("down_proj_scale", torch.empty(num_experts, hidden_dim, **scale))

    @classmethod
    def from_float(cls, experts: nn.Module) -> "UniMoEInt8Experts":
        weight = experts.gate_up_proj
        module = cls(experts.num_experts, experts.hidden_dim, experts.intermediate_dim, experts.act_fn, weight.dtype, weight.device)
        gate_up, module.gate_up_proj_scale = quantize_rows(experts.gate_up_proj)
        down, module.down_proj_scale = quantize_rows(experts.down_proj)
        module.gate_up_proj, module.down_proj = _frozen(gate_up), _frozen(down)
        return module

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) in `dtype`."""
        gate_up = dequantize_rows(self.gate_up_proj, self.gate_up_proj_scale)
        down = dequantize_rows(self.down_proj, self.down_proj_scale)
        return gate_up.to(dtype), down.to(dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._forward_every_expert(hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)  # [T*k]
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)[: self.num_experts].tolist()
        output = torch.zeros_like(hidden_states)  # [T, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            routed = order[start : start + count]  # (token, slot) pairs of this expert
            start += count
            tokens = routed // top_k
            gate, up = int8_linear(hidden_states[tokens], self.gate_up_proj[expert], self.gate_up_proj_scale[expert]).chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up * top_k_weights.reshape(-1)[routed, None].to(up.dtype)  # [c, I]
            output.index_add_(0, tokens, int8_linear(hidden, self.down_proj[expert], self.down_proj_scale[expert]))
        return output

    def _forward_every_expert(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The compiled path: every expert runs on every token, weighted by its routing weight (0 where not chosen).
        No shape depends on the routing, so the graph has no host sync; each expert reads its int8 weights once."""
        # [T, E]: each token's weight for each expert
        weights = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=hidden_states.dtype, device=hidden_states.device)
        weights = weights.scatter_add(1, top_k_index, top_k_weights.to(hidden_states.dtype))
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            gate, up = int8_linear(hidden_states, self.gate_up_proj[expert], self.gate_up_proj_scale[expert]).chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up * weights[:, expert, None]
            output = output + int8_linear(hidden, self.down_proj[expert], self.down_proj_scale[expert])
        return output

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, int8"


class UniMoEInt8Config(QuantizationConfigMixin):
    """`quantization_config` for `from_pretrained`: int8 language model (see the module docstring).

    Args:
        modules_to_not_convert (`list[str]`, *optional*): qualified module names (e.g. `"lm_head"`,
            `"model.language_model.layers.0"`) kept in floating point, with everything under them. Each must name a
            module of the language model or the LM head, or one above them (`"model"`); an unknown name, or a tower
            (never quantised), is an error.
    """

    def __init__(self, modules_to_not_convert: list[str] | None = None, quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"UniMoEInt8Config: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.modules_to_not_convert = modules_to_not_convert
        self.post_init()

    def post_init(self):
        names = self.modules_to_not_convert
        if names is not None and (not isinstance(names, list) or not all(isinstance(name, str) and name for name in names)):
            raise ValueError(f"UniMoEInt8Config: modules_to_not_convert must be a list of module names, got {names!r}")


def _converted_modules(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """The float modules to replace, by qualified name: every `nn.Linear`, the `UniMoEExperts` and the embedding of the
    language model, and the LM head; none under a name in `skip`."""
    modules = dict(model.named_modules())
    unknown = [name for name in skip if name not in modules]
    if unknown:
        raise ValueError(f"unimoe_int8: modules_to_not_convert names no module of this model: {unknown}")
    prefix = next((name for name, module in modules.items() if type(module).__name__ == "UniMoETextModel"), None)
    if prefix is None:
        raise ValueError(f"unimoe_int8 quantises a Uni-MoE language model; {type(model).__name__} has none")
    scope = [prefix] + (["lm_head"] if "lm_head" in modules else [])

    def inside(name: str, roots: list[str]) -> bool:
        return any(root == "" or name == root or name.startswith(root + ".") for root in roots)

    outside = [name for name in skip if not inside(name, scope) and not any(inside(root, [name]) for root in scope)]
    if outside:
        raise ValueError(
            f"unimoe_int8: modules_to_not_convert names modules outside the language model and head: {outside} "
            f"(the towers and connectors are never quantised; quantised: {scope})"
        )

    selected = {}
    for name, module in modules.items():
        if not inside(name, scope) or inside(name, skip):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "UniMoEExperts":
            selected[name] = module
    tied = getattr(model.config, "tie_word_embeddings", False)
    embedding = f"{prefix}.embed_tokens" if prefix else "embed_tokens"
    if tied and ("lm_head" in selected or embedding in selected):
        raise ValueError(
            "unimoe_int8 does not quantise tied word embeddings (the head would need the embedding's rows twice); "
            f"pass modules_to_not_convert=['lm_head', {embedding!r}] to keep both in floating point"
        )
    return selected


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_language_model(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Replace, in place, the language model's float modules by their int8 versions (computed from their weights)."""
    for name, module in _converted_modules(model, modules_to_not_convert or []).items():
        kind = UniMoEInt8Embedding if isinstance(module, nn.Embedding) else UniMoEInt8Linear if isinstance(module, nn.Linear) else UniMoEInt8Experts
        try:
            _set_module(model, name, kind.from_float(module))
        except ValueError as error:
            raise ValueError(f"unimoe_int8: {name}: {error}") from error
    return model


def _empty_int8_modules(model: nn.Module, modules_to_not_convert: list[str], dtype: torch.dtype) -> None:
    """Replace the modules `quantize_language_model` would, by empty int8 modules on the meta device, for a saved
    int8 checkpoint's tensors to load into."""
    for name, module in _converted_modules(model, modules_to_not_convert).items():
        if isinstance(module, nn.Embedding):
            new = UniMoEInt8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, dtype, "meta")
        elif isinstance(module, nn.Linear):
            new = UniMoEInt8Linear(module.in_features, module.out_features, module.bias is not None, dtype, "meta")
        else:
            new = UniMoEInt8Experts(module.num_experts, module.hidden_dim, module.intermediate_dim, module.act_fn, dtype, "meta")
        _set_module(model, name, new)


def dequantize_language_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace, in place, every int8 module by a float module in `dtype` holding its dequantised weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (UniMoEInt8Linear, UniMoEInt8Embedding)):
            _set_module(model, name, module.to_float(dtype))
        elif isinstance(module, UniMoEInt8Experts):
            _set_module(model, name, _float_experts(model, module, dtype))
    return model


def _float_experts(model: nn.Module, module: UniMoEInt8Experts, dtype: torch.dtype) -> nn.Module:
    # The experts class of the model's own module (remote code may load a second copy of these files).
    modeling = __import__(type(model).__module__, fromlist=["UniMoEExperts", "UniMoEMoeSpec"])
    text_config = model.config.get_text_config(decoder=True)
    with torch.device(module.gate_up_proj.device):
        experts = modeling.UniMoEExperts(modeling.UniMoEMoeSpec.for_text(text_config)).to(dtype)
    gate_up, down = module.dequantized(dtype)
    experts.gate_up_proj.data.copy_(gate_up)
    experts.down_proj.data.copy_(down)
    return experts


class UniMoEInt8Quantizer(HfQuantizer):
    """transformers' quantizer for `quant_method="unimoe_int8"`. Float checkpoints load as usual and are quantised
    once loaded; int8 checkpoints (saved from a quantised model) load straight into int8 modules."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        self.modules_to_not_convert = list(self.quantization_config.modules_to_not_convert or [])
        _converted_modules(model, self.modules_to_not_convert)  # refuse unknown names and tied embeddings before loading
        if self.pre_quantized:
            _empty_int8_modules(model, self.modules_to_not_convert, model.dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            quantize_language_model(model, self.modules_to_not_convert)
        return model

    def _dequantize(self, model, dtype=None):
        return dequantize_language_model(model, dtype or torch.float32)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """`generate` compiles the decoding step (static cache) of a quantised model only when this is True; the int8
        experts then run their graph-friendly path."""
        return True


# Registered the transformers way. Remote code imports these files once per checkpoint folder, and the registration
# functions refuse a name twice: a later copy replaces the entry (the classes are the same code).
if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = UniMoEInt8Config
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = UniMoEInt8Quantizer
else:
    register_quantization_config(QUANT_METHOD)(UniMoEInt8Config)
    register_quantizer(QUANT_METHOD)(UniMoEInt8Quantizer)
