"""Training data for Uni-MoE: the conversation format, loading with `datasets`, validation, the collator and the
modality-grouped sampler.

Rows follow the original Uni-MoE / LLaVA JSON format

    {"id": "...", "image": "path", "video": "path", "audio": "path" or ["path", ...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}]}

(`"voice"` is accepted for `"audio"`, as in the original speech data; a `"video"` list of frame image files,
`["frame_000.jpg", ...]`, is one video given as its frames, as in the original data), or carry HF chat `"messages"`
with content lists (`{"type": "image", "path": ...}` or `{"type": "image", "image": ...}`; a video block's path may be
such a frame list; local files only, not URLs). Media paths are resolved against a root directory and decoded
lazily, by the processor, when the collator builds a batch. The k-th `<image>` of a row takes the row's k-th image,
and so on.
"""

import json
import logging
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm
from transformers import BatchFeature

from modeling_unimoe.processing_unimoe import (
    UniMoEChatContentTypeError,
    check_chat_messages,
    is_frame_paths,
    load_audio,
    load_image,
    load_video,
)


logger = logging.getLogger(__name__)

MEDIA_KEYS = {"image": "image", "video": "video", "audio": "audio", "voice": "audio"}
PLACEHOLDER = re.compile(r"<(image|video|audio)>\n?")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _items(row: dict, modality: str) -> list[str | list[str]]:
    """The row's media of `modality`, one entry per placeholder: a path, or a video's list of frame files."""
    items = []
    for key, kind in MEDIA_KEYS.items():
        value = row.get(key)
        if kind != modality or not value:
            continue
        if isinstance(value, str) or (modality == "video" and is_frame_paths(value)):
            items.append(value)
        else:
            items.extend(value)
    return items


def media_path_candidates(path: str, media_root: str | Path | None) -> list[Path]:
    """Where a row's media path may be, in order: relative paths under `media_root`; an absolute path as written,
    then under `media_root` (the original's files write `/coco_images/x.jpg` for a file in the media folder). The
    training and evaluation CLIs resolve paths with this one rule."""
    path = Path(str(path))
    if media_root is None:
        return [path]
    under_root = Path(media_root) / str(path).lstrip("/")
    return [path, under_root] if path.is_absolute() else [under_root]


def _resolver(media_root: str | Path | None):
    """path (or list of frame paths) -> the first existing candidate (`media_path_candidates`; the last one when none
    exists, for the processor or validation to name), as strings / a list of strings."""

    def resolve(item):
        if isinstance(item, (list, tuple)):
            return [resolve(path) for path in item]
        candidates = media_path_candidates(item, media_root)
        return str(next((candidate for candidate in candidates if candidate.is_file()), candidates[-1]))

    return resolve


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _block_source(block: dict, at: str) -> str | list[str]:
    """The media file of a `messages` content block: its `path`, or a string under its type key (`{"type": "image",
    "image": "x.png"}`, the form the processor and the README take), resolved like `path`; a video's may be a list of
    frame files. Training and evaluation read local files only: a URL (`url`, or `http://...` as the path) is refused,
    and so are a block without a file, one giving it twice (the processor would take both) and a non-path value."""
    kind = block["type"]
    given = {key: block[key] for key in (kind, "path", "url") if block.get(key) not in (None, "")}
    if not given:
        raise ValueError(f"{at}: {kind} block without a path")
    if len(given) > 1:
        raise ValueError(f"{at}: {kind} block with both {' and '.join(map(repr, given))}: give its file once, as 'path'")
    key, source = next(iter(given.items()))
    if key == "url" or (isinstance(source, str) and URL.match(source)):
        raise ValueError(
            f"{at}: {kind} URL {source!r}: only local media files are supported; download it and give its path"
        )
    if isinstance(source, str) or (kind == "video" and is_frame_paths(source)):
        return source if isinstance(source, str) else list(source)
    frames = ", or a list of frame image files" if kind == "video" else ""
    raise UniMoEChatContentTypeError(f"{at}: {kind} {key!r} must be a file path (a str{frames}), got {type(source).__name__}")


def media_key(item: str | list[str]) -> str | tuple[str, ...]:
    """A hashable key for a media entry (a video's frame list becomes a tuple)."""
    return tuple(item) if isinstance(item, list) else item


def row_media(row: dict, media_root: str | Path | None = None) -> dict[str, list[str | list[str]]]:
    """{modality: [resolved path, or a video's resolved frame paths]} of a row, in placeholder order."""
    resolve = _resolver(media_root)
    if row.get("messages"):
        media = defaultdict(list)
        for message in row["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            for block in content if isinstance(content, (list, tuple)) else []:
                if isinstance(block, dict) and block.get("type") in ("image", "video", "audio"):
                    source = next((block[key] for key in (block["type"], "path") if block.get(key) not in (None, "")), None)
                    if source is not None:
                        media[block["type"]].append(resolve(source))
        return dict(media)
    return {modality: [resolve(item) for item in _items(row, modality)] for modality in ("image", "video", "audio") if _items(row, modality)}


def to_messages(row: dict, media_root: str | Path | None = None) -> list[dict]:
    """The row as HF chat messages with content lists, media paths resolved against `media_root`.

    Whatever the chat template would drop or render wrongly is an error naming the row and the turn or message,
    never a row that trains with the item silently missing: no or an empty conversation, a turn refused by
    `conversation_turns`, a placeholder without its media or media without a placeholder, a message without a role
    or with one other than system, user and assistant (case-sensitive), a text that is not a string, a content block
    without a type, of another type than text, image, video and audio, or (media) without a path, as
    `processing_unimoe.check_chat_messages` refuses them in the processor. A media block's file may be its `path` or
    a string under its type key (`_block_source`: local files only); it comes out as `path`."""
    if row.get("messages") is not None:
        return _chat_row_messages(row, media_root)
    return _conversation_row_messages(row, media_root)


def _chat_row_messages(row: dict, media_root: str | Path | None) -> list[dict]:
    """`to_messages` of an HF chat `messages` row: checked by `check_chat_messages`, each media block as `{"type",
    "path"}`, its one file (`_block_source`) resolved against `media_root`."""
    row_id = row.get("id", "?")
    given = row["messages"]
    if not isinstance(given, (list, tuple)):
        raise UniMoEChatContentTypeError(f"row {row_id}: 'messages' is of type {type(given).__name__}, expected a list")

    def present(item):  # `datasets` gives every message and block each key of the file, None where it has none
        return {key: value for key, value in item.items() if value is not None} if isinstance(item, dict) else item

    given = [present(message) for message in given]
    given = [
        {**message, "content": [present(block) for block in message["content"]]}
        if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple))
        else message
        for message in given
    ]
    check_chat_messages(given, f"row {row_id}")
    resolve = _resolver(media_root)
    messages = []
    for index, message in enumerate(given):
        content = message.get("content", [])
        if not isinstance(content, str):
            content = [
                block if block["type"] == "text" else {
                    "type": block["type"],
                    "path": resolve(_block_source(block, f"row {row_id}, message {index}, content block {number}")),
                }
                for number, block in enumerate(content)
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


def conversation_turns(row: dict) -> list[tuple[str, str]]:
    """(role, text) of each turn of a LLaVA-style `conversations` row, the speaker mapped by `ROLES`. Checked, each
    error naming the row (and the turn): a conversation that is missing, not a list or empty; a turn that is not a
    dict, without `from`, with a speaker not in `ROLES` (case-sensitive), a system turn after the first, a turn
    without `value` or whose `value` is not a str."""
    row_id = row.get("id", "?")
    turns = row.get("conversations")
    if turns is None:
        raise ValueError(f"row {row_id}: no conversation (expected 'conversations' or 'messages')")
    if not isinstance(turns, (list, tuple)):
        raise UniMoEChatContentTypeError(
            f"row {row_id}: 'conversations' must be a list of turns ({{'from', 'value'}}), got {type(turns).__name__}"
        )
    if not turns:
        raise ValueError(f"row {row_id}: the conversation is empty: it needs at least one turn")
    checked = []
    for index, turn in enumerate(turns):
        at = f"row {row_id}, turn {index}"
        if not isinstance(turn, dict):
            raise UniMoEChatContentTypeError(f"{at} is of type {type(turn).__name__}, expected a dict with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker is None:
            raise ValueError(f"{at} has no 'from' (expected one of {', '.join(ROLES)})")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            hint = "; speakers are case-sensitive" if isinstance(speaker, str) and speaker.lower() in ROLES else ""
            raise ValueError(f"{at}: unknown speaker {speaker!r} (expected one of {', '.join(ROLES)}){hint}")
        if role == "system" and index > 0:
            raise ValueError(f"{at}: a system turn after the first turn; Vicuna v1 has one system prompt, the first turn")
        if "value" not in turn:
            raise ValueError(f"{at} has no 'value'")
        if not isinstance(turn["value"], str):
            raise UniMoEChatContentTypeError(f"{at}: 'value' must be a str, got {type(turn['value']).__name__}")
        checked.append((role, turn["value"]))
    return checked


def _conversation_row_messages(row: dict, media_root: str | Path | None) -> list[dict]:
    """`to_messages` of a `conversations` row (`conversation_turns`): the k-th `<image>` of the conversation takes the
    row's k-th image (`row_media`), and so on; a placeholder without its media, or media left without a placeholder,
    is an error naming the row."""
    row_id = row.get("id", "?")
    turns = conversation_turns(row)
    media = {modality: iter(paths) for modality, paths in row_media(row, media_root).items()}
    messages = [{"role": role, "content": _turn_content(text, media, row_id)} for role, text in turns]
    unused = {modality: left for modality, paths in media.items() if (left := list(paths))}
    if unused:
        raise ValueError(f"row {row_id}: media without a placeholder in the conversation: {unused}")
    return messages


def _turn_content(text: str, media: dict[str, Iterator], row_id) -> list[dict]:
    """A turn's text as content blocks: text runs, and a media block for each placeholder, taking the next item of its
    modality from `media`; a placeholder with no item left is an error naming the row."""
    content, position = [], 0
    for match in PLACEHOLDER.finditer(text):
        if match.start() > position:
            content.append({"type": "text", "text": text[position : match.start()]})
        modality = match.group(1)
        path = next(media.get(modality, iter(())), None)
        if path is None:
            raise ValueError(f"row {row_id}: more <{modality}> placeholders than {modality} paths")
        content.append({"type": modality, "path": path})
        position = match.end()
    if position < len(text):
        content.append({"type": "text", "text": text[position:]})
    return content


def text_warmup_rows(rows: list[dict], caption_rows: list[dict]) -> list[dict]:
    """`rows` with every media placeholder replaced by its media's caption, media keys dropped: text-only rows that
    teach a random language model to answer from a description (stage 0). `caption_rows` are stage-1 rows whose
    answer is the caption of their media; a media item without one is an error naming the row."""
    captions = {}
    for row in caption_rows:
        for items in row_media(row, None).values():
            for item in items:
                captions[media_key(item)] = row["conversations"][-1]["value"]
    warmup = []
    for row in rows:
        media = [item for items in row_media(row, None).values() for item in items]
        missing = [item for item in media if media_key(item) not in captions]
        if missing:
            raise ValueError(f"row {row.get('id', '?')}: no caption for its media {missing}")
        described = {modality: iter(items) for modality, items in row_media(row, None).items()}

        def describe(match: re.Match) -> str:
            return captions[media_key(next(described[match.group(1)]))] + "\n"

        turns = [{"from": turn["from"], "value": PLACEHOLDER.sub(describe, turn["value"])} for turn in row["conversations"]]
        extra = {key: row[key] for key in ("modality", "task") if key in row}
        warmup.append({"id": f"text-{row.get('id', len(warmup))}", **extra, "conversations": turns})
    return warmup


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with `system_prompt` as their system message, unless they have one or it is None (the chat
    template's default then applies: Vicuna v1's sentence)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def modality_mix(row: dict) -> str:
    """The sorted set of modalities a row uses ("text" when none): the sampler's grouping key."""
    media = row_media(row)
    return "+".join(sorted(media)) or "text"


def load_conversations(data_files: str | list[str], split: str = "train") -> datasets.Dataset:
    """Rows from JSON / JSONL files (either format above, one or both in each file) as a `datasets.Dataset`.

    Each file loads on its own (with one file's schema, `datasets` cannot read the next if its rows differ: a
    `conversations` file and a `messages` file), then the files are concatenated: a column a file lacks is None in
    its rows, a column whose type differs between files (`"image": "x.png"` in one, a list in another) is kept as
    JSON values. A missing or empty file, invalid JSON (with the line and column), a file of no rows or of non-object
    rows, and files that still cannot be combined are errors naming the file(s) and the problem."""
    files = [str(data_files)] if isinstance(data_files, (str, Path)) else [str(path) for path in data_files]
    if not files:
        raise ValueError("no data files given")
    parts = [_load_file(path, split) for path in files]
    return parts[0] if len(parts) == 1 else _concatenate(parts, files)


def _load_file(path: str, split: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}" + (" (a folder)" if os.path.isdir(path) else ""))
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path} is empty: expected a JSON list of rows or JSON lines, one row per line")
    with open(path, encoding="utf-8", errors="replace") as file:
        start = file.read(65536).lstrip()
    first = start[1:].lstrip()[:1] if start.startswith("[") else start[:1]
    if first and first not in "{]":  # `datasets` would make [1, 2] or ["a"] rows of a `text` column
        raise ValueError(f"data file {path}: its first row is not a JSON object ({start[:40]!r}...); rows are objects")
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_logger.level
    json_logger.setLevel(logging.CRITICAL)  # it logs its parse error, with no line, before raising: ours replaces both
    try:
        dataset = datasets.load_dataset("json", data_files=[path], split=split)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, StopIteration) as error:
        # datasets' and pyarrow's errors name neither the file nor the line (a 0-byte file: a bare StopIteration)
        raise ValueError(f"data file {path}: {_diagnose_json(path, error)}") from error
    finally:
        json_logger.setLevel(level)
    if len(dataset) == 0:
        raise ValueError(f"data file {path} holds no rows")
    return dataset


def read_json_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON list or JSON-lines file as plain objects, each with its own keys (no table schema: what
    evaluation reads). Errors name the file and the first problem (`_json_rows_problem`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}" + (" (a folder)" if path.is_dir() else ""))
    problem, rows = _json_rows_problem(path.read_text(encoding="utf-8", errors="replace"), jsonl=path.suffix == ".jsonl")
    if problem:
        raise ValueError(f"data file {path}: {problem}")
    return rows


def _json_rows_problem(text: str, jsonl: bool) -> tuple[str | None, list[dict]]:
    """(None, rows) for a JSON list of objects or JSON lines (`jsonl`: read line by line only); else (what is wrong,
    []): an empty file or list, invalid JSON with its line and column, a JSON object instead of a list, a row that is
    not an object."""
    if not text.strip():
        return "the file is empty (only whitespace): expected a JSON list of rows or JSON lines, one row per line", []
    rows = None
    if not jsonl:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as whole:
            if text.lstrip().startswith("["):
                return f"invalid JSON at line {whole.lineno}, column {whole.colno}: {whole.msg}", []
        if isinstance(rows, dict):
            return f"expected a JSON list of rows (or JSON lines), got an object with keys {sorted(rows)[:8]}", []
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as bad:
                    return f"line {number} is not valid JSON (column {bad.colno}: {bad.msg}); each line must be one row", []
    if not isinstance(rows, list):
        return f"expected a JSON list of rows, got a JSON {type(rows).__name__}", []
    if not rows:
        return "no rows (an empty JSON list)", []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {index} is a {type(row).__name__}, expected an object", []
    return None, rows


def _diagnose_json(path: str, error: Exception) -> str:
    """Why `datasets` could not load the JSON / JSONL file `path`: what `_json_rows_problem` finds in it; else (valid
    rows) `datasets`' own reason."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    problem, _ = _json_rows_problem(text, jsonl=False)  # a .jsonl file that is one JSON list loads in `datasets` too
    if problem:
        return problem
    reason = error.__cause__ or error.__context__ or error
    reason = str(reason).strip().splitlines()[-1] if str(reason).strip() else type(reason).__name__
    return f"valid JSON, but its rows do not load as one table ({reason}); give each key one type in every row"


def _concatenate(parts: list[datasets.Dataset], files: list[str]) -> datasets.Dataset:
    """The files' rows in order; columns whose types differ between files become JSON values first."""
    types = defaultdict(dict)  # column -> {feature: first file with it}
    for part, path in zip(parts, files):
        for column, feature in part.features.items():
            if not (isinstance(feature, datasets.Value) and feature.dtype == "null"):  # a column of Nones fits any
                types[column].setdefault(repr(feature), path)
    conflicts = {column: found for column, found in types.items() if len(found) > 1}
    json_feature = getattr(datasets, "Json", None)
    if conflicts and json_feature is not None:
        parts = [_as_json(part, [column for column in conflicts if column in part.column_names], json_feature) for part in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        if not conflicts:
            raise ValueError(f"the data files {', '.join(files)} cannot be combined: {error}") from error
        column, found = next(iter(conflicts.items()))
        kinds = "; ".join(f"{feature} in {path}" for feature, path in found.items())
        raise ValueError(
            f"the data files {', '.join(files)} cannot be combined: column {column!r} has different types ({kinds}); "
            "write it the same way in every file"
        ) from error


def _as_json(part: datasets.Dataset, columns: list[str], json_feature) -> datasets.Dataset:
    if not columns:
        return part
    features = part.features.copy()
    for column in columns:
        features[column] = json_feature()
    return part.map(lambda row: {column: row[column] for column in columns}, features=features)


class NonFiniteMediaError(ValueError):
    """A media file that decodes but holds NaN or infinite values."""


def _check_file(path: str, modality: str, sampling_rate: int = 16000) -> int | None:
    """Decode a media file for real (a truncated or mislabelled file fails here, not in the middle of training) and
    refuse NaN or infinite values; -> an audio file's sample count at `sampling_rate` (None for images and videos)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if modality == "image":
        image = load_image(path, 0)
        # only float images ("F": 32-bit TIFF...) can hold NaN or inf; RGB conversion would silently paint them a colour
        if image.mode == "F" and not np.isfinite(pixels := np.asarray(image)).all():
            raise NonFiniteMediaError(f"{int((~np.isfinite(pixels)).sum())} NaN or infinite pixel value(s)")
    elif modality == "video":
        load_video(path, 1, 0)
    else:
        waveform = load_audio(path, sampling_rate, 0)
        if not np.isfinite(waveform).all():  # NaN features, then a NaN loss that stops training at an unnamed row
            raise NonFiniteMediaError(f"{int((~np.isfinite(waveform)).sum())} NaN or infinite sample(s)")
        return waveform.size
    return None


def validate_dataset(
    dataset: datasets.Dataset,
    media_root: str | Path | None = None,
    skip_invalid: bool = False,
    processor=None,
    max_length: int | None = None,
    system_prompt: str | None = None,
    media_required: str | None = None,
) -> datasets.Dataset:
    """Check every row before training for whatever would fail at a training step, with no row id by then: the
    conversation converts (`to_messages`: no or an empty conversation, unknown roles, content types or text blocks
    are errors) and has an assistant reply (else every label is masked and the loss is NaN), each media file exists,
    decodes and holds no NaN or infinite value. With the training `processor`, also what the collator would refuse:
    audio longer than `max_audio_windows` windows, and a conversation (with `system_prompt`, as the collator adds it)
    longer after media expansion than the model maximum, the smaller of the tokenizer's `model_max_length` and
    `max_length` (the model's `max_position_embeddings`). With `media_required` (the reason, e.g. stage 1's: it
    trains only the connectors, which a text-only row never reaches, so its batch has no gradient), a row without
    media is invalid too: all of them are named in one error.

    A bad row stops everything with an error naming the row id (and the media file), unless `skip_invalid`, in which
    case the bad rows are dropped, counted and logged (with their ids and reasons); no row left is an error. Each
    media file is decoded once, however many rows use it.
    """
    limit, limit_name = None, None
    if processor is not None:
        limit, limit_name = processor.tokenizer.model_max_length, "the tokenizer's model_max_length"
        if max_length is not None and max_length < limit:
            limit, limit_name = max_length, "the model's max_position_embeddings"
    decoded = {}  # (path, kind) -> the audio sample count, or the error: each file is decoded once
    bad, text_only = {}, []
    for index, row in enumerate(dataset):
        row_id = row.get("id")
        row_id = index if row_id is None else row_id
        try:
            _check_row(row, row_id, media_root, processor, limit, limit_name, system_prompt, decoded)
            if media_required is not None and not row_media(row):
                if not skip_invalid:
                    text_only.append(str(row_id))
                    continue
                raise ValueError(f"row {row_id}: text-only (no image, video or audio): {media_required}")
        except ValueError as error:
            if not skip_invalid:
                raise
            bad[index] = str(error)
    if text_only:
        named = ", ".join(text_only[:10]) + (f" and {len(text_only) - 10} more" if len(text_only) > 10 else "")
        raise ValueError(
            f"{len(text_only)} text-only row(s) of {len(dataset)} (no image, video or audio): {named}. "
            f"{media_required[:1].upper()}{media_required[1:]}. Remove them, or drop and count them with skip_invalid "
            "(--skip_invalid)"
        )
    if bad:
        logger.warning("Dropped %d invalid row(s) of %d:\n%s", len(bad), len(dataset), "\n".join(bad.values()))
        if len(bad) == len(dataset):
            raise ValueError(f"no valid row left: all {len(dataset)} row(s) are invalid (first: {next(iter(bad.values()))})")
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
    return dataset


def _check_row(row, row_id, media_root, processor, limit, limit_name, system_prompt, decoded: dict):
    """One row of `validate_dataset`: raises a `ValueError` naming the row."""
    try:
        messages = to_messages(row, media_root)
        media = row_media(row, media_root)
    except (KeyError, TypeError, AttributeError) as error:  # a malformed row the checks above did not foresee
        if isinstance(error, ValueError):  # UniMoEChatContentTypeError: already names the row
            raise
        raise ValueError(f"row {row_id}: malformed row ({type(error).__name__}: {error})") from error
    sampling_rate = processor.feature_extractor.sampling_rate if processor is not None else 16000
    audio_samples = []
    for modality, items in media.items():
        for item in items:
            # a video given as its frame files: each frame exists and is an image
            files = [(path, "image", "video frame") for path in item] if isinstance(item, list) else [(item, modality, modality)]
            for path, kind, name in files:
                if (path, kind) not in decoded:
                    try:
                        decoded[path, kind] = _check_file(path, kind, sampling_rate)
                    except (OSError, ValueError) as error:
                        decoded[path, kind] = error
                result = decoded[path, kind]
                if isinstance(result, NonFiniteMediaError):
                    raise ValueError(f"row {row_id}: {name} file {path!r} holds {result}") from result
                if isinstance(result, OSError):
                    raise ValueError(f"row {row_id}: {name} file {path!r} is missing or unreadable ({result})") from result
                if isinstance(result, Exception):  # the loaders' refusals: undecodable, empty, out of range, NaN...
                    raise ValueError(f"row {row_id}: {name} file {path!r} is unreadable or invalid ({result})") from result
                if kind == "audio":
                    audio_samples.append((path, result))
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"row {row_id}: no assistant turn: nothing to learn (every label would be masked, the loss NaN)")
    if processor is None:
        return
    extractor = processor.feature_extractor
    audio_windows = []
    for path, samples in audio_samples:
        windows = extractor.num_windows(samples)
        if windows > extractor.max_audio_windows:
            raise ValueError(
                f"row {row_id}: audio file {path!r} lasts {samples / sampling_rate:.1f} s ({windows} windows of "
                f"{extractor.window_seconds} s), more than the model's max_audio_windows={extractor.max_audio_windows} "
                f"({extractor.max_audio_windows * extractor.window_seconds} s); cut it or drop the row"
            )
        audio_windows.append(windows)
    conversation = with_system_prompt(messages, system_prompt)
    try:
        text = processor.apply_chat_template([conversation], tokenize=False)[0]
    except ValueError as error:
        raise ValueError(f"row {row_id}: {error}") from error
    placeholders = {"image": processor.image_token, "video": processor.video_token, "audio": processor.audio_token}
    for modality, token in placeholders.items():
        given = len(media.get(modality, []))
        if text.count(token) != given:
            raise ValueError(
                f"row {row_id}: {text.count(token)} {token} placeholder(s) in the rendered conversation but {given} "
                f"{modality} item(s) (is {token} written in its text?)"
            )
    # exactly what the collator tokenizes: the rendered text, each placeholder expanded to its soft tokens
    (expanded,), _ = processor._expand_placeholders([text], audio_windows, processor.num_frames)
    bos = processor.tokenizer.bos_token
    add_special_tokens = not (bos is not None and text.startswith(bos))
    length = len(processor.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"])
    if length > limit:
        counts = ", ".join(f"{len(media.get(modality, []))} {modality}" for modality in placeholders)
        raise ValueError(
            f"row {row_id}: {length} tokens after expanding its media ({counts}), more than the model maximum of "
            f"{limit} ({limit_name}); shorten the conversation or give it fewer media items"
        )


# How `pad_encodings` pads each token-level field (None: the tokenizer's pad id); every other field is media.
TOKEN_FIELD_PADDING = {"input_ids": None, "attention_mask": 0, "labels": -100, "assistant_masks": 0}


def pad_encodings(encodings: list, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Processor outputs of single conversations -> one batch, as the processor batches them: the token fields
    (`TOKEN_FIELD_PADDING`, [1, length] each) padded to the longest on `padding_side`, the media tensors
    (`pixel_values`, `input_features`...: one row per item) concatenated in conversation order."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(encoding["input_ids"].shape[1] for encoding in encodings)
    batch = {}
    for key, pad in TOKEN_FIELD_PADDING.items():
        if key not in encodings[0]:
            continue
        field = torch.full((len(encodings), length), pad_token_id if pad is None else pad, dtype=encodings[0][key].dtype)
        for row, encoding in enumerate(encodings):
            width = encoding[key].shape[1]
            columns = slice(length - width, length) if padding_side == "left" else slice(0, width)
            field[row, columns] = encoding[key][0]
        batch[key] = field
    media_keys = dict.fromkeys(key for encoding in encodings for key in encoding if key not in TOKEN_FIELD_PADDING)
    for key in media_keys:
        batch[key] = torch.cat([encoding[key] for encoding in encodings if key in encoding])
    return batch


class UniMoEDataCollator:
    """Rows -> a padded batch with assistant-only labels, all modalities, through the processor's chat template.

    `cache_encodings=True`: each row is encoded once (media decoded, features computed, tokens) and its encoding reused
    whenever the row comes again, the batch assembled by `pad_encodings`: the same tensors as encoding the batch, for
    the price of keeping every row's encoding in memory (a 30 s audio item: about 0.3 MB with both audio towers).
    `cache_rows` fills the cache before training, in the main process, so the DataLoader's worker processes (forked
    anew each epoch) start with it. A row is known by its conversation (media paths included, not their contents): a
    media file rewritten after its row was encoded is not read again.
    """

    def __init__(
        self, processor, media_root: str | Path | None = None, system_prompt: str | None = None, cache_encodings: bool = False
    ):
        self.processor = processor
        self.media_root = media_root
        self.system_prompt = system_prompt
        self.cache = {} if cache_encodings else None

    def _conversation(self, row: dict) -> list[dict]:
        return with_system_prompt(to_messages(row, self.media_root), self.system_prompt)

    def _encode(self, conversations: list[list[dict]]):
        return self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_labels=True, processor_kwargs={"padding": True}
        )

    def _cached(self, conversation: list[dict]):
        key = json.dumps(conversation, sort_keys=True, default=str)
        if key not in self.cache:
            self.cache[key] = self._encode([conversation])
        return self.cache[key]

    def cache_rows(self, rows) -> None:
        """Encode every row of `rows` into the cache (with `cache_encodings=True`)."""
        if self.cache is None:
            raise ValueError("cache_rows needs a collator made with cache_encodings=True")
        for row in tqdm(rows, desc="encoding rows", unit="row"):
            self._cached(self._conversation(row))

    def __call__(self, rows: list[dict]):
        conversations = [self._conversation(row) for row in rows]
        if self.cache is None:
            return self._encode(conversations)
        tokenizer = self.processor.tokenizer
        encodings = [self._cached(conversation) for conversation in conversations]
        return BatchFeature(pad_encodings(encodings, tokenizer.pad_token_id, tokenizer.padding_side))


class ModalityGroupedSampler(Sampler[int]):
    """Yields indices so that every global batch holds one modality mix (the paper's modality-level data
    parallelism), rows of similar length together inside a batch.

    Each epoch (`set_epoch`) the rows of every modality mix are shuffled and cut into chunks of `global_batch_size`
    (per-device batch x processes x accumulation steps), each chunk ordered by length, and the chunks of all groups
    shuffled together. A group's last chunk is topped up with other rows of the same group, drawn at random, so that
    batches never straddle two mixes and no row is dropped (the original dropped the leftovers).
    """

    def __init__(self, mixes: list[str], lengths: list[int], global_batch_size: int, seed: int = 0):
        if len(mixes) != len(lengths):
            raise ValueError(f"{len(mixes)} modality mixes but {len(lengths)} lengths")
        self.mixes, self.lengths = mixes, lengths
        self.global_batch_size = global_batch_size
        self.seed, self.epoch = seed, 0
        self.groups = defaultdict(list)
        for index, mix in enumerate(mixes):
            self.groups[mix].append(index)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def chunks(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        chunks = []
        for mix in sorted(self.groups):
            indices = list(self.groups[mix])
            rng.shuffle(indices)
            shortfall = -len(indices) % self.global_batch_size
            while shortfall:  # top up without repeating a row twice more than needed
                extra = rng.sample(self.groups[mix], min(shortfall, len(self.groups[mix])))
                indices += extra
                shortfall -= len(extra)
            for start in range(0, len(indices), self.global_batch_size):
                chunk = indices[start : start + self.global_batch_size]
                chunks.append(sorted(chunk, key=lambda i: self.lengths[i], reverse=True))
        rng.shuffle(chunks)
        return chunks

    def __iter__(self) -> Iterator[int]:
        for chunk in self.chunks():
            yield from chunk

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.global_batch_size) for group in self.groups.values()) * self.global_batch_size
