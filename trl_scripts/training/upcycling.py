"""Upcycling: a dense LLaMA-architecture causal LM becomes a sparse Uni-MoE model.

Every expert of a sparse layer starts as a copy of a dense FFN: either the dense model's own FFN (sparse upcycling),
or, in Uni-MoE's stage 2 -> 3 path, one separately trained FFN per expert (one per modality), given as state dicts in
the original layout `model.layers.{L}.mlp.{gate,up,down}_proj.weight`. CuMo's co-upcycling
(`upcycle_multimodal_experts`) does the same for the vision projector and CLIP's MLPs.
"""

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM, UniMoETextConfig, UniMoETextForCausalLM

from ..console import check_output_dir, command_line
from ..checkpoint_files import read_state_dict


logger = logging.getLogger(__name__)

# LLaMA config fields carried over unchanged into the text config.
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _load_dense(dense: PreTrainedModel | str | Path) -> PreTrainedModel:
    if isinstance(dense, (str, Path)):
        try:
            dense = AutoModelForCausalLM.from_pretrained(dense)
        except OSError as error:  # no such folder, no config.json or weights, not a Hub id
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise FileNotFoundError(f"cannot load the dense model {str(dense)!r}: {reason}") from error
    config = dense.config
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"{type(dense).__name__} has FFN biases (`mlp_bias=True`); Uni-MoE experts have none")
    state = dense.state_dict()
    missing = [f"model.layers.0.mlp.{proj}.weight" for proj in _FFN_PROJECTIONS if f"model.layers.0.mlp.{proj}.weight" not in state]
    if missing:
        raise ValueError(
            f"{type(dense).__name__} is not a LLaMA-architecture causal LM: no SwiGLU FFN weights {missing}"
        )
    return dense


def _expert_ffns(
    dense_state: dict[str, torch.Tensor],
    num_experts: int,
    expert_ffn_state_dicts: list[dict[str, torch.Tensor]] | None,
) -> list[dict[str, torch.Tensor]]:
    if expert_ffn_state_dicts is None:
        return [dense_state] * num_experts
    if len(expert_ffn_state_dicts) != num_experts:
        raise ValueError(f"{len(expert_ffn_state_dicts)} expert FFN state dicts given for num_experts={num_experts}")
    return expert_ffn_state_dicts


def _stacked_experts(
    experts: list[dict[str, torch.Tensor]], sparse_layers, dtype, prefix: str = "model.language_model."
) -> dict[str, torch.Tensor]:
    """Fused expert weights of every sparse layer from one FFN state dict per expert (original layout keys), under
    `prefix` (the language model's: `model.language_model.` in `UniMoEForCausalLM`, `model.` in the text-only class)."""
    state = {}
    for layer in sorted(sparse_layers):
        gate_up, down = [], []
        for expert, ffn in enumerate(experts):
            keys = {proj: f"model.layers.{layer}.mlp.{proj}.weight" for proj in _FFN_PROJECTIONS}
            absent = [key for key in keys.values() if key not in ffn]
            if absent:
                raise KeyError(f"FFN state dict of expert {expert} lacks {absent}")
            gate_up.append(torch.cat([ffn[keys["gate_proj"]], ffn[keys["up_proj"]]], dim=0))  # [2I, H]
            down.append(ffn[keys["down_proj"]])  # [H, I]
        experts_key = f"{prefix}layers.{layer}.mlp.experts"
        state[f"{experts_key}.gate_up_proj"] = torch.stack(gate_up).to(dtype)  # [E, 2I, H]
        state[f"{experts_key}.down_proj"] = torch.stack(down).to(dtype)  # [E, H, I]
    return state


def dense_ffn_state_dict(model: UniMoEForCausalLM) -> dict[str, torch.Tensor]:
    """The dense FFNs of a Uni-MoE model without sparse layers, in the original layout
    (`model.layers.{L}.mlp.{gate,up,down}_proj.weight`): what Uni-MoE's stage 2 produces per modality, one expert each."""
    text = model.config.text_config
    if text.sparse_layer_indices:
        raise ValueError(f"the model has sparse layers {text.sparse_layer_indices}; stage-2 FFNs come from a dense model")
    prefix = "model.language_model."
    return {
        key[len(prefix) - len("model.") :]: value.detach().clone()
        for key, value in model.state_dict().items()
        if key.startswith(prefix + "layers.") and ".mlp." in key
    }


def upcycle_unimoe(
    model: UniMoEForCausalLM,
    expert_ffn_state_dicts: list[dict[str, torch.Tensor]] | None = None,
    *,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "all",
    router_type: str = "topk_softmax",
    norm_topk_prob: bool = True,
) -> UniMoEForCausalLM:
    """Uni-MoE stage 2 -> 3: a Uni-MoE model whose language model is dense (`moe_layers=[]`, towers and connectors
    included) becomes the sparse model, expert e of each sparse layer taken from the e-th stage-2 FFN state dict
    (`dense_ffn_state_dict`; the model's own FFNs when none are given). Everything else is copied."""
    dense_ffn = dense_ffn_state_dict(model)
    experts = _expert_ffns(dense_ffn, num_experts, expert_ffn_state_dicts)
    config_dict = model.config.to_dict()
    config_dict["text_config"] |= dict(
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, moe_layers=moe_layers,
        router_type=router_type, norm_topk_prob=norm_topk_prob,
    )
    moe = UniMoEForCausalLM(UniMoEConfig.from_dict(config_dict)).to(model.dtype)
    sparse_layers = set(moe.config.text_config.sparse_layer_indices)
    source = model.state_dict()
    state = {}
    for key, value in moe.state_dict().items():
        if ".mlp.experts." in key and key.startswith("model.language_model."):
            continue
        state[key] = value if key.endswith(".mlp.gate.weight") and key.startswith("model.language_model.") else source[key]
    state.update(_stacked_experts(experts, sparse_layers, model.dtype))
    moe.load_state_dict(state, strict=True)
    moe.generation_config = copy.deepcopy(model.generation_config)
    return moe


def upcycle_llama(
    dense: PreTrainedModel | str | Path,
    *,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "all",
    router_type: str = "topk_softmax",
    norm_topk_prob: bool = True,
    expert_ffn_state_dicts: list[dict[str, torch.Tensor]] | None = None,
    **text_config_overrides,
) -> UniMoETextForCausalLM:
    """Turn a dense LLaMA-architecture causal LM (a model or a path to one) into a text-only Uni-MoE,
    `UniMoETextForCausalLM` (saved in the flat text-only layout, which vLLM serves; `UniMoEForCausalLM.from_pretrained`
    reads it as a model without towers, and `assemble_unimoe` puts towers around it).

    Attention, embeddings, norms and the LM head are copied. In each sparse layer, expert `e` is the dense FFN of
    that layer, or, when `expert_ffn_state_dicts` is given, layer L's FFN from the e-th state dict (keys
    `model.layers.{L}.mlp.{gate,up,down}_proj.weight`; other keys are ignored). Routers start from the usual random
    init. With identical experts and normalised top-k weights the upcycled model computes exactly the dense function.
    """
    dense = _load_dense(dense)
    dense_config = dense.config
    text_config = {name: getattr(dense_config, name) for name in _LLAMA_FIELDS if hasattr(dense_config, name)}
    text_config.update(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=dense_config.intermediate_size,
        moe_layers=moe_layers,
        router_type=router_type,
        norm_topk_prob=norm_topk_prob,
        **text_config_overrides,
    )
    config = UniMoETextConfig(**text_config)
    dtype = next(dense.parameters()).dtype
    model = UniMoETextForCausalLM(config).to(dtype)

    dense_state = dense.state_dict()
    experts = _expert_ffns(dense_state, num_experts, expert_ffn_state_dicts)
    sparse_layers = set(config.sparse_layer_indices)
    state, used = {}, set()
    for key, value in model.state_dict().items():  # the same keys as the dense LLaMA's
        if ".mlp.gate.weight" in key:
            state[key] = value  # router: fresh init
            continue
        if ".mlp.experts." in key:
            continue
        if key not in dense_state:
            raise KeyError(f"Dense checkpoint has no weight {key!r}")
        state[key] = dense_state[key]
        used.add(key)
    used.update(f"model.layers.{layer}.mlp.{proj}.weight" for layer in sparse_layers for proj in _FFN_PROJECTIONS)
    unused = sorted(set(dense_state) - used)
    if unused:  # e.g. Qwen2's q/k/v biases or Qwen3's q/k norms: a different architecture, not a LLaMA
        raise ValueError(f"{type(dense).__name__} has weights a LLaMA-architecture Uni-MoE cannot hold: {unused[:8]}")

    state.update(_stacked_experts(experts, sparse_layers, dtype, prefix="model."))

    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(dense.generation_config)  # EOS ids, sampling defaults of the backbone
    logger.info(
        "Upcycled %s: %d experts (top-%d) in layers %s", type(dense).__name__, num_experts, num_experts_per_tok,
        sorted(sparse_layers),
    )
    return model.eval()


VISION_MOE_LAYER_PATTERNS = ("all", "even", "odd", "none")


def vision_moe_layer_indices(config: UniMoEConfig, layers: str | list[int]) -> list[int]:
    """CLIP layer indices for CuMo MoE MLPs: `"all"`, `"even"`, `"odd"` (of the layers that feed
    `vision_feature_layer`, `config.vision_feature_depth`: the only ones that run), `"none"`, or explicit indices.

    CuMo made all 24 CLIP-L layers sparse with the feature layer -2 (`clip_smoe.py`), so its 24th layer computed
    routed experts whose output was dropped; here `"all"` is the 23 layers that feature layer needs. Raises
    `ValueError` without a vision tower or for indices past the feature layer."""
    depth = config.vision_feature_depth
    if depth is None:
        raise ValueError("the model has no vision tower: there are no CLIP layers to make sparse")
    if isinstance(layers, str):
        if layers not in VISION_MOE_LAYER_PATTERNS:
            raise ValueError(f"vision MoE layers {layers!r}: expected one of {', '.join(VISION_MOE_LAYER_PATTERNS)} or layer indices")
        start, step = {"all": (0, 1), "even": (0, 2), "odd": (1, 2), "none": (depth, 1)}[layers]
        return list(range(start, depth, step))
    if out_of_range := [index for index in layers if not 0 <= index < depth]:
        raise ValueError(
            f"vision MoE layers {list(layers)}: CLIP layers 0 to {depth - 1} feed vision_feature_layer="
            f"{config.vision_feature_layer} (the later ones never run); out of range: {out_of_range}"
        )
    return sorted(layers)


def upcycle_multimodal_experts(
    model: UniMoEForCausalLM,
    *,
    projector_num_experts: int = 1,
    projector_num_experts_per_tok: int = 2,
    vision_moe_layers: str | list[int] = (),
    vision_num_experts: int = 4,
    vision_num_experts_per_tok: int = 2,
) -> UniMoEForCausalLM:
    """CuMo co-upcycling (arXiv 2405.05949, Sec. 3): the trained vision projector (`projector_num_experts > 1`)
    and/or the MLPs of the chosen CLIP layers (`vision_moe_layers`: see `vision_moe_layer_indices`) become top-k
    sparse MoE blocks whose experts all start as copies of the dense MLP; routers are freshly initialised. Every
    expert computing the same MLP and the top-k weights summing to one, the result computes the same function as
    `model` until the experts diverge in training. Everything else, the language model included (dense or sparse),
    is copied. Raises `ValueError` if the vision side already is a mixture of experts or nothing is made sparse."""
    config_dict = model.config.to_dict()
    if config_dict.get("projector_num_experts", 1) > 1 or config_dict.get("vision_moe_layers"):
        raise ValueError("the model's vision side is already a mixture of experts")
    vision_moe_layers = vision_moe_layer_indices(model.config, vision_moe_layers)
    if projector_num_experts <= 1 and not vision_moe_layers:
        raise ValueError("nothing to co-upcycle: give projector_num_experts > 1 and/or vision MoE layers")
    config_dict.update(
        projector_num_experts=projector_num_experts,
        projector_num_experts_per_tok=projector_num_experts_per_tok,
        vision_moe_layers=vision_moe_layers,
        vision_num_experts=vision_num_experts,
        vision_num_experts_per_tok=vision_num_experts_per_tok,
    )
    config = UniMoEConfig.from_dict(config_dict)
    moe = UniMoEForCausalLM(config).to(model.dtype)
    dense_state = model.state_dict()
    # each sparse MLP, by key prefix: the dense linears its fused experts' up and down projections start from
    sparse_mlps = {"model.multi_modal_projector.": ("linear_1", "linear_2")} if projector_num_experts > 1 else {}
    sparse_mlps |= {f"model.vision_tower.encoder.layers.{i}.mlp.": ("fc1", "fc2") for i in vision_moe_layers}
    state = {}
    for key, value in moe.state_dict().items():
        prefix = next((p for p in sparse_mlps if key.startswith(p)), None)
        if prefix is None:
            state[key] = dense_state[key]
        elif key.startswith(prefix + "gate."):
            state[key] = value  # router: fresh init
        else:  # prefix + "experts.{up,down}_proj[_bias]" [E, ...]: the dense linear's weight or bias in every expert
            projection, _, bias = key.removeprefix(prefix + "experts.").partition("_proj")
            linear = sparse_mlps[prefix][projection == "down"]
            state[key] = dense_state[f"{prefix}{linear}.{'bias' if bias else 'weight'}"].expand_as(value)
    moe.load_state_dict(state, strict=True)
    moe.generation_config = copy.deepcopy(model.generation_config)
    logger.info(
        "Co-upcycled: projector %s, CLIP MLPs of layers %s (%d experts, top-%d)",
        f"{projector_num_experts} experts (top-{projector_num_experts_per_tok})" if projector_num_experts > 1 else "dense",
        vision_moe_layers, vision_num_experts, vision_num_experts_per_tok,
    )
    return moe.eval()


@dataclass
class UpcycleArguments:
    dense: str = field(metadata={"help": "Path to a dense LLaMA-architecture causal LM (HF format)."})
    output_dir: str = field(
        metadata={"help": "Where to save the text-only Uni-MoE checkpoint (flat layout, with remote code) and the dense model's tokenizer."}
    )
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str = field(default="all", metadata={"help": "all, even, odd, or comma-separated layer indices."})
    router_type: str = "topk_softmax"
    expert_ffns: list[str] = field(
        default_factory=list,
        metadata={"help": "One FFN state-dict file (.safetensors or .bin) per expert (stage-2 FFNs), in expert order."},
    )


@command_line
def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(UpcycleArguments).parse_args_into_dataclasses(args=argv)
    check_output_dir(args.output_dir)
    moe_layers = args.moe_layers if args.moe_layers in ("all", "even", "odd") else [int(i) for i in args.moe_layers.split(",")]
    model = upcycle_llama(
        args.dense,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_layers=moe_layers,
        router_type=args.router_type,
        expert_ffn_state_dicts=[read_state_dict(path) for path in args.expert_ffns] or None,
    )
    model.save_pretrained(args.output_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.dense)
    except (OSError, ValueError):  # a folder with weights only
        logger.warning("%s has no tokenizer: %s holds the model only; save one there before serving it", args.dense, args.output_dir)
        return
    tokenizer.save_pretrained(args.output_dir)
    if not tokenizer.chat_template:
        logger.warning(
            "the tokenizer of %s has no chat template: unimoe-serve, unimoe-evaluate and push_to_hub need one; set "
            "`tokenizer.chat_template` (Uni-MoE's: processing/chat_template.jinja) and save it to %s",
            args.dense, args.output_dir,
        )


if __name__ == "__main__":
    main()
