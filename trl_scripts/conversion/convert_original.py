"""Convert the released original Uni-MoE v1 checkpoints into this package's format.

The original code (github HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs, folder `Uni_MoE/`) loads a released model
from several pieces, in a fixed order, each load tolerating absent keys. This script reads the same pieces in the
same order, merges what the original merged at load time (the PEFT LoRA adapter, the 8-expert LoRA-in-expert MLPs),
fuses the experts into our `[E, 2I, H]` / `[E, H, I]` layout and saves one self-contained checkpoint (safetensors,
`config.json` with `auto_map`, the remote code, the processor with the tokenizer and the Vicuna v1 chat template).

    python -m trl_scripts.convert_original --variant speech-4e \
        --base_dir Uni-MoE-speech-base --stage3_dir Uni-MoE-speech-e2 \
        --clip clip-vit-large-patch14-336 --whisper whisper-small --output_dir uni-moe-speech-4e

Variants (the original code folder each was trained with):

- `speech-4e`   (`Uni_MoE_speech`):  4 experts top-2 in every layer, Whisper speech branch.
- `audio-4e`    (`Uni_MoE_audio`):   4 experts in even layers (odd layers dense), BEATs + Q-Former sound branch.
- `speech-v1.5` (`Uni_MoE_speech_dp`): 4 experts in even layers, Whisper speech branch.
- `8e`          (`Uni_MoE_8e`):      8 DeepSpeed-MoE experts in every layer, built from `--experts_dir` files plus the
                                      per-expert LoRA files of the stage-3 folder; GShard top-2 router.

Load order (4 experts, `Uni_MoE_*/model/all_builder.py`): base shards (`pytorch_model-*.bin` + index), then from the
stage-3 folder `non_lora_trainables.bin`, the PEFT adapter merged as `W += (alpha / r) B A`, `mm_audio_aligner.bin`
and last `mlp_gates.bin`, whose plain router weights override any router LoRA merged before (the audio and v1.5
releases trained a LoRA on the routers that their own loader drops this way; we reproduce it and log it). Without a
stage-3 folder (a base checkpoint alone) the base folder's `mm_projector.bin` and `mm_audio_aligner.bin` follow the
shards. 8 experts (`load_all_pretrained_model_dp`): base shards, each expert `e` from its `--experts_dir` file (the
original's list maps 8 experts onto 6 files) plus `(lora_alpha / lora_r) B A` (2 B A in the release) from
`{e}_mlp_experts.bin`, `non_lora_trainables.bin`, `mlp_gates.bin` (`deepspeed_moe.gate.wg`), the attention LoRA,
`mm_audio_aligner.bin`.

Every source tensor is accounted for: it lands in exactly one place of the converted model, or it belongs to a
documented group the original never used (tower copies, the aligner's unused Whisper token embedding, the base's 4
experts under the 8-expert model, ...); anything else is an error listing the keys, as is any weight of the converted
model that no source set. The towers (CLIP, Whisper, BEATs) come from their own checkpoints, as in the original.
"""

import inspect
import json
import logging
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationConfig,
    HfArgumentParser,
    WhisperModel,
)
from transformers.initialization import no_init_weights
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM, UniMoEProcessor, load_beats_checkpoint

from ..console import check_output_dir, command_line
from ..training.presets import CHAT_TEMPLATE_PATH
from .assemble import _with_placeholders, keep_tokenizer_options
from ..checkpoint_files import read_state_dict
from .original_keys import (
    VARIANTS,
    ConversionReport,
    Drop,
    OriginalKeyMapper,
    OriginalVariant,
    Slot,
    WeightPlan,
    normalise_keys,
    target_shapes,
)


logger = logging.getLogger(__name__)


# expert index -> file in Uni-MoE-8e-Experts (`expert_list` in Uni_MoE_8e/.../train/train.py and all_builder.py)
ORIGINAL_8E_EXPERT_FILES = ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4", "mlp_base7", "mlp_base", "mlp_base7")

STAGE3_FILES = ("config.json", "adapter_config.json", "non_lora_trainables.bin", "mm_audio_aligner.bin", "mlp_gates.bin")

SHARD_INDEX = "pytorch_model.bin.index.json"
SINGLE_SHARD = "pytorch_model.bin"

# ----------------------------------------------------------------------------------------------------------- reading


def base_shard_files(base_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The base checkpoint's `.bin` shards (from the index) and the index's weight map (None for a single file)."""
    index_path = base_dir / SHARD_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path} is not a shard index with a `weight_map`: {error}") from error
        return [base_dir / name for name in sorted(set(weight_map.values()))], weight_map
    return [base_dir / SINGLE_SHARD], None


def missing_inputs(
    variant: OriginalVariant, base_dir: Path, stage3_dir: Path | None, experts_dir: Path | None,
    clip: Path | None, whisper: Path | None, beats: Path | None, expert_files: tuple[str, ...],
) -> list[str]:
    """Every file or folder the conversion needs but cannot find, with what it is."""
    missing = []

    def need(path: Path, what: str) -> None:
        if not path.is_file():
            missing.append(f"{path} ({what})")

    if not (base_dir / SHARD_INDEX).is_file() and not (base_dir / SINGLE_SHARD).is_file():
        missing.append(f"{base_dir / SHARD_INDEX} or {base_dir / SINGLE_SHARD} (base model weights)")
    else:
        for shard in base_shard_files(base_dir)[0]:
            need(shard, "base model shard")
    if stage3_dir is None:
        need(base_dir / "config.json", "original model config")
        for name in ("mm_projector.bin", "mm_audio_aligner.bin"):
            need(base_dir / name, "connector weights")
    else:
        for name in STAGE3_FILES:
            need(stage3_dir / name, "stage-3 file")
        if not (stage3_dir / "adapter_model.safetensors").is_file():
            need(stage3_dir / "adapter_model.bin", "stage-3 LoRA adapter weights")
    if variant.deepspeed_experts:
        if stage3_dir is None:
            missing.append("--stage3_dir (the 8-expert model only exists as base + experts + stage 3)")
        else:
            for expert in range(len(expert_files)):
                need(stage3_dir / f"{expert}_mlp_experts.bin", f"expert {expert} LoRA")
        if experts_dir is None:
            missing.append("--experts_dir (the Uni-MoE-8e-Experts folder)")
        else:
            for name in dict.fromkeys(expert_files):
                need(experts_dir / f"{name}.bin", "expert FFN")
    towers = {"--clip": (clip, "CLIP vision tower folder")}
    if variant.audio_tower == "whisper":
        towers["--whisper"] = (whisper, "Whisper folder")
    else:
        towers["--beats"] = (beats, "official BEATs .pt")
    for option, (path, what) in towers.items():
        if path is None:
            missing.append(f"{option} ({what})")
        elif not path.exists():
            missing.append(f"{path} ({what})")
    return missing


# -------------------------------------------------------------------------------------------------------- config


def _require(original: dict, field_name: str, config_path: Path):
    if field_name not in original:
        raise ValueError(f"{config_path}: the original config lacks `{field_name}`")
    return original[field_name]


def _expect(original: dict, field_name: str, allowed: tuple, config_path: Path, default=None):
    value = original.get(field_name, default)
    if value not in allowed:
        found = f"={value!r}" if field_name in original else f" is absent (the original code then uses {default!r})"
        raise ValueError(f"{config_path}: `{field_name}`{found}; only {allowed} converts")
    return value


def text_config_from_original(original: dict, variant: OriginalVariant, config_path: Path) -> dict:
    """Our `UniMoETextConfig` fields from the original LLaVA/LLaMA config (transformers 4.31 names) and the variant."""
    if not original.get("moe"):
        raise ValueError(f"{config_path}: `moe` is not set: this is not a Uni-MoE checkpoint config")
    moe_layers = variant.moe_layers
    router_aux_loss_coef = 0.0  # the 4-expert code has no balance loss
    norm_topk_prob = True
    if variant.deepspeed_experts:
        _expect(original, "moe_type", ("dense",), config_path)  # every layer a DeepSpeed MoE (the released 8config.json)
        if original.get("use_fm_block"):
            raise ValueError(f"{config_path}: `use_fm_block` is set; the per-modality router adapters have no equivalent here")
        router_aux_loss_coef = float(original.get("aux_balance_loss_coef", 0.01)) if original.get("aux_balance_loss") else 0.0
    rope_theta = float(original.get("rope_theta", 10000.0))
    rope_scaling = original.get("rope_scaling")
    if rope_scaling is None:
        rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        rope_parameters = {"rope_type": rope_scaling["type"], "factor": float(rope_scaling["factor"]), "rope_theta": rope_theta}
    num_heads = _require(original, "num_attention_heads", config_path)
    return {
        "vocab_size": _require(original, "vocab_size", config_path),
        "hidden_size": _require(original, "hidden_size", config_path),
        "intermediate_size": _require(original, "intermediate_size", config_path),
        "num_hidden_layers": _require(original, "num_hidden_layers", config_path),
        "num_attention_heads": num_heads,
        "num_key_value_heads": original.get("num_key_value_heads") or num_heads,
        "hidden_act": original.get("hidden_act", "silu"),
        "max_position_embeddings": original.get("max_position_embeddings", 4096),
        "initializer_range": original.get("initializer_range", 0.02),
        "rms_norm_eps": original.get("rms_norm_eps", 1e-5),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": original.get("tie_word_embeddings", False),
        "pad_token_id": original.get("pad_token_id", 0),
        "bos_token_id": original.get("bos_token_id", 1),
        "eos_token_id": original.get("eos_token_id", 2),
        "num_experts": _require(original, "num_experts", config_path),
        "num_experts_per_tok": _require(original, "num_experts_per_tok", config_path),
        "moe_layers": moe_layers,
        "router_type": variant.router_type,
        "norm_topk_prob": norm_topk_prob,
        "router_aux_loss_coef": router_aux_loss_coef,
    }


def guess_variant(original: dict, base_dir: Path) -> tuple[str, str] | None:
    """(variant, evidence) the checkpoint looks like, from its config and the base shard index; None when they do not
    tell (a single unindexed shard cannot be listed without unpickling it)."""
    if "moe_type" in original or "ep_size" in original:
        return "8e", "its config has DeepSpeed MoE fields (moe_type, ep_size)"
    if "beats" in str(original.get("mm_audio_tower", "")).lower():
        return "audio-4e", f"its audio tower is {original['mm_audio_tower']!r}"
    index = base_dir / SHARD_INDEX
    if not index.is_file():
        return None
    sparse = {int(match.group(1)) for key in json.loads(index.read_text())["weight_map"]
              if (match := re.match(r"model\.layers\.(\d+)\.mlp\.(?:gate\.weight|experts\.)", key))}  # fmt: skip
    if not sparse:
        return None
    if all(layer % 2 == 0 for layer in sparse) and len(sparse) > 1:
        return "speech-v1.5", f"a Whisper audio tower and experts in the even layers only ({sorted(sparse)[:4]}...)"
    return "speech-4e", "a Whisper audio tower and experts in every layer"


def check_multimodal_fields(original: dict, variant: OriginalVariant, config_path: Path) -> None:
    """Refuse original settings the converted model would not compute the same way."""
    _expect(original, "mm_projector_type", ("mlp2x_gelu",), config_path)
    _expect(original, "mm_vision_select_feature", ("patch",), config_path, default="patch")
    _expect(original, "audio_projector_type", ("linear",), config_path, default="linear")
    _expect(original, "mm_use_im_start_end", (False,), config_path, default=False)
    # the original adds a `<im_patch>` token when this is missing or true
    _expect(original, "mm_use_im_patch_token", (False,), config_path, default=True)
    if variant.audio_tower == "whisper":
        _expect(original, "mm_audio_select_layer", (0,), config_path, default=0)  # 0 = the encoder's last hidden state
    for name in ("mm_vision_tower", "mm_audio_tower", "query_tokens_size"):
        _require(original, name, config_path)


# --------------------------------------------------------------------------------------------------- the sources


def _read_into_plan(plan: WeightPlan, mapper: OriginalKeyMapper, path: Path) -> None:
    state = read_state_dict(path)
    plan.report.tensors_read[str(path)] = len(state)
    for key, tensor in normalise_keys(state, path).items():
        plan.place(mapper.map(key), tensor, f"{path.name}:{key}")


def read_base_shards(plan: WeightPlan, mapper: OriginalKeyMapper, base_dir: Path) -> None:
    shards, weight_map = base_shard_files(base_dir)
    for shard in tqdm(shards, desc="Reading base shards", unit="shard"):
        state = read_state_dict(shard)
        if weight_map is not None:
            lacking = sorted(key for key, name in weight_map.items() if name == shard.name and key not in state)
            if lacking:
                raise ValueError(f"Base shard {shard} lacks {len(lacking)} weights its index lists: {', '.join(lacking[:20])}")
        plan.report.tensors_read[str(shard)] = len(state)
        for key, tensor in state.items():
            plan.place(mapper.map(key), tensor, f"{shard.name}:{key}")


def read_lora_adapter(plan: WeightPlan, mapper: OriginalKeyMapper, stage3_dir: Path) -> None:
    """The PEFT (0.4) LoRA of stage 3: `base_model.model.<module>.lora_{A,B}.weight`, merged as W += (alpha/r) B A."""
    from peft import LoraConfig

    lora_config = LoraConfig.from_pretrained(str(stage3_dir))
    config_path = stage3_dir / "adapter_config.json"
    unsupported = {
        "use_dora": lora_config.use_dora, "fan_in_fan_out": lora_config.fan_in_fan_out,
        "rank_pattern": lora_config.rank_pattern, "alpha_pattern": lora_config.alpha_pattern,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"{config_path}: `{name}`={value!r} is not supported (Uni-MoE v1 adapters use plain LoRA)")
    if lora_config.bias != "none":
        raise ValueError(f"{config_path}: `bias`={lora_config.bias!r} is not supported (Uni-MoE v1 used 'none')")
    scaling = lora_config.lora_alpha / (lora_config.r**0.5 if lora_config.use_rslora else lora_config.r)
    weights_path = stage3_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        weights_path = stage3_dir / "adapter_model.bin"
    state = read_state_dict(weights_path)
    plan.report.tensors_read[str(weights_path)] = len(state)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            plan.problems.append(f"unmapped source {weights_path.name}:{key}: not a PEFT LoRA A/B weight")
            continue
        modules[match[1]][match[2]] = tensor
    for module, pair in modules.items():
        origin = f"{weights_path.name}:{module}.lora_{{A,B}}"
        if set(pair) != {"A", "B"}:
            plan.problems.append(f"{origin}: LoRA of {module} lacks lora_{'A' if 'A' not in pair else 'B'}")
            continue
        mapped = mapper.map(module + ".weight")
        if not isinstance(mapped, Slot):
            why = mapped.reason if isinstance(mapped, Drop) else mapped.why
            plan.problems.append(f"unmapped source {origin}: its target {module}.weight does not convert ({why})")
            continue
        if pair["A"].shape[0] != lora_config.r:
            plan.problems.append(f"{origin}: rank {pair['A'].shape[0]} but adapter_config.json says r={lora_config.r}")
            continue
        plan.merge_lora(mapped, pair["A"], pair["B"], scaling, origin)


def read_8e_experts(
    plan: WeightPlan, mapper: OriginalKeyMapper, stage3_dir: Path, experts_dir: Path, expert_files: tuple[str, ...],
    scaling: float,
) -> None:
    """Expert e of every layer: `experts_dir/<expert_files[e]>.bin` (a dense FFN, `model.layers.{L}.mlp.{proj}.weight`)
    plus `scaling * B @ A` from `stage3_dir/{e}_mlp_experts.bin` (LoRA-in-expert, matched by layer and projection)."""
    base_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    lora_key = re.compile(
        r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
        r"(gate_proj|up_proj|down_proj)(?:_lora_([AB]))?\.weight$"
    )
    for expert, name in enumerate(tqdm(expert_files, desc="Reading experts", unit="expert")):
        lora_path = stage3_dir / f"{expert}_mlp_experts.bin"
        lora_state = normalise_keys(read_state_dict(lora_path), lora_path)
        plan.report.tensors_read[str(lora_path)] = len(lora_state)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = defaultdict(dict)
        local_indices = set()
        for key, tensor in lora_state.items():
            match = lora_key.match(key)
            if match is None:
                plan.problems.append(f"unmapped source {lora_path.name}:{key}: not a deepspeed_experts weight")
                continue
            layer, local, projection, half = int(match[1]), int(match[2]), match[3], match[4]
            local_indices.add(local)
            if layer not in mapper.sparse_layers:
                plan.problems.append(f"unmapped source {lora_path.name}:{key}: layer {layer} has no experts")
            elif half is None:  # an expert base weight saved with the LoRA: the expert file below supersedes it
                plan.load(mapper.expert_slot(layer, expert, projection), tensor, f"{lora_path.name}:{key}")
            else:
                pairs[(layer, projection)][half] = tensor
        if len(local_indices) > 1:
            # the original loader keys experts by position only and would silently mix these
            raise ValueError(f"{lora_path} holds several local experts {sorted(local_indices)}; expected one expert per file")
        expert_path = experts_dir / f"{name}.bin"
        expert_state = read_state_dict(expert_path)
        plan.report.tensors_read[f"{expert_path} (expert {expert})"] = len(expert_state)
        for key, tensor in expert_state.items():
            match = base_key.match(key)
            if match is None or int(match[1]) not in mapper.sparse_layers:
                plan.problems.append(f"unmapped source {expert_path.name}:{key}: not an FFN weight of a MoE layer")
                continue
            plan.load(mapper.expert_slot(int(match[1]), expert, match[2]), tensor, f"{expert_path.name}:{key} (expert {expert})")
        for (layer, projection), pair in sorted(pairs.items()):
            origin = f"{lora_path.name}:layer {layer} {projection}_lora_{{A,B}}"
            if set(pair) != {"A", "B"}:
                plan.problems.append(f"{origin}: lacks lora_{'A' if 'A' not in pair else 'B'}")
                continue
            plan.merge_lora(mapper.expert_slot(layer, expert, projection), pair["A"], pair["B"], scaling, origin)


def read_towers(plan: WeightPlan, vision, speech, sound) -> None:
    for prefix, tower, origin in (
        ("model.vision_tower.", vision, "CLIP"), ("model.speech_tower.", speech, "Whisper encoder"),
        ("model.audio_tower.", sound, "BEATs"),
    ):
        if tower is None:
            continue
        for key, tensor in tower.state_dict().items():
            plan.load(Slot(prefix + key), tensor, f"{origin}:{key}")


# ----------------------------------------------------------------------------------------------------- converting


def load_original_tokenizer(folder: Path):
    """The checkpoint's own tokenizer, as the original loaded it: `AutoTokenizer.from_pretrained(model_base,
    use_fast=False)` on transformers 4.31, which took the class `tokenizer_config.json` names.

    - The named class is loaded directly. AutoTokenizer would route by the original's config.json instead
      (`model_type` "llava"), which transformers 5 maps to a generic converted tokenizer (on 5.23 one that drops
      SentencePiece's `▁` prefix).
    - A LLaMA tokenizer whose config does not set `legacy` gets `legacy=True`, 4.31's default (transformers 5 defaults
      to False, which tokenises the text after `</s>` and after each media placeholder otherwise). The option is kept
      when the converted tokenizer is saved.
    """
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    named_class = getattr(transformers, str(settings.get("tokenizer_class")), None)
    try:
        with warnings.catch_warnings():
            # AutoTokenizer parses the original config.json (model_type "llava") only to pick a tokenizer class;
            # transformers then warns about that foreign config's legacy fields
            warnings.simplefilter("ignore", FutureWarning)
            if named_class is None:
                return keep_tokenizer_options(AutoTokenizer.from_pretrained(folder))
            options = {}
            if "legacy" in inspect.signature(named_class.__init__).parameters:
                options["legacy"] = settings.get("legacy", True)
            return keep_tokenizer_options(named_class.from_pretrained(folder, **options))
    except (ValueError, ImportError, OSError) as error:
        hint = ""
        if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
            hint = (
                " The released checkpoints ship a SentencePiece tokenizer.model; reading it needs the `sentencepiece` "
                "and `protobuf` packages (pip install sentencepiece protobuf)."
            )
        raise ValueError(f"Cannot load the tokenizer of {folder}: {error}.{hint}") from error


def build_processor(config: UniMoEConfig, tokenizer, clip: Path, image_aspect_ratio: str | None) -> UniMoEProcessor:
    """Our processor with the original's image preprocessing: the CLIP folder's image processor (what the original
    loaded) and, for `image_aspect_ratio="pad"`, LLaVA's pad-to-square with the mean colour (`expand2square`)."""
    processor = UniMoEProcessor.from_model_config(config, tokenizer, chat_template=CHAT_TEMPLATE_PATH.read_text(), num_frames=8)
    # the original sliced audio every window + 1 samples, each slice cut to the window (one sample dropped per window)
    processor.feature_extractor.window_stride = processor.feature_extractor.window_samples + 1
    if (clip / "preprocessor_config.json").is_file():
        processor.image_processor = AutoImageProcessor.from_pretrained(clip)
    if image_aspect_ratio == "pad":
        settings = processor.image_processor.to_dict()
        for name in ("image_processor_type", "processor_class"):
            settings.pop(name, None)
        processor.image_processor = LlavaImageProcessorPil(**settings, do_pad=True)
    return processor


def convert_original(
    variant: str,
    base_dir: str | Path,
    *,
    stage3_dir: str | Path | None = None,
    experts_dir: str | Path | None = None,
    clip: str | Path | None = None,
    whisper: str | Path | None = None,
    beats: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    audio_qformer_config: str | Path | None = None,
    expert_files: tuple[str, ...] = ORIGINAL_8E_EXPERT_FILES,
    dtype: torch.dtype = torch.bfloat16,
    output_dir: str | Path | None = None,
) -> tuple[UniMoEForCausalLM, UniMoEProcessor, ConversionReport]:
    """Convert a released Uni-MoE v1 checkpoint (see the module docstring); saves to `output_dir` when given."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    base_dir = Path(base_dir)
    stage3_dir, experts_dir = (Path(p) if p is not None else None for p in (stage3_dir, experts_dir))
    clip, whisper, beats = (Path(p) if p is not None else None for p in (clip, whisper, beats))
    expert_files = tuple(expert_files)
    missing = missing_inputs(spec, base_dir, stage3_dir, experts_dir, clip, whisper, beats, expert_files)
    if missing:
        raise FileNotFoundError("The conversion lacks:\n  " + "\n  ".join(missing))
    if spec.deepspeed_experts and len(expert_files) == 0:
        raise ValueError("expert_files is empty")
    other_towers = {"whisper": whisper, "beats": beats}
    other_towers.pop(spec.audio_tower)
    if any(path is not None for path in other_towers.values()):
        raise ValueError(f"The {variant} variant has no {', '.join(other_towers)} tower; do not pass it")
    report = ConversionReport()

    # The architecture is the stage-3 config's (the original loads the base weights with it).
    config_path = (stage3_dir or base_dir) / "config.json"
    original = json.loads(config_path.read_text())
    guess = guess_variant(original, base_dir)
    if guess is not None and guess[0] != variant:
        raise ValueError(
            f"--variant {variant} does not match this checkpoint: it looks like {guess[0]} ({guess[1]}); "
            f"pass --variant {guess[0]}"
        )
    text_config = text_config_from_original(original, spec, config_path)
    check_multimodal_fields(original, spec, config_path)
    if spec.deepspeed_experts and len(expert_files) != text_config["num_experts"]:
        raise ValueError(f"{len(expert_files)} expert files for num_experts={text_config['num_experts']} in {config_path}")

    tokenizer = load_original_tokenizer(Path(tokenizer_dir or base_dir))
    original_vocab_size = text_config["vocab_size"]
    if len(tokenizer) > original_vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is {original_vocab_size}")
    tokens_before = len(tokenizer)
    tokenizer = _with_placeholders(tokenizer)
    added_ids = list(range(tokens_before, len(tokenizer)))
    report.added_tokens = tokenizer.convert_ids_to_tokens(added_ids)
    text_config["vocab_size"] = max(original_vocab_size, len(tokenizer))  # new rows only past the original vocabulary

    vision = CLIPVisionModel.from_pretrained(clip)
    speech = WhisperModel.from_pretrained(whisper) if whisper is not None else None
    sound = load_beats_checkpoint(beats) if beats is not None else None
    config = UniMoEConfig(
        text_config=text_config,
        vision_config=vision.config.to_dict(),
        speech_config=speech.config.to_dict() if speech is not None else None,
        # the tower stays frozen: BEATs' LayerDrop would only add noise
        audio_config=sound.config.to_dict() | {"encoder_layerdrop": 0.0} if sound is not None else None,
        audio_qformer_config=json.loads(Path(audio_qformer_config).read_text()) if audio_qformer_config else None,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        audio_token_id=tokenizer.audio_token_id,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        video_pooling="mean",
        num_query_tokens=original["query_tokens_size"],
        max_audio_windows=20,
        # Whisper's window: max_source_positions encoder positions = 2 x that many mel frames, 100 per second
        **({"audio_window_seconds": speech.config.max_source_positions // 50} if speech is not None else {}),
        mask_audio_padding=False,  # the original's aligners attended to the padding of every window
    )
    with no_init_weights():  # every weight is written below; skip the random initialisation of billions of them
        model = UniMoEForCausalLM._from_config(config, dtype=dtype)
    model.eval()

    plan = WeightPlan(target_shapes(model, original_vocab_size), report)
    mapper = OriginalKeyMapper(model, spec, original_vocab_size)
    for slot in plan.target_shapes:
        if slot.rows is not None and slot.rows[0] == original_vocab_size:
            plan.mean_of_rows(slot, (0, original_vocab_size))
    read_base_shards(plan, mapper, base_dir)
    if stage3_dir is None:  # a base (stage-2) checkpoint alone: its connectors come from its side files
        for name in ("mm_projector.bin", "mm_audio_aligner.bin"):
            _read_into_plan(plan, mapper, base_dir / name)
    elif spec.deepspeed_experts:
        if (stage3_dir / "fm_adapter.bin").is_file():
            raise ValueError(f"{stage3_dir / 'fm_adapter.bin'}: the per-modality router adapters have no equivalent here")
        scaling = _require(original, "lora_alpha", config_path) / _require(original, "lora_r", config_path)
        read_8e_experts(plan, mapper, stage3_dir, experts_dir, expert_files, scaling)
        for name in ("non_lora_trainables.bin", "mlp_gates.bin"):
            _read_into_plan(plan, mapper, stage3_dir / name)
        read_lora_adapter(plan, mapper, stage3_dir)
        _read_into_plan(plan, mapper, stage3_dir / "mm_audio_aligner.bin")
    else:
        _read_into_plan(plan, mapper, stage3_dir / "non_lora_trainables.bin")
        read_lora_adapter(plan, mapper, stage3_dir)
        for name in ("mm_audio_aligner.bin", "mlp_gates.bin"):
            _read_into_plan(plan, mapper, stage3_dir / name)
    if stage3_dir is not None:  # uploaded next to the weights, but the original's stage-3 loader never reads them
        ignored = [stage3_dir / "mm_projector.bin", base_dir / "mm_projector.bin", base_dir / "mm_audio_aligner.bin"]
        report.files_not_read += [str(path) for path in ignored if path.is_file()]
    read_towers(plan, vision, speech.encoder if speech is not None else None, sound)
    plan.raise_problems()
    plan.apply(model)

    if (base_dir / "generation_config.json").is_file():  # what the original's from_pretrained(model_base) read
        model.generation_config = GenerationConfig.from_pretrained(base_dir)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    if added_ids:
        # The placeholders did not exist in the original vocabulary, so the original could never emit them.
        model.generation_config.suppress_tokens = added_ids
    processor = build_processor(config, tokenizer, clip, original.get("image_aspect_ratio"))
    _log_report(report)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor, report


def _log_report(report: ConversionReport) -> None:
    logger.info("Read %d tensors from %d files", sum(report.tensors_read.values()), len(report.tensors_read))
    for reason, origins in report.dropped.items():
        logger.info("Dropped %d tensors (%s), e.g. %s", len(origins), reason, origins[0])
    if report.superseded:
        logger.info("%d weights were set again later in the original load order (the later source wins)", len(report.superseded))
    if report.lora_overridden:
        logger.warning(
            "%d merged LoRA updates were overwritten later in the original load order, as the original loader did "
            "(e.g. %s: %s replaced by %s)", len(report.lora_overridden), *report.lora_overridden[0],
        )
    for path in report.files_not_read:
        logger.info("Not read (the original loader ignores it): %s", path)
    if report.added_tokens:
        logger.info("Added placeholder tokens %s (embedding and head rows: the mean of the original rows)", report.added_tokens)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ConvertArguments:
    variant: str = field(metadata={"help": f"Released family: {', '.join(VARIANTS)}.", "choices": list(VARIANTS)})
    base_dir: str = field(
        metadata={"help": "Base checkpoint folder (e.g. Uni-MoE-speech-base): pytorch_model-*.bin, index, tokenizer."}
    )
    output_dir: str = field(metadata={"help": "Where to save the converted model, processor and remote code."})
    stage3_dir: str | None = field(
        default=None, metadata={"help": "Stage-3 folder (e.g. Uni-MoE-speech-e2). Without it the base is converted alone."}
    )
    experts_dir: str | None = field(default=None, metadata={"help": "8e only: the Uni-MoE-8e-Experts folder."})
    clip: str | None = field(default=None, metadata={"help": "CLIP folder (openai/clip-vit-large-patch14-336)."})
    whisper: str | None = field(default=None, metadata={"help": "Whisper folder (openai/whisper-small); speech variants."})
    beats: str | None = field(default=None, metadata={"help": "Official BEATs .pt (BEATs_iter3_plus_AS2M.pt); audio-4e."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder (default: the base folder, as the original)."}
    )
    audio_qformer_config: str | None = field(
        default=None,
        metadata={"help": "audio-4e: JSON of Blip2QFormerConfig fields (default: the original's hard-coded Q-Former)."},
    )
    expert_files: str = field(
        default=",".join(ORIGINAL_8E_EXPERT_FILES), metadata={"help": "8e: comma-separated expert file stems, expert 0 first."}
    )
    dtype: str = field(default="bfloat16", metadata={"help": "Saved dtype.", "choices": list(DTYPES)})


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(args=argv)
    check_output_dir(args.output_dir)
    model, _, report = convert_original(
        args.variant, args.base_dir, stage3_dir=args.stage3_dir, experts_dir=args.experts_dir, clip=args.clip,
        whisper=args.whisper, beats=args.beats, tokenizer_dir=args.tokenizer, audio_qformer_config=args.audio_qformer_config,
        expert_files=tuple(name for name in args.expert_files.split(",") if name), dtype=DTYPES[args.dtype],
        output_dir=args.output_dir,
    )
    text = model.config.text_config
    dropped = sum(len(origins) for origins in report.dropped.values())
    print(
        f"Converted Uni-MoE {args.variant} to {args.output_dir}: {model.num_parameters() / 1e9:.2f} B parameters, "
        f"{text.num_experts} experts top-{text.num_experts_per_tok} in layers {text.sparse_layer_indices}; "
        f"{sum(report.tensors_read.values())} source tensors read, {dropped} unused by the original dropped, "
        f"{len(report.lora_overridden)} merged LoRA updates overridden as in the original load order."
    )


if __name__ == "__main__":
    main()
