"""Evaluate a saved Uni-MoE checkpoint: batched greedy generation, then metrics through the packaged `evaluate` modules.

    python -m trl_scripts.evaluate --model DIR --data FILE --task {vqa,mcq,caption,asr} [--media_root DIR] \
        [--batch_size 8] [--max_new_tokens 32] [--output_dir outputs/eval] [--group_by modality]

The model loads with `AutoModelForCausalLM` / `AutoProcessor` (`trust_remote_code=True`), so any checkpoint written by
`save_pretrained` works, with or without this package installed. The data file (JSON list or JSONL) may hold:

- our conversation rows (`trl_scripts.training.data`): LLaVA-style `conversations` with `image` / `video` / `audio` / `voice`
  keys, or HF chat `messages`; the final assistant turn is the reference answer;
- the original Uni-MoE evaluation files (`Uni_MoE/data_sample/*.json`): `question_id` or `id`, `image` (a path or a
  list), `video` (a video file, or a list of frame images), `voice` (speech), `text`, `category`, `conversations`
  ending with an empty `gpt` turn, and the references in `gt` (the human answers, e.g. A-OKVQA's 10) or `answer`
  (e.g. MMBench's `["B"]`). Rows whose text has no placeholder for their media (MMBench) get them prepended to the
  first question, image then audio then video, as the original inference did. Question files without answers
  (OK-VQA's, TextVQA's: the original joins them with a separate annotation file) need a `gt` field added first.

An explicit `references`, `answers`, `gt` or `answer` field always wins over the final assistant turn. Media paths are
resolved against `--media_root` (default: the data file's folder); an absolute path that does not exist is also tried
under the root (the original files write `/coco_images/...` relative to an image folder). A row whose media file is
missing, or that has no reference, stops the run before the model is loaded, with an error naming the row and path.

Tasks and metrics (all from `trl_scripts/evaluation/metrics`, plain floats): `vqa` -> vqa_accuracy, exact_match; `mcq` ->
mcq_accuracy, mcq_unparsed (options read from the row's `options` / `choices` or from "A. ..." lines of the question);
`caption` -> bleu (sacrebleu, 0-100); `asr` -> wer, cer. Accuracy metrics are also reported per group
(`<metric>/<group>`) when the rows fall into two or more groups of `--group_by` (default `modality`: the row's
`modality` field, else the media it uses).

Outputs in `--output_dir`: `predictions.jsonl` (one line per row: id, prompt, prediction, references, and the group
and options when used) and `metrics.json`:
`{"task": ..., "dataset": {"name": ..., "type": ..., "split": ...}, "metrics": {name: float}, "num_samples": N}`.
"""

import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from ..console import check_output_dir, command_line
from ..loading import DTYPES, EXPERTS_IMPLEMENTATIONS, load_model_and_processor, model_kwargs, resolve_device
from ..training.data import (
    conversation_turns,
    media_path_candidates,
    modality_mix,
    read_json_rows,
    row_media,
    to_messages,
    with_system_prompt,
)
from .metrics import load_metric
from .metrics.mcq_accuracy.mcq_accuracy import resolve_reference


logger = logging.getLogger(__name__)

TASK_METRICS = {
    "vqa": ("vqa_accuracy", "exact_match"),
    "mcq": ("mcq_accuracy",),
    "caption": ("bleu",),
    "asr": ("wer",),
}
GROUPED_METRICS = {"vqa_accuracy", "exact_match", "mcq_accuracy"}  # the metrics that take `groups`
REFERENCE_KEYS = ("references", "answers", "gt", "answer")
OPTION_KEYS = ("options", "choices")
ID_KEYS = ("id", "question_id")
# the original inference put the media placeholders before the question in this order
PLACEHOLDER_ORDER = ("image", "audio", "video")
OPTION_LINE = re.compile(r"^\s*\(?([A-Z])\)?\s*[.):\uff1a]\s*(\S.*?)\s*$", re.MULTILINE)


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "A checkpoint folder written by save_pretrained (model + processor)."})
    data: str = field(
        metadata={"help": "JSON or JSONL evaluation file (our conversation rows or the original format)."}
    )
    task: Literal["vqa", "mcq", "caption", "asr"] = field(metadata={"help": "Which metrics to compute."})
    media_root: str | None = field(
        default=None, metadata={"help": "Media paths are relative to this folder (default: the data file's)."}
    )
    batch_size: int = 8
    max_new_tokens: int = 32
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions.jsonl and metrics.json go."})
    group_by: str | None = field(
        default="modality",
        metadata={
            "help": "Row field for per-group accuracies ('modality' falls back to the media used); 'none' to disable."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Name in metrics.json (default: the data file's stem)."}
    )
    dataset_type: str | None = field(default=None, metadata={"help": "Dataset id in metrics.json (default: the name)."})
    dataset_split: str = field(default="test", metadata={"help": "Split named in metrics.json."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda when available)."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype: auto (the checkpoint's), float32, bfloat16 or float16."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message of every prompt that has none (default: the chat template's, Vicuna's "
                  "sentence). Use the one the checkpoint was trained with: the quickstart's is ''."},
    )
    quantization: str = field(
        default="none",
        metadata={"help": "none, or int8: the language model's weights in int8 (quant_method unimoe_int8), quantised on "
                  "load; an int8 checkpoint loads as int8 either way."},
    )
    experts_implementation: str = field(
        default="default",
        metadata={"help": f"{', '.join(EXPERTS_IMPLEMENTATIONS)}: the experts kernel (default: transformers' choice, "
                  "grouped_mm; eager is the fastest float32 kernel on CPU, docs/benchmarks.md)."},
    )


@dataclass
class EvalSample:
    """One evaluation row, ready for generation."""

    id: str
    messages: list[dict]  # the prompt as chat messages (no answer turn), media paths resolved
    prompt: str  # the prompt's text with media placeholders, for the predictions file
    references: list[str]
    group: str | None = None
    options: dict[str, str] | None = None


# --------------------------------------------------------------------------------------------------------- reading


def row_id(row: dict, index: int) -> str:
    for key in ID_KEYS:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return f"row-{index}"


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def row_references(row: dict, answer_turn: str | None, rid: str | None = None) -> list[str] | None:
    """The reference answers: an explicit field (a string, or a list of strings or of VQA-style `{"answer": ...}`
    objects), else the answer turn. Any other value (a number, an object without `answer`, a nested list) is refused,
    naming the row (`rid`) and the field, never scored as its Python repr."""
    for key in REFERENCE_KEYS:
        value = row.get(key)
        if value is None or (isinstance(value, (str, list)) and not value):
            continue
        references = []
        for item in value if isinstance(value, list) else [value]:
            text = item["answer"] if isinstance(item, dict) and "answer" in item else item
            if not isinstance(text, str):
                at = f"row {rid}: " if rid is not None else ""
                shown = json.dumps(item, ensure_ascii=False, default=str)
                raise ValueError(
                    f"{at}reference field {key!r} must be a string or a list of strings (or of {{\"answer\": string}} "
                    f"objects), got {type(item).__name__} {shown[:80]}"
                )
            references.append(text.strip())
        references = [reference for reference in references if reference]
        if references:
            return references
    if answer_turn is not None and answer_turn.strip():
        return [answer_turn.strip()]
    return None


def resolve_media_path(path: str, root: Path, rid: str, modality: str) -> str:
    """`path` relative to `root`; an absolute path that does not exist is tried under `root` as well."""
    candidates = media_path_candidates(path, root)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    tried = " or ".join(repr(str(candidate)) for candidate in candidates)
    raise FileNotFoundError(f"row {rid}: {modality} file {path!r} not found (looked for {tried})")


def _prompt_row(row: dict, rid: str) -> dict:
    """The row for `to_messages`, under its evaluation id: a `messages` or `conversations` row as it is, a question-file
    row (LLaVA's, the original's) with its question in `text` only as a one-turn conversation. A `text` that is not a
    non-empty string, and a row with no prompt at all, are errors naming the row."""
    if row.get("messages"):
        return {**row, "id": rid}
    if row.get("conversations"):
        return {**row, "id": rid, "messages": None}
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        return {**row, "id": rid, "messages": None, "conversations": [{"from": "human", "value": text}]}
    if text is not None:
        problem = "is empty" if isinstance(text, str) else f"must be a string, got {type(text).__name__} {text!r}"[:120]
        raise ValueError(f"row {rid}: the prompt 'text' {problem}")
    raise ValueError(f"row {rid}: no prompt (expected 'conversations', 'messages' or 'text')")


def _with_missing_placeholders(row: dict) -> dict:
    """A `conversations` row whose text has no placeholder at all for some of its media (`row_media`: MMBench's rows)
    with them prepended to its first question, image then audio then video, as the original inference did. The turns
    are checked by `conversation_turns`; a `messages` row, or one without a question, is returned as it is."""
    if row.get("messages"):
        return row
    turns = conversation_turns(row)
    text = "".join(value for _, value in turns)
    media = row_media(row)
    missing = "".join(f"<{m}>\n" * len(media[m]) for m in PLACEHOLDER_ORDER if media.get(m) and f"<{m}>" not in text)
    first = next((index for index, (role, _) in enumerate(turns) if role == "user"), None)
    if not missing or first is None:
        return row
    conversation = [dict(turn) for turn in row["conversations"]]
    conversation[first]["value"] = missing + conversation[first]["value"]
    return {**row, "conversations": conversation}


def _with_media_files(message: dict, root: Path, rid: str) -> dict:
    """`message` with each media block's path found under `root` (`resolve_media_path`: a missing file is an error
    naming the row and the path as written); a video given as frame files, frame by frame."""
    if isinstance(message["content"], str):
        return message
    content = []
    for block in message["content"]:
        if block["type"] != "text":
            path = block["path"]
            path = (
                [resolve_media_path(frame, root, rid, "video frame") for frame in path]
                if isinstance(path, list)
                else resolve_media_path(path, root, rid, block["type"])
            )
            block = {**block, "path": path}
        content.append(block)
    return {**message, "content": content}


def _row_messages(row: dict, root: Path, rid: str) -> tuple[list[dict], str | None]:
    """(prompt messages, answer text or None) of a row of any format, read by training's parser (`to_messages`: the
    turns, roles and content blocks checked, placeholders paired with media), media files found under `root`, and the
    final assistant turn split off as the answer. A prompt without a question (no user turn) is an error naming the
    row."""
    messages = to_messages(_with_missing_placeholders(_prompt_row(row, rid)))
    messages = [_with_media_files(message, root, rid) for message in messages]
    answer = None
    if messages and messages[-1]["role"] == "assistant":
        answer = _text_of(messages.pop()["content"])
    if not any(message["role"] == "user" for message in messages):
        raise ValueError(f"row {rid}: the conversation has no question (no user turn before the answer)")
    return messages, answer


def prompt_text(messages: list[dict]) -> str:
    """The prompt as readable text: media as their placeholders, one line per earlier turn when there are several."""
    rendered = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            text = "".join(
                f"<{block['type']}>\n" if block["type"] in ("image", "video", "audio") else block.get("text", "")
                for block in content
            )
        rendered.append((message["role"], text))
    if len(rendered) == 1:
        return rendered[0][1]
    return "\n".join(f"{role.upper()}: {text}" for role, text in rendered)


def parse_options(text: str) -> dict[str, str] | None:
    """Options written as "A. ...", "(B) ...", "C) ..." lines, when they run A, B, C, ... (at least two)."""
    options = {}
    for letter, option in OPTION_LINE.findall(text):
        if letter == string.ascii_uppercase[len(options)]:
            options[letter] = option
        elif letter == "A":  # a new list starts: keep the last one, nearest to the question's end
            options = {"A": option}
    return options if len(options) >= 2 else None


def row_options(row: dict, prompt: str, rid: str) -> dict[str, str] | None:
    for key in OPTION_KEYS:
        value = row.get(key)
        if value:
            if isinstance(value, dict):
                return {str(letter).strip().upper(): str(text) for letter, text in value.items()}
            if not isinstance(value, list) or len(value) > 26:
                raise ValueError(
                    f"row {rid}: '{key}' must be a list of at most 26 option texts or a {{letter: text}} object"
                )
            return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(value)}
    return parse_options(prompt)


def check_mcq_references(sample: EvalSample, data_file: str | Path) -> None:
    """With the row's options known, each reference must be one of them (its letter, or its text, as mcq_accuracy
    reads references): a reference that is neither would be scored against the answer's text, silently wrong."""
    if not sample.options:
        return
    for reference in sample.references:
        if resolve_reference(reference, sample.options) is None:
            raise ValueError(
                f"row {sample.id} in {data_file}: the reference {reference!r} is not one of the row's options "
                f"({', '.join(sample.options)}); give the correct option's letter (or its text)"
            )


def _group_value(row: dict, group_by: str) -> str | None:
    value = row.get(group_by)
    if value is None and group_by == "modality":
        return modality_mix(row)
    if isinstance(value, list):
        return "+".join(sorted(str(v) for v in value))
    return None if value is None else str(value)


def load_eval_samples(
    data_file: str | Path,
    task: str,
    media_root: str | Path | None = None,
    group_by: str | None = "modality",
    max_samples: int | None = None,
    system_prompt: str | None = None,
) -> list[EvalSample]:
    """Every row of `data_file` as an `EvalSample`, checked: media files exist, references are present. A row without
    a system message gets `system_prompt` (None: the chat template's default)."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASK_METRICS)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1 (the number of rows to evaluate), got {max_samples}")
    data_file = Path(data_file)
    root = Path(media_root) if media_root is not None else data_file.resolve().parent
    rows = read_json_rows(data_file)[:max_samples]
    if not rows:
        raise ValueError(f"{data_file}: no rows to evaluate")
    samples, groups = [], []
    for index, row in enumerate(rows):
        rid = row_id(row, index)
        messages, answer = _row_messages(row, root, rid)
        references = row_references(row, answer, rid)
        if references is None:
            raise ValueError(
                f"row {rid} in {data_file}: no reference answer (expected a non-empty final assistant turn or one of "
                f"the fields {', '.join(REFERENCE_KEYS)})"
            )
        if task == "asr" and len(references) != 1:
            raise ValueError(
                f"row {rid} in {data_file}: the asr task takes one reference transcript, got {len(references)}"
            )
        prompt = prompt_text(messages)
        sample = EvalSample(rid, with_system_prompt(messages, system_prompt), prompt, references)
        if task == "mcq":
            sample.options = row_options(row, prompt, rid)
            check_mcq_references(sample, data_file)
        samples.append(sample)
        groups.append(_group_value(row, group_by) if group_by else None)
    if any(group is not None for group in groups):
        missing = [sample.id for sample, group in zip(samples, groups) if group is None]
        if missing:
            raise ValueError(f"{data_file}: rows {missing[:5]} have no {group_by!r} field while other rows do")
        for sample, group in zip(samples, groups):
            sample.group = group
    return samples


# -------------------------------------------------------------------------------------------------------- generating


@torch.inference_mode()
def generate_predictions(
    model, processor, samples: list[EvalSample], batch_size: int = 8, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers for `samples`, `batch_size` prompts at a time, left-padded."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    processor.tokenizer.padding_side = "left"
    predictions = []
    for start in tqdm(range(0, len(samples), batch_size), desc="generating", unit="batch"):
        batch = samples[start : start + batch_size]
        try:
            inputs = processor.apply_chat_template(
                [sample.messages for sample in batch],
                tokenize=True,
                return_dict=True,
                add_generation_prompt=True,
                processor_kwargs={"padding": True},
            )
        except (ValueError, OSError) as error:
            raise ValueError(
                f"rows {[sample.id for sample in batch]}: cannot build the model inputs ({error})"
            ) from error
        inputs = inputs.to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        predictions.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return predictions


# ---------------------------------------------------------------------------------------------------------- scoring


def compute_metrics(task: str, samples: list[EvalSample], predictions: list[str]) -> dict[str, float]:
    """The task's metrics; per-group accuracies too when the samples fall into two or more groups."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    groups = [sample.group for sample in samples]
    grouped = groups if None not in groups and len(set(groups)) > 1 else None
    references = [sample.references for sample in samples]
    results = {}
    for name in TASK_METRICS[task]:
        metric = load_metric(name, keep_in_memory=True)
        kwargs = {"groups": grouped} if name in GROUPED_METRICS and grouped else {}
        if name == "mcq_accuracy":
            kwargs["options"] = [sample.options for sample in samples]
        refs = [refs[0] for refs in references] if name == "wer" else references
        results.update(metric.compute(predictions=predictions, references=refs, **kwargs))
    return results


def write_outputs(
    output_dir: str | Path, task: str, samples: list[EvalSample], predictions: list[str], metrics: dict, dataset: dict
) -> dict:
    """`predictions.jsonl` and `metrics.json` in `output_dir`; returns the metrics.json content."""
    output_dir = check_output_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as file:
        for sample, prediction in zip(samples, predictions):
            line = {"id": sample.id, "prompt": sample.prompt, "prediction": prediction, "references": sample.references}
            if sample.group is not None:
                line["group"] = sample.group
            if sample.options:
                line["options"] = sample.options
            file.write(json.dumps(line, ensure_ascii=False) + "\n")
    result = {"task": task, "dataset": dataset, "metrics": metrics, "num_samples": len(samples)}
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_arguments(args: EvaluationArguments) -> None:
    """The options that need neither the data nor the model, each error naming its option: counts, dtype, device.
    (The model folder is checked after the data, as it loads: a bad row is reported whatever the model.)"""
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max_samples must be at least 1 (the number of rows to evaluate), got {args.max_samples}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    model_kwargs(args.quantization, args.experts_implementation)
    resolve_device(args.device)


def evaluate_checkpoint(args: EvaluationArguments) -> dict:
    """Check the options, read and check the data, generate, score and write the outputs; returns the metrics.json
    content."""
    check_arguments(args)
    group_by = None if args.group_by in (None, "", "none") else args.group_by
    samples = load_eval_samples(args.data, args.task, args.media_root, group_by, args.max_samples, args.system_prompt)
    logger.info("Evaluating %d rows of %s (task %s)", len(samples), args.data, args.task)
    model, processor = load_model_and_processor(
        args.model, args.device, args.dtype, args.quantization, args.experts_implementation
    )
    predictions = generate_predictions(model, processor, samples, args.batch_size, args.max_new_tokens)
    metrics = compute_metrics(args.task, samples, predictions)
    name = args.dataset_name or Path(args.data).stem
    dataset = {"name": name, "type": args.dataset_type or name, "split": args.dataset_split}
    return write_outputs(args.output_dir, args.task, samples, predictions, metrics, dataset)


@command_line
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    result = evaluate_checkpoint(args)
    summary = ", ".join(f"{name} {value:.4f}" for name, value in result["metrics"].items())
    print(f"{args.task} on {result['dataset']['name']} ({result['num_samples']} samples): {summary}")
    print(f"wrote {Path(args.output_dir) / 'predictions.jsonl'} and {Path(args.output_dir) / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
