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
import json
import logging
import os
import queue
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..console import command_line
from ..evaluate import DTYPES, check_model_path, resolve_device
from .arguments import ServingArguments, parse_serving_arguments


try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
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


def _media_source(url, where: str):
    """A media URL of a content part -> what the processor reads: bytes (`data:` URI) or a local file path."""
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


def _convert_part(part, where: str, legend: MediaLegend) -> dict:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where}: a content part is an object with a 'type', got {json.dumps(part)[:100]}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        source, media = _media_source(_part_url(part, "image_url", where), where), "image"
    elif kind == "video_url":
        source, media = _media_source(_part_url(part, "video_url", where), where), "video"
    elif kind == "audio_url":
        source, media = _media_source(_part_url(part, "audio_url", where), where), "audio"
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


def chat_messages_from_openai(messages) -> tuple[list[dict], MediaLegend]:
    """OpenAI chat messages -> the processor's chat format, every media part decoded (bytes) or located (a local
    path); `developer` messages are system messages. Raises `RequestError` naming the message and part."""
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
        if isinstance(content, list):
            content = [_convert_part(part, f"{where}.content[{i}]", legend) for i, part in enumerate(content)]
        converted["content"] = content
        conversation.append(converted)
    return conversation, legend


# ---------------------------------------------------------------------------------------------------- batching


def collate(encodings: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Processor outputs of single requests -> one batch: `input_ids` and `attention_mask` left-padded to the
    longest, media tensors (`pixel_values`, `input_features`...: one row per item) concatenated in request order,
    as the processor itself orders the media of a batch."""
    length = max(encoding["input_ids"].shape[1] for encoding in encodings)
    input_ids = torch.full((len(encodings), length), pad_token_id, dtype=encodings[0]["input_ids"].dtype)
    attention_mask = torch.zeros((len(encodings), length), dtype=encodings[0]["attention_mask"].dtype)
    for row, encoding in enumerate(encodings):
        width = encoding["input_ids"].shape[1]
        input_ids[row, length - width :] = encoding["input_ids"][0]
        attention_mask[row, length - width :] = encoding["attention_mask"][0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    media_keys = dict.fromkeys(key for encoding in encodings for key in encoding if key not in batch)
    for key in media_keys:
        batch[key] = torch.cat([encoding[key] for encoding in encodings if key in encoding])
    return batch


class _Row:
    """One request inside a batched `generate`: its new tokens, until its end of sequence, its own token budget,
    or its client going away; streamed to `sink` (a transformers `DirectStreamer`) or collected for `future`."""

    def __init__(self, encoding, generation_config, eos_token_ids: set[int], sink=None, future=None, loop=None):
        self.encoding, self.generation_config = encoding, generation_config
        self.budget = generation_config.max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.sink, self.future, self.loop = sink, future, loop
        self.tokens: list[int] = []
        self.done = False

    def start(self) -> None:
        if self.sink is not None:
            self.sink.put(self.encoding["input_ids"][0])  # the streamer protocol: the prompt first (not streamed)

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
        if self.sink is not None:
            self.sink._enqueue(_StreamError(message))
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


def _batch_key(generation_config, row_id: int) -> str:
    """Requests batch together when their generation settings agree but for the token budget; a request with stop
    strings runs alone (transformers ends its row without telling the streamer)."""
    settings = generation_config.to_dict()
    for name in ("max_new_tokens", "max_length", "transformers_version"):
        settings.pop(name, None)
    if settings.get("stop_strings"):
        settings["alone"] = row_id
    return json.dumps(settings, sort_keys=True, default=str)


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
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="unimoe-generate", daemon=True)
        self._thread.start()

    # the interface of transformers' managers (`model`, `processor` are the ones given at construction)
    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        streamer = DirectStreamer(processor.tokenizer._tokenizer, loop, events, response_parser=response_parser)
        self._queue.put(_Row(inputs, gen_config, self.eos_token_ids, sink=streamer))
        return events, streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Row(inputs, gen_config, self.eos_token_ids, future=future, loop=loop))
        generated_ids = await future
        text = processor.decode(generated_ids, skip_special_tokens=True)
        return text, inputs["input_ids"].shape[-1], generated_ids

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
                groups.setdefault(_batch_key(row.generation_config, index), []).append(row)
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

    def __init__(self, model: str, device: str | None = None, dtype: str = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
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
        processor = AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=True)
        processor.tokenizer.padding_side = "left"
        return processor

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        model_id, revision = self._split(model_id_and_revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, trust_remote_code=True, dtype=self.dtype)
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


class UniMoEChatCompletionHandler(ChatCompletionHandler):
    """transformers' chat-completions handler with our content parts, checks and batching manager; its response
    builders (`_streaming`, `_non_streaming`, `_build_generation_config`) are used as they are."""

    def __init__(self, model_manager: UniMoEModelManager, generate_manager: BatchingGenerateManager):
        super().__init__(model_manager, GenerationState())
        self.generate_manager = generate_manager

    async def handle_request(self, body: dict, request_id: str):
        self._validate_request(body)
        for name, refused in _REFUSED_FIELDS.items():
            if refused(body.get(name)):
                raise RequestError(
                    f"{name}={json.dumps(body[name])[:100]} is not supported: this server answers with one text choice "
                    "(no log-probabilities, tools, structured or audio output, presence penalty)"
                )
        served = self.model_manager.model_name
        if body.get("model") != served:
            raise RequestError(
                f"model {body.get('model')!r} is not served here; this server serves {served!r} (GET /v1/models)",
                status=404,
                code="model_not_found",
            )
        model, processor = self.model_manager.served()
        conversation, legend = chat_messages_from_openai(body.get("messages"))
        inputs = await asyncio.to_thread(self._encode, processor, conversation, legend)
        generation_config = self._generation_config(body, model, inputs["input_ids"].shape[1])
        if body.get("stream"):
            return self._streaming(request_id, model, processor, served, inputs, generation_config, self.generate_manager)
        return await self._non_streaming(request_id, model, processor, served, inputs, generation_config, self.generate_manager)

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
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise RequestError(f"max_tokens must be a positive integer, got {requested!r}")
        room = context - prompt_length
        if room < 1 or (requested is not None and requested > room):
            asked = f" plus max_tokens={requested}" if requested is not None else ""
            raise RequestError(
                f"the prompt is {prompt_length} tokens after media expansion{asked}, past the model's context of "
                f"{context} tokens (max_position_embeddings); send less media or text, or ask for fewer tokens",
                code="context_length_exceeded",
            )
        temperature = body.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0):
            raise RequestError(f"temperature must be a number >= 0, got {temperature!r}")
        generation_config = self._build_generation_config(body, model.generation_config)
        if requested is None:
            generation_config.max_new_tokens = min(generation_config.max_new_tokens, room)
        if temperature:  # OpenAI's meaning: any temperature above 0 samples (0 is greedy)
            generation_config.do_sample = True
        elif temperature is not None:  # greedy: a temperature of 0 is not a sampling setting generate should see
            generation_config.temperature = None
        return generation_config


# ------------------------------------------------------------------------------------------------------ the app


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def build_app(model_manager: UniMoEModelManager, handler: UniMoEChatCompletionHandler) -> FastAPI:
    """The FastAPI app: chat completions, model list and health, errors as OpenAI error objects."""
    app = FastAPI(title="Uni-MoE OpenAI-compatible server")

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError):
        return _error(error.status, str(error), error.code)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError):
        return _error(400, f"malformed request: {error.errors()}"[:1000])

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception):
        logger.exception("request failed")
        return _error(500, f"{type(error).__name__}: {error}")

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"malformed JSON body: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        return await handler.handle_request(body, request.state.request_id)

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
        return {
            "status": "ok",
            "model": model_manager.model_name,
            "batches_run": manager.batches_run,
            "requests_batched": manager.requests_batched,
            "largest_batch": manager.largest_batch,
        }

    return app


def create_app(model: str, device: str | None = None, dtype: str = "auto", max_batch_size: int = 8, batch_wait_ms: float = 5.0):
    """Load `model` (a checkpoint folder or Hub repo id) and return the app serving it."""
    local = check_model_path(model)
    try:
        model_manager = UniMoEModelManager(model, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        where = Path(model).resolve() if local else "the Hub"
        raise ValueError(f"{model!r}: cannot load the checkpoint from {where}: {str(error).splitlines()[0]}") from error
    loaded_model, processor = model_manager.served()
    generate_manager = BatchingGenerateManager(loaded_model, processor, max_batch_size, batch_wait_ms / 1000)
    handler = UniMoEChatCompletionHandler(model_manager, generate_manager)
    return build_app(model_manager, handler)


@dataclass
class ServeArguments(ServingArguments):
    max_batch_size: int = field(default=8, metadata={"help": "Most concurrent requests in one batched generate."})
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "How long a batch waits for more requests after its first (milliseconds)."}
    )


def parse_arguments(argv: list[str] | None = None) -> ServeArguments:
    """`ServeArguments` from the command line: the checkpoint as the first positional argument or `--model`."""
    return parse_serving_arguments(ServeArguments, argv, "unimoe-serve")


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    app = create_app(args.model, args.device, args.dtype, args.max_batch_size, args.batch_wait_ms)
    logger.info("serving %s on http://%s:%d/v1", args.model, args.host, args.port)
    # on Ctrl-C / SIGTERM, requests still generating get 10 s to finish (uvicorn's default waits for them all)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
