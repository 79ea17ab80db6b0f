"""Training data for Uni-MoE: the conversation format, loading with `datasets`, validation, the collator and the
modality-grouped sampler.

Rows follow the original Uni-MoE / LLaVA JSON format

    {"id": "...", "image": "path", "video": "path", "audio": "path" or ["path", ...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}]}

(`"voice"` is accepted for `"audio"`, as in the original speech data; a `"video"` list of frame image files,
`["frame_000.jpg", ...]`, is one video given as its frames, as in the original data), or carry HF chat `"messages"`
with content lists (`{"type": "image", "path": ...}`; a video block's path may be such a frame list). Media paths are
resolved against a root directory and decoded lazily, by the processor, when the collator builds a batch. The k-th
`<image>` of a row takes the row's k-th image, and so on.
"""

import logging
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import datasets
from torch.utils.data import Sampler

from modeling_unimoe.processing_unimoe import is_frame_paths, load_audio, load_image, load_video


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


def _resolver(media_root: str | Path | None):
    """path (or list of frame paths) -> the same resolved against `media_root`, as strings / a list of strings."""
    root = Path(media_root) if media_root is not None else None

    def resolve(item):
        if isinstance(item, (list, tuple)):
            return [resolve(path) for path in item]
        return str(root / item) if root is not None else str(item)

    return resolve


def media_key(item: str | list[str]) -> str | tuple[str, ...]:
    """A hashable key for a media entry (a video's frame list becomes a tuple)."""
    return tuple(item) if isinstance(item, list) else item


def row_media(row: dict, media_root: str | Path | None = None) -> dict[str, list[str | list[str]]]:
    """{modality: [resolved path, or a video's resolved frame paths]} of a row, in placeholder order."""
    resolve = _resolver(media_root)
    if row.get("messages"):
        media = defaultdict(list)
        for message in row["messages"]:
            content = message["content"]
            for block in [] if isinstance(content, str) else content:
                if block["type"] in ("image", "video", "audio") and block.get("path"):
                    media[block["type"]].append(resolve(block["path"]))
        return dict(media)
    return {modality: [resolve(item) for item in _items(row, modality)] for modality in ("image", "video", "audio") if _items(row, modality)}


def to_messages(row: dict, media_root: str | Path | None = None) -> list[dict]:
    """The row as HF chat messages with content lists, media paths resolved against `media_root`."""
    row_id = row.get("id", "?")
    if row.get("messages"):
        resolve = _resolver(media_root)
        messages = []
        for message in row["messages"]:
            content = message["content"]
            if not isinstance(content, str) and media_root is not None:
                content = [{**block, "path": resolve(block["path"])} if block.get("path") else block for block in content]
            messages.append({"role": message["role"], "content": content})
        return messages

    media = {modality: iter(paths) for modality, paths in row_media(row, media_root).items()}
    messages = []
    for turn in row["conversations"]:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"row {row_id}: unknown speaker {turn['from']!r} (expected human, gpt or system)")
        content, position = [], 0
        for match in PLACEHOLDER.finditer(turn["value"]):
            if match.start() > position:
                content.append({"type": "text", "text": turn["value"][position : match.start()]})
            modality = match.group(1)
            path = next(media.get(modality, iter(())), None)
            if path is None:
                raise ValueError(f"row {row_id}: more <{modality}> placeholders than {modality} paths")
            content.append({"type": modality, "path": path})
            position = match.end()
        if position < len(turn["value"]):
            content.append({"type": "text", "text": turn["value"][position:]})
        messages.append({"role": role, "content": content})
    left = {modality: list(paths) for modality, paths in media.items()}
    unused = {modality: paths for modality, paths in left.items() if paths}
    if unused:
        raise ValueError(f"row {row_id}: media without a placeholder in the conversation: {unused}")
    return messages


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
    """Rows from JSON / JSONL files (either format above) as a `datasets.Dataset`."""
    return datasets.load_dataset("json", data_files=data_files, split=split)


def _check_file(path: str, modality: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    # decode for real: a truncated or mislabelled file fails here, not in the middle of training
    if modality == "image":
        load_image(path, 0)
    elif modality == "video":
        load_video(path, 1, 0)
    else:
        load_audio(path, 16000, 0)


def validate_dataset(
    dataset: datasets.Dataset, media_root: str | Path | None = None, skip_invalid: bool = False
) -> datasets.Dataset:
    """Check every row before training: its conversation converts and each of its media files exists and decodes.

    A bad row stops everything with an error naming the row id and the file, unless `skip_invalid`, in which case the
    bad rows are dropped, counted and logged (with their ids and reasons).
    """
    bad = {}
    for index, row in enumerate(dataset):
        row_id = row.get("id", index)
        try:
            to_messages(row, media_root)
            for modality, items in row_media(row, media_root).items():
                for item in items:
                    # a video given as its frame files: each frame exists and is an image
                    files = [(path, "image", "video frame") for path in item] if isinstance(item, list) else [(item, modality, modality)]
                    for path, kind, name in files:
                        try:
                            _check_file(path, kind)
                        except (OSError, ValueError) as error:
                            raise ValueError(f"row {row_id}: {name} file {path!r} is missing or unreadable ({error})") from error
        except ValueError as error:
            if not skip_invalid:
                raise
            bad[index] = str(error)
    if bad:
        logger.warning("Dropped %d invalid row(s) of %d:\n%s", len(bad), len(dataset), "\n".join(bad.values()))
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
    return dataset


class UniMoEDataCollator:
    """Rows -> a padded batch with assistant-only labels, all modalities, through the processor's chat template."""

    def __init__(self, processor, media_root: str | Path | None = None, system_prompt: str | None = None):
        self.processor = processor
        self.media_root = media_root
        self.system_prompt = system_prompt

    def __call__(self, rows: list[dict]):
        conversations = [with_system_prompt(to_messages(row, self.media_root), self.system_prompt) for row in rows]
        return self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_labels=True, processor_kwargs={"padding": True}
        )


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
