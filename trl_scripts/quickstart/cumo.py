"""CuMo's recipe on the `tiny` preset (`python -m trl_scripts.quickstart --recipe cumo`), on two CPU cores.

The image and video tasks of the synthetic data -> stage 0 text warm-up -> stage 1 alignment -> stage 2
pre-finetuning of the whole dense model -> stage 3: the projector and every CLIP MLP co-upcycled into top-2 sparse
MoE blocks of 4 experts (`upcycling.upcycle_multimodal_experts`), everything trained in full with balance and z-losses
on each router -> held-out exact match per modality and task -> a fresh-process reload through the Auto classes ->
routing heatmap of the projector and CLIP routers -> summary.

CuMo (arXiv 2405.05949; `SHI-Labs/CuMo` `scripts/cumo/mistral_7b/*.sh`) starts from a pretrained LLM and CLIP; the
`tiny` preset's are random, so, as in the default quickstart, stage 0 teaches the language model to answer from text
(each image or video replaced by its caption) and stage 1 trains the random towers with the projector
(`--train_towers`). Both are stated in the summary. Stage 2 trains on the captions (CuMo pre-finetuned on captions,
ALLaVA's), stage 3 on the questions. The language model stays dense, as in CuMo-7B. The recipe and the seeds it was
tuned on: docs/cumo.md.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments

from ..training.plots import plot_routing
from ..training.train import DataArguments, StageArguments, run as run_stage
from ..training.trainer import VISION_MODALITIES, modality_expert_counts
from .make_synthetic_data import TASKS, make_synthetic_dataset
from .run import (
    QuickstartArguments,
    Timings,
    answer_in_fresh_process,
    evaluate_held_out,
    print_fresh_answers,
    print_timings,
)


logger = logging.getLogger(__name__)

RECIPES = ("unimoe", "cumo")


@dataclass
class CuMoQuickstartArguments(QuickstartArguments):
    """The quickstart's options with CuMo's tiny recipe as defaults (stage 2 is the pre-finetuning here), plus the
    co-upcycling of stage 3. `use_espeak` does not apply: the speech rows are left out."""

    recipe: str = field(default="cumo", metadata={"help": "cumo here; unimoe is the default quickstart."})
    output_dir: str = field(default="outputs/quickstart-cumo", metadata={"help": "Data, stage outputs, plots, summary."})
    num_train_per_task: int = field(default=768, metadata={"help": "Training items per image or video task."})
    warmup_epochs: float = 1.0
    stage1_epochs: float = 8.0
    stage2_epochs: float = field(default=1.0, metadata={"help": "Stage 2, CuMo's pre-finetuning (on the captions)."})
    stage3_epochs: float = 2.0
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Stages 2 and 3, which train the whole model (at 3e-3 they lost the video direction: docs/cumo.md)."},
    )
    stage1_learning_rate: float = 1e-3
    warmup_learning_rate: float = field(default=3e-3, metadata={"help": "Stage 0, the text warm-up."})
    num_experts: int = field(
        default=4, metadata={"help": "Stage 3: experts of the MoE projector and of each MoE CLIP MLP (CuMo: 4)."}
    )
    top_k: int = field(default=2, metadata={"help": "Stage 3: experts per token in the projector and CLIP (CuMo: 2)."})
    vision_moe_layers: str = field(default="all", metadata={"help": "Stage 3: all, even, odd or CLIP layer indices."})
    mm_router_aux_loss_coef: float = field(default=0.1, metadata={"help": "Balance-loss weight per router group (CuMo: 0.1)."})
    mm_router_z_loss_coef: float = field(default=0.01, metadata={"help": "z-loss weight per router group (CuMo: 0.01)."})


def quickstart_arguments_class(argv: list[str] | None = None) -> type[QuickstartArguments]:
    """The options class of the recipe named by `--recipe` in `argv` (default: the command line's):
    `QuickstartArguments` for unimoe, `CuMoQuickstartArguments` for cumo (its own defaults and options)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe", default="unimoe")
    recipe = parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].recipe
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    return CuMoQuickstartArguments if recipe == "cumo" else QuickstartArguments


def _training_args(output_dir: Path, epochs: float, learning_rate: float, args: CuMoQuickstartArguments) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, dataloader_num_workers=1,
    )


def image_and_video_data(data: dict) -> dict[str, Path]:
    """The image and video rows of the synthetic data, as `captions.json`, `train.json` and `eval.json` beside it."""
    folder = data["train"].parent
    files = {}
    for split in ("captions", "train", "eval"):
        rows = [row for row in json.loads(data[split].read_text()) if "image" in row or "video" in row]
        files[split] = folder / f"{split}-image-video.json"
        files[split].write_text(json.dumps(rows, indent=1) + "\n")
    return files


def train_cumo_stages(args: CuMoQuickstartArguments, files: dict[str, Path]) -> tuple[Path, dict[str, list[dict]]]:
    """Stages 0-3 of `--recipe cumo` through `trl_scripts.training.train.run`; returns the stage-3 folder and each stage's log
    history."""
    out = Path(args.output_dir)
    train, captions = str(files["train"]), str(files["captions"])
    sparse = StageArguments(
        stage=3, recipe="cumo", model_name_or_path=str(out / "stage2"), projector_experts=args.num_experts,
        projector_top_k=args.top_k, vision_moe_layers=args.vision_moe_layers, vision_experts=args.num_experts,
        vision_top_k=args.top_k, mm_router_aux_loss_coef=args.mm_router_aux_loss_coef,
        mm_router_z_loss_coef=args.mm_router_z_loss_coef,
    )
    plan = [
        ("stage 0: text warm-up", StageArguments(stage=0, recipe="cumo", model_name_or_path="tiny"), [train, captions], args.warmup_epochs),
        (
            "stage 1: alignment",
            StageArguments(stage=1, recipe="cumo", model_name_or_path=str(out / "stage0"), train_towers=True),
            [captions],
            args.stage1_epochs,
        ),
        (
            "stage 2: pre-finetuning",
            StageArguments(stage=2, recipe="cumo", model_name_or_path=str(out / "stage1")),
            [captions],
            args.stage2_epochs,
        ),
        ("stage 3: co-upcycled sparse tuning", sparse, [train], args.stage3_epochs),
    ]
    histories = {}
    for title, stage_args, train_files, epochs in plan:
        learning_rate = {0: args.warmup_learning_rate, 1: args.stage1_learning_rate}.get(stage_args.stage, args.learning_rate)
        start = time.perf_counter()
        data_args = DataArguments(
            train_files=train_files, media_root=str(files["train"].parent), captions_file=captions,
            system_prompt=args.system_prompt,
        )
        trainer = run_stage(stage_args, data_args, _training_args(out / f"stage{stage_args.stage}", epochs, learning_rate, args))
        histories[title] = [entry for entry in trainer.state.log_history if "ce_loss" in entry]
        logger.info("%s done in %.0f s", title, time.perf_counter() - start)
    return out / "stage3", histories


@torch.no_grad()
def multimodal_routing_shares(model, processor, samples, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{"projector": [2, 1, experts], "vision": [2, CLIP MoE layers, experts]}: the share of the image (row 0) and
    video-frame (row 1) tokens that each router sends to each expert (top-k assignments). Batches hold one modality,
    so every router row of a batch is of that modality."""
    config = model.config
    sizes = {
        "projector": (int(config.projector_num_experts > 1), config.projector_num_experts, config.projector_num_experts_per_tok),
        "vision": (len(config.vision_moe_layers), config.vision_num_experts, config.vision_num_experts_per_tok),
    }
    counts = {group: torch.zeros(len(VISION_MODALITIES), layers, experts) for group, (layers, experts, _) in sizes.items()}
    processor.tokenizer.padding_side = "left"
    for index, modality in enumerate(VISION_MODALITIES):
        group_samples = [sample for sample in samples if sample.group == modality]
        for start in tqdm(range(0, len(group_samples), batch_size), desc=f"routing ({modality})", unit="batch"):
            batch = group_samples[start : start + batch_size]
            inputs = processor.apply_chat_template(
                [sample.messages for sample in batch], tokenize=True, return_dict=True, add_generation_prompt=True,
                processor_kwargs={"padding": True},
            )
            outputs = model(**inputs, output_router_logits=True)
            for group, (_, experts, top_k) in sizes.items():
                for layer, logits in enumerate(getattr(outputs, f"{group}_router_logits") or ()):
                    chosen = logits.topk(top_k, dim=-1).indices  # [tokens, k]
                    modality_ids = torch.full((chosen.shape[0],), index)
                    counts[group][:, layer] += modality_expert_counts(modality_ids, chosen, len(VISION_MODALITIES), experts)
    return {group: count / count.sum(dim=-1, keepdim=True).clamp(min=1) for group, count in counts.items()}


def run(args: CuMoQuickstartArguments) -> dict:
    if not isinstance(args, CuMoQuickstartArguments):
        raise TypeError("the CuMo quickstart takes CuMoQuickstartArguments (its defaults are CuMo's tiny recipe)")
    torch.set_num_threads(args.num_threads)
    timings = Timings()
    out = Path(args.output_dir).resolve()
    args.output_dir = str(out)
    with timings.step("synthetic data"):
        data = make_synthetic_dataset(
            out / "data", num_train_per_task=args.num_train_per_task, num_eval_per_task=args.num_eval_per_task,
            seed=args.seed, use_espeak=False,
        )
        files = image_and_video_data(data)
    with timings.step("stages 0-3 (training)"):
        checkpoint, histories = train_cumo_stages(args, files)
    with timings.step("held-out evaluation"):
        model, processor, samples, metrics = evaluate_held_out(
            checkpoint, files["eval"], args.system_prompt, out / "eval", "unimoe-synthetic-quickstart-cumo"
        )
    with timings.step("routing heatmap"):
        shares = multimodal_routing_shares(model, processor, samples)
        heatmap = checkpoint / "routing_heatmap.png"
        panels = ["projector"] * shares["projector"].shape[1] + [f"CLIP layer {i}" for i in model.config.vision_moe_layers]
        plot_routing(
            torch.cat([shares["projector"], shares["vision"]], dim=1), panels, [""] * args.num_experts, heatmap,
            row_labels=list(VISION_MODALITIES),
            title="Share of the image and video-frame tokens each router sends to each expert (top-k assignments, held-out)",
        )
    with timings.step("fresh-process Auto* reload + answers"):
        first = [next(sample for sample in samples if sample.group == modality) for modality in VISION_MODALITIES]
        reloaded = answer_in_fresh_process(checkpoint, first)
    timings.finish()

    print_fresh_answers(first, reloaded)

    print("\nHeld-out accuracy (exact match, local `evaluate` module)")
    print(f"  {'modality / task':<18} {'accuracy':>8} {'chance':>7} {'target':>7}")
    for modality in VISION_MODALITIES:
        accuracy = metrics[f"exact_match/{modality}"]
        flag = "" if accuracy >= 0.9 else "  below target"
        print(f"  {modality:<18} {accuracy:>8.2f} {'':>7} {0.9:>7.2f}{flag}")
        for task, (task_modality, _, answers) in TASKS.items():
            if task_modality == modality:
                print(f"    {task:<16} {metrics[f'exact_match/{task}']:>8.2f} {1 / len(answers):>7.2f}")
    print(f"  {'all':<18} {metrics['exact_match']:>8.2f}")

    config = model.config
    total, active = model.num_parameters(), model.num_active_parameters()
    print("\nModel (CuMo co-upcycled)")
    print(f"  projector: {config.projector_num_experts} experts, top-{config.projector_num_experts_per_tok}; CLIP MLPs of "
          f"layers {config.vision_moe_layers} (of {config.vision_config.num_hidden_layers}; feature layer "
          f"{config.vision_feature_layer}): {config.vision_num_experts} experts, top-{config.vision_num_experts_per_tok}; "
          f"language model dense")
    print(f"  router losses: balance x {config.mm_router_aux_loss_coef}, z-loss x {config.mm_router_z_loss_coef} per router "
          f"group; {total / 1e6:.2f} M parameters, {active / 1e6:.2f} M active per token")
    print("  Not in CuMo's recipe (the tiny preset starts from random weights): stage 0 text warm-up, towers trained in "
          f"stage 1, system prompt {args.system_prompt!r}.")
    print_timings(timings)
    print(f"\n  checkpoint      {checkpoint}")
    print(f"  heatmap         {heatmap}")
    print(f"  predictions     {out / 'eval' / 'predictions.jsonl'}")
    summary = {
        "metrics": metrics, "timings": timings, "answers": reloaded["answers"],
        "routing_shares": {group: value.tolist() for group, value in shares.items()},
        "losses": {title: entries[-1] if entries else {} for title, entries in histories.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
