"""A Gradio chat app for Uni-MoE checkpoints: `unimoe-chat DIR` (`python -m trl_scripts.chat_app DIR`).

    unimoe-chat outputs/quickstart/stage3 [--port 7860] [--device cuda] [--dtype bfloat16] [--share]

One chat with a multimodal input box: text plus image, audio (uploaded or recorded with the microphone) and video
files. Each file becomes a `{"type": "image" | "audio" | "video", "path": ...}` block of the processor's chat format,
its modality decided from its name (the extension's MIME type). Another kind of file, a file the processor cannot
read, or media the checkpoint has no tower for is refused, naming the file and the problem, in a warning and as the
answer; the next message works as usual. The whole chat is the conversation: earlier user turns with their media,
the answers as text (a refused message is left out).

The answer streams token by token (`model.generate` in a thread with a `TextIteratorStreamer`); the generation
settings (max new tokens, temperature (0: greedy), top_p) are in an accordion under the input box. Under each answer
a heatmap shows which experts each sparse layer chose for that answer's tokens, per modality (the text, image, video
and audio tokens of prompt and answer): one forward pass over prompt + answer with `output_router_logits=True`,
counted like the trainer's expert load (`trl_scripts.training.trainer.modality_expert_counts`) and drawn with
`trl_scripts.training.plots.plot_routing`.

Needs the `chat` extra (`pip install 'unimoe[chat]'`: gradio). `unimoe-push-to-hub --space ORG/NAME` publishes the
model with a Hugging Face Space running this app on it (`trl_scripts.hub.space`).
"""

import io
import json
import logging
import mimetypes
import threading
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils import cached_file

from ..console import command_line
from ..loading import load_model_and_processor, readable_modalities
from ..training.plots import plot_routing
from ..training.trainer import MODALITIES, modality_expert_counts
from .arguments import ServingArguments, parse_serving_arguments


try:
    import gradio as gr
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"unimoe-chat needs the chat extra ({error}): pip install 'unimoe[chat]' (gradio)") from error


logger = logging.getLogger(__name__)

MEDIA_MODALITIES = ("image", "audio", "video")  # the file kinds the input box takes, in the processor's block types
DEFAULT_MAX_NEW_TOKENS = 64
HEATMAP_LABEL = "Expert routing of this answer"  # the heatmap's alt text on the page
HEATMAP_TITLE = "Experts chosen for this answer's tokens (prompt + answer): share of each modality's top-k assignments"
REFUSAL_TITLE = "Cannot read the message"  # the answer to a refused message
FAILURE_TITLE = "Generation failed"  # the answer to a message whose generation raised
ERROR_TITLES = (REFUSAL_TITLE, FAILURE_TITLE)


class ChatInputError(ValueError):
    """A message the app refuses: a file that is not an image, audio or video, or media the checkpoint cannot read."""


# ------------------------------------------------------------------------------------------------------- messages


def error_answer(title: str, text: str) -> dict:
    """The chat's answer to a message it could not answer: `text` under `title` (one of `ERROR_TITLES`). Raising
    `gr.Error` from the chat function instead would leave gradio 6's ChatInterface input box disabled for good."""
    return {"role": "assistant", "content": text, "metadata": {"title": title}}  # no "status": shown open


def is_error_answer(message: dict) -> bool:
    return (message.get("metadata") or {}).get("title") in ERROR_TITLES


def file_modality(path: str) -> str:
    """"image", "audio" or "video": the top-level MIME type of the file's name (`mimetypes`, from its extension).

    Raises `ChatInputError` naming the file for any other type (documents, archives, no extension)."""
    mime_type, _ = mimetypes.guess_type(path)
    modality = (mime_type or "").split("/")[0]
    if modality not in MEDIA_MODALITIES:
        raise ChatInputError(
            f"{Path(path).name}: unsupported file type ({mime_type or 'unknown type'}); expected an image, audio or "
            "video file"
        )
    return modality


def media_block(path: str, readable: Collection[str]) -> dict:
    """`{"type": modality, "path": path}`; `ChatInputError` when the file is no media or the checkpoint cannot read
    its modality."""
    modality = file_modality(path)
    if modality not in readable:
        can_read = ", ".join(m for m in MEDIA_MODALITIES if m in readable) or "no media"
        raise ChatInputError(
            f"{Path(path).name}: this checkpoint has no tower for {modality} (it reads text and {can_read})"
        )
    return {"type": modality, "path": path}


def _file_path(file) -> str:
    """A MultimodalTextbox file: a path, or a FileData dict with one."""
    return file["path"] if isinstance(file, dict) else str(file)


def user_content(text: str, files: Sequence, readable: Collection[str]) -> list[dict]:
    """One user turn in the processor's chat format: a media block per file, in order, then the text (if any).

    `files` are paths (or dicts with a "path"); raises `ChatInputError` for a file that is not readable media and for
    an empty turn."""
    content = [media_block(_file_path(file), readable) for file in files]
    if text:
        content.append(_text_block(text))
    if not content:
        raise ChatInputError("The message is empty: type a question or attach an image, audio or video file")
    return content


def _text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def _history_parts(message: dict) -> list[dict]:
    """The parts of one Chatbot message ({"type": "text" | "file" | "component", ...}); plain strings are text."""
    content = message["content"] if isinstance(message["content"], list) else [message["content"]]
    return [{"type": "text", "text": part} if isinstance(part, str) else part for part in content]


def conversation(message: dict, history: Sequence[dict], readable: Collection[str]) -> list[dict]:
    """The processor's chat messages for a new `message` after `history`.

    `message` is the MultimodalTextbox value, `{"text": str, "files": [path, ...]}`; `history` the Chatbot's messages
    (`{"role": "user" | "assistant", "content": [{"type": "text", "text"} | {"type": "file", "file": {"path"}} |
    {"type": "component", ...}]}`). User turns keep their media as blocks; an answer is its text (the routing heatmap
    is left out, consecutive assistant messages are one answer); a user turn answered with an error
    (`is_error_answer`) or not at all is left out. Raises `ChatInputError` for a file that is not readable media."""
    messages, pending = [], None
    for item in history:
        parts = _history_parts(item)
        if item["role"] == "user":
            if pending is not None:
                logger.info("Leaving out a user message that got no answer")
            pending = [
                media_block(part["file"]["path"], readable) if part["type"] == "file" else _text_block(part["text"])
                for part in parts
                if part["type"] in ("file", "text")
            ]
        elif item["role"] == "assistant":
            text = "".join(part["text"] for part in parts if part["type"] == "text")
            if is_error_answer(item):
                pending = None
            elif pending is not None:
                messages += [{"role": "user", "content": pending}, {"role": "assistant", "content": [_text_block(text)]}]
                pending = None
            elif messages and text:  # a later message of the same answer: a new line of it
                messages[-1]["content"][0]["text"] += "\n" + text
    if pending is not None:
        logger.info("Leaving out a user message that got no answer")
    content = user_content(message.get("text") or "", message.get("files") or [], readable)
    return [*messages, {"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------------------ streaming


class _StopWhenSet(StoppingCriteria):
    """Ends `generate` at the next token once `event` is set (the chat stopped listening)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """`generate` keyword arguments: greedy at temperature 0, else sampling with `temperature` and `top_p`."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def stream_answer(
    model, processor, inputs, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0
) -> Generator[str, None, tuple[str, torch.Tensor]]:
    """Yields the answer so far (the decoded new tokens, growing) while `model.generate(**inputs)` runs in a thread;
    returns `(answer, sequences)`, `sequences` [1, prompt + answer tokens] (`answer, ids = yield from ...`).

    An error in `generate` is raised here. Closing the generator ends the generation at the next token."""
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    result = {}

    def run():
        try:
            result["sequences"] = model.generate(
                **inputs, streamer=streamer, max_new_tokens=int(max_new_tokens),
                pad_token_id=processor.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                **sampling_kwargs(temperature, top_p),
            )
        except BaseException as error:  # re-raised in the caller's thread; the streamer must end either way
            result["error"] = error
            streamer.end()

    thread = threading.Thread(target=run, name="unimoe-chat-generate", daemon=True)
    thread.start()
    answer = ""
    try:
        for piece in streamer:
            if piece:
                answer += piece
                yield answer
    finally:
        stop.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    return answer, result["sequences"]


# -------------------------------------------------------------------------------------------------------- routing


def count_routing(
    input_ids: torch.Tensor, router_logits: Sequence[torch.Tensor], media_token_ids: dict[str, int], top_k: int
) -> torch.Tensor:
    """[modalities (`MODALITIES`), sparse layers, experts] counts of one sequence's top-k expert assignments.

    `input_ids` [seq]; `router_logits` one [seq, experts] tensor per sparse layer (a batch of one); a token is of
    modality m when its id is `media_token_ids[m]` (the placeholder the processor expanded), else text."""
    input_ids = input_ids.cpu()
    modality = torch.zeros_like(input_ids)  # MODALITIES[0] is text
    for name, token_id in media_token_ids.items():
        if token_id is not None:  # a model without that modality's tower
            modality[input_ids == token_id] = MODALITIES.index(name)
    layers = []
    for logits in router_logits:
        if logits.shape[0] != input_ids.shape[0]:
            raise ValueError(f"router logits for {logits.shape[0]} tokens, input ids for {input_ids.shape[0]}")
        chosen = logits.float().topk(top_k, dim=-1).indices.cpu()  # [seq, k]
        layers.append(modality_expert_counts(modality, chosen, len(MODALITIES), logits.shape[-1]))
    return torch.stack(layers, dim=1)


@torch.inference_mode()
def answer_routing_shares(model, inputs, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which experts the sparse layers chose for one answer: a forward pass over prompt + answer (`sequences`
    [1, seq], from `generate` on `inputs`, whose media inputs it reuses) with `output_router_logits=True`.

    Returns `shares` [modalities, sparse layers, experts] (float; each modality's top-k assignments per layer, a row
    sums to 1 where the modality has tokens and is 0 elsewhere) and `tokens` [modalities] (its number of tokens)."""
    if sequences.shape[0] != 1:
        raise ValueError(f"expected the sequences of one answer, got a batch of {sequences.shape[0]}")
    config = model.config
    text_config = config.get_text_config()
    forward_inputs = {**inputs, "input_ids": sequences, "attention_mask": torch.ones_like(sequences)}
    router_logits = model(**forward_inputs, output_router_logits=True).router_logits
    if len(router_logits) != len(text_config.sparse_layer_indices):
        raise ValueError(
            f"the model returned router logits for {len(router_logits)} layers; its config has "
            f"{len(text_config.sparse_layer_indices)} sparse layers"
        )
    media_token_ids = {name: getattr(config, f"{name}_token_id", None) for name in ("image", "video", "audio")}
    counts = count_routing(sequences[0], router_logits, media_token_ids, text_config.num_experts_per_tok)
    tokens = counts[:, 0].sum(dim=-1).long() // text_config.num_experts_per_tok  # k assignments per token and layer
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1), tokens


def routing_heatmap(
    shares: torch.Tensor, tokens: torch.Tensor, layers: list[int], expert_names: list[str]
) -> Image.Image:
    """The heatmap of `answer_routing_shares`: the modalities present (rows, named with their token count) x experts,
    one panel per sparse layer, as a PNG image."""
    present = [index for index, count in enumerate(tokens.tolist()) if count > 0]
    buffer = io.BytesIO()
    plot_routing(
        shares[present], layers, expert_names, buffer, title=HEATMAP_TITLE,
        row_labels=[f"{MODALITIES[index]} ({int(tokens[index])})" for index in present],
    )
    buffer.seek(0)
    return Image.open(buffer)


def expert_names(model_path: str, num_experts: int) -> list[str]:
    """The experts' names stage 2 saved with the checkpoint (`experts.json`: ["text", "image", ...]), "" for the
    experts it does not name (all of them when the checkpoint has no such file)."""
    path = cached_file(
        model_path, "experts.json", _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    names = json.loads(Path(path).read_text()) if path else []
    return [str(name) for name in names[:num_experts]] + [""] * (num_experts - len(names))


# ------------------------------------------------------------------------------------------------------------ app


def _with_upload_names(error: Exception, paths: Collection[str]) -> str:
    """The error's message with each uploaded file named as the user named it (not its path in gradio's cache)."""
    message = str(error)
    for path in sorted(paths, key=len, reverse=True):
        message = message.replace(path, Path(path).name)
    return message


def _message_paths(message: dict, history: Sequence[dict]) -> list[str]:
    paths = [_file_path(file) for file in message.get("files") or []]
    for item in history:
        paths += [part["file"]["path"] for part in _history_parts(item) if part["type"] == "file"]
    return paths


class ChatApp:
    """A loaded checkpoint and the chat function of its page (`respond`)."""

    def __init__(self, model, processor, expert_names: list[str] | None = None, system_prompt: str | None = None):
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt  # None: the chat template's default system message
        self.readable = readable_modalities(model.config)
        text_config = model.config.get_text_config()
        self.sparse_layers = list(text_config.sparse_layer_indices)
        self.expert_names = expert_names or [""] * text_config.num_experts

    @classmethod
    def from_pretrained(
        cls, model_path: str, device: str | None = None, dtype: str = "auto", system_prompt: str | None = None,
        quantization: str = "none", experts_implementation: str = "default",
    ) -> "ChatApp":
        """Load a checkpoint folder or Hub repo id (`trl_scripts.loading.load_model_and_processor`)."""
        model, processor = load_model_and_processor(model_path, device, dtype, quantization, experts_implementation)
        return cls(model, processor, expert_names(model_path, model.config.get_text_config().num_experts), system_prompt)

    def inputs(self, messages: list[dict]):
        """The model inputs of a conversation (its last turn the user's); raises `ChatInputError` for a file or
        message the processor refuses, naming it."""
        try:
            inputs = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except (ValueError, TypeError, OSError) as error:
            raise ChatInputError(str(error)) from error
        return inputs.to(self.model.device)

    def check_room(self, inputs, max_new_tokens: int) -> None:
        """`ChatInputError` when prompt + `max_new_tokens` would pass the model's context (`max_position_embeddings`)."""
        prompt, context = inputs["input_ids"].shape[1], self.model.config.max_position_embeddings
        if prompt + int(max_new_tokens) > context:
            raise ChatInputError(
                f"the conversation is {prompt} tokens after media expansion; with up to {int(max_new_tokens)} new tokens "
                f"it would pass the model's context of {context}: clear the chat or lower max new tokens"
            )

    def respond(
        self,
        message: dict,
        history: list[dict],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Generator:
        """The ChatInterface function: yields the answer so far (str), then the answer with its routing heatmap
        ([str, gr.Image]). A message it refuses (naming the file and the problem), or whose generation raises, gets
        a warning and an `error_answer`, which later turns leave out of the conversation."""
        try:
            messages = conversation(message, history, self.readable)
            if self.system_prompt is not None:
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            inputs = self.inputs(messages)
            self.check_room(inputs, max_new_tokens)
        except ChatInputError as error:
            logger.info("Refused a message: %s", error)
            text = _with_upload_names(error, _message_paths(message, history))
            gr.Warning(f"{REFUSAL_TITLE}: {text}")
            yield error_answer(REFUSAL_TITLE, text)
            return
        try:
            answer, sequences = yield from stream_answer(
                self.model, self.processor, inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
            )
            shares, tokens = answer_routing_shares(self.model, inputs, sequences)
            heatmap = routing_heatmap(shares, tokens, self.sparse_layers, self.expert_names)
        except Exception as error:  # e.g. out of memory: the page says so and takes the next message
            logger.exception("Generation failed")
            text = f"{type(error).__name__}: {error}"
            gr.Warning(f"{FAILURE_TITLE}: {text}")
            yield error_answer(FAILURE_TITLE, text)
            return
        # no label: in a chat message it would cover the top of the heatmap
        yield [answer, gr.Image(heatmap, alt_text=HEATMAP_LABEL, format="png", buttons=["download", "fullscreen"])]


def build_demo(
    chat: ChatApp, *, title: str = "Uni-MoE chat", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> gr.ChatInterface:
    """The page: a chatbot, a multimodal input box for the media the checkpoint reads (microphone too when it reads
    audio), and the generation settings (`max_new_tokens` the default of its slider) in an accordion."""
    media = [modality for modality in MEDIA_MODALITIES if modality in chat.readable]
    textbox = gr.MultimodalTextbox(
        file_types=media or None, file_count="multiple",
        sources=["upload", "microphone"] if "audio" in media else ["upload"],
        placeholder=f"Ask about an {' / '.join(media)}..." if media else "Ask a question...", autofocus=True,
    )
    settings = [
        gr.Slider(1, max(1024, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p (sampling only)"),
    ]
    description = (
        "Attach images, audio or video and ask about them. Under each answer: the experts each sparse layer chose for "
        "the answer's tokens (prompt + answer), per modality."
    )
    return gr.ChatInterface(
        chat.respond, multimodal=True, textbox=textbox, chatbot=gr.Chatbot(label="Chat", height=560),
        additional_inputs=settings, additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        title=title, description=description, fill_height=True,
    )


# ------------------------------------------------------------------------------------------------------------ CLI


@dataclass
class ChatArguments(ServingArguments):
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "The system message of every conversation (default: the chat template's, Vicuna's sentence; "
                  "the quickstart's checkpoints were trained with an empty one: --system_prompt '')."},
    )
    share: bool = field(
        default=False, metadata={"help": "Also serve on a public gradio.live link (through Gradio's servers)."}
    )


def parse_arguments(argv: list[str] | None = None) -> ChatArguments:
    """`ChatArguments` from the command line: the checkpoint as the first positional argument or `--model`."""
    return parse_serving_arguments(ChatArguments, argv, "unimoe-chat")


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    chat = ChatApp.from_pretrained(
        args.model, args.device, args.dtype, args.system_prompt, args.quantization, args.experts_implementation
    )
    demo = build_demo(chat, title=f"Uni-MoE chat: {Path(args.model).name or args.model}")
    logger.info("Chatting with %s on http://%s:%d", args.model, args.host, args.port)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
