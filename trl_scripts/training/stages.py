"""What trains in each of Uni-MoE's progressive stages.

0. Text warm-up (not in the paper, whose LLM was pretrained): a randomly initialised language model learns to answer
   from text, the skill the stages assume; towers and connectors untouched.
1. Alignment: only the connectors (vision projector, speech aligner, audio aligner); towers and LLM frozen.
2. Modality-specific experts: a dense copy of the LLM's FFNs trains on one modality's data; attention, embeddings,
   norms, connectors and towers frozen, so every expert is trained against the same stage-1 model whatever the order
   of the experts. Each result becomes one expert (`dense_ffn_state_dict`).
3. MoE tuning: routers and connectors train fully; attention and the fused experts train with LoRA (peft:
   `target_modules` for attention, `target_parameters` for the experts).

CuMo's recipe (`--recipe cumo`, arXiv 2405.05949) shares stages 0 and 1 (CuMo's pre-training trains only the MLP
connector) and replaces the other two:

2. Pre-finetuning (PFT): the whole dense model trains, CLIP included, as a warm-up before the experts come in.
3. Visual instruction tuning: the projector and CLIP MLPs, co-upcycled into sparse MoE blocks, and everything else
   train in full (no LoRA), every router with its balance and z-loss.
"""

import logging
from collections import defaultdict

from peft import LoraConfig, PeftModel, get_peft_model

from modeling_unimoe import UniMoEForCausalLM


logger = logging.getLogger(__name__)

CONNECTORS = ("multi_modal_projector", "speech_aligner", "audio_aligner")
# Not in the paper's recipe (its LLM was pretrained): with a randomly initialised LM, a frozen final norm and head
# bound the logits to a narrow range, so nothing can be answered confidently. Demos on random LMs train them too.
OUTPUT_LAYERS = ("language_model.norm", "lm_head")
LM_ATTENTION = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def expert_lora_targets(model: UniMoEForCausalLM) -> list[str]:
    """peft `target_parameters` for LoRA on the language model's fused experts: `EXPERT_PARAMETERS`, which peft
    matches by suffix, or, in a model whose CuMo experts in CLIP end the same way (`mlp.experts.down_proj`), the
    language model's by full name."""
    names = [name for name, _ in model.named_parameters() if name.endswith(tuple(EXPERT_PARAMETERS))]
    language_model = [name for name in names if name.startswith("model.language_model.")]
    return EXPERT_PARAMETERS if language_model == names else language_model


def parameter_counts(model) -> dict[str, tuple[int, int]]:
    """{component: (trainable, total)} over the model's top-level parts (towers, connectors, language model, head)."""
    counts = defaultdict(lambda: [0, 0])
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        component = next((p for p in parts if p.endswith(("_tower", "_aligner", "_projector", "language_model"))), parts[-2])
        counts[component][0] += parameter.numel() if parameter.requires_grad else 0
        counts[component][1] += parameter.numel()
    return {component: tuple(value) for component, value in sorted(counts.items())}


def log_parameter_counts(model, stage: str) -> dict[str, tuple[int, int]]:
    counts = parameter_counts(model)
    trainable = sum(t for t, _ in counts.values())
    total = sum(n for _, n in counts.values())
    lines = [f"  {component:<24} {t:>12,} / {n:>12,}" for component, (t, n) in counts.items()]
    logger.info("%s: %s of %s parameters trainable\n%s", stage, f"{trainable:,}", f"{total:,}", "\n".join(lines))
    return counts


def _connectors(model: UniMoEForCausalLM):
    return [getattr(model.model, name) for name in CONNECTORS if hasattr(model.model, name)]


def _unfreeze_output_layers(model: UniMoEForCausalLM):
    model.model.language_model.norm.requires_grad_(True)
    model.lm_head.requires_grad_(True)


def prepare_stage0(model: UniMoEForCausalLM) -> dict[str, tuple[int, int]]:
    """Text warm-up: the whole language model (embeddings, attention, FFNs, norms, head); towers and connectors frozen."""
    model.requires_grad_(False)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return log_parameter_counts(model, "stage 0 (text warm-up)")


TOWERS = ("vision_tower", "speech_tower", "audio_tower")


def prepare_stage1(
    model: UniMoEForCausalLM, train_output_layers: bool = False, train_towers: bool = False
) -> dict[str, tuple[int, int]]:
    """Cross-modal alignment: connectors only (and the output layers with `train_output_layers`; the towers with
    `train_towers`, for randomly initialised towers only: pretrained ones stay frozen, as in the paper)."""
    model.requires_grad_(False)
    for connector in _connectors(model):
        connector.requires_grad_(True)
    if train_towers:
        for name in TOWERS:
            if hasattr(model.model, name):
                getattr(model.model, name).requires_grad_(True)
    if train_output_layers:
        _unfreeze_output_layers(model)
    return log_parameter_counts(model, "stage 1 (alignment)")


def prepare_stage2(model: UniMoEForCausalLM, train_output_layers: bool = False) -> dict[str, tuple[int, int]]:
    """One modality's expert: the dense FFNs; attention, embeddings, norms, head, connectors and towers frozen
    (`train_output_layers` also trains the final norm and the LM head: see `OUTPUT_LAYERS`). Connectors stay as stage 1
    left them: trained here, they would drift towards each expert's modality in turn (image and video share the
    projector, speech and audio events the aligners) and the saved ones would suit only the last expert."""
    if model.config.text_config.sparse_layer_indices:
        raise ValueError("stage 2 trains the dense FFNs of a dense language model (moe_layers=[])")
    model.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.mlp.requires_grad_(True)
    if train_output_layers:
        _unfreeze_output_layers(model)
    return log_parameter_counts(model, "stage 2 (modality expert)")


def prepare_cumo_pft(model: UniMoEForCausalLM) -> dict[str, tuple[int, int]]:
    """CuMo stage 2, pre-finetuning: every parameter trains, the towers included (CuMo's
    `scripts/cumo/mistral_7b/pft_mistral_7b.sh` freezes nothing: `--pft True`, no `--tune_mm_mlp_adapter`, CLIP loaded
    trainable). Raises `ValueError` for a model without a vision tower, or whose vision side is already sparse."""
    config = model.config
    if config.vision_config is None:
        raise ValueError("CuMo's pre-finetuning warms up a model with a vision tower; this one has none")
    if config.projector_num_experts > 1 or config.vision_moe_layers:
        raise ValueError("CuMo's pre-finetuning warms up a dense vision side; this model's is already a mixture of experts")
    model.requires_grad_(True)
    return log_parameter_counts(model, "CuMo stage 2 (pre-finetuning)")


def prepare_cumo_sparse(model: UniMoEForCausalLM) -> dict[str, tuple[int, int]]:
    """CuMo stage 3, visual instruction tuning: every parameter trains in full, the co-upcycled experts and their
    fresh routers included (`scripts/cumo/mistral_7b/sft_mistral_7b.sh`: no LoRA, nothing frozen). Raises
    `ValueError` for a model without a sparse projector or sparse CLIP MLPs (co-upcycle it first:
    `upcycling.upcycle_multimodal_experts`)."""
    config = model.config
    if not (config.projector_num_experts > 1 or config.vision_moe_layers):
        raise ValueError("CuMo stage 3 tunes a co-upcycled model: build it with upcycle_multimodal_experts from stage 2's")
    model.requires_grad_(True)
    return log_parameter_counts(model, "CuMo stage 3 (co-upcycled sparse tuning)")


def prepare_stage3(
    model: UniMoEForCausalLM, lora_r: int = 8, lora_alpha: int = 16, train_output_layers: bool = False
) -> PeftModel:
    """MoE tuning: LoRA on the LM attention and fused experts; routers and connectors trained in full (as peft
    `modules_to_save`, so adapter checkpoints and resumption carry them), and the output layers with
    `train_output_layers`."""
    if not model.config.text_config.sparse_layer_indices:
        raise ValueError("stage 3 tunes a sparse model: build it with upcycle_unimoe from the stage-2 FFNs")
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,  # peft requires 0 with target_parameters
        target_modules=LM_ATTENTION,
        target_parameters=expert_lora_targets(model),
        modules_to_save=[
            "mlp.gate",
            *[name for name in CONNECTORS if hasattr(model.model, name)],
            *(OUTPUT_LAYERS if train_output_layers else ()),
        ],
    )
    peft_model = get_peft_model(model, config)
    log_parameter_counts(peft_model, "stage 3 (MoE tuning)")
    return peft_model
