"""An OpenAI-compatible chat server for Uni-MoE checkpoints: `unimoe-serve DIR` (`python -m trl_scripts.serve`).

    unimoe-serve outputs/quickstart/stage3 --port 8000
    # then: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
    #           model="outputs/quickstart/stage3", messages=[...])

Endpoints: `POST /v1/chat/completions` (JSON, or SSE chunks with `"stream": true`), `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health`. Content parts: `text`, `image_url`, `input_audio` (base64 wav, mp3 or
flac), `video_url` and `audio_url` (a `data:` URI, a `file://` URL or a local path), in any mix.

Built on transformers' serving stack (`transformers serve`, `transformers.cli.serving`, the `serving` extra):
its `ModelManager` holds the loaded model, its `ChatCompletionHandler` builds the generation config from the
request and writes the OpenAI responses and SSE chunks, and its `DirectStreamer` turns tokens into text. Four
parts are ours, where that stack cannot be extended to a remote-code multimodal model:

- loading (`UniMoEModelManager`): transformers looks the architecture up in its own namespace and decides the
  modality from its in-tree class-name tables, so a `trust_remote_code` model is "Unknown modality";
- content parts (`chat_messages_from_openai`): transformers drops parts of an unknown type and fetches URLs
  while the chat template runs; here every part is decoded up front, and a bad one is a 400 naming it;
- batching (`BatchingGenerateManager`): transformers runs one `generate` at a time (its continuous batching
  needs paged attention, for in-tree text models); here concurrent requests share one left-padded `generate`;
- the app (`build_app`): `transformers.cli.serving.server.build_server` also mounts endpoints this model cannot
  serve (`/v1/audio/transcriptions`, `/v1/responses`, model loading and unloading).
"""

import asyncio
import base64
import binascii
import copy
import io
import ipaddress
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..console import command_line
from ..loading import (
    DTYPES,
    check_model_path,
    load_processor,
    model_kwargs,
    readable_modalities,
    resolve_device,
)
from ..training.data import pad_encodings
from .arguments import ServingArguments, parse_serving_arguments


try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import (
        BaseGenerateManager,
        DirectStreamer,
        GenerationState,
        Modality,
        _GenerationCancelled,
        _StreamError,
    )
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"unimoe-serve needs the serving extra ({error}): pip install 'unimoe[serve]' (fastapi, uvicorn, openai)"
    ) from error


logger = logging.getLogger(__name__)

SUPPORTED_PARTS = ("text", "image_url", "input_audio", "video_url", "audio_url")
AUDIO_FORMATS = ("wav", "mp3", "flac")
# OpenAI fields transformers' handler accepts but ignores (with a warning): each one that would change the answer is
# refused (its value -> whether it asks for something this server does not do); the others (user, metadata, store,
# service_tier, stream_options, parallel_tool_calls) do not change it.
_REFUSED_FIELDS = {
    "n": lambda value: value not in (None, 1),
    "logprobs": bool,
    "top_logprobs": bool,
    "response_format": lambda value: isinstance(value, dict) and value.get("type") not in (None, "text"),
    "tools": bool,
    "tool_choice": lambda value: value not in (None, "none"),
    "functions": bool,
    "function_call": lambda value: value not in (None, "none"),
    "audio": bool,
    "modalities": lambda value: bool(value) and list(value) != ["text"],
    "presence_penalty": bool,
    "prediction": bool,
    "web_search_options": bool,
    "reasoning_effort": bool,
}


class RequestError(ValueError):
    """A request the server refuses: answered with HTTP `status` and an OpenAI error body naming the problem."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


# ------------------------------------------------------------------------------------------------ content parts


@dataclass
class MediaLegend:
    """Where each media item of a request came from, in the processor's order per modality (it names items as
    `image 0`, `audio 1`...): `{"image": ["messages[0].content[1]", ...], ...}`."""

    places: dict[str, list[str]] = field(default_factory=lambda: {"image": [], "video": [], "audio": []})

    def add(self, kind: str, where: str) -> None:
        self.places[kind].append(where)

    def explain(self) -> str:
        named = [f"{kind} {index} is {where}" for kind, wheres in self.places.items() for index, where in enumerate(wheres)]
        return f" ({'; '.join(named)})" if named else ""


def _decode_data_uri(url: str, where: str) -> io.BytesIO:
    """`data:[<type>][;base64],<payload>` -> the payload's bytes (base64 only: media are binary)."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError(f"{where}: malformed data: URI (no ',' before the payload)")
    if not header.endswith(";base64"):
        raise RequestError(f"{where}: the data: URI must be base64-encoded ('data:<type>;base64,<payload>')")
    return _decode_base64(payload, where)


def _decode_base64(payload, where: str) -> io.BytesIO:
    if not isinstance(payload, str):
        raise RequestError(f"{where}: expected a base64 string, got {type(payload).__name__}")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{where}: corrupt base64 ({error})") from None
    if not data:
        raise RequestError(f"{where}: the base64 payload is empty")
    return io.BytesIO(data)


def _media_source(url, where: str, local_files: "bool | Path" = True):
    """A media URL of a content part -> what the processor reads: bytes (`data:` URI) or a local file path, read only
    where `local_files` allows it (True: any, False: none, a folder: files inside it)."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: expected a non-empty URL string, got {url!r}"[:300])
    if url.startswith("data:"):
        return _decode_data_uri(url, where)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise RequestError(
            f"{where}: this server does not fetch remote URLs ({url[:100]}); send the file as a data: URI "
            "('data:<type>;base64,<payload>')"
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{where}: file URL of another host ({parsed.netloc}); only local files can be read")
        path = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise RequestError(f"{where}: unsupported URL scheme {parsed.scheme!r}; use a data: URI or a file URL")
    else:
        path = Path(url)
    if local_files is False:
        raise RequestError(f"{where}: this server reads no local files (see --media_dir); send the file as a data: URI")
    if local_files is not True and not path.resolve().is_relative_to(Path(local_files).resolve()):
        raise RequestError(f"{where}: this server reads local files only under its --media_dir; send a data: URI")
    if not path.is_file():
        raise RequestError(f"{where}: no such file on the server: {path}")
    return str(path)


def _part_url(part: dict, key: str, where: str):
    value = part.get(key)
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise RequestError(f"{where}: a {key!r} part needs {{{key!r}: {{'url': ...}}}}")
    return value


def _check_text(text: str, where: str, special_tokens: dict[str, str]) -> None:
    """Text that holds one of the model's special tokens would be read as that token (a media placeholder, a turn
    end): refused, naming it."""
    for token, meaning in special_tokens.items():
        if token in text:
            raise RequestError(
                f"{where}: the text contains {token!r}, the model's {meaning}; media go in image_url / input_audio / "
                "video_url parts, and turns in messages"
            )


def _convert_part(part, where: str, legend: MediaLegend, local_files: "bool | Path" = True) -> dict:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where}: a content part is an object with a 'type', got {json.dumps(part)[:100]}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "video_url", "audio_url"):
        source, media = _media_source(_part_url(part, kind, where), where, local_files), kind.removesuffix("_url")
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or "data" not in audio:
            raise RequestError(f"{where}: an input_audio part needs {{'input_audio': {{'data': <base64>, 'format': ...}}}}")
        audio_format = audio.get("format")
        if audio_format is not None and audio_format not in AUDIO_FORMATS:
            raise RequestError(f"{where}: input_audio format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
        source, media = _decode_base64(audio["data"], where), "audio"
    else:
        raise RequestError(
            f"{where}: unknown content part type {kind!r}; this server takes {', '.join(SUPPORTED_PARTS)}"
        )
    legend.add(media, where)
    return {"type": media, media if isinstance(source, io.BytesIO) else "path": source}


def special_tokens_of(processor) -> dict[str, str]:
    """{token: what it is} for the tokenizer's special tokens that text must not carry."""
    tokenizer = processor.tokenizer
    tokens = {token: "special token" for token in tokenizer.all_special_tokens}
    tokens.update({processor.image_token: "image placeholder", processor.video_token: "video placeholder",
                   processor.audio_token: "audio placeholder"})
    if tokenizer.eos_token:
        tokens[tokenizer.eos_token] = "end-of-turn token"
    return tokens


def chat_messages_from_openai(messages, processor=None, local_files: "bool | Path" = True) -> tuple[list[dict], MediaLegend]:
    """OpenAI chat messages -> the processor's chat format, every media part decoded (bytes) or located (a local
    path, where `local_files` allows: True any, False none, a folder the files inside it); `developer` messages are
    system messages. With `processor`, text holding one of its special tokens is refused. Raises `RequestError`
    naming the message and part."""
    special = special_tokens_of(processor) if processor is not None else {}
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages")
    legend, conversation = MediaLegend(), []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: a message is an object with 'role' and 'content', got {type(message).__name__}")
        converted = {key: value for key, value in message.items() if key != "content"}
        if converted.get("role") == "developer":
            converted["role"] = "system"
        content = message.get("content")
        if content in (None, "", []) and converted.get("role") == "user":  # (an empty system message: no system prompt)
            raise RequestError(f"{where}: a user message needs content (text or media parts)")
        if isinstance(content, str):
            _check_text(content, where, special)
        elif isinstance(content, list):
            content = [_convert_part(part, f"{where}.content[{i}]", legend, local_files) for i, part in enumerate(content)]
            for i, block in enumerate(content):
                if block["type"] == "text":
                    _check_text(block["text"], f"{where}.content[{i}]", special)
        converted["content"] = content
        conversation.append(converted)
    return conversation, legend


# ---------------------------------------------------------------------------------------------------- batching


# the processor outputs each modality's media arrive in
_MEDIA_INPUTS = {"image": ("pixel_values",), "video": ("pixel_values_videos",), "audio": ("input_features", "input_values")}


def check_served_modalities(config, inputs) -> None:
    """`RequestError` (400) for media of a modality the served model has no tower for: a text-only checkpoint, or
    one without the vision or audio towers. `generate` would fail on them as a server error."""
    readable = readable_modalities(config)
    refused = [name for name, keys in _MEDIA_INPUTS.items() if name not in readable and any(k in inputs for k in keys)]
    if refused:
        takes = ["text"] + [name for name in _MEDIA_INPUTS if name in readable]
        raise RequestError(f"this model takes {', '.join(takes)} only; the request has {' and '.join(refused)} input")


def collate(encodings: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Processor outputs of single requests -> one left-padded batch (`trl_scripts.training.data.pad_encodings`), media in
    request order, as the processor itself orders the media of a batch."""
    return pad_encodings(encodings, pad_token_id, padding_side="left")


class _Row:
    """One request inside a batched `generate`: its new tokens, until its end of sequence, its own token budget,
    or its client going away; streamed to `sink` (a transformers `DirectStreamer`) or collected for `future`."""

    def __init__(
        self, encoding, generation_config, eos_token_ids: set[int], sink=None, future=None, loop=None, seed=None
    ):
        self.encoding, self.generation_config, self.seed = encoding, generation_config, seed
        self.budget = generation_config.max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.sink, self.future, self.loop = sink, future, loop
        self.tokens: list[int] = []
        self.done = False

    def start(self) -> None:
        """Before the batch runs: a row whose client already left is done (and left out of the batch)."""
        if self.sink is not None:
            try:
                self.sink.put(self.encoding["input_ids"][0])  # the streamer protocol: the prompt first (not streamed)
            except _GenerationCancelled:
                self.done = True

    def cancel(self) -> None:
        """The client went away: the row ends at the next token, and nothing more is sent."""
        self.done = True

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.sink is not None:
            try:
                self.sink.put(torch.tensor([token]))
            except _GenerationCancelled:  # the client went away: this row stops, the others go on
                self.done = True
                return
        if token in self.eos_token_ids or len(self.tokens) >= self.budget:
            self.finish()

    def finish(self) -> None:
        self.done = True
        if self.sink is not None:
            self.sink.end()
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_set_result, self.future, torch.tensor(self.tokens, dtype=torch.long))

    def fail(self, message: str) -> None:
        self.done = True
        if self.sink is not None:  # (transformers writes the message into a JSON string unescaped)
            self.sink._enqueue(_StreamError(json.dumps(message)[1:-1]))
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_set_exception, self.future, RuntimeError(message))


def _set_result(future, value):
    if not future.done():
        future.set_result(value)


def _set_exception(future, error):
    if not future.done():
        future.set_exception(error)


class _RowsStreamer(BaseStreamer):
    """The streamer of a batched `generate`: hands each row its token."""

    def __init__(self, rows: list[_Row]):
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if not row.done:
                row.add(token)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                row.finish()


class _RowsDone(StoppingCriteria):
    """Ends each row when `_Row` says so (its budget, a client gone), so that `generate` stops once all are done."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


def _batch_key(row: "_Row", row_id: int) -> str:
    """Requests batch together when their generation settings agree but for the token budget. A request with stop
    strings runs alone (transformers ends its row without telling the streamer), and so does one with a `seed` (the
    seed is the global torch generator's, set right before its `generate`)."""
    settings = row.generation_config.to_dict()
    for name in ("max_new_tokens", "max_length", "transformers_version"):
        settings.pop(name, None)
    if settings.get("stop_strings") or row.seed is not None:
        settings["alone"] = row_id
    return repr(sorted((name, repr(value)) for name, value in settings.items()))


class BatchingGenerateManager(BaseGenerateManager):
    """transformers' generation-manager interface, batching concurrent requests: one thread runs `generate` on
    up to `max_batch_size` requests at a time, left-padded (`collate`), each request's media encoded once, by its
    own processor call. A batch takes every request waiting when the previous one ends, after waiting up to
    `batch_wait` seconds for more. Greedy answers equal each request's answer alone."""

    def __init__(self, model, processor, max_batch_size: int = 8, batch_wait: float = 0.005):
        if max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait < 0:
            raise ValueError(f"--batch_wait_ms must be >= 0, got {batch_wait * 1000}")
        self.model, self.processor = model, processor
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = [tokenizer.eos_token_id] if eos is None else eos
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.batches_run = self.requests_batched = self.largest_batch = 0  # reported by /health
        self._queue: queue.Queue = queue.Queue()
        self._seeds: dict[str, int] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="unimoe-generate", daemon=True)
        self._thread.start()

    # the interface of transformers' managers (`model`, `processor` are the ones given at construction)
    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        streamer = DirectStreamer(processor.tokenizer._tokenizer, loop, events, response_parser=response_parser)
        self._submit(_Row(inputs, gen_config, self.eos_token_ids, sink=streamer, seed=self._seeds.pop(request_id, None)))
        return events, streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id, disconnected=None):
        """As transformers' managers; `disconnected` (an async callable, e.g. `Request.is_disconnected`) is polled
        while the request waits, and a client gone ends its row."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        row = _Row(inputs, gen_config, self.eos_token_ids, future=future, loop=loop, seed=self._seeds.pop(request_id, None))
        self._submit(row)
        while disconnected is not None and not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if not future.done() and await disconnected():
                row.cancel()
                future.cancel()
        generated_ids = await future
        text = processor.decode(generated_ids, skip_special_tokens=True)
        return text, inputs["input_ids"].shape[-1], generated_ids

    def set_seed(self, request_id: str, seed: int) -> None:
        """The request's sampling seed, applied in the generation thread right before its (unbatched) `generate`."""
        self._seeds[request_id] = seed

    def _submit(self, row: "_Row") -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the generation thread has stopped; restart the server")
        self._queue.put(row)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)

    def _serve(self) -> None:
        while not self._stopped:
            first = self._queue.get()
            if first is None:
                return
            waiting, deadline = [first], time.monotonic() + self.batch_wait
            while len(waiting) < self.max_batch_size:
                try:
                    row = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if row is None:
                    self._stopped = True
                    break
                waiting.append(row)
            groups: dict[str, list[_Row]] = {}
            for index, row in enumerate(waiting):
                try:
                    groups.setdefault(_batch_key(row, index), []).append(row)
                except Exception as error:  # (never expected) the thread outlives any one request
                    logger.exception("cannot batch a request")
                    row.fail(f"cannot schedule the request: {type(error).__name__}: {error}")
            for rows in groups.values():
                self._run(rows)

    @torch.inference_mode()
    def _run(self, rows: list[_Row]) -> None:
        self.batches_run += 1
        self.requests_batched += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        try:
            for row in rows:
                row.start()
            rows = [row for row in rows if not row.done]  # clients gone while waiting
            if not rows:
                return
            if rows[0].seed is not None:  # (a seeded request runs alone)
                torch.manual_seed(rows[0].seed)
            batch = collate([row.encoding for row in rows], self.pad_token_id)
            batch = {key: value.to(self.model.device) for key, value in batch.items()}
            generation_config = copy.deepcopy(rows[0].generation_config)
            generation_config.max_new_tokens = max(row.budget for row in rows)
            generation_config.pad_token_id = self.pad_token_id
            self.model.generate(
                **batch,
                generation_config=generation_config,
                streamer=_RowsStreamer(rows),
                stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
                tokenizer=self.processor.tokenizer,
            )
        except Exception as error:  # a failed batch answers each of its requests with the error
            logger.exception("generation failed for a batch of %d request(s)", len(rows))
            for row in rows:
                if not row.done:
                    row.fail(f"generation failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------- model, handler


class UniMoEModelManager(ModelManager):
    """transformers' `ModelManager` pinned to one Uni-MoE checkpoint (a folder or Hub repo id), loaded at start
    through the Auto classes with `trust_remote_code=True`, and served under the name it was given."""

    def __init__(
        self, model: str, device: str | None = None, dtype: str = "auto", quantization: str = "none",
        experts_implementation: str = "default",
    ):  # fmt: skip
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.load_kwargs = model_kwargs(quantization, experts_implementation)
        self.model_name = model
        self.target_device = resolve_device(device)
        super().__init__(device="cpu", dtype=dtype, trust_remote_code=True, model_timeout=-1, force_model=model)
        # loaded (and cached) by `force_model` above; kept here so that requests do not go through the cache's lock
        self.served_model, self.served_processor = self.load_model_and_processor(self.process_model_name(model))

    def _split(self, model_id_and_revision: str) -> tuple[str, str | None]:
        if os.path.exists(model_id_and_revision) or "@" not in model_id_and_revision:
            return model_id_and_revision, None
        model_id, _, revision = model_id_and_revision.partition("@")
        return model_id, revision or None

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        model_id, revision = self._split(model_id_and_revision)
        processor = load_processor(model_id, revision)
        processor.tokenizer.padding_side = "left"
        return processor

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        model_id, revision = self._split(model_id_and_revision)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, revision=revision, trust_remote_code=True, dtype=self.dtype, **self.load_kwargs
        )
        return model.to(self.target_device).eval()

    @staticmethod
    def get_model_modality(model, processor=None):
        return Modality.MULTIMODAL

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        return [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "local" if os.path.exists(self.model_name) else self.model_name.split("/")[0]}]

    get_gen_models = list_models  # its name in transformers 5.23

    def served(self):
        """(model, processor) of the served checkpoint."""
        return self.served_model, self.served_processor


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    """`body[name]`: None, or a finite number in [low, high] ((low, high] with `low_open`); else a `RequestError`."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)[:50]}")
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"{name} must be in {interval}, got {value}")
    return value


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {json.dumps(value)[:50]}")
    return value


# keys of transformers serve's `generation_config` extension (a JSON string) that this server accepts: the ones that
# change how tokens are chosen, not the shape of the answer (beams, several sequences) or what is returned
GENERATION_CONFIG_KEYS = ("min_new_tokens", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                          "repetition_penalty", "no_repeat_ngram_size")


def check_request_fields(body: dict, vocab_size: int) -> None:
    """The request's fields, each checked before any media is decoded: a `RequestError` names the field and what it
    takes (OpenAI's ranges, or transformers' where it maps the field: `frequency_penalty` > -1 becomes
    `repetition_penalty = 1 + frequency_penalty`)."""
    for name, refused in _REFUSED_FIELDS.items():
        if refused(body.get(name)):
            raise RequestError(
                f"{name}={json.dumps(body[name])[:100]} is not supported: this server answers with one text choice "
                "(no log-probabilities, tools, structured or audio output, presence penalty)"
            )
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestError(f"stream must be true or false, got {json.dumps(body['stream'])[:50]}")
    for name in ("max_tokens", "max_completion_tokens"):
        _integer(body, name, 1, 2**31 - 1)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1, low_open=True)
    _number(body, "frequency_penalty", -1, 2, low_open=True)
    _integer(body, "seed", 0, 2**63 - 1)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError("logit_bias must be an object {token id: bias}")
        for key, value in bias.items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise RequestError(f"logit_bias: {key!r} is not a token id (0..{vocab_size - 1})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise RequestError(f"logit_bias[{key!r}] must be a number in [-100, 100], got {json.dumps(value)[:50]}")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(x, str) and x for x in stops):
            raise RequestError("stop must be a non-empty string or a list of 1 to 4 of them")
        if body.get("stream"):
            raise RequestError("stop cannot be combined with stream here (the streamed text would include the stop string)")
    if body.get("chat_template_kwargs"):
        raise RequestError("chat_template_kwargs is not supported: Uni-MoE's chat template (Vicuna v1) takes no options")
    raw = body.get("generation_config")
    if raw is not None:
        try:
            settings = json.loads(raw) if isinstance(raw, str) else None
        except json.JSONDecodeError as error:
            raise RequestError(f"generation_config is not valid JSON ({error})") from None
        if not isinstance(settings, dict):
            raise RequestError("generation_config must be a JSON object in a string (transformers serve's extension)")
        if unknown := sorted(set(settings) - set(GENERATION_CONFIG_KEYS)):
            raise RequestError(f"generation_config: {', '.join(unknown)} not accepted here; it takes {', '.join(GENERATION_CONFIG_KEYS)}")


class UniMoEChatCompletionHandler(ChatCompletionHandler):
    """transformers' chat-completions handler with our content parts, checks and batching manager; its response
    builders (`_streaming`, `_non_streaming`, `_build_generation_config`) are used as they are."""

    def __init__(
        self, model_manager: UniMoEModelManager, generate_manager: BatchingGenerateManager, local_files: "bool | Path" = True
    ):
        super().__init__(model_manager, GenerationState())
        self.generate_manager, self.local_files = generate_manager, local_files

    async def handle_request(self, body: dict, request_id: str, request: "Request | None" = None):
        self._validate_request(body)
        served = self.model_manager.model_name
        if body.get("model") != served:
            raise RequestError(
                f"model {body.get('model')!r} is not served here; this server serves {served!r} (GET /v1/models)",
                status=404,
                code="model_not_found",
            )
        model, processor = self.model_manager.served()
        check_request_fields(body, model.config.get_text_config().vocab_size)
        conversation, legend = chat_messages_from_openai(body.get("messages"), processor, self.local_files)
        inputs = await asyncio.to_thread(self._encode, processor, conversation, legend)
        check_served_modalities(model.config, inputs)
        generation_config = self._generation_config(body, model, inputs["input_ids"].shape[1])
        if body.get("seed") is not None:
            self.generate_manager.set_seed(request_id, body["seed"])
        manager = self.generate_manager
        if body.get("stream"):
            response = self._streaming(request_id, model, processor, served, inputs, generation_config, manager)
            response.body_iterator = _with_done(response.body_iterator)
            return response
        if request is not None:  # a client that goes away ends its generation
            manager = _WatchedManager(manager, request)
        response = await self._non_streaming(request_id, model, processor, served, inputs, generation_config, manager)
        if body.get("stop") is not None:
            response = _cut_at_stop(response, body["stop"])
        return response

    @staticmethod
    def _encode(processor, conversation: list[dict], legend: MediaLegend):
        try:
            return processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except (ValueError, TypeError, OSError) as error:
            raise RequestError(f"{error}{legend.explain()}") from None

    def _generation_config(self, body: dict, model, prompt_length: int):
        context = model.config.max_position_embeddings
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        room = context - prompt_length
        if room < 1 or (requested is not None and requested > room):
            asked = f" plus max_tokens={requested}" if requested is not None else ""
            raise RequestError(
                f"the prompt is {prompt_length} tokens after media expansion{asked}, past the model's context of "
                f"{context} tokens (max_position_embeddings); send less media or text, or ask for fewer tokens",
                code="context_length_exceeded",
            )
        temperature = body.get("temperature")
        # the seed is applied in the generation thread, right before this request's generate (not here: transformers
        # would seed the global generator now, while other requests sample)
        generation_config = self._build_generation_config({**body, "seed": None}, model.generation_config)
        if requested is None:
            generation_config.max_new_tokens = min(generation_config.max_new_tokens, room)
        if body.get("logit_bias"):  # (transformers' mapping keeps integer biases, which generate refuses)
            generation_config.sequence_bias = {(int(key),): float(value) for key, value in body["logit_bias"].items()}
        if temperature:  # OpenAI's meaning: any temperature above 0 samples (0 is greedy)
            generation_config.do_sample = True
        elif temperature is not None:  # greedy: a temperature of 0 is not a sampling setting generate should see
            generation_config.temperature = None
        return generation_config


class _WatchedManager:
    """The batching manager, for one non-streamed request whose client is watched while it waits."""

    def __init__(self, manager: BatchingGenerateManager, request: "Request"):
        self.manager, self.request = manager, request

    async def generate_non_streaming(self, *args, **kwargs):
        return await self.manager.generate_non_streaming(*args, **kwargs, disconnected=self.request.is_disconnected)


async def _with_done(chunks):
    """The SSE chunks, then OpenAI's `data: [DONE]` (transformers' stream ends without it)."""
    async for chunk in chunks:
        yield chunk
    yield "data: [DONE]\n\n"


def _cut_at_stop(response: "JSONResponse", stop) -> "JSONResponse":
    """A non-streamed answer cut before its first stop string, as OpenAI returns it (generation ended on it)."""
    body = json.loads(response.body)
    content = body["choices"][0]["message"].get("content") or ""
    ends = [content.find(text) for text in ([stop] if isinstance(stop, str) else stop) if text in content]
    if ends:
        body["choices"][0]["message"]["content"] = content[: min(ends)]
        body["choices"][0]["finish_reason"] = "stop"
    return JSONResponse(body, status_code=response.status_code)


# ------------------------------------------------------------------------------------------------------ the app


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def build_app(model_manager: UniMoEModelManager, handler: UniMoEChatCompletionHandler, max_body_bytes: int = 64 << 20) -> FastAPI:
    """The FastAPI app: chat completions, model list and health, errors as OpenAI error objects."""
    app = FastAPI(title="Uni-MoE OpenAI-compatible server")

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError):
        return _error(error.status, str(error), error.code)

    @app.exception_handler(StarletteHTTPException)  # (fastapi's HTTPException, and routing's 404 and 405)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception):
        logger.exception("request failed")
        return _error(500, f"{type(error).__name__}: {error}")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise RequestError(f"the request body is {len(raw):,} bytes, over this server's {max_body_bytes:,} (--max_request_mb)", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"malformed JSON body: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        request_id = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        response = await handler.handle_request(body, request_id, request)
        response.headers["x-request-id"] = request_id
        return response

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": model_manager.list_models()}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str):
        for model in model_manager.list_models():
            if model["id"] == model_id:
                return model
        raise RequestError(f"model {model_id!r} is not served here", status=404, code="model_not_found")

    @app.get("/health")
    def health():
        """Ready once the model is loaded; with the batching counters (batches, requests, the largest batch)."""
        manager = handler.generate_manager
        if not manager.healthy:
            return JSONResponse({"status": "unhealthy", "reason": "the generation thread stopped"}, status_code=503)
        return {
            "status": "ok",
            "model": model_manager.model_name,
            "batches_run": manager.batches_run,
            "requests_batched": manager.requests_batched,
            "largest_batch": manager.largest_batch,
        }

    return app


def create_app(
    model: str,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    local_files: "bool | str | Path" = True,
    max_request_mb: float = 64,
    quantization: str = "none",
    experts_implementation: str = "default",
):
    """Load `model` (a checkpoint folder or Hub repo id) and return the app serving it. `local_files`: which local
    media files requests may name (True: any, False: none, a folder: those inside it)."""
    if local_files not in (True, False) and not Path(local_files).is_dir():
        raise NotADirectoryError(f"--media_dir {local_files}: no such folder")
    local = check_model_path(model)
    try:
        model_manager = UniMoEModelManager(
            model, device=device, dtype=dtype, quantization=quantization, experts_implementation=experts_implementation
        )
    except (OSError, ValueError) as error:
        where = Path(model).resolve() if local else "the Hub"
        raise ValueError(f"{model!r}: cannot load the checkpoint from {where}: {str(error).splitlines()[0]}") from error
    loaded_model, processor = model_manager.served()
    generate_manager = BatchingGenerateManager(loaded_model, processor, max_batch_size, batch_wait_ms / 1000)
    handler = UniMoEChatCompletionHandler(model_manager, generate_manager, local_files)
    return build_app(model_manager, handler, int(max_request_mb * (1 << 20)))


@dataclass
class ServeArguments(ServingArguments):
    max_batch_size: int = field(default=8, metadata={"help": "Most concurrent requests in one batched generate."})
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "How long a batch waits for more requests after its first (milliseconds)."}
    )
    media_dir: str | None = field(
        default=None,
        metadata={"help": "Local media files (file:// URLs, paths) requests may name: only those under this folder. "
                  "Default: any file when listening on a loopback address, none otherwise."},
    )
    max_request_mb: float = field(default=64, metadata={"help": "Largest request body accepted (MiB)."})


def parse_arguments(argv: list[str] | None = None) -> ServeArguments:
    """`ServeArguments` from the command line: the checkpoint as the first positional argument or `--model`."""
    return parse_serving_arguments(ServeArguments, argv, "unimoe-serve")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    local_files = args.media_dir if args.media_dir is not None else _is_loopback(args.host)
    app = create_app(
        args.model, args.device, args.dtype, args.max_batch_size, args.batch_wait_ms, local_files, args.max_request_mb,
        args.quantization, args.experts_implementation,
    )
    logger.info("serving %s on http://%s:%d/v1", args.model, args.host, args.port)
    # on Ctrl-C / SIGTERM, requests still generating get 10 s to finish (uvicorn's default waits for them all)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
