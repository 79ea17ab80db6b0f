"""Stage 1 of the quickstart with and without `--cache_encodings`, in the same run: seconds per stage (encoding the rows
included) and their ratio, and a check that both runs log the same losses.

The quickstart's stage 1 trains the random towers and the connectors on caption rows for several epochs. Preparing an
audio row (decoding, Whisper log-mel, BEATs fbank) costs more than its training step, so without the cache the
DataLoader's worker, not the model, sets the pace.

    python benchmarks/bench_cache_encodings.py [--num_train_per_task 96] [--epochs 8]
"""

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from trl_scripts.quickstart.make_synthetic_data import make_synthetic_dataset
from trl_scripts.training.train import DataArguments, StageArguments, run


def stage1_seconds(data: dict, output_dir: Path, epochs: float, cache: bool) -> tuple[float, list]:
    data_args = DataArguments(
        train_files=[str(data["captions"])], media_root=str(data["train"].parent), system_prompt="", cache_encodings=cache
    )
    training_args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=1, disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = run(StageArguments(stage=1, model_name_or_path="tiny", train_towers=True), data_args, training_args)
    seconds = time.perf_counter() - start
    return seconds, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_train_per_task", type=int, default=96)
    parser.add_argument("--epochs", type=float, default=8)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        data = make_synthetic_dataset(Path(folder) / "data", num_train_per_task=args.num_train_per_task, num_eval_per_task=1, use_espeak=False)
        uncached, uncached_losses = stage1_seconds(data, Path(folder) / "plain", args.epochs, cache=False)
        cached, cached_losses = stage1_seconds(data, Path(folder) / "cached", args.epochs, cache=True)
    if cached_losses != uncached_losses:
        raise SystemExit("the cached run logged other losses than the uncached one")
    print(f"stage 1, {args.num_train_per_task} items per task, {args.epochs:g} epochs, {torch.get_num_threads()} threads; "
          f"the same {len(cached_losses)} logged losses in both runs")
    print("| stage 1 | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| encoded in the DataLoader worker each epoch (default) | {uncached:.1f} | 1.00 |")
    print(f"| --cache_encodings (each row encoded once, before training) | {cached:.1f} | {uncached / cached:.2f} |")


if __name__ == "__main__":
    main()
