"""The key-mapping plan of `convert_original`: where each tensor of an original Uni-MoE v1 checkpoint lands in this
package's layout (`OriginalKeyMapper`: original key -> `Slot` of a converted weight, a documented `Drop`, or
`Unmapped`), and the `WeightPlan` that places the tensors, merges LoRA pairs and checks that every region of the
converted model is set exactly once (`target_shapes`). No file reading and no command line: those are in
`convert_original`."""

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_unimoe import UniMoEForCausalLM

@dataclass(frozen=True)
class OriginalVariant:
    """What distinguishes one released Uni-MoE v1 family: which code folder it ran with and what that code built."""

    name: str
    code_folder: str
    moe_layers: str  # "all" | "even"
    router_type: str  # ours: "topk_softmax" (Mixtral-style MoeLayer) | "softmax_topk" (DeepSpeed TopKGate)
    audio_tower: str  # "whisper" | "beats"
    deepspeed_experts: bool = False


VARIANTS = {
    "speech-4e": OriginalVariant("speech-4e", "Uni_MoE/Uni_MoE_speech", "all", "topk_softmax", "whisper"),
    "audio-4e": OriginalVariant("audio-4e", "Uni_MoE/Uni_MoE_audio", "even", "topk_softmax", "beats"),
    "speech-v1.5": OriginalVariant("speech-v1.5", "Uni_MoE/Uni_MoE_speech_dp", "even", "topk_softmax", "whisper"),
    "8e": OriginalVariant("8e", "Uni_MoE/Uni_MoE_8e/Uni_MoE_speech", "all", "softmax_topk", "whisper", deepspeed_experts=True),
}



FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# The groups of original tensors the original model never computed with, and why.
DROP_TOWER_COPY = "tower weights inside the LLM checkpoint: the original re-loaded its towers from their own checkpoints"
DROP_WHISPER_TOKENS = "Whisper token embedding of the speech aligner: the original feeds its queries as inputs_embeds"
DROP_ROUTER_LORA_COPY = (
    "router LoRA saved with the routers: the original loads mlp_gates.bin after merge_and_unload, ignoring keys "
    "of LoRA modules that no longer exist by then"
)
DROP_BASE_EXPERTS_UNDER_8E = (
    "the base's 4-expert MoE weights: the 8-expert model has no such modules (its experts come from the expert files, "
    "its routers from mlp_gates.bin), so the original ignored them"
)
DROP_ROTARY = "rotary inv_freq buffer: recomputed from rope_theta (checked equal)"


def normalise_keys(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The original loader's key clean-up for files saved from the PEFT-wrapped model: drop a leading `base_model.`,
    then, if any key starts with `model.model.`, drop one leading `model.` everywhere. Two keys that become one would
    lose a tensor: that is an error naming them."""
    renamed = {key: key.removeprefix("base_model.") for key in state}
    if any(key.startswith("model.model.") for key in renamed.values()):
        renamed = {key: new.removeprefix("model.") for key, new in renamed.items()}
    by_new_name = defaultdict(list)
    for key, new in renamed.items():
        by_new_name[new].append(key)
    collisions = [keys for keys in by_new_name.values() if len(keys) > 1]
    if collisions:
        raise ValueError(f"{path}: these keys become the same weight after the original's prefix clean-up: {collisions[:5]}")
    return {renamed[key]: value for key, value in state.items()}


@dataclass(frozen=True)
class Slot:
    """One region of one weight of the converted model: the whole tensor, one expert's matrix, or a range of rows."""

    key: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def region(self, tensor: torch.Tensor) -> torch.Tensor:
        view = tensor if self.expert is None else tensor[self.expert]
        return view if self.rows is None else view[self.rows[0] : self.rows[1]]

    def __str__(self) -> str:
        expert = "" if self.expert is None else f"[expert {self.expert}]"
        rows = "" if self.rows is None else f"[rows {self.rows[0]}:{self.rows[1]}]"
        return f"{self.key}{expert}{rows}"


@dataclass(frozen=True)
class Drop:
    """A source tensor the original never computed with; `expected` (if set) is what it must equal."""

    reason: str
    expected: torch.Tensor | None = None


@dataclass(frozen=True)
class Unmapped:
    why: str


@dataclass
class _Load:
    origin: str
    tensor: torch.Tensor


@dataclass
class _MergeLoRA:
    origin: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float


@dataclass
class _MeanOfRows:
    """New vocabulary rows (the placeholder tokens): the mean of the original rows of the same weight."""

    rows: tuple[int, int]
    origin: str = "mean of the original vocabulary rows"


@dataclass
class ConversionReport:
    """What the conversion read and decided, for the log and the tests."""

    tensors_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    superseded: list[tuple[str, str, str]] = field(default_factory=list)  # (slot, earlier origin, later origin)
    lora_overridden: list[tuple[str, str, str]] = field(default_factory=list)  # (slot, LoRA origin, overriding origin)
    added_tokens: list[str] = field(default_factory=list)
    files_not_read: list[str] = field(default_factory=list)


class WeightPlan:
    """Every operation the original's load order applies to each weight region, recorded before any arithmetic, so
    that problems (unmapped sources, unset weights, shape mismatches) are all reported at once and the final values
    are computed one weight at a time (peak memory: the converted model plus one weight)."""

    def __init__(self, target_shapes: dict[Slot, torch.Size], report: ConversionReport):
        self.target_shapes = target_shapes
        self.operations: dict[Slot, list] = defaultdict(list)
        self.report = report
        self.problems: list[str] = []

    def _check_shape(self, slot: Slot, shape, origin: str) -> bool:
        if slot not in self.target_shapes:
            self.problems.append(f"unmapped source {origin}: {slot} is not a weight region of the converted model")
            return False
        if tuple(shape) != tuple(self.target_shapes[slot]):
            self.problems.append(
                f"shape mismatch: {origin} is {tuple(shape)} but {slot} expects {tuple(self.target_shapes[slot])}"
            )
            return False
        return True

    def load(self, slot: Slot, tensor: torch.Tensor, origin: str) -> None:
        if self._check_shape(slot, tensor.shape, origin):
            self.operations[slot].append(_Load(origin, tensor))

    def merge_lora(self, slot: Slot, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, origin: str) -> None:
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            self.problems.append(f"{origin}: LoRA A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not form B @ A")
        elif self._check_shape(slot, (lora_B.shape[0], lora_A.shape[1]), origin):
            self.operations[slot].append(_MergeLoRA(origin, lora_A, lora_B, scaling))

    def mean_of_rows(self, slot: Slot, rows: tuple[int, int]) -> None:
        self.operations[slot].append(_MeanOfRows(rows))

    def place(self, mapped, tensor: torch.Tensor, origin: str) -> None:
        """Record a source tensor according to where `OriginalKeyMapper.map` sends it."""
        if isinstance(mapped, Slot):
            self.load(mapped, tensor, origin)
        elif isinstance(mapped, Drop):
            if mapped.expected is not None and not torch.allclose(tensor.float(), mapped.expected.float(), rtol=1e-2, atol=1e-6):
                self.problems.append(f"{origin} differs from the value this model computes ({mapped.reason})")
            self.report.dropped[mapped.reason].append(origin)
        else:
            self.problems.append(f"unmapped source {origin}: {mapped.why}")

    def raise_problems(self) -> None:
        unset = sorted(
            str(slot) for slot in self.target_shapes
            if not any(isinstance(op, (_Load, _MeanOfRows)) for op in self.operations[slot])
        )
        problems = self.problems + [f"no source sets {slot}" for slot in unset]
        if problems:
            shown = "\n  ".join(problems[:60])
            more = f"\n  ... and {len(problems) - 60} more" if len(problems) > 60 else ""
            raise ValueError(f"The original checkpoint does not convert ({len(problems)} problems):\n  {shown}{more}")

    def _value(self, slot: Slot, filled: torch.Tensor) -> torch.Tensor:
        value, value_origin, merges = None, None, []
        for operation in self.operations[slot]:
            if isinstance(operation, _MergeLoRA):
                merges.append(operation)
                continue
            if value is not None:
                self.report.superseded.append((str(slot), value_origin, operation.origin))
            for merge in merges:
                self.report.lora_overridden.append((str(slot), merge.origin, operation.origin))
            merges = []
            if isinstance(operation, _Load):
                value, value_origin = operation.tensor.float(), operation.origin
            else:  # _MeanOfRows: read the original rows already written to the converted weight
                value, value_origin = filled[operation.rows[0] : operation.rows[1]].float().mean(0, keepdim=True), operation.origin
        for merge in merges:  # merged in fp32, like PEFT's merge but without the fp16 round trip
            value = value + merge.scaling * (merge.lora_B.float() @ merge.lora_A.float())
        return value

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        slots_by_key = defaultdict(list)
        for slot in self.target_shapes:
            slots_by_key[slot.key].append(slot)
        state = model.state_dict()
        for key in tqdm(sorted(slots_by_key), desc="Writing weights", unit="weight"):
            target = state[key]
            # derived rows (new vocabulary entries) after the rows they are computed from
            for slot in sorted(slots_by_key[key], key=lambda s: any(isinstance(op, _MeanOfRows) for op in self.operations[s])):
                region = slot.region(target)
                region.copy_(self._value(slot, target).expand_as(region).to(region.dtype))


class OriginalKeyMapper:
    """Where a (normalised) original `LlavaLlamaForCausalLM` key goes in `UniMoEForCausalLM`."""

    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    _EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    _ROUTER_LORA = re.compile(r"^mlp\.gate\.lora_[AB](\.default)?\.weight$")

    def __init__(self, model: UniMoEForCausalLM, variant: OriginalVariant, original_vocab_size: int):
        config = model.config
        text = config.text_config
        self.variant = variant
        self.sparse_layers = set(text.sparse_layer_indices)
        self.num_layers = text.num_hidden_layers
        self.num_experts = text.num_experts
        self.intermediate = text.moe_intermediate_size
        self.original_vocab_size = original_vocab_size
        self.extended_vocab = text.vocab_size > original_vocab_size
        self.inv_freq = model.model.language_model.rotary_emb.inv_freq.detach().clone()

    def _vocab_slot(self, key: str) -> Slot:
        return Slot(key, rows=(0, self.original_vocab_size)) if self.extended_vocab else Slot(key)

    def expert_slot(self, layer: int, expert: int, projection: str) -> Slot:
        key = f"model.language_model.layers.{layer}.mlp.experts."
        if projection == "down_proj":
            return Slot(key + "down_proj", expert=expert)
        start = 0 if projection == "gate_proj" else self.intermediate
        return Slot(key + "gate_up_proj", expert=expert, rows=(start, start + self.intermediate))

    def map(self, key: str):
        if key == "lm_head.weight":
            return self._vocab_slot("lm_head.weight")
        if key == "model.embed_tokens.weight":
            return self._vocab_slot("model.language_model.embed_tokens.weight")
        if key == "model.norm.weight":
            return Slot("model.language_model.norm.weight")
        if key.startswith(("model.vision_tower.", "model.audio_tower.")):
            return Drop(DROP_TOWER_COPY)
        match = self._LAYER.match(key)
        if match:
            return self._map_layer(int(match[1]), match[2], key)
        if key.startswith("model.mm_projector."):
            renamed = {"0": "linear_1", "2": "linear_2"}
            parts = key.split(".")
            if len(parts) == 4 and parts[2] in renamed:
                return Slot(f"model.multi_modal_projector.{renamed[parts[2]]}.{parts[3]}")
            return Unmapped("not an mlp2x_gelu projector weight")
        if self.variant.audio_tower == "whisper":
            return self._map_speech_aligner(key)
        return self._map_sound_aligner(key)

    def _map_layer(self, layer: int, rest: str, key: str):
        if layer >= self.num_layers:
            return Unmapped(f"layer {layer} does not exist (num_hidden_layers={self.num_layers})")
        prefix = f"model.language_model.layers.{layer}."
        if rest == "self_attn.rotary_emb.inv_freq":
            return Drop(DROP_ROTARY, expected=self.inv_freq)
        if rest.startswith(("self_attn.", "input_layernorm.", "post_attention_layernorm.")):
            return Slot(prefix + rest)
        if self._ROUTER_LORA.match(rest):
            return Drop(DROP_ROUTER_LORA_COPY)
        if layer not in self.sparse_layers:
            if rest in {f"mlp.{p}.weight" for p in FFN_PROJECTIONS}:
                return Slot(prefix + rest)
            return Unmapped(f"layer {layer} is a dense layer in the {self.variant.name} layout ({self.variant.code_folder})")
        if self.variant.deepspeed_experts:
            if rest == "mlp.deepspeed_moe.gate.wg.weight":
                return Slot(prefix + "mlp.gate.weight")
            if rest == "mlp.gate.weight" or self._EXPERT.match(rest):
                return Drop(DROP_BASE_EXPERTS_UNDER_8E)
            return Unmapped(f"not a weight of an {self.variant.name} MoE layer ({self.variant.code_folder})")
        if rest == "mlp.gate.weight":
            return Slot(prefix + "mlp.gate.weight")
        expert = self._EXPERT.match(rest)
        if expert:
            if int(expert[1]) >= self.num_experts:
                return Unmapped(f"expert {expert[1]} does not exist (num_experts={self.num_experts})")
            return self.expert_slot(layer, int(expert[1]), expert[2])
        return Unmapped(f"layer {layer} is a sparse MoE layer in the {self.variant.name} layout ({self.variant.code_folder})")

    def _map_speech_aligner(self, key: str):
        decoder = "model.mm_audio_aligner.decoder.audio_decoder."
        if key == decoder + "embed_tokens.weight":
            return Drop(DROP_WHISPER_TOKENS)
        if key.startswith(decoder):
            return Slot("model.speech_aligner." + key[len(decoder) :])
        if key.startswith("model.mm_audio_aligner.projector."):
            return Slot("model.speech_aligner.projector." + key[len("model.mm_audio_aligner.projector.") :])
        if key == "model.query_tokens":
            return Slot("model.speech_aligner.query_tokens")
        return Unmapped("not a weight of the Whisper-decoder speech aligner")

    def _map_sound_aligner(self, key: str):
        for source, target in (
            ("model.mm_audio_aligner.qformer.qformer.", "model.audio_aligner.qformer."),
            ("model.mm_audio_aligner.projector.", "model.audio_aligner.projector."),
        ):
            if key.startswith(source):
                return Slot(target + key[len(source) :])
        if key == "model.mm_audio_aligner.query_tokens":
            return Slot("model.audio_aligner.query_tokens")
        return Unmapped("not a weight of the Q-Former sound aligner")


def target_shapes(model: UniMoEForCausalLM, original_vocab_size: int) -> dict[Slot, torch.Size]:
    """Every region of the converted model some source must set: whole weights, one expert's gate / up / down
    matrix of each fused experts weight, and the original vs the added rows of the embeddings and LM head."""
    text = model.config.text_config
    intermediate = text.moe_intermediate_size
    shapes = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            for expert in range(tensor.shape[0]):
                for rows in ((0, intermediate), (intermediate, 2 * intermediate)):
                    shapes[Slot(key, expert=expert, rows=rows)] = tensor[expert, rows[0] : rows[1]].shape
        elif key.endswith("mlp.experts.down_proj"):
            for expert in range(tensor.shape[0]):
                shapes[Slot(key, expert=expert)] = tensor[expert].shape
        elif key in ("lm_head.weight", "model.language_model.embed_tokens.weight") and tensor.shape[0] > original_vocab_size:
            shapes[Slot(key, rows=(0, original_vocab_size))] = tensor[:original_vocab_size].shape
            shapes[Slot(key, rows=(original_vocab_size, tensor.shape[0]))] = tensor[original_vocab_size:].shape
        else:
            shapes[Slot(key)] = tensor.shape
    return shapes
