"""BEATs audio encoder (arXiv 2212.09058) as a transformers model, weight-compatible with the official checkpoints.

`BEATsModel(input_values, padding_mask)` computes what the official `BEATs.extract_features` computes after its
fbank: 16x16 patch embedding of the `[frames, 128]` fbank, LayerNorm, `post_extract_proj`, a convolutional positional
embedding, then a post-LN (DeepNorm) Transformer whose attention adds a T5-style relative position bias gated per
query.
Parameter names are the official state-dict keys, with two differences that `load_beats_checkpoint` (or
`beats_state_dict_from_official`) resolves:

- the weight-normalised positional convolution uses torch's parametrization, so the official
  `encoder.pos_conv.0.weight_g` / `weight_v` are `encoder.pos_conv.0.parametrizations.weight.original0` / `original1`
  (transformers' own legacy renaming maps the same names when it loads a checkpoint);
- the official model shares one relative position table between all layers but stores a copy per layer
  (`encoder.layers.{i}.self_attn.relative_attention_bias.weight`); here only layer 0 owns it, and the loader checks
  that the other copies are identical.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_beats import BEATS_ACTIVATIONS, BEATS_HEAD_CFG_KEYS, BEATsConfig


logger = logging.get_logger(__name__)


@dataclass
class BEATsModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches, encoder_embed_dim)`):
        Encoder output, one row per 16x16 fbank patch in time-major order (`patch = time_step * freq_patches +
        freq_index`; 1496 = 187 x 8 patches for a 30 s window).
    padding_mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
        True where a patch counts as padding (returned when a `padding_mask` was given).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The encoder input and the output of every layer, when `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention probabilities of every layer, when `output_attentions=True` (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    padding_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half of the buckets per direction, exact up to a quarter, then log-spaced up to
    `max_distance` (farther positions share the last bucket)."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + log_ratio * (num_buckets - max_exact)).long().clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


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
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, heads, T, T]
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, T, heads, head_dim]
    return output, probs


class BEATsScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by `scale` (BEATs' layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, hidden_states, scale):
        ctx.scale = scale
        return hidden_states.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.scale, None


class BEATsPositionalConvEmbedding(nn.Sequential):
    """Grouped Conv1d over time, weight-normalised over its kernel axis, then GELU; added to the patch features.

    A Sequential so that the convolution sits at `pos_conv.0`, where the official checkpoints keep it.
    """

    def __init__(self, config: BEATsConfig):
        conv = nn.Conv1d(
            config.encoder_embed_dim,
            config.encoder_embed_dim,
            kernel_size=config.conv_pos,
            padding=config.conv_pos // 2,
            groups=config.conv_pos_groups,
        )
        super().__init__(nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2), nn.GELU())
        self.trim = 1 - config.conv_pos % 2  # an even kernel with padding k // 2 yields one extra step

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self[0](hidden_states.transpose(1, 2))  # [B, C, T + trim]
        hidden_states = hidden_states[..., : hidden_states.shape[-1] - self.trim]
        return self[1](hidden_states).transpose(1, 2)  # [B, T, C]


class BEATsAttention(nn.Module):
    """Multi-head self-attention with a relative position bias that a per-query, per-head gate rescales (gru_rel_pos).

    Layer 0 owns the relative position table (`relative_attention_bias`); the encoder computes the bias once and
    every layer gates it with its own `grep_linear` / `grep_a`.
    """

    def __init__(self, config: BEATsConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.encoder_embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        embed_dim = config.encoder_embed_dim
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if config.relative_position_embedding and layer_idx == 0:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, self.num_heads)
        if config.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)  # two gates, each the sum of 4 logits
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def compute_position_bias(self, length: int) -> torch.Tensor:
        """Relative position bias `[heads, length, length]` from this layer's table (layer 0 only)."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        relative = positions[None, :] - positions[:, None]  # key position - query position
        buckets = relative_position_bucket(relative, self.config.num_buckets, self.config.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        padding_bias: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        hidden_shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, heads, T, head_dim]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_mask = padding_bias  # [B, 1, 1, T] or None
        if position_bias is not None:
            if self.config.gru_rel_pos:
                gates = self.grep_linear(query).view(batch, self.num_heads, length, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)  # [B, heads, T, 1] each
                position_bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias  # [B, heads, T, T]
            attention_mask = position_bias if attention_mask is None else position_bias + attention_mask

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
        output = self.out_proj(output.reshape(batch, length, -1).contiguous())
        return output, weights


class BEATsEncoderLayer(GradientCheckpointingLayer):
    """Attention + feed-forward, post-LN with DeepNorm residual scaling (or pre-LN when `layer_norm_first`)."""

    def __init__(self, config: BEATsConfig, layer_idx: int):
        super().__init__()
        embed_dim = config.encoder_embed_dim
        self.self_attn = BEATsAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.activation_fn = ACT2FN[BEATS_ACTIVATIONS[config.activation_fn]]
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.layer_norm_first = config.layer_norm_first
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        if config.deep_norm:  # DeepNorm's Xavier gains, read by `_init_weights`
            beta = (8 * config.encoder_layers) ** -0.25
            for linear, gain in ((self.self_attn.q_proj, 1.0), (self.self_attn.k_proj, 1.0),
                                 (self.self_attn.v_proj, beta), (self.self_attn.out_proj, beta),
                                 (self.fc1, beta), (self.fc2, beta)):
                linear.deep_norm_gain = gain

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        return F.dropout(hidden_states, p=self.dropout, training=self.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        padding_bias: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        if self.layer_norm_first:
            normed = self.self_attn_layer_norm(hidden_states)
            attended, _ = self.self_attn(normed, position_bias, padding_bias, **kwargs)
            hidden_states = hidden_states + F.dropout(attended, p=self.dropout, training=self.training)
            return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))

        attended, _ = self.self_attn(hidden_states, position_bias, padding_bias, **kwargs)
        attended = F.dropout(attended, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.residual_scale + attended)
        return self.final_layer_norm(hidden_states * self.residual_scale + self.feed_forward(hidden_states))


class BEATsEncoder(nn.Module):
    def __init__(self, config: BEATsConfig):
        super().__init__()
        self.config = config
        self.pos_conv = BEATsPositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.encoder_embed_dim)
        self.layers = nn.ModuleList([BEATsEncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.BoolTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        config = self.config
        padding_bias = None
        if padding_mask is not None:
            hidden_states = hidden_states.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            padding_bias = torch.zeros(padding_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device)
            padding_bias = padding_bias.masked_fill(padding_mask, torch.finfo(hidden_states.dtype).min)
            padding_bias = padding_bias[:, None, None, :]  # [B, 1, 1, T]: padded keys are never attended

        hidden_states = hidden_states + self.pos_conv(hidden_states)
        if not config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = F.dropout(hidden_states, p=config.dropout, training=self.training)

        position_bias = None
        if config.relative_position_embedding:
            position_bias = self.layers[0].self_attn.compute_position_bias(hidden_states.shape[1]).unsqueeze(0)

        for layer in self.layers:
            if config.layer_wise_gradient_decay_ratio != 1.0 and hidden_states.requires_grad:
                hidden_states = BEATsScaleGradient.apply(hidden_states, config.layer_wise_gradient_decay_ratio)
            if self.training and config.encoder_layerdrop > 0 and torch.rand(()).item() < config.encoder_layerdrop:
                continue  # LayerDrop
            hidden_states = layer(hidden_states, position_bias, padding_bias, **kwargs)

        if config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        return hidden_states


class BEATsPreTrainedModel(PreTrainedModel):
    config: BEATsConfig
    config_class = BEATsConfig
    base_model_prefix = "beats"
    main_input_name = "input_values"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["BEATsEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # the relative position bias is an additive float mask
    _can_record_outputs = {
        "hidden_states": BEATsEncoderLayer,
        "attentions": BEATsAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """The official initialisation: N(0, 0.02) linears and tables (Xavier with DeepNorm gains for the attention
        and feed-forward projections), a weight-normalised N(0, sqrt(4 / (k * C))) positional convolution.

        Written per parameter-owning module: transformers does not call `_init_weights` on parameter-less modules of
        remote code.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            gain = getattr(module, "deep_norm_gain", None)
            if gain is None:
                init.normal_(module.weight, mean=0.0, std=std)
            else:
                init.xavier_normal_(module.weight, gain=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):  # the weight-normalised positional convolution
            weight_g, weight_v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
            init.normal_(weight_v, mean=0.0, std=math.sqrt(4.0 / (module.kernel_size[0] * module.in_channels)))
            init.copy_(weight_g, torch.linalg.vector_norm(weight_v, dim=(0, 1), keepdim=True))
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BEATsAttention) and self.config.gru_rel_pos:
            init.ones_(module.grep_a)


class BEATsModel(BEATsPreTrainedModel):
    """BEATs encoder: normalised fbank `input_values` `[batch, frames, mel_bins]` -> `[batch, patches, 768]`."""

    def __init__(self, config: BEATsConfig):
        super().__init__(config)
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BEATsEncoder(config)
        self.post_init()

    @staticmethod
    def patch_padding_mask(padding_mask: torch.BoolTensor, num_patches: int) -> torch.BoolTensor:
        """Frame mask `[B, frames]` -> patch mask `[B, num_patches]`, by the official rule (`forward_padding_mask`):
        drop the last `frames % num_patches` frames, split the rest into `num_patches` consecutive equal groups, and
        call a patch padding when its whole group is padding.

        The official rule groups frames in patch-index order although patches are time-major (each time step has
        `mel_bins // patch` patches), so the mask of patch `p` comes from frames near `2p`, not from its own 16 frames;
        it is reproduced as is, because the pretrained weights (and Uni-MoE's audio connector) saw these masks.
        """
        batch, frames = padding_mask.shape
        usable = frames - frames % num_patches
        return padding_mask[:, :usable].reshape(batch, num_patches, -1).all(dim=-1)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BEATsModelOutput:
        r"""
        input_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_mel_bins)`):
            Normalised Kaldi fbank (`beats_fbank`): 2998 x 128 for a 30 s window at 16 kHz.
        padding_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
            True on padding frames (the official convention; `beats_frame_padding_mask` converts a sample-level
            mask). Reduced to one value per patch (see `patch_padding_mask`); padded patches are zeroed before the
            positional convolution and never attended to.
        """
        if input_values.ndim != 3:
            raise ValueError(
                f"`input_values` must be [batch, frames, mel_bins], got shape {tuple(input_values.shape)}."
            )
        patch = self.config.input_patch_size
        if input_values.shape[1] < patch or input_values.shape[2] < patch:
            raise ValueError(
                f"`input_values` of shape {tuple(input_values.shape)} holds no {patch}x{patch} patch: BEATs needs at "
                f"least {patch} frames and {patch} mel bins."
            )
        patches = self.patch_embedding(input_values.unsqueeze(1).to(self.patch_embedding.weight.dtype))
        hidden_states = patches.flatten(2).transpose(1, 2)  # [B, frames // p * mel // p, embed_dim], time-major
        hidden_states = self.layer_norm(hidden_states)

        if padding_mask is not None:
            padding_mask = padding_mask.to(device=hidden_states.device, dtype=torch.bool)
            if padding_mask.shape != input_values.shape[:2]:
                raise ValueError(
                    f"`padding_mask` must be [batch, frames] = {tuple(input_values.shape[:2])}, "
                    f"got {tuple(padding_mask.shape)}."
                )
            if padding_mask.shape[1] < hidden_states.shape[1]:
                raise ValueError(
                    f"`padding_mask` has {padding_mask.shape[1]} frames for {hidden_states.shape[1]} patches; the "
                    "official frame-to-patch reduction needs at least one frame per patch."
                )
            padding_mask = self.patch_padding_mask(padding_mask, hidden_states.shape[1])

        if self.post_extract_proj is not None:
            hidden_states = self.post_extract_proj(hidden_states)
        hidden_states = self.dropout_input(hidden_states)
        hidden_states = self.encoder(hidden_states, padding_mask=padding_mask, **kwargs)
        return BEATsModelOutput(last_hidden_state=hidden_states, padding_mask=padding_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoints ({"cfg": dict, "model": state dict}, e.g. BEATs_iter3_plus_AS2M.pt)

# Defaults of the official `BEATsConfig` class: a `cfg` dict that omits a field means this value, not ours.
BEATS_OFFICIAL_CFG_DEFAULTS = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
}

# Official keys BEATsModel deliberately does not hold: the AudioSet classification head of the fine-tuned checkpoints
# (`finetuned_model=True`). Nothing else may be dropped.
BEATS_HEAD_KEYS = ("predictor.weight", "predictor.bias")

_WEIGHT_NORM_RENAMES = {
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv.0.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv.0.parametrizations.weight.original1",
}


def beats_config_from_official(cfg: dict) -> BEATsConfig:
    """`BEATsConfig` from an official checkpoint's `cfg` dict (missing fields take the official class defaults)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"An official BEATs `cfg` must be a dict, got {type(cfg).__name__}.")
    unknown = sorted(set(cfg) - set(BEATS_OFFICIAL_CFG_DEFAULTS) - set(BEATS_HEAD_CFG_KEYS))
    if unknown:
        # The official model reads only the fields above, so extra entries cannot change it.
        logger.warning(f"Ignoring `cfg` entries the official BEATs model does not read: {unknown}")
    return BEATsConfig(**{name: cfg.get(name, default) for name, default in BEATS_OFFICIAL_CFG_DEFAULTS.items()})


def beats_state_dict_from_official(
    state_dict: dict[str, torch.Tensor], config: BEATsConfig
) -> dict[str, torch.Tensor]:
    """Official BEATs state dict -> `BEATsModel` state dict (same keys, see the module docstring for the two
    differences). Drops only `BEATS_HEAD_KEYS`; raises ValueError when a shared relative position table differs
    between layers."""
    converted = {}
    shared_table = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    for key, tensor in state_dict.items():
        if key in BEATS_HEAD_KEYS:
            continue
        if config.relative_position_embedding and key.endswith(".self_attn.relative_attention_bias.weight"):
            if key != shared_table:
                reference = state_dict.get(shared_table)
                if reference is None or not torch.equal(tensor, reference):
                    raise ValueError(
                        f"`{key}` is not identical to `{shared_table}` (missing or different); BEATs shares one "
                        "relative position table across layers."
                    )
                continue
        converted[_WEIGHT_NORM_RENAMES.get(key, key)] = tensor
    return converted


def load_beats_checkpoint(path: str | Path) -> BEATsModel:
    """Reads an official BEATs `.pt` (`{"cfg": ..., "model": ...}`) into an eval-mode `BEATsModel`, strictly.

    Every official encoder key must be present and consumed; only `BEATS_HEAD_KEYS` may be left over. Any missing,
    unexpected or mis-shaped weight is a ValueError listing the keys; an unreadable file is a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BEATs checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torch.load failure has many types (pickle, zip, EOF, RuntimeError)
        raise ValueError(f"Cannot read the BEATs checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) or "cfg" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not an official BEATs checkpoint: expected keys 'cfg' and 'model', got {found}.")

    config = beats_config_from_official(checkpoint["cfg"])
    state_dict = beats_state_dict_from_official(checkpoint["model"], config)
    model = BEATsModel(config)
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches (checkpoint vs model): {', '.join(mismatched)}")
    if problems:
        raise ValueError(f"{path} does not match BEATsModel({config.encoder_layers} layers): " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


__all__ = [
    "BEATsModel",
    "BEATsModelOutput",
    "BEATsPreTrainedModel",
    "beats_config_from_official",
    "beats_state_dict_from_official",
    "load_beats_checkpoint",
]
