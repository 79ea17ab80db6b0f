"""UniMoEProcessor: placeholder expansion, media decoding, chat template, labels and every bad-input error."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils.media import tone, write_audio, write_image, write_video


def user(*content):
    return [{"role": "user", "content": list(content)}]


def test_placeholders_expand_to_the_soft_token_counts(tiny_processor, tmp_path):
    processor = tiny_processor
    image = write_image(tmp_path / "red.png")
    video = write_video(tmp_path / "move.mp4")
    audio = write_audio(tmp_path / "beep.wav", seconds=6.0)  # two windows (the tiny preset's are 4 s long)
    inputs = processor(
        text="<image>\n<video>\n<audio>\nWhat is it?", images=[image], videos=[video], audio=[audio]
    )
    ids = inputs["input_ids"][0]
    assert (ids == processor.image_token_id).sum() == processor.image_seq_length == 16  # (28 / 7) ** 2
    assert (ids == processor.video_token_id).sum() == 16  # mean pooling: one image's worth
    assert (ids == processor.audio_token_id).sum() == 2 * 4 * 2  # 2 windows x 4 query tokens x 2 towers
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    assert inputs["pixel_values_videos"].shape == (1, processor.num_frames, 3, 28, 28)
    assert inputs["input_features"].shape == (2, 80, 400)  # Whisper log-mel per window: 100 frames per second
    assert inputs["input_values"].shape == (2, 398, 128)  # BEATs fbank per window
    assert inputs["input_values_mask"][1].sum() < 398 == inputs["input_values_mask"][0].sum()  # 2 s of 4 real


def test_token_counts_and_replacement_offsets_agree_with_the_expansion(tiny_processor, tmp_path):
    """transformers' processor hooks (which vLLM's multimodal backend calls): `_get_num_multimodal_tokens` predicts
    from sizes alone what `__call__` expands each item to, and `text_replacement_offsets` says where each expansion
    landed, with its modality and replacement text."""
    processor = tiny_processor
    text = "a <image> b <video> c <audio> d <image>"
    audio = tone(6.0)  # two 4 s windows
    inputs = processor(
        text=text, images=[write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png", size=(90, 30))],
        videos=[write_video(tmp_path / "v.mp4")], audio=[audio], return_text_replacement_offsets=True,
    )
    predicted = processor._get_num_multimodal_tokens(
        image_sizes=[(28, 28), (30, 90)], video_sizes=[(12, 64, 48)], audio_lengths=[len(audio), 10**9]
    )
    assert predicted.num_image_tokens == [16, 16] and predicted.num_image_patches == [1, 1]
    assert predicted.num_video_tokens == [16]
    assert predicted.num_audio_tokens == [2 * 4 * 2, 4 * 4 * 2]  # the longest audio uses max_audio_windows=4
    (offsets,) = inputs["text_replacement_offsets"]
    assert [entry["type"] for entry in offsets] == ["image", "video", "audio", "image"]
    ids = inputs["input_ids"][0]
    expanded = processor.tokenizer.decode(ids, skip_special_tokens=False)
    for entry in offsets:
        token = getattr(processor, f"{entry['type']}_token")
        assert entry["text"] == token and text[slice(*entry["span"])] == token
        assert entry["replacement"] == token * ((entry["new_span"][1] - entry["new_span"][0]) // len(token))
    counts = {kind: (ids == getattr(processor, f"{kind}_token_id")).sum().item() for kind in ("image", "video", "audio")}
    assert counts == {"image": 32, "video": 16, "audio": predicted.num_audio_tokens[0]}
    assert expanded.count("<image>") == 32


def test_video_tokens_without_pooling(tiny_processor):
    processor = tiny_processor
    processor.video_pooling = "none"
    frames = [np.full((20, 20, 3), i * 20, dtype=np.uint8) for i in range(6)]
    inputs = processor(text="<video> go", videos=[frames])
    assert (inputs["input_ids"][0] == processor.video_token_id).sum() == 16 * processor.num_frames


def test_chat_template_is_vicuna_v1(tiny_processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And the shape?"},
    ]
    prompt = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    assert prompt == f"{system} USER: <image>\nWhat colour? ASSISTANT: red</s>USER: And the shape? ASSISTANT:"


def test_chat_template_loads_files_and_returns_labels(tiny_processor, tmp_path):
    image = write_image(tmp_path / "red.png")
    audio = write_audio(tmp_path / "beep.wav")
    messages = [
        {"role": "user", "content": [
            {"type": "image", "path": str(image)}, {"type": "audio", "path": str(audio)},
            {"type": "text", "text": "What colour is it?"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many beeps?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]
    out = tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_labels=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert out["pixel_values"].shape[0] == 1 and out["input_features"].shape[0] == 1
    tokenizer = tiny_processor.tokenizer
    assert tokenizer.decode(ids[labels != -100]).replace(" ", "") == "red</s>two</s>"
    # nothing of the user turns, the system prompt or the media is learned
    assert (labels[ids == tiny_processor.image_token_id] == -100).all()
    assert labels[0] == -100  # BOS


def test_batch_padding_and_mixed_modalities(tiny_processor, tmp_path):
    image = write_image(tmp_path / "red.png")
    out = tiny_processor(
        text=["<image> colour?", "hello there", "<audio> beeps?"],
        images=[[image], [], []],
        audio=[[], [], [tone(1.0)]],
        padding=True,
    )
    assert out["input_ids"].shape[0] == 3
    assert out["attention_mask"].sum(1).tolist() == [len(x) for x in tiny_processor.tokenizer(
        ["<image>" * 16 + " colour?", "hello there", "<audio>" * 8 + " beeps?"])["input_ids"]]


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality, kwargs, text", [
    ("image", {"images": []}, "<image> a"),
    ("image", {"images": [Image.new("RGB", (8, 8))] * 2}, "<image> a"),
    ("video", {"videos": [[np.zeros((8, 8, 3), np.uint8)]] * 2}, "<video> a"),
    ("audio", {"audio": []}, "<audio> a"),
    ("audio", {"audio": [tone(1.0)]}, "no placeholder"),
])
def test_placeholder_count_mismatch_names_the_modality(tiny_processor, modality, kwargs, text):
    with pytest.raises(ValueError, match=rf"{modality} placeholder\(s\) in the text .* {modality} item\(s\) given"):
        tiny_processor(text=text, **kwargs)


def test_placeholder_count_mismatch_names_the_sample(tiny_processor):
    images = [[Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))] * 2]
    with pytest.raises(ValueError, match=r"sample 1: 1 image placeholder\(s\) in the text but 2 image item\(s\)"):
        tiny_processor(text=["<image> a", "<image> b"], images=images)


def test_unreadable_files_are_named(tiny_processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        tiny_processor(text="<image>", images=[str(broken)])
    with pytest.raises(ValueError, match=r"cannot read image file .*missing\.png"):
        tiny_processor(text="<image>", images=[str(tmp_path / "missing.png")])
    corrupt_video = tmp_path / "corrupt.mp4"
    corrupt_video.write_bytes(b"\x00" * 2000)
    with pytest.raises(ValueError, match=r"cannot decode video file .*corrupt\.mp4"):
        tiny_processor(text="<video>", videos=[str(corrupt_video)])
    corrupt_audio = tmp_path / "corrupt.wav"
    corrupt_audio.write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(ValueError, match=r"cannot decode audio file .*corrupt\.wav"):
        tiny_processor(text="<audio>", audio=[str(corrupt_audio)])


def test_audio_is_resampled_and_mixed_to_mono(tiny_processor, tmp_path):
    stereo_44k = write_audio(tmp_path / "stereo.wav", seconds=1.0, rate=44100, channels=2)
    mono_16k = write_audio(tmp_path / "mono.wav", seconds=1.0)
    a = tiny_processor(text="<audio>", audio=[str(stereo_44k)])["input_features"]
    b = tiny_processor(text="<audio>", audio=[str(mono_16k)])["input_features"]
    inner = (..., slice(3, 97))  # the resampler's filter edges touch the first and last few 10 ms frames
    torch.testing.assert_close(a[inner], b[inner], atol=0.05, rtol=0)  # same tone, resampled and mixed
    c = tiny_processor(text="<audio>", audio=[(tone(1.0, rate=8000), 8000)])["input_features"]
    torch.testing.assert_close(c[inner], b[inner], atol=0.05, rtol=0)


@pytest.mark.parametrize("container, subtype", [
    ("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
    ("FLAC", "PCM_16"), ("FLAC", "PCM_24"),  # PyAV's: libsndfile trusts a FLAC header's length and rate
])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_wav_files_read_by_libsndfile_decode_to_pyavs_bits(container, subtype, channels, tmp_path, monkeypatch):
    """WAV files at the target rate skip FFmpeg's per-file setup (read with soundfile); the samples, and so the
    features, must be PyAV's bit for bit. Files at other rates, FLAC, and anything soundfile cannot read go to PyAV."""
    import io

    import soundfile

    from modeling_unimoe import processing_unimoe

    rng = np.random.default_rng(channels)
    samples = np.clip(rng.standard_normal((24000, channels)) * 0.3, -1, 1)
    samples[:5] = [[-1.0] * channels, [1.0] * channels, [0.999] * channels, [1e-6] * channels, [0.0] * channels]
    path = tmp_path / f"clip.{container.lower()}"
    soundfile.write(path, samples, 16000, subtype=subtype, format=container)
    fast = [processing_unimoe.load_audio(source, 16000, 0) for source in (str(path), io.BytesIO(path.read_bytes()))]
    assert (processing_unimoe._read_wav(str(path), 16000) is not None) == (container == "WAV")  # soundfile's path
    assert processing_unimoe._read_wav(str(path), 8000) is None  # another rate: PyAV resamples it
    monkeypatch.setattr(processing_unimoe, "_read_wav", lambda path, rate: None)
    pyav = processing_unimoe.load_audio(str(path), 16000, 0)
    assert pyav.dtype == np.float32 and pyav.shape == (24000,)
    for waveform in fast:
        assert waveform.dtype == np.float32 and np.array_equal(waveform, pyav)


@pytest.mark.parametrize("rate", [44100, 16000])
def test_many_channel_files_decode_instead_of_crashing_the_process(rate, tmp_path):
    """PyAV's planar-float `to_ndarray` crashed the interpreter (a segmentation fault) for 8 or more channels; eight
    copies of a tone now mix down to the tone's own samples (to float rounding: libswresample's kernels differ by
    channel count). Run in a child process: the old failure would take pytest down with it."""
    import subprocess
    import sys

    import soundfile

    samples = tone(1.0, 440.0, rate)
    soundfile.write(tmp_path / "mono.flac", samples, rate, subtype="PCM_16")
    soundfile.write(tmp_path / "eight.flac", np.repeat(samples[:, None], 8, axis=1), rate, subtype="PCM_16")
    code = (
        "import sys, numpy as np; from modeling_unimoe.processing_unimoe import load_audio; "
        f"a, b = (load_audio(r'{tmp_path}/' + name, 16000, 0) for name in ('mono.flac', 'eight.flac')); "
        "print(a.shape == b.shape == (16000,) and float(np.abs(a - b).max()) < 1e-6)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().endswith("True")


def test_empty_and_overlong_audio(tiny_processor, caplog):
    with pytest.raises(ValueError, match="audio 0 is empty"):
        tiny_processor(text="<audio>", audio=[np.zeros(0, np.float32)])
    too_long = np.zeros(16000 * 4 * 5, dtype=np.float32)  # 5 windows of 4 s, tiny allows 4
    with pytest.raises(ValueError, match=r"audio item 0 lasts 20\.0 s \(5 windows of 4 s\).*max_audio_windows=4"):
        tiny_processor(text="<audio>", audio=[too_long])
    with caplog.at_level("WARNING"):
        out = tiny_processor(text="<audio>", audio=[too_long], truncation=True)
    assert out["input_features"].shape[0] == 4
    assert "truncated to the first 16 s" in caplog.text


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_image_modes_and_odd_sizes(tiny_processor, mode):
    image = Image.new("RGB", (37, 11), (200, 30, 10)).convert(mode)
    out = tiny_processor(text="<image>", images=[image])
    assert out["pixel_values"].shape == (1, 3, 28, 28)


def test_short_video_repeats_frames_and_empty_video_fails(tiny_processor, tmp_path):
    short = write_video(tmp_path / "short.mp4", num_frames=2)
    out = tiny_processor(text="<video>", videos=[str(short)])
    frames = out["pixel_values_videos"][0]
    assert frames.shape[0] == tiny_processor.num_frames
    assert torch.equal(frames[0], frames[1])  # 2 frames spread over 4 slots
    with pytest.raises(ValueError, match="video 0: the given frames are empty"):
        tiny_processor(text="<video>", videos=[[]])


def test_videos_without_a_declared_frame_count_are_sampled_from_their_frames(tiny_processor, tmp_path):
    """MKV and WebM files declare no frame count (PyAV reads 0), which transformers' `load_video` samples by; ours
    counts the frames it decodes: the same frames as the same video in MP4."""
    import av

    mkv, mp4 = write_video(tmp_path / "move.mkv"), write_video(tmp_path / "move.mp4")
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0
    expected = tiny_processor(text="<video>", videos=[str(mp4)])["pixel_values_videos"]
    torch.testing.assert_close(tiny_processor(text="<video>", videos=[str(mkv)])["pixel_values_videos"], expected, atol=0, rtol=0)


def test_too_long_after_expansion_names_the_lengths(tiny_processor):
    tiny_processor.tokenizer.model_max_length = 30
    with pytest.raises(ValueError, match=r"sample 0 is \d+ tokens long after expanding its media \(1 images.*maximum of 30"):
        tiny_processor(text="<image> what colour is the shape in this picture?", images=[Image.new("RGB", (8, 8))])


def test_media_in_an_assistant_turn_is_never_a_label(tiny_processor):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Show me a red square."}]},
        {"role": "assistant", "content": [{"type": "image", "image": np.zeros((8, 8, 3), np.uint8)}, {"type": "text", "text": "here"}]},
    ]
    out = tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_labels=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert (labels[ids == tiny_processor.image_token_id] == -100).all()
    assert tiny_processor.tokenizer.decode(ids[labels != -100]).replace(" ", "") == "\nhere</s>"


def test_unsupported_options_are_refused_and_num_frames_is_honoured(tiny_processor):
    frames = [np.full((20, 20, 3), i, dtype=np.uint8) for i in range(6)]
    with pytest.raises(ValueError, match=r"does not support the option\(s\) \['do_normalize'\]"):
        tiny_processor(text="<video>", videos=[frames], do_normalize=False)
    assert tiny_processor(text="<video>", videos=[frames], num_frames=2)["pixel_values_videos"].shape[1] == 2


def test_tensors_grayscale_and_float_media(tiny_processor):
    out = tiny_processor(
        text="<image><image><image><video><audio>",
        images=[torch.rand(3, 20, 20), np.zeros((20, 20), np.uint8), np.random.rand(20, 20, 3)],
        videos=[torch.rand(5, 3, 20, 20)],
        audio=[torch.rand(16000) * 2 - 1],  # float samples in [-1, 1]
    )
    assert out["pixel_values"].shape == (3, 3, 28, 28)
    assert out["pixel_values_videos"].shape[:2] == (1, tiny_processor.num_frames)
    assert out["input_features"].shape[0] == 1
    two = tiny_processor(text="<audio><audio>", audio=(tone(1.0), tone(2.0)))  # a tuple of two waveforms
    assert two["input_features"].shape[0] == 2


@pytest.mark.parametrize("seconds", [0.01, 1.0, 2.7, 30.0, 31.3])
def test_beats_fbank_of_short_windows_equals_the_full_padded_computation(seconds):
    from modeling_unimoe.feature_extraction_beats import beats_fbank
    from modeling_unimoe.feature_extraction_unimoe import UniMoEFeatureExtractor

    extractor = UniMoEFeatureExtractor(audio_towers=["beats"])
    wave = np.random.default_rng(0).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1
    features = extractor([wave], return_tensors="pt")["input_values"]
    windows = [wave[i : i + 480000] for i in range(0, len(wave), 480000)]
    expected = torch.stack([beats_fbank(np.pad(w, (0, 480000 - len(w)), mode="edge")) for w in windows])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("empty", ["", [], [{"type": "text", "text": ""}]])
def test_an_empty_assistant_message_is_the_generation_prompt(tiny_processor, empty):
    """The original's `get_prompt` renders an empty message as `ROLE:` with no space and no `</s>`."""
    question = {"role": "user", "content": "What colour?"}
    with_empty = tiny_processor.apply_chat_template([question, {"role": "assistant", "content": empty}])
    assert with_empty.endswith("USER: What colour? ASSISTANT:")
    assert with_empty == tiny_processor.apply_chat_template([question], add_generation_prompt=True)


def test_original_windowing_for_converted_checkpoints():
    """The original slices `window + 1` samples at a time, each cut to the window: `window_stride` reproduces it."""
    from modeling_unimoe import UniMoEFeatureExtractor

    ours = UniMoEFeatureExtractor(audio_towers=["whisper"], window_seconds=4)
    original = UniMoEFeatureExtractor(audio_towers=["whisper"], window_seconds=4, window_stride=4 * 16000 + 1)
    window = 4 * 16000
    assert ours(np.zeros(window + 1, np.float32))["audio_windows"].tolist() == [2]
    assert original(np.zeros(window + 1, np.float32))["audio_windows"].tolist() == [1]
    wave = np.random.default_rng(0).standard_normal(int(2.5 * window)).astype(np.float32)
    slices = [wave[start : start + window + 1][:window] for start in range(0, wave.size, window + 1)]
    expected = ours(slices)["input_features"]  # the original's slices, one per item
    torch.testing.assert_close(original(wave)["input_features"], expected)
    assert not torch.equal(ours(wave)["input_features"][1], expected[1])
    reloaded = UniMoEFeatureExtractor.from_dict(original.to_dict())
    assert reloaded.window_stride == window + 1
    with pytest.raises(ValueError, match="shorter than a window"):
        UniMoEFeatureExtractor(window_seconds=4, window_stride=window - 1)
