"""Uni-MoE's progressive training, and CuMo's, one stage per call, on transformers' Trainer.

    python -m trl_scripts.train --stage 0 --model_name_or_path tiny --train_files train.json captions.json \
        --captions_file captions.json --output_dir out/stage0        # only for a random LM (not in the paper)
    python -m trl_scripts.train --stage 1 --model_name_or_path tiny --train_files captions.json --media_root DIR \
        --output_dir out/stage1 [TrainingArguments...]
    python -m trl_scripts.train --stage 2 --model_name_or_path out/stage1 --train_files train.json \
        --experts image,video,audio,speech --output_dir out/stage2
    python -m trl_scripts.train --stage 3 --model_name_or_path out/stage2 --train_files train.json --output_dir out/stage3
    python -m trl_scripts.train configuration/training/tiny-stage1.yaml [--output_dir ...]  # a YAML, plus overrides

    # CuMo (arXiv 2405.05949): stage 1 as above, then --recipe cumo for stages 2 and 3
    python -m trl_scripts.train --recipe cumo --stage 2 --model_name_or_path out/stage1 --train_files captions.json \
        --output_dir out/cumo-stage2
    python -m trl_scripts.train --recipe cumo --stage 3 --model_name_or_path out/cumo-stage2 --train_files train.json \
        --projector_experts 4 --projector_top_k 2 --vision_moe_layers all --vision_experts 4 --vision_top_k 2 \
        --mm_router_aux_loss_coef 0.1 --mm_router_z_loss_coef 0.01 --output_dir out/cumo-stage3

Media paths in the rows are relative to `--media_root`, by default the folder of the train files (the evaluation
CLI's rule, `trl_scripts.training.data.media_path_candidates`). Paths in a YAML file are relative to the working directory;
options after the YAML file override its values. The options are checked first (`check_options`), then every row
(`validate_dataset`; stage 1 also refuses text-only rows, which its connectors never see), all before a model loads.

Stage 0, the text warm-up, is not in the paper: a randomly initialised language model (the `tiny` preset) first
learns to answer from text, each media placeholder replaced by its media's caption, as a pretrained LLM already can.
Stage 1 starts from a preset (`tiny`, `small`, ...: a dense language model with the preset's towers) or a saved
model; stage 2 trains, for each name in `--experts`, the stage-1 FFNs on the rows whose `modality` is that name
(the FFNs are reset between experts; connectors, attention and towers stay frozen) and saves each as
`experts/<name>.safetensors`; stage 3 builds the sparse model from those FFNs and tunes it with LoRA, then merges
the adapters and saves a plain checkpoint with its remote code, processor and chat template.

`--recipe` picks what stages 2 and 3 do; stages 0 and 1 are the same in both. `unimoe` (the default) is the above.
`cumo` is CuMo's recipe (`SHI-Labs/CuMo` `scripts/cumo/mistral_7b/{pretrain,pft,sft}_mistral_7b.sh`): stage 1
aligns the connector (CuMo's pre-training), stage 2 pre-finetunes the whole dense model, CLIP included (PFT), and
stage 3 co-upcycles the trained projector (`--projector_experts`, `--projector_top_k`) and the MLPs of the chosen
CLIP layers (`--vision_moe_layers`, `--vision_experts`, `--vision_top_k`) into top-k sparse MoE blocks
(`upcycling.upcycle_multimodal_experts`), then trains everything in full, every router with its balance and
z-loss (`--mm_router_aux_loss_coef`, `--mm_router_z_loss_coef` for the projector's and CLIP's, each group on its own;
`--router_aux_loss_coef`, `--router_z_loss_coef` for the language model's). The language model stays as stage 2
left it: dense (CuMo-7B), or sparse when it already was (a Uni-MoE checkpoint, as CuMo-8x7B kept Mixtral's experts).
Only the CLIP layers that feed `vision_feature_layer` run, so `--vision_moe_layers all` means those (CuMo wrapped
all 24 layers of CLIP-L with feature layer -2 and computed the 24th for nothing).
"""

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoProcessor, HfArgumentParser, TrainingArguments, set_seed

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM
from modeling_unimoe.configuration_unimoe import MOE_LAYER_PATTERNS, ROUTER_TYPES

from ..console import command_line
from ..checkpoint_files import read_state_dict
from .data import UniMoEDataCollator, load_conversations, text_warmup_rows, validate_dataset
from .presets import PRESETS_DIR, load_preset, load_tiny_processor
from .stages import prepare_cumo_pft, prepare_cumo_sparse, prepare_stage0, prepare_stage1, prepare_stage2, prepare_stage3
from .trainer import UniMoETrainer
from .upcycling import (
    VISION_MOE_LAYER_PATTERNS,
    dense_ffn_state_dict,
    upcycle_multimodal_experts,
    upcycle_unimoe,
    vision_moe_layer_indices,
)


logger = logging.getLogger(__name__)

RECIPES = ("unimoe", "cumo")


def _layer_spec(option: str, given: str, patterns) -> str | list[int]:
    """A layer option: one of `patterns`, or distinct non-negative comma-separated indices; errors name `option`."""
    value = given.strip()
    if value in patterns:
        return value
    layers = []
    for part in value.split(","):
        try:
            layers.append(int(part))
        except ValueError:
            raise ValueError(
                f"{option} {given!r}: {part.strip()!r} is not a layer index (expected {', '.join(patterns)} or "
                "comma-separated layer indices, e.g. 0,2,5)"
            ) from None
    if negative := [layer for layer in layers if layer < 0]:
        raise ValueError(f"{option} {given!r}: layer indices start at 0, got {negative}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{option} {given!r}: a layer is given twice")
    return layers


@dataclass
class StageArguments:
    stage: int = field(
        metadata={"help": "0 (text warm-up, random LMs only), 1 (alignment), 2 (unimoe: modality experts; cumo: "
                  "pre-finetuning of the whole model) or 3 (unimoe: MoE tuning; cumo: co-upcycled sparse tuning)."}
    )
    model_name_or_path: str = field(metadata={"help": "A preset name (stage 1) or the previous stage's output folder."})
    recipe: str = field(
        default="unimoe", metadata={"help": "What stages 2 and 3 do: unimoe (Uni-MoE's) or cumo (CuMo's); see the module doc."}
    )
    experts: str = field(default="", metadata={"help": "Stage 2: comma-separated modality names, one expert each, in expert order."})
    num_experts_per_tok: int = 2
    moe_layers: str = field(default="all", metadata={"help": "Stage 3: all, even, odd or comma-separated layer indices."})
    router_type: str = "topk_softmax"
    lora_r: int = 8
    lora_alpha: int = 16
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Stage 3: weight of the language model's balance loss (default: keep the stage-2 model's)."},
    )
    router_z_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Stage 3: weight of the language model's router z-loss (default: keep the stage-2 model's)."},
    )
    projector_experts: int = field(
        default=4, metadata={"help": "CuMo stage 3: experts of the sparse MoE projector (CuMo: 4; 1 keeps it dense)."}
    )
    projector_top_k: int = field(default=2, metadata={"help": "CuMo stage 3: projector experts per token (CuMo: 2)."})
    vision_moe_layers: str = field(
        default="all",
        metadata={"help": "CuMo stage 3: CLIP layers whose MLP becomes a sparse MoE: all, even or odd (of the layers that "
                  "feed vision_feature_layer, the only ones that run), none, or comma-separated layer indices."},
    )
    vision_experts: int = field(default=4, metadata={"help": "CuMo stage 3: experts of each sparse CLIP MLP (CuMo: 4)."})
    vision_top_k: int = field(default=2, metadata={"help": "CuMo stage 3: CLIP experts per token (CuMo: 2)."})
    mm_router_aux_loss_coef: float = field(
        default=0.1,
        metadata={"help": "CuMo stage 3: weight of the balance loss of the projector's routers and of CLIP's, each group "
                  "on its own (CuMo: 0.1)."},
    )
    mm_router_z_loss_coef: float = field(
        default=0.01,
        metadata={"help": "CuMo stage 3: weight of the router z-loss of the projector's routers and of CLIP's (CuMo: 0.01)."},
    )
    train_towers: bool = field(
        default=False,
        metadata={"help": "Stage 1: also train the towers (for random towers like the tiny preset's; not the paper's recipe)."},
    )
    train_output_layers: bool = field(
        default=False,
        metadata={"help": "Also train the final norm and LM head (needed when the LM starts random; not the paper's recipe)."},
    )
    component_learning_rates: str = field(
        default="",
        metadata={
            "help": "Learning rates of named modules, e.g. 'speech_tower=1e-3,speech_aligner=1e-3'; "
            "the other parameters use --learning_rate."
        },
    )

    def learning_rates(self) -> dict[str, float]:
        """`component_learning_rates` as {module name: learning rate}: each a name and a positive finite number."""
        rates = {}
        for item in filter(None, (part.strip() for part in self.component_learning_rates.split(","))):
            name, _, value = item.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = None
            if rate is None or not name.strip():
                raise ValueError(
                    f"--component_learning_rates: {item!r} is not 'module=learning_rate' (e.g. speech_tower=1e-3)"
                )
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"--component_learning_rates: {item!r}: a learning rate must be a positive finite number")
            if name.strip() in rates:
                raise ValueError(f"--component_learning_rates: {name.strip()!r} is given twice")
            rates[name.strip()] = rate
        return rates

    def expert_names(self) -> list[str]:
        """Stage 2's `experts`: distinct modality names, at least one."""
        names = [name.strip() for name in self.experts.split(",") if name.strip()]
        if not names:
            raise ValueError("stage 2 needs --experts: comma-separated modality names, e.g. image,video,audio,speech")
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"--experts {self.experts!r}: {', '.join(twice)} given twice (one expert per modality)")
        return names

    def moe_layer_spec(self) -> str | list[int]:
        """Stage 3's `moe_layers`: all, even, odd, or distinct non-negative layer indices."""
        return _layer_spec("--moe_layers", self.moe_layers, MOE_LAYER_PATTERNS)

    def vision_moe_layer_spec(self) -> str | list[int]:
        """CuMo stage 3's `vision_moe_layers`: all, even, odd, none, or distinct non-negative CLIP layer indices (their
        range is checked against the model, `upcycling.vision_moe_layer_indices`)."""
        return _layer_spec("--vision_moe_layers", self.vision_moe_layers, VISION_MOE_LAYER_PATTERNS)


@dataclass
class DataArguments:
    train_files: list[str] = field(metadata={"help": "JSON/JSONL conversation files."})
    media_root: str | None = field(
        default=None, metadata={"help": "Media paths in the rows are relative to this folder (default: the train files' folder)."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Drop (and count) invalid rows: no conversation or assistant reply, missing, unreadable or "
                  "NaN media, audio over max_audio_windows, text over the model maximum after media expansion, "
                  "text-only rows in stage 1 (without --train_output_layers)."},
    )
    group_by_modality: bool = field(default=True, metadata={"help": "One modality mix per global batch."})
    captions_file: str | None = field(
        default=None, metadata={"help": "Stage 0: caption rows (stage-1 data) describing the media of --train_files."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message for rows without one (default: the chat template's, Vicuna v1's sentence)."},
    )
    cache_encodings: bool = field(
        default=False,
        metadata={"help": "Encode every row once before training and reuse the encodings every epoch (the same batches; "
                  "memory: every row's media features, ~0.3 MB per 30 s audio item; media files changed during the "
                  "stage are not read again). Pays off over several epochs when preparing media costs more than the "
                  "training step."},
    )


def default_media_root(train_files: list[str]) -> str:
    """The folder the train files are in: their rows' media paths are relative to it unless `--media_root` says."""
    folders = sorted({str(Path(path).resolve().parent) for path in train_files})
    if len(folders) != 1:
        raise ValueError(f"--train_files are in several folders ({', '.join(folders)}); say where their media are with --media_root")
    return folders[0]


def load_stage_model(name_or_path: str, stage: int) -> tuple[UniMoEForCausalLM, object]:
    """(model, processor): a fresh dense model from a preset for stage 1, else the saved previous stage (a local
    folder or a Hub repo id)."""
    if not Path(name_or_path).is_dir() and not (PRESETS_DIR / f"{name_or_path}.json").is_file():
        try:
            return UniMoEForCausalLM.from_pretrained(name_or_path), AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:  # a path-like name is not even a valid repo id (HFValidationError)
            presets = ", ".join(sorted(path.stem for path in PRESETS_DIR.glob("*.json")))
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]  # one line on the command line
            raise FileNotFoundError(
                f"--model_name_or_path {name_or_path!r}: no such folder ({Path(name_or_path).resolve()}), not a preset "
                f"({presets}), and not loadable from the Hub ({reason})"
            ) from error
    if not Path(name_or_path).is_dir():
        if stage > 1:
            raise ValueError(f"stage {stage} continues from the previous stage's output folder, not the preset {name_or_path!r}")
        if name_or_path != "tiny":
            raise ValueError(f"only the `tiny` preset ships a tokenizer; build {name_or_path!r} with trl_scripts.conversion.assemble first")
        config = load_preset(name_or_path, moe_layers=[])
        return UniMoEForCausalLM(config), load_tiny_processor(config)
    return UniMoEForCausalLM.from_pretrained(name_or_path), AutoProcessor.from_pretrained(name_or_path)


def load_stage_processor(name_or_path: str, stage: int) -> tuple[object | None, int | None]:
    """(processor, the model's `max_position_embeddings`) of the model a stage trains, without building it: what
    `validate_dataset` needs to check audio windows and expanded lengths. (None, None) where `load_stage_model` will
    refuse the name, with its own error."""
    try:
        if not Path(name_or_path).is_dir() and (PRESETS_DIR / f"{name_or_path}.json").is_file():
            if stage > 1 or name_or_path != "tiny":
                return None, None
            config = load_preset(name_or_path, moe_layers=[])
            return load_tiny_processor(config), config.text_config.max_position_embeddings
        config = UniMoEConfig.from_pretrained(name_or_path)
        return AutoProcessor.from_pretrained(name_or_path), config.text_config.max_position_embeddings
    except (OSError, ValueError):
        return None, None


def stage2_experts(source: str | Path) -> list[str]:
    """The expert names stage 2 saved in `source` (`experts/experts.json`), each with its FFN file."""
    experts_file = Path(source) / "experts" / "experts.json"
    if not experts_file.is_file():
        raise FileNotFoundError(f"stage 3 needs the stage-2 output: {experts_file} is missing")
    try:
        names = json.loads(experts_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{experts_file} is not valid JSON ({error})") from None
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        raise ValueError(f"{experts_file}: expected a non-empty list of expert names, got {names!r}")
    if missing := [name for name in names if not (experts_file.parent / f"{name}.safetensors").is_file()]:
        raise FileNotFoundError(f"{experts_file.parent} lacks the FFN file(s) of expert(s) {missing} (<name>.safetensors)")
    return names


def _stage_config(name_or_path: str, stage: int) -> UniMoEConfig | None:
    """The config of the model a stage starts from, without its weights (None where `load_stage_model` will refuse
    the name with its own error)."""
    try:
        if not Path(name_or_path).is_dir() and (PRESETS_DIR / f"{name_or_path}.json").is_file():
            return load_preset(name_or_path, moe_layers=[]) if stage <= 1 else None
        return UniMoEConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


def check_options(stage_args: StageArguments, data_args: DataArguments) -> None:
    """Every option checked before anything loads (model, processor or data), each error naming its option: the
    recipe and stage; the component learning rates (numbers; for stages 0-2 also the module names, against the
    model's architecture built on the meta device); stage 0's captions file; stage 2's expert names; stage 3's MoE
    layers (in the stage-2 model's range), router type, experts per token (at most the stage-2 experts), LoRA rank and
    alpha and router-loss weights; CuMo's stages 2 and 3: see `check_cumo_options`."""
    stage = stage_args.stage
    if stage_args.recipe not in RECIPES:
        raise ValueError(f"--recipe {stage_args.recipe!r}: expected one of {', '.join(RECIPES)}")
    if stage not in STAGES[stage_args.recipe]:
        raise ValueError(f"--stage must be 0, 1, 2 or 3, got {stage}")
    rates = stage_args.learning_rates()
    if stage == 0 and data_args.captions_file is None:
        raise ValueError("stage 0 needs --captions_file: the caption rows that describe the media of --train_files")
    if stage == 3:
        for option in ("router_aux_loss_coef", "router_z_loss_coef"):
            coef = getattr(stage_args, option)
            if coef is not None and not (math.isfinite(coef) and coef >= 0):
                raise ValueError(f"--{option} must be a finite number >= 0, got {coef}")
    if stage_args.recipe == "cumo" and stage >= 2:
        check_cumo_options(stage_args)
    elif stage == 2:
        stage_args.expert_names()
    elif stage == 3:
        moe_layers = stage_args.moe_layer_spec()
        if stage_args.router_type not in ROUTER_TYPES:
            raise ValueError(f"--router_type {stage_args.router_type!r}: expected one of {', '.join(ROUTER_TYPES)}")
        if stage_args.lora_r < 1 or not (math.isfinite(stage_args.lora_alpha) and stage_args.lora_alpha > 0):
            raise ValueError(f"--lora_r must be >= 1 and --lora_alpha > 0, got {stage_args.lora_r} and {stage_args.lora_alpha}")
        names = stage2_experts(stage_args.model_name_or_path)
        if not 1 <= stage_args.num_experts_per_tok <= len(names):
            raise ValueError(
                f"--num_experts_per_tok {stage_args.num_experts_per_tok}: expected 1 to {len(names)}, the experts stage 2 "
                f"trained ({', '.join(names)})"
            )
        config = _stage_config(stage_args.model_name_or_path, stage)
        layers = config.text_config.num_hidden_layers if config is not None else None
        if layers is not None and isinstance(moe_layers, list) and (out := [i for i in moe_layers if i >= layers]):
            raise ValueError(f"--moe_layers {stage_args.moe_layers!r}: the model has layers 0 to {layers - 1}; out of range: {out}")
    if rates and stage <= 2 and (config := _stage_config(stage_args.model_name_or_path, stage)) is not None:
        with torch.device("meta"):  # the architecture, no weights
            parts = {part for name, _ in UniMoEForCausalLM(config).named_parameters() for part in name.split(".")}
        if unknown := sorted(set(rates) - parts):
            components = ", ".join(sorted(part for part in parts if part.endswith(("_tower", "_aligner", "_projector", "language_model", "lm_head"))))
            raise ValueError(
                f"--component_learning_rates names modules the model does not have: {unknown} (its components: {components})"
            )


def check_cumo_options(stage_args: StageArguments) -> None:
    """CuMo's stages 2 and 3, before anything loads: the source model (its config) has a vision tower whose side is
    still dense; for stage 3 the projector's and CLIP's expert counts and top-k, the CLIP layers (against the layers
    that feed the source's `vision_feature_layer`), the router-loss weights, and that something is made sparse."""
    stage, source = stage_args.stage, stage_args.model_name_or_path
    if stage == 3:
        if stage_args.projector_experts < 1:
            raise ValueError(f"--projector_experts must be >= 1 (1 keeps the projector dense), got {stage_args.projector_experts}")
        if stage_args.projector_experts > 1 and not 1 <= stage_args.projector_top_k <= stage_args.projector_experts:
            raise ValueError(
                f"--projector_top_k {stage_args.projector_top_k}: expected 1 to {stage_args.projector_experts} (--projector_experts)"
            )
        layers = stage_args.vision_moe_layer_spec()
        if layers not in ("none", []):
            if stage_args.vision_experts < 1:
                raise ValueError(f"--vision_experts must be >= 1, got {stage_args.vision_experts}")
            if not 1 <= stage_args.vision_top_k <= stage_args.vision_experts:
                raise ValueError(f"--vision_top_k {stage_args.vision_top_k}: expected 1 to {stage_args.vision_experts} (--vision_experts)")
        for option in ("mm_router_aux_loss_coef", "mm_router_z_loss_coef"):
            coef = getattr(stage_args, option)
            if not (math.isfinite(coef) and coef >= 0):
                raise ValueError(f"--{option} must be a finite number >= 0, got {coef}")
    config = _stage_config(source, stage)
    if config is None:
        return  # `load_stage_model` names what is wrong with the source
    if config.vision_config is None:
        raise ValueError(f"--recipe cumo: {source} has no vision tower: CuMo's stage {stage} needs CLIP and its projector")
    if config.projector_num_experts > 1 or config.vision_moe_layers:
        raise ValueError(
            f"--recipe cumo --stage {stage}: the vision side of {source} is already a mixture of experts; stage 2 warms up "
            "and stage 3 co-upcycles a dense one (the output of stage 1, then of stage 2)"
        )
    if stage == 3:
        try:
            resolved = vision_moe_layer_indices(config, layers)
        except ValueError as error:
            raise ValueError(f"--vision_moe_layers {stage_args.vision_moe_layers!r}: {error}") from None
        if stage_args.projector_experts == 1 and not resolved:
            raise ValueError(
                f"--recipe cumo --stage 3: nothing to co-upcycle (--projector_experts 1 and --vision_moe_layers "
                f"{stage_args.vision_moe_layers!r} selects no layer of the {config.vision_feature_depth} that run)"
            )


def check_experts_have_rows(names: list[str], dataset, train_files: list[str]) -> None:
    """Stage 2: every expert has training rows (rows whose `modality` is its name), checked before any trains."""
    modalities = sorted({str(value) for value in dataset["modality"] if value is not None}) if "modality" in dataset.column_names else []
    if missing := [name for name in names if name not in modalities]:
        raise ValueError(
            f"--experts: no training rows with modality {', '.join(map(repr, missing))} in {', '.join(train_files)} "
            f"(the rows' modalities: {', '.join(modalities) or 'none: the rows have no modality field'})"
        )


def _trainer(model, processor, dataset, stage_args, data_args: DataArguments, training_args: TrainingArguments) -> UniMoETrainer:
    collator = UniMoEDataCollator(processor, data_args.media_root, data_args.system_prompt, data_args.cache_encodings)
    if data_args.cache_encodings:
        collator.cache_rows(dataset)
    return UniMoETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        group_by_modality=data_args.group_by_modality,
        component_learning_rates=stage_args.learning_rates(),
    )


def _train(trainer: UniMoETrainer, resume_from_checkpoint=None) -> None:
    """`trainer.train`, then the collator's cached encodings (`--cache_encodings`) are let go: the next stage's
    workers should not fork a process that still holds them."""
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if getattr(trainer.data_collator, "cache", None):
        trainer.data_collator.cache.clear()


def _save(model, processor, output_dir: str, training_args: TrainingArguments):
    if not training_args.should_save:  # one writer under DDP/DeepSpeed: the main process
        return
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def run_stage0(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    if data_args.captions_file is None:
        raise ValueError("stage 0 needs --captions_file: the caption rows that describe the media of --train_files")
    rows = text_warmup_rows(list(dataset), list(load_conversations([data_args.captions_file])))
    model, processor = load_stage_model(stage_args.model_name_or_path, 0)
    prepare_stage0(model)
    trainer = _trainer(model, processor, Dataset.from_list(rows), stage_args, data_args, training_args)
    _train(trainer, training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def run_stage1(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    model, processor = load_stage_model(stage_args.model_name_or_path, 1)
    prepare_stage1(model, train_output_layers=stage_args.train_output_layers, train_towers=stage_args.train_towers)
    trainer = _trainer(model, processor, dataset, stage_args, data_args, training_args)
    _train(trainer, training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def run_stage2(stage_args, data_args, training_args, dataset) -> list[UniMoETrainer]:
    experts = stage_args.expert_names()
    check_experts_have_rows(experts, dataset, data_args.train_files)
    model, processor = load_stage_model(stage_args.model_name_or_path, 2)
    base_ffn = {key: value.clone() for key, value in dense_ffn_state_dict(model).items()}
    output_dir = Path(training_args.output_dir)
    (output_dir / "experts").mkdir(parents=True, exist_ok=True)
    trainers = []
    for name in experts:
        rows = dataset.filter(lambda row: row.get("modality") == name)
        _load_ffn(model, base_ffn)  # every expert starts from the stage-1 FFNs
        prepare_stage2(model, train_output_layers=stage_args.train_output_layers)
        expert_args = TrainingArguments(**{**training_args.to_dict(), "output_dir": str(output_dir / f"run-{name}")})
        trainer = _trainer(model, processor, rows, stage_args, data_args, expert_args)
        _train(trainer)
        save_file(dense_ffn_state_dict(model), output_dir / "experts" / f"{name}.safetensors")
        logger.info("stage 2: expert %r trained on %d rows", name, len(rows))
        trainers.append(trainer)
    _load_ffn(model, base_ffn)
    _save(model, processor, str(output_dir), training_args)
    (output_dir / "experts" / "experts.json").write_text(json.dumps(experts))
    return trainers


def _load_ffn(model, ffn: dict[str, torch.Tensor]):
    """Put stage-2-layout FFN weights (`model.layers.{L}.mlp.*`) back into the dense model, every key checked."""
    state = model.state_dict()
    renamed = {key.replace("model.", "model.language_model.", 1): value for key, value in ffn.items()}
    unknown = sorted(set(renamed) - set(state))
    if unknown:
        raise KeyError(f"FFN keys not in the model: {unknown}")
    model.load_state_dict(state | renamed, strict=True)


def _set_router_loss_weights(model, stage_args: StageArguments):
    """The language model's router-loss weights given on the command line (the others keep the model's)."""
    for option in ("router_aux_loss_coef", "router_z_loss_coef"):
        if getattr(stage_args, option) is not None:
            setattr(model.config.text_config, option, getattr(stage_args, option))


def run_stage3(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    source = Path(stage_args.model_name_or_path)
    names = stage2_experts(source)
    moe_layers = stage_args.moe_layer_spec()
    ffns = [read_state_dict(source / "experts" / f"{name}.safetensors") for name in names]
    dense, processor = load_stage_model(str(source), 3)
    model = upcycle_unimoe(
        dense, ffns, num_experts=len(ffns), num_experts_per_tok=stage_args.num_experts_per_tok,
        moe_layers=moe_layers, router_type=stage_args.router_type,
    )
    _set_router_loss_weights(model, stage_args)
    peft_model = prepare_stage3(
        model, lora_r=stage_args.lora_r, lora_alpha=stage_args.lora_alpha, train_output_layers=stage_args.train_output_layers
    )
    trainer = _trainer(peft_model, processor, dataset, stage_args, data_args, training_args)
    _train(trainer, training_args.resume_from_checkpoint)
    merged = peft_model.merge_and_unload()
    _save(merged, processor, training_args.output_dir, training_args)
    (Path(training_args.output_dir) / "experts.json").write_text(json.dumps(names))
    trainer.model = merged
    return trainer


def run_cumo_stage2(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    """CuMo's pre-finetuning: the whole dense model trains (`stages.prepare_cumo_pft`)."""
    model, processor = load_stage_model(stage_args.model_name_or_path, 2)
    prepare_cumo_pft(model)
    trainer = _trainer(model, processor, dataset, stage_args, data_args, training_args)
    _train(trainer, training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def run_cumo_stage3(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    """CuMo's visual instruction tuning: the stage-2 projector and CLIP MLPs co-upcycled into sparse MoE blocks,
    then everything trained in full (`stages.prepare_cumo_sparse`), every router with its losses."""
    dense, processor = load_stage_model(stage_args.model_name_or_path, 3)
    model = upcycle_multimodal_experts(
        dense,
        projector_num_experts=stage_args.projector_experts,
        projector_num_experts_per_tok=stage_args.projector_top_k,
        vision_moe_layers=stage_args.vision_moe_layer_spec(),
        vision_num_experts=stage_args.vision_experts,
        vision_num_experts_per_tok=stage_args.vision_top_k,
    )
    del dense
    model.config.mm_router_aux_loss_coef = stage_args.mm_router_aux_loss_coef
    model.config.mm_router_z_loss_coef = stage_args.mm_router_z_loss_coef
    _set_router_loss_weights(model, stage_args)
    prepare_cumo_sparse(model)
    trainer = _trainer(model, processor, dataset, stage_args, data_args, training_args)
    _train(trainer, training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def stage1_media_reason(stage_args: StageArguments) -> str | None:
    """Why stage 1 refuses text-only rows (None where it need not): it trains only the connectors (and towers), which
    a text-only row never reaches, so a text-only batch has no gradient. Stages 0, 2 and 3 train the language model
    (all of it, its FFNs, its attention and experts): every row reaches them. `--train_output_layers` adds the final
    norm and head, which a text-only row does reach."""
    if stage_args.train_output_layers:
        return None
    trained = "connectors and towers" if stage_args.train_towers else "connectors"
    return (
        f"stage 1 trains only the {trained}, which a text-only row never reaches (its batch has no gradient; "
        "--train_output_layers also trains the output layers, which it does reach)"
    )


# recipe -> stage -> what runs it; stages 0 and 1 are shared
STAGES = {
    "unimoe": {0: run_stage0, 1: run_stage1, 2: run_stage2, 3: run_stage3},
    "cumo": {0: run_stage0, 1: run_stage1, 2: run_cumo_stage2, 3: run_cumo_stage3},
}


def run(stage_args: StageArguments, data_args: DataArguments, training_args: TrainingArguments):
    check_options(stage_args, data_args)  # before the processor, the data or the model load
    training_args.remove_unused_columns = False  # rows carry media paths the collator needs
    # before any model is built: fresh weights (routers, LoRA) are then the same in every process and every launch
    set_seed(training_args.seed)
    logger.info(
        "%s stage %d on %d process(es), %s", stage_args.recipe, stage_args.stage, training_args.world_size,
        training_args.parallel_mode.value,
    )
    if data_args.media_root is None:
        data_args.media_root = default_media_root(data_args.train_files)
    processor, max_length = load_stage_processor(stage_args.model_name_or_path, stage_args.stage)
    dataset = validate_dataset(
        load_conversations(data_args.train_files), data_args.media_root, data_args.skip_invalid,
        processor=processor, max_length=max_length, system_prompt=data_args.system_prompt,
        media_required=stage1_media_reason(stage_args) if stage_args.stage == 1 else None,
    )
    if stage_args.recipe == "unimoe" and stage_args.stage == 2:  # before the model loads and the first expert trains
        check_experts_have_rows(stage_args.expert_names(), dataset, data_args.train_files)
    return STAGES[stage_args.recipe][stage_args.stage](stage_args, data_args, training_args, dataset)


# transformers 5.23 renamed TrainingArguments' `gradient_checkpointing` to `activation_checkpointing`; the YAMLs use the
# new name, which runs as the old one on the earlier releases in range.
CHECKPOINTING_OPTION = (
    "--activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "--gradient_checkpointing"
)


def yaml_arguments(path: str) -> list[str]:
    """A YAML file of training options (`configuration/training/*.yaml`) as command-line arguments."""
    settings = yaml.safe_load(Path(path).read_text())
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(settings).__name__}")
    arguments = []
    for name, value in settings.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        arguments += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return arguments


def parse_arguments(argv: list[str]) -> tuple["StageArguments", "DataArguments", TrainingArguments]:
    """The command line (a YAML first, then options that override it), with `--activation_checkpointing` under the
    running release's name, as the three argument dataclasses."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_arguments(argv[0]) + argv[1:]  # the command line's options come last and win
    argv = [CHECKPOINTING_OPTION if arg == "--activation_checkpointing" else arg for arg in argv]
    return HfArgumentParser((StageArguments, DataArguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)


@command_line
def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    stage_args, data_args, training_args = parse_arguments(argv)
    run(stage_args, data_args, training_args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank waits for the main process's save, then leaves the process group: a rank that exits with the
        # gloo threads still running can abort ("terminate called without an active exception", SIGABRT).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
