"""Uni-MoE's progressive training, one stage per call, on transformers' Trainer.

    python -m trl_scripts.train --stage 0 --model_name_or_path tiny --train_files train.json captions.json \
        --captions_file captions.json --output_dir out/stage0        # only for a random LM (not in the paper)
    python -m trl_scripts.train --stage 1 --model_name_or_path tiny --train_files captions.json --media_root DIR \
        --output_dir out/stage1 [TrainingArguments...]
    python -m trl_scripts.train --stage 2 --model_name_or_path out/stage1 --train_files train.json \
        --experts image,video,audio,speech --output_dir out/stage2
    python -m trl_scripts.train --stage 3 --model_name_or_path out/stage2 --train_files train.json --output_dir out/stage3
    python -m trl_scripts.train configuration/training/tiny-stage1.yaml [--output_dir ...]  # a YAML, plus overrides

Media paths in the rows are relative to `--media_root`, by default the folder of the train files (the evaluation
CLI's rule, `trl_scripts.data.media_path_candidates`). Paths in a YAML file are relative to the working directory;
options after the YAML file override its values.

Stage 0, the text warm-up, is not in the paper: a randomly initialised language model (the `tiny` preset) first
learns to answer from text, each media placeholder replaced by its media's caption, as a pretrained LLM already can.
Stage 1 starts from a preset (`tiny`, `small`, ...: a dense language model with the preset's towers) or a saved
model; stage 2 trains, for each name in `--experts`, the stage-1 FFNs on the rows whose `modality` is that name
(the FFNs are reset between experts; connectors, attention and towers stay frozen) and saves each as
`experts/<name>.safetensors`; stage 3 builds the sparse model from those FFNs and tunes it with LoRA, then merges
the adapters and saves a plain checkpoint with its remote code, processor and chat template.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, HfArgumentParser, TrainingArguments, set_seed

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM

from .console import command_line
from .data import UniMoEDataCollator, load_conversations, text_warmup_rows, validate_dataset
from .presets import PRESETS_DIR, load_preset, load_tiny_processor
from .stages import prepare_stage0, prepare_stage1, prepare_stage2, prepare_stage3
from .trainer import UniMoETrainer
from .upcycling import dense_ffn_state_dict, upcycle_unimoe


logger = logging.getLogger(__name__)


@dataclass
class StageArguments:
    stage: int = field(metadata={"help": "0 (text warm-up, random LMs only), 1 (alignment), 2 (modality experts) or 3 (MoE tuning)."})
    model_name_or_path: str = field(metadata={"help": "A preset name (stage 1) or the previous stage's output folder."})
    experts: str = field(default="", metadata={"help": "Stage 2: comma-separated modality names, one expert each, in expert order."})
    num_experts_per_tok: int = 2
    moe_layers: str = field(default="all", metadata={"help": "Stage 3: all, even, odd or comma-separated layer indices."})
    router_type: str = "topk_softmax"
    lora_r: int = 8
    lora_alpha: int = 16
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Stage 3: weight of the balance loss (default: keep the stage-2 model's)."}
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
        """`component_learning_rates` as {module name: learning rate}."""
        rates = {}
        for item in filter(None, (part.strip() for part in self.component_learning_rates.split(","))):
            name, _, value = item.partition("=")
            try:
                rates[name.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"--component_learning_rates: {item!r} is not 'module=learning_rate' (e.g. speech_tower=1e-3)"
                ) from None
        return rates


@dataclass
class DataArguments:
    train_files: list[str] = field(metadata={"help": "JSON/JSONL conversation files."})
    media_root: str | None = field(
        default=None, metadata={"help": "Media paths in the rows are relative to this folder (default: the train files' folder)."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Drop (and count) invalid rows: no conversation or assistant reply, missing, unreadable or "
                  "NaN media, audio over max_audio_windows, text over the model maximum after media expansion."},
    )
    group_by_modality: bool = field(default=True, metadata={"help": "One modality mix per global batch."})
    captions_file: str | None = field(
        default=None, metadata={"help": "Stage 0: caption rows (stage-1 data) describing the media of --train_files."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message for rows without one (default: the chat template's, Vicuna v1's sentence)."},
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
            raise FileNotFoundError(
                f"--model_name_or_path {name_or_path!r}: no such folder ({Path(name_or_path).resolve()}), not a preset "
                f"({presets}), and not loadable from the Hub ({error})"
            ) from error
    if not Path(name_or_path).is_dir():
        if stage > 1:
            raise ValueError(f"stage {stage} continues from the previous stage's output folder, not the preset {name_or_path!r}")
        if name_or_path != "tiny":
            raise ValueError(f"only the `tiny` preset ships a tokenizer; build {name_or_path!r} with trl_scripts.assemble first")
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


def _trainer(model, processor, dataset, stage_args, data_args: DataArguments, training_args: TrainingArguments) -> UniMoETrainer:
    return UniMoETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=UniMoEDataCollator(processor, data_args.media_root, data_args.system_prompt),
        group_by_modality=data_args.group_by_modality,
        component_learning_rates=stage_args.learning_rates(),
    )


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
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def run_stage1(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    model, processor = load_stage_model(stage_args.model_name_or_path, 1)
    prepare_stage1(model, train_output_layers=stage_args.train_output_layers, train_towers=stage_args.train_towers)
    trainer = _trainer(model, processor, dataset, stage_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    _save(model, processor, training_args.output_dir, training_args)
    return trainer


def run_stage2(stage_args, data_args, training_args, dataset) -> list[UniMoETrainer]:
    experts = [name for name in stage_args.experts.split(",") if name]
    if not experts:
        raise ValueError("stage 2 needs --experts, e.g. image,video,audio,speech")
    model, processor = load_stage_model(stage_args.model_name_or_path, 2)
    base_ffn = {key: value.clone() for key, value in dense_ffn_state_dict(model).items()}
    output_dir = Path(training_args.output_dir)
    (output_dir / "experts").mkdir(parents=True, exist_ok=True)
    trainers = []
    for name in experts:
        rows = dataset.filter(lambda row: row.get("modality") == name)
        if len(rows) == 0:
            raise ValueError(f"stage 2: no training rows with modality {name!r} in {data_args.train_files}")
        _load_ffn(model, base_ffn)  # every expert starts from the stage-1 FFNs
        prepare_stage2(model, train_output_layers=stage_args.train_output_layers)
        expert_args = TrainingArguments(**{**training_args.to_dict(), "output_dir": str(output_dir / f"run-{name}")})
        trainer = _trainer(model, processor, rows, stage_args, data_args, expert_args)
        trainer.train()
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


def run_stage3(stage_args, data_args, training_args, dataset) -> UniMoETrainer:
    source = Path(stage_args.model_name_or_path)
    experts_file = source / "experts" / "experts.json"
    if not experts_file.is_file():
        raise FileNotFoundError(f"stage 3 needs the stage-2 output: {experts_file} is missing")
    names = json.loads(experts_file.read_text())
    ffns = [load_file(source / "experts" / f"{name}.safetensors") for name in names]
    dense, processor = load_stage_model(str(source), 3)
    moe_layers = stage_args.moe_layers if stage_args.moe_layers in ("all", "even", "odd") else [int(i) for i in stage_args.moe_layers.split(",")]
    model = upcycle_unimoe(
        dense, ffns, num_experts=len(ffns), num_experts_per_tok=stage_args.num_experts_per_tok,
        moe_layers=moe_layers, router_type=stage_args.router_type,
    )
    if stage_args.router_aux_loss_coef is not None:
        model.config.text_config.router_aux_loss_coef = stage_args.router_aux_loss_coef
    peft_model = prepare_stage3(
        model, lora_r=stage_args.lora_r, lora_alpha=stage_args.lora_alpha, train_output_layers=stage_args.train_output_layers
    )
    trainer = _trainer(peft_model, processor, dataset, stage_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    merged = peft_model.merge_and_unload()
    _save(merged, processor, training_args.output_dir, training_args)
    (Path(training_args.output_dir) / "experts.json").write_text(json.dumps(names))
    trainer.model = merged
    return trainer


STAGES = {0: run_stage0, 1: run_stage1, 2: run_stage2, 3: run_stage3}


def run(stage_args: StageArguments, data_args: DataArguments, training_args: TrainingArguments):
    if stage_args.stage not in STAGES:
        raise ValueError(f"--stage must be 0, 1, 2 or 3, got {stage_args.stage}")
    training_args.remove_unused_columns = False  # rows carry media paths the collator needs
    # before any model is built: fresh weights (routers, LoRA) are then the same in every process and every launch
    set_seed(training_args.seed)
    logger.info("stage %d on %d process(es), %s", stage_args.stage, training_args.world_size, training_args.parallel_mode.value)
    if data_args.media_root is None:
        data_args.media_root = default_media_root(data_args.train_files)
    processor, max_length = load_stage_processor(stage_args.model_name_or_path, stage_args.stage)
    dataset = validate_dataset(
        load_conversations(data_args.train_files), data_args.media_root, data_args.skip_invalid,
        processor=processor, max_length=max_length, system_prompt=data_args.system_prompt,
    )
    return STAGES[stage_args.stage](stage_args, data_args, training_args, dataset)


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


@command_line
def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((StageArguments, DataArguments, TrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_arguments(argv[0]) + argv[1:]  # the command line's options come last and win
    stage_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    run(stage_args, data_args, training_args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank waits for the main process's save, then leaves the process group: a rank that exits with the
        # gloo threads still running can abort ("terminate called without an active exception", SIGABRT).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
