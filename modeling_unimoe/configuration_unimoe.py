"""Configurations of Uni-MoE: the sparse-MoE LLaMA decoder and the composite multimodal model."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_rope_utils import RopeParameters


ROUTER_TYPES = ("topk_softmax", "softmax_topk")
MOE_LAYER_PATTERNS = ("all", "even", "odd")


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
    keys_to_ignore_at_inference = ["past_key_values"]

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

    def __post_init__(self, **kwargs):
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

    def _check_moe_fields(self):
        def bad(field, value, expected):
            raise ValueError(f"UniMoETextConfig: invalid `{field}`={value!r}; expected {expected}.")

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
        if self.router_aux_loss_coef < 0:
            bad("router_aux_loss_coef", self.router_aux_loss_coef, "a non-negative weight")
        if self.router_z_loss_coef < 0:
            bad("router_z_loss_coef", self.router_z_loss_coef, "a non-negative weight")
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


@strict
class UniMoEConfig(PreTrainedConfig):
    r"""
    The composite Uni-MoE configuration: `text_config` (a [`UniMoETextConfig`]) plus the optional modality
    sub-configs of the multimodal model. A checkpoint without modality sub-configs is a text-only Uni-MoE LM.
    """

    model_type = "unimoe"
    # The language model's own plans (text config) apply under `model.language_model`; nothing at this level.
    base_model_fsdp_plan = {}
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=UniMoETextConfig)}

    text_config: dict | UniMoETextConfig | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Tying is a property of the language model: follow the text config (as LLaVA does).
        self.tie_word_embeddings = self.text_config.tie_word_embeddings


UniMoEConfig.register_for_auto_class()

__all__ = ["UniMoEConfig", "UniMoETextConfig"]
