"""Quickstart (`make demo`): Uni-MoE's progressive training end to end on the `tiny` preset, on two CPU cores.

synthetic data (images, video, audio events, speech) -> stage 0 text warm-up -> stage 1 alignment -> stage 2 one
expert per modality -> stage 3 MoE tuning (LoRA, merged) -> held-out evaluation through a local `evaluate` metric ->
fresh-process reload through the Auto classes with `trust_remote_code=True` -> one answer per modality -> routing
heatmap and loss curve PNGs -> summary.

Beyond the paper's recipe, because the `tiny` preset starts from random weights (its LLM and towers were never
pretrained): stage 0 teaches the language model to answer from text (each media item replaced by its caption),
stage 1 trains the random towers with the connectors (`--train_towers`), and the prompts carry an empty system
message instead of Vicuna's 40-token sentence, which a random 4-layer model learns to look past only slowly. The
summary prints all three.

`--recipe cumo` runs CuMo's recipe on the image and video tasks instead (`trl_scripts.quickstart.cumo`).
"""

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, TrainingArguments

from ..console import command_line
from ..evaluation.evaluate import EvalSample, generate_predictions, write_outputs
from ..evaluation.metrics import load_metric
from ..training.data import to_messages, with_system_prompt
from ..training.plots import plot_losses, plot_routing
from ..training.train import DataArguments, StageArguments, run as run_stage
from ..training.trainer import modality_expert_counts
from .make_synthetic_data import MODALITIES, TASKS, make_synthetic_dataset


logger = logging.getLogger(__name__)


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Data, stage outputs, plots, summary."})
    num_train_per_task: int = field(
        default=768, metadata={"help": "Training items per task: many fresh items for few epochs generalise better than few items for many."}
    )
    num_eval_per_task: int = field(default=100, metadata={"help": "Held-out items per task (100: one item is one percentage point)."})
    use_espeak: bool = field(
        default=False, metadata={"help": "Synthesise speech with espeak-ng (default: the committed clips, the same on every machine)."}
    )
    system_prompt: str = field(default="", metadata={"help": "System message of every prompt (see the module doc)."})
    warmup_epochs: float = 1.0
    stage1_epochs: float = 8.0
    stage2_epochs: float = 1.0
    stage3_epochs: float = 2.0
    learning_rate: float = field(default=3e-3, metadata={"help": "Stages 0, 2 and 3."})
    stage1_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Stage 1: the random towers learn the beep count and the video direction in a jump after a "
                  "plateau, which at 3e-3 outlasted stage 1 on some seeds."},
    )
    batch_size: int = 8
    seed: int = 0
    num_threads: int = field(
        default=1, metadata={"help": "torch threads: the tiny model's ops are too small to split; the other core loads data."}
    )
    recipe: str = field(
        default="unimoe",
        metadata={"help": "unimoe: Uni-MoE's stages on all four modalities (the options above); cumo: CuMo's co-upcycled "
                  "vision MoE on the image and video tasks (trl_scripts.quickstart.cumo; its options: --recipe cumo --help)."},
    )


def _training_args(output_dir: Path, epochs: float, learning_rate: float, args: QuickstartArguments) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=1,
    )


def train_all_stages(args: QuickstartArguments, data: dict) -> tuple[Path, dict[str, list[dict]]]:
    """Stages 0-3 through `trl_scripts.training.train.run`; returns the stage-3 folder and each stage's log history."""
    out = Path(args.output_dir)
    media_root = str(data["train"].parent)
    train, captions = str(data["train"]), str(data["captions"])
    plan = [
        ("stage 0: text warm-up", StageArguments(stage=0, model_name_or_path="tiny"), [train, captions], args.warmup_epochs),
        ("stage 1: alignment", StageArguments(stage=1, model_name_or_path=str(out / "stage0"), train_towers=True), [captions], args.stage1_epochs),
        (
            "stage 2: modality experts",
            StageArguments(stage=2, model_name_or_path=str(out / "stage1"), experts=",".join(MODALITIES)),
            [train],
            args.stage2_epochs,
        ),
        ("stage 3: MoE tuning", StageArguments(stage=3, model_name_or_path=str(out / "stage2")), [train], args.stage3_epochs),
    ]
    histories = {}
    for index, (title, stage_args, files, epochs) in enumerate(plan):
        learning_rate = args.stage1_learning_rate if stage_args.stage == 1 else args.learning_rate
        start = time.perf_counter()
        # Stage 1 runs 8 epochs over the same captions, and preparing its audio rows costs 4x their training step:
        # encode each row once (the same batches; about 0.5 GB for its 3,072 rows).
        data_args = DataArguments(
            train_files=files, media_root=media_root, captions_file=captions, system_prompt=args.system_prompt,
            cache_encodings=stage_args.stage == 1,
        )
        result = run_stage(stage_args, data_args, _training_args(out / f"stage{index}", epochs, learning_rate, args))
        trainers = result if isinstance(result, list) else [result]
        histories[title] = [entry for trainer in trainers for entry in trainer.state.log_history if "ce_loss" in entry]
        logger.info("%s done in %.0f s", title, time.perf_counter() - start)
    return out / "stage3", histories


class Timings(dict):
    """Seconds per step of a run, in the order the steps ran; `total` counts from creation."""

    def __init__(self):
        super().__init__()
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str):
        mark = time.perf_counter()
        yield
        self[name] = time.perf_counter() - mark

    def finish(self) -> "Timings":
        self["total"] = time.perf_counter() - self._start
        return self


def print_fresh_answers(samples: list, reloaded: dict) -> None:
    print("\nAnswers from a fresh process (AutoModelForCausalLM + AutoProcessor, trust_remote_code=True):")
    print(f"  class {reloaded['class']}")
    for sample, answer in zip(samples, reloaded["answers"]):
        print(f"  [{sample.group:<6}] {sample.prompt.splitlines()[-1]:<34} -> {answer!r:<10} (expected {sample.references[0]!r})")


def print_timings(timings: Timings) -> None:
    print("\nTime (2 CPU cores)")
    for name, seconds in timings.items():
        print(f"  {name:<40} {seconds:6.1f} s")


def eval_samples(rows: list[dict], media_root: Path, system_prompt: str) -> list[EvalSample]:
    samples = []
    for row in rows:
        messages = with_system_prompt(to_messages(row, media_root)[:1], system_prompt)
        answer = row["conversations"][1]["value"]
        samples.append(EvalSample(row["id"], messages, row["conversations"][0]["value"], [answer], row["modality"]))
    return samples


@torch.no_grad()
def routing_shares(model, processor, samples: list[EvalSample], batch_size: int = 32) -> torch.Tensor:
    """[modalities, sparse layers, experts]: share of each modality's media tokens (top-k assignments) per expert."""
    text = model.config.text_config
    num_experts = text.num_experts
    counts = torch.zeros(len(MODALITIES), len(text.sparse_layer_indices), num_experts)
    media_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id, model.config.audio_token_id])
    processor.tokenizer.padding_side = "left"
    for start in tqdm(range(0, len(samples), batch_size), desc="routing", unit="batch"):
        batch = samples[start : start + batch_size]
        inputs = processor.apply_chat_template(
            [sample.messages for sample in batch], tokenize=True, return_dict=True, add_generation_prompt=True,
            processor_kwargs={"padding": True},
        )
        router_logits = model(**inputs, output_router_logits=True).router_logits
        is_media = torch.isin(inputs["input_ids"], media_ids)  # [batch, seq]; padding is never media
        modality = torch.tensor([MODALITIES.index(sample.group) for sample in batch])[:, None].expand_as(is_media)
        modality = modality[is_media]  # [media tokens]
        for layer, logits in enumerate(router_logits):
            chosen = logits.reshape(*is_media.shape, num_experts)[is_media].topk(text.num_experts_per_tok, dim=-1).indices
            counts[:, layer] += modality_expert_counts(modality, chosen, len(MODALITIES), num_experts)
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)


def answer_in_fresh_process(checkpoint: Path, samples: list[EvalSample]) -> dict:
    """Load `checkpoint` through AutoModelForCausalLM/AutoProcessor with trust_remote_code in a new interpreter that
    cannot import this package, and answer each sample's prompt greedily."""
    result_path = checkpoint.parent / "fresh_process_answers.json"
    prompts = [sample.messages for sample in samples]
    code = textwrap.dedent(
        f"""
        import json, sys
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        answers = []
        for messages in json.loads({json.dumps(prompts)!r}):
            inputs = processor.apply_chat_template([messages], tokenize=True, return_dict=True, add_generation_prompt=True)
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        ours = [name for name in sys.modules if name.split(".")[0] in ("modeling_unimoe", "trl_scripts")]
        json.dump({{"answers": answers, "class": type(model).__module__ + "." + type(model).__name__,
                    "our_modules_imported": ours}}, open({str(result_path)!r}, "w"))
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=checkpoint.parent, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"Fresh-process reload of {checkpoint} failed:\n{result.stderr[-3000:]}")
    reloaded = json.loads(result_path.read_text())
    if reloaded["our_modules_imported"]:
        raise RuntimeError(f"The fresh process imported our package: {reloaded['our_modules_imported']}")
    return reloaded



def evaluate_held_out(checkpoint: Path, eval_file: Path, system_prompt: str, eval_dir: Path, dataset_name: str):
    """Greedy answers of the checkpoint to the held-out rows, scored by exact match overall, per modality
    (`exact_match/<modality>`) and per task (`exact_match/<task>`); written to `eval_dir` (predictions, metrics) and to
    the checkpoint's `eval_results.json` (the model card's evaluation results). -> (model, processor, samples, metrics)"""
    from modeling_unimoe import UniMoEForCausalLM, UniMoEProcessor

    model = UniMoEForCausalLM.from_pretrained(checkpoint).eval()
    processor = UniMoEProcessor.from_pretrained(checkpoint)
    rows = json.loads(eval_file.read_text())
    samples = eval_samples(rows, eval_file.parent, system_prompt)
    # The whole answer up to </s> (the longest, "very high", is four tokens); the metric ignores case and punctuation.
    predictions = generate_predictions(model, processor, samples, batch_size=32, max_new_tokens=8)
    references = [sample.references for sample in samples]
    exact_match = load_metric("exact_match")
    metrics = exact_match.compute(predictions=predictions, references=references, groups=[sample.group for sample in samples])
    by_task = exact_match.compute(predictions=predictions, references=references, groups=[row["task"] for row in rows])
    metrics |= {key: value for key, value in by_task.items() if key != "exact_match"}
    write_outputs(eval_dir, "vqa", samples, predictions, metrics, {"name": dataset_name, "type": "synthetic", "split": "eval"})
    (checkpoint / "eval_results.json").write_text((eval_dir / "metrics.json").read_text())
    return model, processor, samples, metrics

def run(args: QuickstartArguments) -> dict:
    if args.recipe == "cumo":
        from .cumo import run as run_cumo

        return run_cumo(args)
    torch.set_num_threads(args.num_threads)
    timings = Timings()
    out = Path(args.output_dir).resolve()
    args.output_dir = str(out)
    with timings.step("synthetic data"):
        data = make_synthetic_dataset(
            out / "data", num_train_per_task=args.num_train_per_task, num_eval_per_task=args.num_eval_per_task,
            seed=args.seed, use_espeak=args.use_espeak,
        )
    with timings.step("stages 0-3 (training)"):
        checkpoint, histories = train_all_stages(args, data)
    with timings.step("held-out evaluation"):
        model, processor, samples, metrics = evaluate_held_out(
            checkpoint, data["eval"], args.system_prompt, out / "eval", "unimoe-synthetic-quickstart"
        )
    with timings.step("routing heatmap + loss curve"):
        experts = json.loads((checkpoint / "experts.json").read_text())
        text = model.config.text_config
        shares = routing_shares(model, processor, samples)
        heatmap = checkpoint / "routing_heatmap.png"
        plot_routing(shares, text.sparse_layer_indices, experts, heatmap, row_labels=list(MODALITIES))
        plot_losses(histories, out / "loss_curve.png")
    with timings.step("fresh-process Auto* reload + answers"):
        first = [next(sample for sample in samples if sample.group == modality) for modality in MODALITIES]
        reloaded = answer_in_fresh_process(checkpoint, first)
    timings.finish()

    print_fresh_answers(first, reloaded)

    chance = {m: sum(1 / len(TASKS[t][2]) for t in TASKS if TASKS[t][0] == m) / sum(TASKS[t][0] == m for t in TASKS) for m in MODALITIES}
    uniform = 1 / len(experts)
    print("\nHeld-out accuracy (exact match, local `evaluate` module) and routing to the modality's own expert")
    print(f"  {'modality':<8} {'accuracy':>8} {'chance':>7} {'target':>7}   {'own-expert share':>16} {'uniform':>8}")
    for index, modality in enumerate(MODALITIES):
        own = shares[index, :, experts.index(modality)].mean().item() if modality in experts else float("nan")
        accuracy = metrics[f"exact_match/{modality}"]
        flag = "" if accuracy >= 0.9 else "  below target"
        print(f"  {modality:<8} {accuracy:>8.2f} {chance[modality]:>7.2f} {0.9:>7.2f}   {own:>16.2f} {uniform:>8.2f}{flag}")
    print(f"  {'all':<8} {metrics['exact_match']:>8.2f}")

    total, active = model.num_parameters(), model.num_active_parameters()
    print("\nModel")
    print(f"  {text.num_experts} experts ({', '.join(experts)}), top-{text.num_experts_per_tok}, "
          f"{len(text.sparse_layer_indices)} of {text.num_hidden_layers} layers sparse; "
          f"{total / 1e6:.2f} M parameters, {active / 1e6:.2f} M active per token")
    print("  Not in the paper's recipe (the tiny preset starts from random weights): stage 0 text warm-up, "
          f"towers trained in stage 1, system prompt {args.system_prompt!r} instead of Vicuna's sentence.")
    print_timings(timings)
    print(f"\n  checkpoint      {checkpoint}")
    print(f"  heatmap         {checkpoint / 'routing_heatmap.png'}")
    print(f"  loss curve      {out / 'loss_curve.png'}")
    print(f"  predictions     {out / 'eval' / 'predictions.jsonl'}")
    summary = {"metrics": metrics, "timings": timings, "own_expert_share": shares.tolist(), "answers": reloaded["answers"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@command_line
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    from .cumo import logger as cumo_logger, quickstart_arguments_class

    cumo_logger.setLevel(logging.INFO)
    (args,) = HfArgumentParser(quickstart_arguments_class(argv)).parse_args_into_dataclasses(args=argv)
    return run(args)


if __name__ == "__main__":
    main()
