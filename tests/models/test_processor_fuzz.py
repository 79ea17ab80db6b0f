"""Property-based fuzz of the processor and the chat template (hypothesis): random conversations of 1-4 turns with
random roles and text and 0-3 media items per message (files or in memory; every image mode; 1-12 video frames;
8-48 kHz mono or stereo audio from 0.5 ms to 17 s) go through `apply_chat_template(..., return_labels=True)` and the
tiny all-towers model. Properties:

- the only exceptions are our documented `ValueError` / `TypeError`, each with a message;
- the placeholder tokens equal the soft tokens the model scatters (its forward raises on any count mismatch, and the
  count per modality is checked against the processor's own arithmetic);
- labels never cover media placeholders or non-assistant text: the labelled tokens decode to exactly the assistant
  replies (with their `</s>`).

`make test` runs 300 examples (a fixed seed, so CI is reproducible); `make fuzz` runs 10,000 with a random seed and
writes the outcome counts to `outputs/fuzz/counts.json` (`UNIMOE_FUZZ_EXAMPLES`, `UNIMOE_FUZZ_REPORT`).
"""

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts import load_preset, load_tiny_processor


EXAMPLES = int(os.environ.get("UNIMOE_FUZZ_EXAMPLES", "300"))
REPORT = os.environ.get("UNIMOE_FUZZ_REPORT")
OUTCOMES = Counter()
NUMBERS = re.compile(r"[0-9]+(\.[0-9]+)?")  # refusals counted by kind, without their item numbers and values

IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F")
FILE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # what PNG stores
RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@st.composite
def images(draw):
    mode = draw(st.sampled_from(IMAGE_MODES))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    return {"type": "image", "mode": mode, "size": size, "seed": draw(st.integers(0, 2**16)),
            "file": mode in FILE_MODES and draw(st.booleans())}  # fmt: skip


@st.composite
def videos(draw):
    return {"type": "video", "frames": draw(st.integers(1, 12)), "size": (draw(st.integers(8, 40)), draw(st.integers(8, 40))),
            "file": draw(st.integers(0, 3)) == 0, "seed": draw(st.integers(0, 2**16))}  # fmt: skip


@st.composite
def audios(draw):
    rate = draw(st.sampled_from(RATES))
    seconds = draw(st.one_of(st.floats(0.0005, 0.05), st.floats(0.05, 17.0)))
    return {"type": "audio", "rate": rate, "samples": max(1, int(seconds * rate)), "channels": draw(st.sampled_from((1, 2))),
            "form": draw(st.sampled_from(("file", "tuple", "dict"))), "seed": draw(st.integers(0, 2**16))}  # fmt: skip


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 4))):
        blocks = draw(st.lists(st.one_of(images(), videos(), audios()), max_size=3))
        text = draw(TEXT)
        if text or not blocks or draw(st.booleans()):
            blocks.insert(draw(st.integers(0, len(blocks))), {"type": "text", "text": text})
        messages.append({"role": draw(st.sampled_from(("user", "assistant"))), "content": blocks})
    return messages


def image_of(spec, folder: Path, name: str):
    rng = np.random.default_rng(spec["seed"])
    width, height = spec["size"]
    mode = spec["mode"]
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width), dtype=np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    if not spec["file"]:
        return {"type": "image", "image": image}
    path = folder / f"{name}.png"
    image.save(path)
    return {"type": "image", "path": str(path)}


def video_of(spec, folder: Path, name: str):
    rng = np.random.default_rng(spec["seed"])
    width, height = spec["size"]
    frames = rng.integers(0, 256, (spec["frames"], height, width, 3), dtype=np.uint8)
    if not spec["file"]:
        return {"type": "video", "video": list(frames)}
    path = folder / f"{name}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for frame in frames:
            packet = stream.encode(av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24"))
            container.mux(packet)
        container.mux(stream.encode())
    return {"type": "video", "path": str(path)}


def audio_of(spec, folder: Path, name: str):
    rng = np.random.default_rng(spec["seed"])
    shape = (spec["samples"],) if spec["channels"] == 1 else (spec["samples"], spec["channels"])
    waveform = (0.3 * rng.standard_normal(shape)).clip(-1, 1).astype(np.float32)
    if spec["form"] == "tuple":
        return {"type": "audio", "audio": (waveform, spec["rate"])}
    if spec["form"] == "dict":
        return {"type": "audio", "audio": {"array": waveform, "sampling_rate": spec["rate"]}}
    path = folder / f"{name}.wav"
    soundfile.write(path, waveform, spec["rate"])
    return {"type": "audio", "path": str(path)}


def materialise(messages, folder: Path):
    makers = {"image": image_of, "video": video_of, "audio": audio_of}
    out = []
    for m, message in enumerate(messages):
        content = message["content"]
        if not isinstance(content, str):
            content = [block if block["type"] == "text" else makers[block["type"]](block, folder, f"m{m}b{b}")
                       for b, block in enumerate(content)]  # fmt: skip
        out.append({"role": message["role"], "content": content})
    return out


def expected_labelled_text(messages) -> str:
    """What the template puts inside the assistant replies' generation blocks, media placeholders removed."""
    replies = []
    for message in messages:
        if message["role"] != "assistant":
            continue
        text = "".join(block["text"] if block["type"] == "text" else f"<{block['type']}>\n" for block in message["content"])
        if text:
            replies.append(re.sub(r"<(image|video|audio)>", "", text) + "</s>")
    return "".join(replies)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = load_preset("tiny")
    yield UniMoEForCausalLM(config).eval(), load_tiny_processor(config)
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(json.dumps({"examples": sum(OUTCOMES.values()), "outcomes": dict(OUTCOMES.most_common())}, indent=2))


@settings(max_examples=EXAMPLES, deadline=None, derandomize="UNIMOE_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(conversation=conversations())
def test_processor_and_chat_template_properties(tiny, conversation):
    model, processor = tiny
    with tempfile.TemporaryDirectory() as folder:
        messages = materialise(conversation, Path(folder))
        try:
            inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_labels=True)
        except (ValueError, TypeError) as error:
            message = str(error)
            assert message.strip(), f"{type(error).__name__} without a message"
            OUTCOMES[f"{type(error).__name__}: {NUMBERS.sub('N', message)[:90]}"] += 1
            return
    OUTCOMES["accepted"] += 1
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    config = model.config
    placeholders = {config.image_token_id: "image", config.video_token_id: "video", config.audio_token_id: "audio"}
    # labels never cover media or anything outside the assistant replies
    assert not any(int(token) in placeholders for token in ids[labels != -100])
    labelled = processor.tokenizer.decode(ids[labels != -100])
    assert labelled.replace(" ", "") == expected_labelled_text(conversation).replace(" ", "")
    # the placeholders are exactly the soft tokens the model scatters (the forward raises on any mismatch)
    counts = Counter(placeholders[int(token)] for token in ids if int(token) in placeholders)
    if "pixel_values" in inputs:
        assert counts["image"] == len(inputs["pixel_values"]) * processor.image_seq_length
    if "pixel_values_videos" in inputs:
        videos, frames = inputs["pixel_values_videos"].shape[:2]
        assert counts["video"] == videos * processor.video_seq_length(frames)
    windows = len(inputs["input_features"]) if "input_features" in inputs else 0
    assert counts["audio"] == processor.audio_seq_length(windows)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == len(ids) and torch.isfinite(logits).all()
