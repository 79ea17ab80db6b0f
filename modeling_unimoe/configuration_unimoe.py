"""Configurations of Uni-MoE: the sparse-MoE LLaMA decoder and the composite multimodal model."""

# First: it refuses a transformers older than the supported range before the imports below need newer names.
from .transformers_compat import BUILDS_SUB_CONFIGS, CACHE_NAME, SubConfigSpec, build_sub_configs  # isort: skip

import math
from functools import partial

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.activations import ACT2CLS
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from .configuration_beats import BEATsConfig, reject_field


ROUTER_TYPES = ("topk_softmax", "softmax_topk")
# UniMoEConfig's fields that a text-only config (UniMoETextConfig at the top of config.json) cannot hold
COMPOSITE_ONLY_FIELDS = {
    "text_config", "vision_config", "speech_config", "audio_config", "audio_qformer_config", "image_token_id",
    "video_token_id", "audio_token_id", "audio_towers", "vision_feature_layer", "projector_num_experts",
    "vision_moe_layers",
}
MOE_LAYER_PATTERNS = ("all", "even", "odd")
ACTIVATIONS = tuple(sorted(ACT2CLS))  # the names `ACT2FN` builds (LLaMA FFN, projector, CLIP, Whisper, Q-Former)
ROPE_TYPES = ("default", *sorted(ROPE_INIT_FUNCTIONS))


def is_weight(value) -> bool:
    """A loss weight or probability bound: a finite number that is not negative (NaN compares False to everything, so
    `value < 0` alone lets it through)."""
    return math.isfinite(value) and value >= 0


def check_config_file(config_dict, source) -> dict:
    """`config_dict` as read from `source`'s config.json: a `ValueError` when it is not a JSON object, or names no
    `model_type` (a config without fields would build the default 7B-class model around the checkpoint)."""
    if not isinstance(config_dict, dict):
        raise ValueError(f"the config.json of {source} holds a JSON {type(config_dict).__name__}, not an object of config fields")
    if not config_dict.get("model_type"):
        raise ValueError(
            f"the config.json of {source} names no model_type (a Uni-MoE config has 'unimoe', or 'unimoe_text' for "
            "the text-only layout)"
        )
    return config_dict


def refuse_foreign_model_type(config_class, config_dict: dict):
    """Raises `ValueError` when a config dict names another architecture: transformers only warns and would build a
    default-sized Uni-MoE (a 7B-class MoE) around a checkpoint whose weights cannot fit it."""
    model_type = config_dict.get("model_type")
    if model_type is not None and model_type != config_class.model_type:
        raise ValueError(
            f"{config_class.__name__} reads `model_type` {config_class.model_type!r}, but this config is {model_type!r}: "
            "the folder holds another architecture. Build Uni-MoE from a dense LLaMA with `unimoe-upcycle`, or from an "
            "original Uni-MoE checkpoint with `unimoe-convert-original`."
        )


@strict
class UniMoETextConfig(PreTrainedConfig):
    r"""
    A LLaMA decoder whose feed-forward layers are (partly) sparse Mixture-of-Experts.

    MoE fields use the transformers names (`num_experts`, `num_experts_per_tok`, `moe_intermediate_size`,
    `norm_topk_prob`, `router_aux_loss_coef`, `output_router_logits`).

    moe_layers (`str` or `list[int]`, defaults to `"all"`):
        Which decoder layers are sparse: `"all"`, `"even"` (0, 2, ...; Uni-MoE v1 audio / v1.5), `"odd"`, or an
        explicit list of layer indices. The other layers keep a dense FFN of `intermediate_size`.
    moe_intermediate_size (`int`, *optional*):
        Width of one expert's FFN. Defaults to `intermediate_size`: Uni-MoE experts are full FFN copies.
    router_type (`str`, defaults to `"topk_softmax"`):
        `"topk_softmax"`: pick the k largest logits, softmax over those k (Uni-MoE v1, Mixtral).
        `"softmax_topk"`: softmax over all experts, then top-k (GShard, CuMo); renormalised when `norm_topk_prob`.
    norm_topk_prob (`bool`, defaults to `True`):
        Renormalise the top-k probabilities of `"softmax_topk"` to sum to one (`"topk_softmax"` always does).
    router_aux_loss_coef (`float`, defaults to 0.01):
        Weight of the load-balancing loss (mean over sparse layers of `E * sum_e f_e * P_e`, minimal 1.0).
    router_z_loss_coef (`float`, defaults to 0.0):
        Weight of the router z-loss (mean squared log-sum-exp of the router logits, ST-MoE).
    num_shared_experts (`int`, defaults to 0):
        Always-active experts per sparse layer, implemented as one dense FFN of
        `num_shared_experts * moe_intermediate_size` whose output is added to the routed experts'.
    """

    model_type = "unimoe_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = [CACHE_NAME]  # the cache is no prediction (Trainer.prediction_step)

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # LLaMA (Vicuna-7B v1.5 by default)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Mixture-of-Experts
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    moe_layers: str | list[int] = "all"
    router_type: str = "topk_softmax"
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_config_file(config_dict, pretrained_model_name_or_path)
        if config_dict.get("model_type") == cls.model_type and cls.base_config_key in config_dict:
            # transformers would read that nested dict as the config (it does so for a composite config)
            raise ValueError(
                f"the config.json of {pretrained_model_name_or_path} is a text-only config (model_type "
                f"'unimoe_text') holding a '{cls.base_config_key}': the text-only layout has its fields at the top"
            )
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        refuse_foreign_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        composite = sorted(set(kwargs) & COMPOSITE_ONLY_FIELDS)
        if composite:  # kept as stray attributes, they would be silently ignored (or misread by tools)
            raise ValueError(
                f"UniMoETextConfig (model_type 'unimoe_text', the text-only layout) has no towers, but got the "
                f"composite config's fields {composite}: a model with towers has model_type 'unimoe' and its "
                "language model's fields under 'text_config'"
            )
        self._check_decoder_fields()  # first: the defaults below divide by these
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if isinstance(self.moe_layers, (list, tuple)):
            self.moe_layers = sorted(int(i) for i in self.moe_layers)
        self._check_moe_fields()
        super().__post_init__(**kwargs)
        self._check_rope_fields()  # after transformers has standardised `rope_parameters`

    def _check_decoder_fields(self):
        """The LLaMA fields whose bad values fail only when the model is built or first run (a KeyError on the
        activation, a negative tensor dimension, a division by zero) or silently give NaN."""
        bad = partial(reject_field, self)

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, field) < 1:
                bad(field, getattr(self, field), "a positive integer")
        if self.num_hidden_layers < 0:
            bad("num_hidden_layers", self.num_hidden_layers, "0 or more decoder layers")
        if self.num_key_value_heads is not None and self.num_key_value_heads < 1:
            bad("num_key_value_heads", self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            bad(
                "num_attention_heads", self.num_attention_heads,
                f"a divisor of hidden_size={self.hidden_size} (or set `head_dim` explicitly)",
            )
        if self.head_dim is not None and self.head_dim < 1:
            bad("head_dim", self.head_dim, "a positive integer")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", self.hidden_act, f"one of transformers' activations {ACTIVATIONS}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            bad("rms_norm_eps", self.rms_norm_eps, "a small positive number (1e-5 or 1e-6 for LLaMA)")
        if not is_weight(self.initializer_range):
            bad("initializer_range", self.initializer_range, "a non-negative standard deviation")
        if not (is_weight(self.attention_dropout) and self.attention_dropout <= 1):
            bad("attention_dropout", self.attention_dropout, "a probability in [0, 1]")
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", self.pad_token_id, f"None or an id below vocab_size={self.vocab_size} (the embedding's padding row)")

    def _check_rope_fields(self):
        rope = self.rope_parameters or {}
        rope_type, theta = rope.get("rope_type", "default"), rope.get("rope_theta")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"UniMoETextConfig: invalid `rope_parameters['rope_type']`={rope_type!r}; expected one of {ROPE_TYPES}."
            )
        if theta is not None and not (math.isfinite(theta) and theta > 0):
            raise ValueError(
                f"UniMoETextConfig: invalid `rope_parameters['rope_theta']`={theta!r}; expected a positive base "
                "wavelength (10000.0 for LLaMA 2): the rotary frequencies would be inf or NaN."
            )

    def _check_moe_fields(self):
        bad = partial(reject_field, self)

        if self.num_experts < 1:
            bad("num_experts", self.num_experts, "at least 1")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            bad("num_experts_per_tok", self.num_experts_per_tok, f"between 1 and num_experts={self.num_experts}")
        if self.router_type not in ROUTER_TYPES:
            bad("router_type", self.router_type, f"one of {ROUTER_TYPES}")
        if self.moe_intermediate_size < 1:
            bad("moe_intermediate_size", self.moe_intermediate_size, "a positive width")
        if self.num_shared_experts < 0:
            bad("num_shared_experts", self.num_shared_experts, "0 or more")
        if not is_weight(self.router_aux_loss_coef):
            bad("router_aux_loss_coef", self.router_aux_loss_coef, "a finite, non-negative weight")
        if not is_weight(self.router_z_loss_coef):
            bad("router_z_loss_coef", self.router_z_loss_coef, "a finite, non-negative weight")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            bad("num_key_value_heads", self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        if isinstance(self.moe_layers, str):
            if self.moe_layers not in MOE_LAYER_PATTERNS:
                bad("moe_layers", self.moe_layers, f"one of {MOE_LAYER_PATTERNS} or a list of layer indices")
        else:
            out_of_range = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
            if out_of_range:
                bad("moe_layers", self.moe_layers, f"indices in [0, {self.num_hidden_layers - 1}]; out of range: {out_of_range}")
            if len(set(self.moe_layers)) != len(self.moe_layers):
                bad("moe_layers", self.moe_layers, "distinct layer indices")

    @property
    def sparse_layer_indices(self) -> list[int]:
        """Indices of the decoder layers whose FFN is a sparse MoE block."""
        layers = range(self.num_hidden_layers)
        if self.moe_layers == "all":
            return list(layers)
        if self.moe_layers == "even":
            return [i for i in layers if i % 2 == 0]
        if self.moe_layers == "odd":
            return [i for i in layers if i % 2 == 1]
        return list(self.moe_layers)


AUDIO_TOWERS = ("whisper", "beats")
VIDEO_POOLING = ("mean", "none")


@strict
class UniMoEConfig(PreTrainedConfig):
    r"""
    The composite Uni-MoE configuration: the MoE language model plus any subset of the modality towers.

    text_config ([`UniMoETextConfig`]): the sparse-MoE LLaMA decoder.
    vision_config (`CLIPVisionConfig`, *optional*): image and video-frame tower (CLIP ViT-L/14-336 in the paper).
    speech_config (`WhisperConfig`, *optional*): speech tower (the Whisper encoder) and the speech aligner, made of
        `speech_aligner_layers` Whisper decoder layers over `num_query_tokens` learned queries.
    audio_config ([`BEATsConfig`], *optional*): sound tower (BEATs iter3+), read by a Q-Former aligner.
    audio_qformer_config (`Blip2QFormerConfig`, *optional*): that Q-Former (defaults to the original's: 12 layers,
        width 768, cross-attention every second layer, reading the BEATs width).
    image_token_id / video_token_id / audio_token_id (`int`, *optional*): the placeholder token ids that the
        processor expands to the exact number of soft tokens, which are replaced by the projected features.
    vision_feature_layer (`int`, defaults to -2): CLIP hidden state used (patch tokens only; CLS dropped).
    projector_hidden_act (`str`, defaults to `"gelu"`): activation of the `mlp2x_gelu` vision projector.
    video_pooling (`str`, defaults to `"mean"`): `"mean"` averages the frames' features (the paper: one image's
        worth of tokens per video, frame order lost); `"none"` keeps every frame's tokens in sequence.
    num_query_tokens (`int`, defaults to 50): audio tokens per audio window and per audio tower.
    audio_window_seconds (`int`, defaults to 30): length of the windows an audio item is cut into; each window is
        encoded on its own. Whisper's encoder reads exactly `2 * speech_config.max_source_positions` mel frames
        (100 per second), so with a speech tower the two must agree (30 s and 1500 positions for real Whisper; the
        `tiny` preset uses 4 s windows).
    max_audio_windows (`int`, defaults to 20): the most windows one audio item may use (10 minutes of 30 s windows).
    audio_towers (`list[str]`, *optional*): which towers encode an `<audio>` item, in token order: `["whisper"]`
        (speech), `["beats"]` (sounds) or both. Defaults to every audio tower the config has.
    speech_aligner_layers (`int`, *optional*): Whisper decoder layers in the speech aligner (defaults to all of
        `speech_config.decoder_layers`, as in the paper).
    mask_audio_padding (`bool`, defaults to `True`): the aligners' queries ignore the padding of each audio window
        (the Whisper and BEATs positions past the clip's end). The original attended to it: converted original
        checkpoints set this to `False` to compute exactly what they were trained to.
    projector_num_experts (`int`, defaults to 1): CuMo option; above 1 the vision projector is a sparse MoE of that
        many `mlp2x_gelu` experts (top-`projector_num_experts_per_tok`), upcycled from a trained projector.
    vision_moe_layers (`list[int]`): CuMo option; CLIP layers whose MLP becomes a sparse MoE of
        `vision_num_experts` copies (top-`vision_num_experts_per_tok`). Only the layers that feed
        `vision_feature_layer` (`vision_feature_depth`) run, so only they can be listed.
    mm_router_aux_loss_coef / mm_router_z_loss_coef (`float`): weights of those routers' balance and z-losses, each
        router group (the projector; CLIP, averaged over its MoE layers) weighted on its own, as in CuMo (which used
        0.1 and 0.01).
    """

    model_type = "unimoe"
    # Not predictions (Trainer.prediction_step): the cache, and the media features and CuMo's router outputs, which
    # only batches with that medium carry (Trainer would zip them away across batches).
    keys_to_ignore_at_inference = [
        CACHE_NAME, "image_hidden_states", "video_hidden_states", "audio_hidden_states", "projector_router_logits",
        "vision_router_logits", "projector_aux_loss", "projector_z_loss", "vision_aux_loss", "vision_z_loss",
    ]
    # The language model's own plans (text config) apply under `model.language_model`; nothing at this level.
    base_model_fsdp_plan = {}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=UniMoETextConfig),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
        "speech_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
        "audio_config": SubConfigSpec(config_class=BEATsConfig, optional=True),
        "audio_qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer", optional=True),
    }
    if not BUILDS_SUB_CONFIGS:  # transformers < 5.20 reads this table instead (later releases derive it)
        sub_configs = {key: spec.config_class for key, spec in sub_configs_defaults.items()}

    text_config: dict | UniMoETextConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    speech_config: dict | PreTrainedConfig | None = None
    audio_config: dict | BEATsConfig | None = None
    audio_qformer_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    video_pooling: str = "mean"
    num_query_tokens: int = 50
    audio_window_seconds: int = 30
    max_audio_windows: int = 20
    audio_towers: list[str] | None = None
    speech_aligner_layers: int | None = None
    mask_audio_padding: bool = True
    projector_num_experts: int = 1
    projector_num_experts_per_tok: int = 2
    vision_moe_layers: list[int] | None = None
    vision_num_experts: int = 4
    vision_num_experts_per_tok: int = 2
    mm_router_aux_loss_coef: float = 0.01
    mm_router_z_loss_coef: float = 0.001
    tie_word_embeddings: bool = False

    @staticmethod
    def _wrap_text_only(config_dict: dict) -> dict:
        """A text-only checkpoint's config (`UniMoETextForCausalLM`'s flat layout, `UniMoETextConfig` at the top) as
        the composite config without towers; any other dict unchanged. A dict with the language model's fields at the
        top but another `model_type` is refused: read as a composite config, it would build the default 7B language
        model around the checkpoint."""
        if config_dict.get("model_type") != UniMoETextConfig.model_type:
            flat = sorted(set(config_dict) & {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"})
            ours = config_dict.get("model_type") in (None, UniMoEConfig.model_type)  # others: `refuse_foreign_model_type`
            if ours and flat and "text_config" not in config_dict:
                raise ValueError(
                    f"this config has the language model's fields {flat} at the top, as the text-only layout does, but "
                    f"model_type {config_dict.get('model_type')!r}: a text-only Uni-MoE config has model_type "
                    "'unimoe_text' (a composite one nests them under 'text_config')"
                )
            return config_dict
        text = {key: value for key, value in config_dict.items() if key not in ("architectures", "auto_map")}
        wrapped = {"model_type": UniMoEConfig.model_type, "text_config": text}
        return wrapped | {name: text[name] for name in ("tie_word_embeddings", "dtype") if name in text}

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls._wrap_text_only(check_config_file(config_dict, pretrained_model_name_or_path)), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        config_dict = cls._wrap_text_only(config_dict)
        refuse_foreign_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    @property
    def max_position_embeddings(self) -> int:
        """The language model's context length, `text_config.max_position_embeddings`, where transformers' generation
        looks for it (`config.max_position_embeddings`): as for a LLaMA, the default `max_length` is capped by it and
        generating past it logs transformers' warning (`MaxLengthCriteria`). Not a field: it is saved once, in the
        text config."""
        return self.text_config.max_position_embeddings

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int):
        self.text_config.max_position_embeddings = value

    @property
    def _experts_implementation(self) -> str | None:
        return self._experts_implementation_internal

    @_experts_implementation.setter
    def _experts_implementation(self, value: str | dict | None):
        """transformers' setter, except that one kernel name (`from_pretrained(experts_implementation="grouped_mm")`,
        directly or through the Auto classes, which set it on the config) goes to the experts alone: the language
        model's (`text_config`) and CuMo's (this config: see `UniMoEMoeSpec`). transformers would also hand it to CLIP
        and Whisper, which have no experts and refuse every kernel but eager. A dict is transformers' per-sub-config
        form and passes as given."""
        if isinstance(value, str):
            value = {"": value, "text_config": value}
        PreTrainedConfig._experts_implementation.fset(self, value)

    @property
    def vision_feature_depth(self) -> int | None:
        """How many CLIP layers compute the `vision_feature_layer` hidden state (the first ones; `hidden_states[j]` is
        the output of layer j - 1): the only layers the model runs, and the only ones that can hold CuMo MoE MLPs.
        None without a vision tower."""
        if self.vision_config is None:
            return None
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    def __post_init__(self, **kwargs):
        if self.audio_config is not None and self.audio_qformer_config is None:
            beats_width = self.audio_config["encoder_embed_dim"] if isinstance(self.audio_config, dict) else self.audio_config.encoder_embed_dim
            self.audio_qformer_config = {
                "model_type": "blip_2_qformer", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "cross_attention_frequency": 2, "encoder_hidden_size": beats_width,
            }
        build_sub_configs(self)
        super().__post_init__(**kwargs)
        # Tying is a property of the language model: follow the text config (as LLaVA does).
        self.tie_word_embeddings = self.text_config.tie_word_embeddings
        present = {"whisper": self.speech_config, "beats": self.audio_config}
        if self.audio_towers is None:
            self.audio_towers = [name for name in AUDIO_TOWERS if present[name] is not None]
        self.vision_moe_layers = sorted(self.vision_moe_layers or [])
        if self.speech_config is not None and self.speech_aligner_layers is None:
            self.speech_aligner_layers = self.speech_config.decoder_layers
        self._check_multimodal_fields(present)
        self._sync_audio_token_budget()

    _AUDIO_BUDGET_FIELDS = ("audio_config", "max_audio_windows", "num_query_tokens", "audio_towers")

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._AUDIO_BUDGET_FIELDS:
            self._sync_audio_token_budget()

    def _sync_audio_token_budget(self):
        """vLLM's Transformers backend sizes its audio budget by `audio_config.max_source_positions`, which it takes for
        the most tokens one audio item yields (Whisper's convention). Not a BEATs setting: derived from this config
        (`max_audio_windows * num_query_tokens * len(audio_towers)`) and kept in step when those fields change."""
        # (`audio_towers` is a list from the end of `__post_init__` on; the fields are being set before)
        if isinstance(getattr(self, "audio_towers", None), list) and isinstance(self.audio_config, PreTrainedConfig):
            self.audio_config.max_source_positions = self.max_audio_windows * self.num_query_tokens * len(self.audio_towers)

    def _check_multimodal_fields(self, present: dict):
        bad = partial(reject_field, self)

        for tower in self.audio_towers:
            if tower not in AUDIO_TOWERS:
                bad("audio_towers", self.audio_towers, f"names from {AUDIO_TOWERS}")
            if present[tower] is None:
                config_name = "speech_config" if tower == "whisper" else "audio_config"
                bad("audio_towers", self.audio_towers, f"towers whose config is set (`{config_name}` is None)")
        if len(set(self.audio_towers)) != len(self.audio_towers):
            bad("audio_towers", self.audio_towers, "distinct tower names")
        if self.video_pooling not in VIDEO_POOLING:
            bad("video_pooling", self.video_pooling, f"one of {VIDEO_POOLING}")
        if self.num_query_tokens < 1:
            bad("num_query_tokens", self.num_query_tokens, "at least 1")
        if self.max_audio_windows < 1:
            bad("max_audio_windows", self.max_audio_windows, "at least 1")
        if self.audio_window_seconds < 1:
            bad("audio_window_seconds", self.audio_window_seconds, "at least 1")
        if self.speech_config is not None and self.speech_config.max_source_positions * 2 != self.audio_window_seconds * 100:
            bad(
                "audio_window_seconds", self.audio_window_seconds,
                f"{self.speech_config.max_source_positions * 2 // 100} s: the Whisper encoder's "
                f"max_source_positions={self.speech_config.max_source_positions} reads "
                f"{self.speech_config.max_source_positions * 2} mel frames, 100 per second",
            )
        if self.speech_config is not None and self.num_query_tokens > self.speech_config.max_target_positions:
            bad("num_query_tokens", self.num_query_tokens, f"at most the speech aligner's {self.speech_config.max_target_positions} positions")
        if self.speech_config is not None and not 1 <= self.speech_aligner_layers <= self.speech_config.decoder_layers:
            bad("speech_aligner_layers", self.speech_aligner_layers, f"between 1 and {self.speech_config.decoder_layers}")
        if self.vision_config is not None:
            depth = self.vision_config.num_hidden_layers
            if not -depth <= self.vision_feature_layer <= depth:
                bad("vision_feature_layer", self.vision_feature_layer, f"a hidden-state index in [-{depth}, {depth}]")
        if self.projector_num_experts < 1:
            bad("projector_num_experts", self.projector_num_experts, "at least 1")
        if self.projector_num_experts > 1 and not 1 <= self.projector_num_experts_per_tok <= self.projector_num_experts:
            bad("projector_num_experts_per_tok", self.projector_num_experts_per_tok, f"between 1 and {self.projector_num_experts}")
        if self.vision_moe_layers:
            if self.vision_config is None:
                bad("vision_moe_layers", self.vision_moe_layers, "no layers: there is no vision tower")
            # hidden_states[j] is the output of CLIP layer j - 1: layers past the feature layer never run
            used = self.vision_feature_depth
            if any(not 0 <= i < used for i in self.vision_moe_layers) or len(set(self.vision_moe_layers)) != len(self.vision_moe_layers):
                bad("vision_moe_layers", self.vision_moe_layers, f"distinct CLIP layer indices in [0, {used - 1}] (the layers feeding vision_feature_layer={self.vision_feature_layer})")
            if self.vision_num_experts < 1:
                bad("vision_num_experts", self.vision_num_experts, "at least 1")
            if not 1 <= self.vision_num_experts_per_tok <= self.vision_num_experts:
                bad("vision_num_experts_per_tok", self.vision_num_experts_per_tok, f"between 1 and {self.vision_num_experts}")
        if self.projector_hidden_act not in ACTIVATIONS:
            bad("projector_hidden_act", self.projector_hidden_act, f"one of transformers' activations {ACTIVATIONS}")
        for field in ("mm_router_aux_loss_coef", "mm_router_z_loss_coef"):
            if not is_weight(getattr(self, field)):
                bad(field, getattr(self, field), "a finite, non-negative weight")
        self._check_tower_fields(bad)
        token_ids = {
            "image_token_id": (self.image_token_id, self.vision_config),
            "video_token_id": (self.video_token_id, self.vision_config),
            "audio_token_id": (self.audio_token_id, self.audio_towers or None),
        }
        vocab_size = self.text_config.vocab_size
        for field, (token_id, tower) in token_ids.items():
            if tower is not None and token_id is None:
                bad(field, token_id, "the placeholder token id, since the matching tower is configured")
            if token_id is not None and not 0 <= token_id < vocab_size:
                bad(field, token_id, f"an id below vocab_size={vocab_size}")
        # A shared id would make one modality's placeholders count as another's (or padding and end-of-sequence
        # tokens as media): the placeholder counts no longer match the media and the forward fails.
        text = self.text_config
        eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
        taken = {token_id: f"text_config.{name}" for name, ids in
                 (("pad_token_id", [text.pad_token_id]), ("bos_token_id", [text.bos_token_id]), ("eos_token_id", eos))
                 for token_id in ids if token_id is not None}
        for field, (token_id, _) in token_ids.items():
            if token_id is None:
                continue
            if token_id in taken:
                bad(field, token_id, f"an id of its own: {taken[token_id]} is {token_id} too")
            taken[token_id] = field

    def _check_tower_fields(self, bad):
        """Sub-config fields transformers' own configs accept but the towers fail to build or run with."""
        vision, speech, qformer = self.vision_config, self.speech_config, self.audio_qformer_config
        if vision is not None:
            if vision.hidden_act not in ACTIVATIONS:
                bad("vision_config.hidden_act", vision.hidden_act, f"one of transformers' activations {ACTIVATIONS}")
            for field in ("image_size", "patch_size"):
                sizes = getattr(vision, field)
                if any(size < 1 for size in (sizes if isinstance(sizes, (list, tuple)) else [sizes])):
                    bad(f"vision_config.{field}", sizes, "a positive number of pixels")
            if vision.num_channels != 3:
                bad("vision_config.num_channels", vision.num_channels, "3: the image processor gives RGB pixels")
            if not (math.isfinite(vision.layer_norm_eps) and vision.layer_norm_eps > 0):
                bad("vision_config.layer_norm_eps", vision.layer_norm_eps, "a small positive number")
        if speech is not None:
            if speech.activation_function not in ACTIVATIONS:
                bad("speech_config.activation_function", speech.activation_function, f"one of transformers' activations {ACTIVATIONS}")
            for field in ("encoder_attention_heads", "decoder_attention_heads"):
                heads = getattr(speech, field)
                if heads < 1 or speech.d_model % heads != 0:
                    bad(f"speech_config.{field}", heads, f"a divisor of speech_config.d_model={speech.d_model}")
        if qformer is not None:
            if qformer.hidden_act not in ACTIVATIONS:
                bad("audio_qformer_config.hidden_act", qformer.hidden_act, f"one of transformers' activations {ACTIVATIONS}")
            if qformer.num_attention_heads < 1 or qformer.hidden_size % qformer.num_attention_heads != 0:
                bad("audio_qformer_config.num_attention_heads", qformer.num_attention_heads,
                    f"a divisor of audio_qformer_config.hidden_size={qformer.hidden_size}")
            if qformer.cross_attention_frequency < 1:
                bad("audio_qformer_config.cross_attention_frequency", qformer.cross_attention_frequency,
                    "at least 1 (cross-attention every that many layers)")
            if not (math.isfinite(qformer.layer_norm_eps) and qformer.layer_norm_eps > 0):
                bad("audio_qformer_config.layer_norm_eps", qformer.layer_norm_eps, "a small positive number")
            if self.audio_config is not None and qformer.encoder_hidden_size != self.audio_config.encoder_embed_dim:
                bad("audio_qformer_config.encoder_hidden_size", qformer.encoder_hidden_size,
                    f"the BEATs width audio_config.encoder_embed_dim={self.audio_config.encoder_embed_dim} it reads")


UniMoEConfig.register_for_auto_class()

__all__ = ["BEATsConfig", "UniMoEConfig", "UniMoETextConfig"]
