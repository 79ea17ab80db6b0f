"""The Gradio chat app (`unimoe-chat`, trl_scripts/serving/chat_app.py) on a tiny multimodal checkpoint: messages from
the chat history and files, modality detection, routing shares against a hand count, streamed answers against
`generate`, and the page itself in Debian's Chromium driven by playwright (uploads, streamed answer, routing heatmap,
a corrupt file refused while the chat stays usable)."""

import inspect
import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio loads: no version check, no telemetry

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tests.utils import REPO_ROOT  # noqa: E402
from tests.utils.media import write_audio, write_image, write_video  # noqa: E402
from tests.utils.models import make_tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from trl_scripts import load_tiny_processor  # noqa: E402
from trl_scripts.serving.chat_app import (  # noqa: E402
    DEFAULT_MAX_NEW_TOKENS,
    HEATMAP_LABEL,
    REFUSAL_TITLE,
    ChatApp,
    ChatInputError,
    answer_routing_shares,
    build_demo,
    conversation,
    count_routing,
    file_modality,
    media_block,
    parse_arguments,
)
from tests.utils.processes import free_port  # noqa: E402
from trl_scripts.training.trainer import MODALITIES  # noqa: E402


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
EXPERTS = ["text", "image", "video", "audio"]
ALL_MEDIA = {"image", "audio", "video"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "tiny-unimoe"
    make_tiny_model(text_only=False).save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    (folder / "experts.json").write_text(json.dumps(EXPERTS))  # what stage 2 leaves in a trained checkpoint
    return folder


@pytest.fixture(scope="module")
def chat(checkpoint) -> ChatApp:
    return ChatApp.from_pretrained(str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat-media")
    files = {
        "image": write_image(folder / "red.png", color=(220, 30, 30)),
        "audio": write_audio(folder / "tone.wav", seconds=1.0),
        "video": write_video(folder / "square.mp4"),
        "corrupt": folder / "x.png",
        "text": folder / "notes.txt",
    }
    files["corrupt"].write_bytes(os.urandom(256))
    files["text"].write_text("not media")
    return files


def greedy_answer(chat: ChatApp, messages: list[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """What `generate` answers to `messages` (greedy), decoded like the app decodes its stream."""
    inputs = chat.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = chat.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return chat.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chatbot_history(*messages) -> list[dict]:
    """Messages as the ChatInterface keeps them between turns: through the Chatbot's postprocess and preprocess."""
    chatbot = gr.Chatbot()
    return chatbot.preprocess(chatbot.postprocess(list(messages)))


def user(text: str, *paths: Path) -> dict:
    """A submitted MultimodalTextbox message as ChatInterface appends it to the history."""
    return {"role": "user", "content": [*({"path": str(path)} for path in paths), *([text] if text else [])]}


# ---- 1. messages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, modality",
    [("a.png", "image"), ("b.JPG", "image"), ("c.webp", "image"), ("d.wav", "audio"), ("e.mp3", "audio"),
     ("f.flac", "audio"), ("g.mp4", "video"), ("h.webm", "video"), ("i.avi", "video")],
)
def test_file_modality_from_the_name(name, modality):
    assert file_modality(f"/tmp/gradio/0123/{name}") == modality


@pytest.mark.parametrize("name, mime_type", [("notes.txt", "text/plain"), ("paper.pdf", "application/pdf"),
                                             ("archive.zip", "application/zip"), ("README", "unknown type")])
def test_other_files_are_refused_naming_file_and_type(name, mime_type):
    with pytest.raises(ChatInputError, match=rf"^{name}: unsupported file type \({mime_type}\); expected an image, audio or video"):
        file_modality(f"/tmp/gradio/0123/{name}")


def test_media_without_a_tower_is_refused():
    assert media_block("/x/a.wav", ALL_MEDIA) == {"type": "audio", "path": "/x/a.wav"}
    with pytest.raises(ChatInputError, match=r"^a\.wav: this checkpoint has no tower for audio \(it reads text and image, video\)"):
        media_block("/x/a.wav", {"image", "video"})


def test_conversation_from_history_and_files(media):
    image, audio, video, corrupt = (str(media[k]) for k in ("image", "audio", "video", "corrupt"))
    history = chatbot_history(
        user("What colour?", media["image"], media["audio"]),
        {"role": "assistant", "content": "Red."},
        {"role": "assistant", "content": gr.Image(Image.new("RGB", (8, 8)), alt_text=HEATMAP_LABEL)},  # the heatmap
        user("And this?", media["corrupt"]),
        {"role": "assistant", "content": "x.png: cannot read", "metadata": {"title": REFUSAL_TITLE}},  # refused
        user("Unanswered (its generation was stopped)"),
        user("", media["video"]),
        {"role": "assistant", "content": "A square"},
        {"role": "assistant", "content": "moving right."},
    )
    messages = conversation({"text": "Why?", "files": [audio]}, history, ALL_MEDIA)
    assert messages == [
        {"role": "user", "content": [{"type": "image", "path": image}, {"type": "audio", "path": audio},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "video", "path": video}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square\nmoving right."}]},
        {"role": "user", "content": [{"type": "audio", "path": audio}, {"type": "text", "text": "Why?"}]},
    ]
    assert corrupt not in json.dumps(messages)
    assert conversation({"text": "Hi", "files": []}, [], set()) == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    with pytest.raises(ChatInputError, match=r"^The message is empty"):
        conversation({"text": "", "files": []}, history, ALL_MEDIA)
    with pytest.raises(ChatInputError, match=r"^notes\.txt: unsupported file type"):
        conversation({"text": "Read this", "files": [str(media["text"])]}, [], ALL_MEDIA)


# ---- 2. routing -----------------------------------------------------------------------------------------------


def test_count_routing_matches_a_hand_count():
    image, audio = 3, 5
    ids = torch.tensor([1, image, image, 7, audio, 9])  # text, image, image, text, audio, text
    # 2 sparse layers, 3 experts, top-2; each row's two largest logits are the experts chosen
    layer0 = torch.tensor([[3.0, 2, 0], [0, 3, 2], [0, 2, 3], [3, 0, 2], [2, 0, 3], [0, 3, 2]])
    layer1 = torch.tensor([[0.0, 1, 2], [0, 1, 2], [2, 1, 0], [2, 0, 1], [0, 2, 1], [1, 2, 0]])
    counts = count_routing(ids, (layer0, layer1), {"image": image, "video": 4, "audio": audio}, top_k=2)
    assert counts.shape == (len(MODALITIES), 2, 3)
    text, img, vid, aud = (MODALITIES.index(m) for m in ("text", "image", "video", "audio"))
    # layer 0: text tokens chose {0,1}, {0,2}, {1,2}; image {1,2} twice; audio {0,2}
    assert counts[text, 0].tolist() == [2, 2, 2] and counts[img, 0].tolist() == [0, 2, 2]
    assert counts[aud, 0].tolist() == [1, 0, 1] and counts[vid].sum() == 0
    # layer 1: text {1,2}, {0,2}, {0,1}; image {1,2}, {0,1}; audio {1,2}
    assert counts[text, 1].tolist() == [2, 2, 2] and counts[img, 1].tolist() == [1, 2, 1]
    assert counts[aud, 1].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"router logits for 5 tokens, input ids for 6"):
        count_routing(ids, (layer0[:5],), {"image": image}, top_k=1)


def test_answer_routing_shares(chat, media):
    messages = conversation({"text": "Describe.", "files": [str(media["image"]), str(media["audio"])]}, [], chat.readable)
    inputs = chat.inputs(messages)
    with torch.no_grad():
        sequences = chat.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    shares, tokens = answer_routing_shares(chat.model, inputs, sequences)
    text_config = chat.model.config.text_config
    assert shares.shape == (len(MODALITIES), len(text_config.sparse_layer_indices), text_config.num_experts)
    config, ids = chat.model.config, sequences[0]
    expected_tokens = {"image": (ids == config.image_token_id).sum().item(), "video": 0,
                       "audio": (ids == config.audio_token_id).sum().item()}
    expected_tokens["text"] = len(ids) - sum(expected_tokens.values())
    assert dict(zip(MODALITIES, tokens.tolist())) == expected_tokens
    assert expected_tokens["image"] > 0 and expected_tokens["audio"] > 0
    sums = shares.sum(dim=-1)  # [modalities, layers]
    for index, modality in enumerate(MODALITIES):
        expected = 1.0 if expected_tokens[modality] else 0.0
        torch.testing.assert_close(sums[index], torch.full_like(sums[index], expected))
    # the shares are of this forward's top-k choices: recount them from the router logits directly
    forward = {**inputs, "input_ids": sequences, "attention_mask": torch.ones_like(sequences)}
    with torch.no_grad():
        logits = chat.model(**forward, output_router_logits=True).router_logits
    image_rows = ids == config.image_token_id
    chosen = logits[0][image_rows].topk(text_config.num_experts_per_tok, dim=-1).indices.flatten()
    by_hand = torch.bincount(chosen, minlength=text_config.num_experts).float() / chosen.numel()
    torch.testing.assert_close(shares[MODALITIES.index("image"), 0], by_hand)


# ---- 3. the chat function -------------------------------------------------------------------------------------


def test_streamed_answer_equals_greedy_generate(chat, media):
    message = {"text": "What do you see and hear?", "files": [str(media["image"]), str(media["audio"])]}
    outputs = list(chat.respond(message, []))
    *partials, final = outputs
    answer, heatmap = final
    assert answer == greedy_answer(chat, conversation(message, [], chat.readable))
    assert len(partials) > 1 and all(isinstance(text, str) for text in partials)
    assert all(later.startswith(earlier) for earlier, later in zip(partials, partials[1:]))
    assert partials[-1] == answer
    assert isinstance(heatmap, gr.Image) and heatmap.alt_text == HEATMAP_LABEL
    assert Image.open(heatmap.value["path"]).size[0] > 300

    # the second turn sees the first: its media and its answer
    history = chatbot_history(user(message["text"], media["image"], media["audio"]),
                              {"role": "assistant", "content": answer})
    second = list(chat.respond({"text": "And the video?", "files": [str(media["video"])]}, history, 8))[-1][0]
    expected = greedy_answer(chat, [
        {"role": "user", "content": [{"type": "image", "path": str(media["image"])},
                                     {"type": "audio", "path": str(media["audio"])},
                                     {"type": "text", "text": message["text"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": inspect.cleandoc(answer)}]},  # as the Chatbot keeps it
        {"role": "user", "content": [{"type": "video", "path": str(media["video"])},
                                     {"type": "text", "text": "And the video?"}]},
    ], max_new_tokens=8)
    assert second == expected


@pytest.mark.parametrize("kind, message", [
    ("corrupt", r"^image 0: cannot read image file 'x\.png' \("),
    ("text", r"^notes\.txt: unsupported file type \(text/plain\)"),
])
def test_refused_files_answer_with_an_error_naming_them(chat, media, kind, message, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    (answer,) = chat.respond({"text": "What is this?", "files": [str(media[kind])]}, [])
    assert answer["metadata"] == {"title": REFUSAL_TITLE}
    assert re.search(message, answer["content"]), answer["content"]
    assert str(media[kind].parent) not in answer["content"]  # the file as the user named it, not its server path
    assert warnings == [f"{REFUSAL_TITLE}: {answer['content']}"]


def test_sampling_settings_reach_generate(chat, media, monkeypatch):
    seen = {}
    generate = chat.model.generate

    def spy(**kwargs):
        seen.update({key: kwargs.get(key) for key in ("do_sample", "temperature", "top_p", "max_new_tokens")})
        return generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", spy)
    list(chat.respond({"text": "Hi", "files": []}, [], 5, 0.7, 0.9))
    assert seen == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}
    list(chat.respond({"text": "Hi", "files": []}, [], 3, 0.0, 0.9))
    assert seen == {"do_sample": False, "temperature": None, "top_p": None, "max_new_tokens": 3}


# ---- 4. command line ------------------------------------------------------------------------------------------


def test_parse_arguments():
    args = parse_arguments(["out/stage3", "--port", "7000", "--share"])
    assert (args.model, args.host, args.port, args.share, args.device, args.dtype) == ("out/stage3", "127.0.0.1", 7000, True, None, "auto")
    assert parse_arguments(["--model", "org/name"]).model == "org/name"
    with pytest.raises(ValueError, match=r"give one checkpoint"):
        parse_arguments(["a", "--model", "b"])
    with pytest.raises(ValueError, match=r"unknown option\(s\): --colour"):
        parse_arguments(["a", "--colour", "red"])
    with pytest.raises(ValueError, match=r"give the checkpoint: unimoe-chat DIR"):
        parse_arguments([])
    with pytest.raises(ValueError, match=r"--port must be in 1\.\.65535"):
        parse_arguments(["a", "--port", "0"])
    assert parse_arguments(["a", "--quantization", "int8"]).quantization == "int8"
    with pytest.raises(ValueError, match=r"^--quantization 'int4': expected one of none, int8$"):
        parse_arguments(["a", "--quantization", "int4"])
    assert parse_arguments(["a", "--experts_implementation", "eager"]).experts_implementation == "eager"
    assert parse_arguments(["a"]).experts_implementation == "default"
    with pytest.raises(ValueError, match=r"^--experts_implementation 'fast': expected one of default, eager, grouped_mm"):
        parse_arguments(["a", "--experts_implementation", "fast"])
    with pytest.raises(ValueError, match=r"^--experts_implementation eager does not apply with --quantization int8: the int8"):
        parse_arguments(["a", "--experts_implementation", "eager", "--quantization", "int8"])


def test_command_line_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_scripts.chat_app", str(tmp_path / "nowhere")], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 1
    assert "error: --model" in result.stderr and "no such folder" in result.stderr and "Traceback" not in result.stderr


# ---- 5. the page, in a real browser ---------------------------------------------------------------------------


@pytest.fixture
def no_internet(monkeypatch):
    """Refuses (and records) every connection this process opens to another machine: gradio, transformers and the
    Hub client must not reach the network."""
    attempts = []
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise ConnectionRefusedError(f"the test allows no connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return attempts


@pytest.fixture
def app_url(chat, no_internet):
    demo = build_demo(chat)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"the browser test drives Debian's Chromium: {CHROMIUM} not installed (make test installs it via apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def send(page, text: str, *files: Path) -> None:
    """Attach `files` (waiting for their thumbnails), type `text` and press Enter in the input box."""
    if files:
        page.locator("input[type=file]").first.set_input_files([str(path) for path in files])
        page.locator('[aria-label="File thumbnail"]').nth(len(files) - 1).wait_for()
    box = page.get_by_test_id("textbox")
    box.fill(text)
    box.press("Enter")


def wait_until_idle(page) -> None:
    """Wait for the input box to come back: the answer (or the refusal) is complete."""
    page.wait_for_function("() => { const box = document.querySelector('[data-testid=textbox]'); return box && !box.disabled; }")


def bot_texts(page) -> list[str]:
    """The text of each assistant message on the page (its accessible label holds the text, not the rendering)."""
    labels = page.get_by_test_id("bot").evaluate_all("nodes => nodes.map(node => node.getAttribute('aria-label'))")
    return [label.removeprefix("bot's message: ") for label in labels if label != "bot's message: a component of type image"]


def normalized(text: str) -> str:
    """Whitespace as HTML shows it (and gradio's `inspect.cleandoc` of a message) does not matter."""
    return " ".join(text.split())


RECORD_ANSWERS = """() => {
    window.seenAnswers = [];
    new MutationObserver(() => document.querySelectorAll('[data-testid=bot]').forEach(node => {
        const label = node.getAttribute('aria-label');
        if (!window.seenAnswers.includes(label)) window.seenAnswers.push(label);
    })).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_chat_page_in_chromium(chat, media, app_url, browser, no_internet, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    elsewhere = []
    page.on("request", lambda request: None if request.url.startswith((app_url, "blob:", "data:")) else elsewhere.append(request.url))
    page.goto(app_url)
    page.get_by_test_id("textbox").wait_for()
    page.evaluate(RECORD_ANSWERS)

    # an image, a wav and a question: the streamed answer is greedy `generate`'s, with the routing heatmap under it
    question = "What do you see and hear?"
    send(page, question, media["image"], media["audio"])
    heatmaps = page.locator(f'[data-testid=bot] img[alt="{HEATMAP_LABEL}"]')
    heatmaps.first.wait_for(timeout=30_000)
    wait_until_idle(page)
    first_message = {"text": question, "files": [str(media["image"]), str(media["audio"])]}
    (answer,) = bot_texts(page)
    assert normalized(answer) == normalized(greedy_answer(chat, conversation(first_message, [], chat.readable)))
    streamed = [label.removeprefix("bot's message: ") for label in page.evaluate("window.seenAnswers")]
    partial = [text for text in streamed if text != answer and answer.startswith(text)]
    assert partial, f"no partial answer was shown before the whole one: {streamed}"
    assert heatmaps.first.is_visible()
    assert heatmaps.first.evaluate("image => image.complete && image.naturalWidth") > 300  # loaded, not a broken image
    page.screenshot(path=tmp_path / "answer.png", full_page=True)

    # a corrupt "image": a readable error on the page, the conversation goes on without it
    send(page, "And this one?", media["corrupt"])
    toast = page.get_by_test_id("toast-text")
    toast.first.wait_for()
    assert "cannot read image file 'x.png'" in toast.first.inner_text()
    wait_until_idle(page)
    assert bot_texts(page)[-1].startswith("image 1: cannot read image file 'x.png'")
    page.screenshot(path=tmp_path / "refused.png", full_page=True)

    send(page, "Tell me more.")
    page.wait_for_function(f"() => document.querySelectorAll('[data-testid=bot] img[alt=\"{HEATMAP_LABEL}\"]').length == 2")
    wait_until_idle(page)
    second = bot_texts(page)[-1]
    expected = greedy_answer(chat, [
        *conversation(first_message, [], chat.readable),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},  # the first answer, as the page keeps it
        {"role": "user", "content": [{"type": "text", "text": "Tell me more."}]},
    ])
    assert normalized(second) == normalized(expected)
    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert not elsewhere and not no_internet, f"reached for the network: {elsewhere} {no_internet}"


def test_a_conversation_past_the_context_is_refused(tmp_path):
    """Prompt + max new tokens past max_position_embeddings: a readable refusal, not generation past the context."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from tests.utils.models import make_tiny_model
    from trl_scripts import load_tiny_processor
    from trl_scripts.serving.chat_app import ChatApp

    folder = tmp_path / "ckpt"
    make_tiny_model(text_only=False).save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    app = ChatApp(model, AutoProcessor.from_pretrained(folder, trust_remote_code=True))
    answers = list(app.respond({"text": "word " * 700, "files": []}, [], max_new_tokens=1024))
    assert len(answers) == 1 and "pass the model's context of 2048" in answers[0]["content"]
    assert [answer for answer in app.respond({"text": "hi", "files": []}, [], max_new_tokens=2)]


def test_the_system_prompt_option_reaches_the_prompt(tmp_path):
    """--system_prompt '' (the quickstart's training prompts) replaces the template's default system sentence."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from tests.utils.models import make_tiny_model
    from trl_scripts import load_tiny_processor
    from trl_scripts.serving.chat_app import ChatApp, parse_arguments

    assert parse_arguments(["ckpt", "--system_prompt", ""]).system_prompt == ""
    assert parse_arguments(["ckpt"]).system_prompt is None
    folder = tmp_path / "ckpt"
    make_tiny_model(text_only=False).save_pretrained(folder)
    load_tiny_processor().save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompts = []
    for system_prompt in (None, ""):
        app = ChatApp(model, processor, system_prompt=system_prompt)
        original = app.inputs
        app.inputs = lambda messages: prompts.append(messages) or original(messages)
        list(app.respond({"text": "hi", "files": []}, [], max_new_tokens=1))
    assert prompts[0][0]["role"] == "user"
    assert prompts[1][0] == {"role": "system", "content": ""}
