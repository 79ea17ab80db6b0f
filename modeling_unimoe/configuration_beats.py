"""Configuration of BEATs, the audio encoder of Uni-MoE's audio variant (microsoft/unilm `beats/`)."""

from typing import NoReturn

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


def reject_field(config: PreTrainedConfig, field: str, value, expected: str) -> NoReturn:
    """The error every Uni-MoE config check raises: a `ValueError` naming the config class, the field (dotted for a
    sub-config's), the value it got and what it expects. The checks bind it as `bad = partial(reject_field, self)`."""
    raise ValueError(f"{type(config).__name__}: invalid `{field}`={value!r}; expected {expected}.")


# Official `activation_fn` names -> transformers' ACT2FN names (fairseq's "gelu_accurate" is the tanh approximation).
BEATS_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "gelu_accurate": "gelu_new",
    "gelu_fast": "gelu_new",
    "tanh": "tanh",
    "linear": "linear",
}

# Keys of an official `cfg` dict that only configure the AudioSet classification head, which BEATsModel does not
# build (its weights are in `BEATS_HEAD_KEYS` of modeling_beats).
BEATS_HEAD_CFG_KEYS = ("finetuned_model", "predictor_dropout", "predictor_class")


@strict
class BEATsConfig(PreTrainedConfig):
    r"""
    BEATs (arXiv 2212.09058): a ViT-style encoder over the 128-bin Kaldi log-mel fbank, with 16x16 patches, a
    convolutional positional embedding and a post-LN (deep-norm) Transformer with T5-style relative position buckets
    gated per query (`gru_rel_pos`).

    Field names are those of the official `BEATsConfig` (the `cfg` dict stored in the released `.pt` files), so
    `BEATsConfig(**checkpoint["cfg"])` reproduces the official model; the defaults are those of
    `BEATs_iter3_plus_AS2M.pt`, the audio tower of Uni-MoE v1 (audio). transformers' generic names
    (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`) are aliases.

    input_patch_size (`int`, defaults to 16):
        Side of the square patches cut from the `[frames, mel bins]` fbank image.
    embed_dim (`int`, defaults to 512):
        Channels of the patch embedding; projected to `encoder_embed_dim` by `post_extract_proj` when different.
    conv_bias (`bool`, defaults to `False`):
        Whether the patch embedding convolution has a bias.
    encoder_layers (`int`, defaults to 12):
        Number of Transformer layers.
    encoder_embed_dim (`int`, defaults to 768):
        Width of the Transformer.
    encoder_ffn_embed_dim (`int`, defaults to 3072):
        Width of the feed-forward layers.
    encoder_attention_heads (`int`, defaults to 12):
        Number of attention heads.
    activation_fn (`str`, defaults to `"gelu"`):
        Feed-forward activation, one of the official names `gelu`, `relu`, `gelu_accurate`, `gelu_fast`, `tanh`,
        `linear`.
    layer_norm_first (`bool`, defaults to `False`):
        Pre-LN layers (and a final encoder LayerNorm) instead of post-LN ones.
    deep_norm (`bool`, defaults to `True`):
        DeepNorm: post-LN residuals scaled by `(2 * encoder_layers) ** 0.25`. Incompatible with `layer_norm_first`.
    layer_wise_gradient_decay_ratio (`float`, defaults to 0.6):
        Gradient multiplier applied at the input of every layer (backward only; 1.0 disables it).
    dropout (`float`, defaults to 0.0):
        Dropout after the positional embedding, the attention block and the feed-forward block.
    attention_dropout (`float`, defaults to 0.0):
        Dropout on the attention probabilities.
    activation_dropout (`float`, defaults to 0.0):
        Dropout after the feed-forward activation.
    encoder_layerdrop (`float`, defaults to 0.05):
        Probability of skipping a whole layer in training (LayerDrop).
    dropout_input (`float`, defaults to 0.0):
        Dropout on the patch features before the encoder.
    conv_pos (`int`, defaults to 128):
        Kernel size of the convolutional positional embedding.
    conv_pos_groups (`int`, defaults to 16):
        Groups of the convolutional positional embedding.
    relative_position_embedding (`bool`, defaults to `True`):
        Add a learned relative position bias (one table, owned by layer 0, shared by all layers).
    num_buckets (`int`, defaults to 320):
        Relative position buckets (half per direction; half of those are exact distances, the rest log-spaced).
    max_distance (`int`, defaults to 800):
        Distance at which the log-spaced buckets end.
    gru_rel_pos (`bool`, defaults to `True`):
        Gate the relative position bias per query and head (`grep_linear`, `grep_a`).
    initializer_range (`float`, defaults to 0.02):
        Standard deviation of the normal initialisation of the encoder's linear and embedding weights.
    """

    model_type = "beats"

    attribute_map = {
        "hidden_size": "encoder_embed_dim",
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
        "intermediate_size": "encoder_ffn_embed_dim",
    }

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    layer_wise_gradient_decay_ratio: float | int = 0.6
    dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    encoder_layerdrop: float | int = 0.05
    dropout_input: float | int = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self):
        def bad(field, expected):
            reject_field(self, field, getattr(self, field), expected)

        for field in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                      "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
            if getattr(self, field) < 1:
                bad(field, "a positive integer")
        for field in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                bad(field, "a probability in [0, 1]")
        if self.encoder_embed_dim % self.encoder_attention_heads != 0:
            bad("encoder_embed_dim", f"a multiple of encoder_attention_heads={self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups != 0:
            bad("conv_pos_groups", f"a divisor of encoder_embed_dim={self.encoder_embed_dim}")
        if self.activation_fn not in BEATS_ACTIVATIONS:
            bad("activation_fn", f"one of {sorted(BEATS_ACTIVATIONS)}")
        if self.deep_norm and self.layer_norm_first:
            bad("deep_norm", "False when layer_norm_first=True (DeepNorm is a post-LN scheme)")
        if self.layer_wise_gradient_decay_ratio <= 0:
            bad("layer_wise_gradient_decay_ratio", "a positive gradient multiplier")
        if self.relative_position_embedding:
            if self.num_buckets < 4:
                bad("num_buckets", "at least 4 (two directions, each with exact and log-spaced buckets)")
            if self.max_distance <= self.num_buckets // 4:
                bad("max_distance", f"larger than the exact-bucket range num_buckets // 4 = {self.num_buckets // 4}")
        if self.initializer_range <= 0:
            bad("initializer_range", "a positive standard deviation")


__all__ = ["BEATsConfig"]
