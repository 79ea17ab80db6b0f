"""UniMoEProcessor on bad or unusual media and text: every input is handled correctly or refused with an error that
names the item and what was expected; nothing is corrupted, dropped or crashes without a word (issue 14)."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from media import tone, write_audio, write_image, write_video
from modeling_unimoe.processing_unimoe import load_audio, load_image


REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESSOR_LOGGER = "modeling_unimoe.processing_unimoe"


def gradient(height: int = 30, width: int = 40) -> np.ndarray:
    """A smooth uint8 [H, W] picture using the whole 0-255 range."""
    y, x = np.mgrid[0:height, 0:width]
    return np.round(255 * (x + y) / (height + width - 2)).astype(np.uint8)


def pixels(processor, image) -> torch.Tensor:
    return processor(text="<image>", images=[image])["pixel_values"]


def frames_pixels(processor, video) -> torch.Tensor:
    return processor(text="<video>", videos=[video])["pixel_values_videos"]


def write_audio_only_mp4(path: Path, seconds: float = 1.0) -> Path:
    import av

    wave = tone(seconds)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for start in range(0, wave.size, 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- 1. image value ranges ---------------------------------------------------------------------------------------


def test_a_16_bit_png_gives_the_pixels_of_its_8_bit_save(tiny_processor, tmp_path):
    picture = gradient()
    Image.fromarray(picture).save(tmp_path / "8bit.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    eight, sixteen = (np.asarray(load_image(str(tmp_path / name), 0), dtype=int) for name in ("8bit.png", "16bit.png"))
    assert np.abs(eight - sixteen).max() <= 1
    a, b = pixels(tiny_processor, str(tmp_path / "8bit.png")), pixels(tiny_processor, str(tmp_path / "16bit.png"))
    assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.999
    torch.testing.assert_close(a, b, atol=0.02, rtol=0)  # one 8-bit level is 1 / 255 / CLIP std (~0.27) = 0.015


@pytest.mark.parametrize("form", ["PIL I;16", "PIL I;16B", "uint16 array", "uint16 tensor", "uint16 video frames"])
def test_16_bit_images_are_scaled_by_their_full_range(tiny_processor, form):
    picture = gradient()
    # the full 16-bit range, not only multiples of 257 (which an 8-bit wrap-around maps back to the right value)
    noise = np.random.default_rng(0).integers(-128, 129, picture.shape)  # less than half an 8-bit level
    wide = np.clip(picture.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    if form == "uint16 video frames":
        expected = frames_pixels(tiny_processor, [picture[..., None].repeat(3, -1)] * 2)
        torch.testing.assert_close(frames_pixels(tiny_processor, [wide] * 2), expected, atol=0, rtol=0)
        return
    image = {
        "PIL I;16": Image.fromarray(wide),
        "PIL I;16B": Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes()),
        "uint16 array": wide,
        "uint16 tensor": torch.from_numpy(wide.astype(np.int32)).to(torch.uint16),
    }[form]
    assert np.array_equal(np.asarray(load_image(image, 0)), picture)
    torch.testing.assert_close(pixels(tiny_processor, image), pixels(tiny_processor, picture), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32, "PIL I", "int64 tensor"])
def test_other_integer_images_in_0_255_are_taken_as_8_bit(tiny_processor, dtype):
    picture = gradient() // 2 if dtype == np.int8 else gradient()
    if dtype == "PIL I":
        image = Image.fromarray(picture.astype(np.int32))
        assert image.mode == "I"
    elif dtype == "int64 tensor":
        image = torch.from_numpy(picture.astype(np.int64))
    else:
        image = picture.astype(dtype)
    torch.testing.assert_close(pixels(tiny_processor, image), pixels(tiny_processor, picture), atol=0, rtol=0)


@pytest.mark.parametrize("dtype, low, high", [
    (np.int16, 0, 1000),  # was wrapped around: 1000 -> 232
    (np.int32, -5, 200),  # -5 -> 251
    (np.int64, 0, 300),
    ("PIL I", 0, 4095),  # Pillow's own conversion clipped it to white
])
def test_integer_images_out_of_0_255_are_refused_with_dtype_and_range(tiny_processor, dtype, low, high):
    image = (gradient() // 2).astype(np.int64)
    image[0, 0], image[-1, -1] = low, high
    image = Image.fromarray(image.astype(np.int32)) if dtype == "PIL I" else image.astype(dtype)
    name = "int32" if dtype == "PIL I" else np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"image 1( \(PIL mode I\))?: an image of dtype {name} must have values in \[0, 255\], found values in \[{low}, {high}\]"):
        tiny_processor(text="<image><image>", images=[gradient(), image])


@pytest.mark.parametrize("high", [1.0001, 2.0, 255.0])
def test_float_images_past_1_are_refused(tiny_processor, high):
    image = gradient().astype(np.float32) / 255 * high  # was taken as 0-255 and came out black
    with pytest.raises(ValueError, match=rf"image 0: an image of dtype float32 must have values in \[0, 1\], found values in \[0, {high:g}\]; divide .* by 255 or pass a uint8"):
        tiny_processor(text="<image>", images=[image])


def test_float_images_within_rounding_of_0_1_are_accepted(tiny_processor):
    picture = gradient()
    image = picture.astype(np.float64) / 255
    image[0, 0], image[0, 1] = 1 + 5e-7, -5e-7
    expected = picture.copy()
    expected[0, 0], expected[0, 1] = 255, 0
    torch.testing.assert_close(pixels(tiny_processor, image), pixels(tiny_processor, expected), atol=0, rtol=0)
    tensor = torch.from_numpy(picture).double() / 255
    torch.testing.assert_close(pixels(tiny_processor, tensor), pixels(tiny_processor, picture), atol=0, rtol=0)


def test_pil_mode_f_follows_the_float_rule(tiny_processor):
    picture = gradient()
    good = Image.fromarray(picture.astype(np.float32) / 255)
    assert good.mode == "F"
    torch.testing.assert_close(pixels(tiny_processor, good), pixels(tiny_processor, picture), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"image 0 \(PIL mode F\): an image of dtype float32 must have values in \[0, 1\], found values in \[0, 255\]"):
        tiny_processor(text="<image>", images=[Image.fromarray(picture.astype(np.float32))])


def test_bool_images_are_0_and_255(tiny_processor):
    mask = gradient() > 127
    torch.testing.assert_close(
        pixels(tiny_processor, mask), pixels(tiny_processor, mask.astype(np.uint8) * 255), atol=0, rtol=0
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_and_frames_are_refused(tiny_processor, bad):
    image = np.random.default_rng(0).random((20, 20, 3))
    image[3, 4, 1] = bad
    with pytest.raises(ValueError, match=r"image 0: 1 of 1200 values of the image \(dtype float64\) are NaN or infinite"):
        tiny_processor(text="<image>", images=[image])
    with pytest.raises(ValueError, match=r"image 0: 1 of 1200 values of the image \(dtype float32\) are NaN or infinite"):
        tiny_processor(text="<image>", images=[torch.from_numpy(image).permute(2, 0, 1)])
    video = np.random.default_rng(0).random((5, 20, 20, 3)).astype(np.float32)
    video[2, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"video 0 frame 2: 1 of 1200 values .* NaN or infinite"):
        tiny_processor(text="<video>", videos=[video])


def test_video_frames_follow_the_image_rule(tiny_processor, tmp_path):
    frames = np.stack([gradient()[..., None].repeat(3, -1)] * 3)
    with pytest.raises(ValueError, match=r"video 0 frame 0: an image of dtype float32 must have values in \[0, 1\]"):
        tiny_processor(text="<video>", videos=[frames.astype(np.float32)])  # 0-255 floats: used to be fine, now named
    torch.testing.assert_close(
        frames_pixels(tiny_processor, frames.astype(np.float32) / 255), frames_pixels(tiny_processor, frames), atol=0, rtol=0
    )
    paths = []
    for i in range(3):  # a video given as 16-bit frame files
        Image.fromarray(gradient().astype(np.uint16) * 257).save(tmp_path / f"frame_{i:03d}.png")
        paths.append(str(tmp_path / f"frame_{i:03d}.png"))
    torch.testing.assert_close(frames_pixels(tiny_processor, paths), frames_pixels(tiny_processor, frames), atol=0, rtol=0)


def test_unsupported_image_dtypes_and_shapes_are_named(tiny_processor):
    with pytest.raises(TypeError, match=r"image 0: unsupported image dtype complex64"):
        tiny_processor(text="<image>", images=[np.zeros((8, 8), np.complex64)])
    with pytest.raises(ValueError, match=r"image 0: expected an \[H, W\], \[H, W, C\] or \[C, H, W\] array with C in 1, 3 or 4, got shape \(8, 8, 2\)"):
        tiny_processor(text="<image>", images=[np.zeros((8, 8, 2), np.uint8)])


# ---- 2. extreme aspect ratios and huge images ---------------------------------------------------------------------


def test_extreme_aspect_ratios_are_refused_naming_the_item_and_the_limit(tiny_processor, tmp_path):
    with pytest.raises(ValueError, match=r"image 1 is 50000x2 pixels: its aspect ratio 25000\.0:1 .* max_aspect_ratio=20"):
        tiny_processor(text="<image><image>", images=[gradient(), Image.new("RGB", (50000, 2))])
    Image.new("RGB", (50000, 2)).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000
    with pytest.raises(ValueError, match=r"image 0 is 50000x2 pixels.*max_aspect_ratio=20"):
        tiny_processor(text="<image>", images=[str(tmp_path / "strip.png")])
    with pytest.raises(ValueError, match=r"video 0 is 2x400 pixels: its aspect ratio 200\.0:1"):
        tiny_processor(text="<video>", videos=[np.zeros((3, 400, 2, 3), np.uint8)])
    tall = np.zeros((20 * 30, 30), np.uint8)  # exactly 20:1 is allowed
    assert pixels(tiny_processor, tall).shape == (1, 3, 28, 28)


def test_max_aspect_ratio_is_saved_and_loaded(tiny_processor, tmp_path):
    from modeling_unimoe import UniMoEProcessor

    tiny_processor.max_aspect_ratio = 50.0
    tiny_processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["max_aspect_ratio"] == 50.0
    reloaded = UniMoEProcessor.from_pretrained(tmp_path)
    assert reloaded.max_aspect_ratio == 50.0
    assert pixels(reloaded, Image.new("RGB", (40 * 10, 10))).shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="max_aspect_ratio must be a number >= 1 or None"):
        UniMoEProcessor(reloaded.image_processor, reloaded.feature_extractor, reloaded.tokenizer, max_aspect_ratio=0)


@pytest.mark.parametrize("size", [(10000, 10), (10, 10000), (2000, 57), (57, 2000)])
def test_a_raised_limit_resizes_only_what_the_crop_keeps(tiny_processor, size):
    """Past 20:1 only the window the center crop keeps is resized: the pixels of the full resize, up to rounding."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    picture = np.stack([127 + 120 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], -1).astype(np.uint8)
    tiny_processor.max_aspect_ratio = None
    full = tiny_processor.image_processor([Image.fromarray(picture)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels(tiny_processor, Image.fromarray(picture)), full, atol=0.035, rtol=0)  # 2 levels


@pytest.mark.parametrize("size", [(336, 336), (640, 480), (480, 640), (37, 11), (3, 60), (1920, 1080), (700, 35)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA"])
def test_normal_images_give_exactly_the_image_processor_pixels(tiny_processor, size, mode):
    """The processor does the CLIP resize itself (to bound it): for every accepted image, the same pixels."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)
    for shortest, crop in [(28, 28), (336, 336), (256, 224)]:
        tiny_processor.image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop}
        )
        bare = tiny_processor.image_processor([image], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels(tiny_processor, image), bare, atol=0, rtol=0)


_PEAK_RSS_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails here instead of exhausting the machine
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from trl_scripts import load_tiny_processor

processor = load_tiny_processor()
processor.image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
Image.new("RGB", (50000, 2), (10, 200, 30)).save(sys.argv[1])
results = {}
for limit in (20, None):
    processor.max_aspect_ratio = limit
    for name, image in (("image", Image.new("RGB", (50000, 2), (10, 200, 30))), ("png", sys.argv[1])):
        try:
            results[f"{name} {limit}"] = list(processor(text="<image>", images=[image])["pixel_values"].shape)
        except (ValueError, MemoryError) as error:
            results[f"{name} {limit}"] = f"{type(error).__name__}: {error}"
# VmHWM, this process's own peak: ru_maxrss would also count the parent's pages shared before the exec (the pytest
# process, 1.6 GB late in the suite)
high_water = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
results["peak_rss_mb"] = int(high_water.split()[1]) / 1024
print(json.dumps(results))
"""


def test_peak_memory_of_a_50000x2_image_stays_bounded(tmp_path):
    """It was OOM-killed at 23 GB: the shortest-edge resize made an 8.4M x 336 intermediate."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_RSS_SCRIPT), str(tmp_path / "strip.png")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert (tmp_path / "strip.png").stat().st_size < 1000  # a few hundred bytes of PNG
    for name in ("image", "png"):
        assert results[f"{name} 20"].startswith("ValueError: image 0 is 50000x2 pixels"), results
        assert results[f"{name} None"] == [1, 3, 336, 336], results
    assert results["peak_rss_mb"] < 1536, results


def test_decompression_bombs_are_refused_naming_the_file_and_the_limit(tiny_processor, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = write_image(tmp_path / "warned.png", size=(40, 40))  # past the limit: Pillow only warns
    refused = write_image(tmp_path / "refused.png", size=(100, 100))  # past twice the limit: Pillow raises
    for path in (warned, refused):
        with pytest.raises(ValueError, match=rf"image 0: image file '.*{path.name}' is too large to decode .*PIL\.Image\.MAX_IMAGE_PIXELS=1000 pixels"):
            tiny_processor(text="<image>", images=[str(path)])
    with pytest.raises(ValueError, match=r"video 0 frame file '.*refused\.png': image file .*MAX_IMAGE_PIXELS=1000"):
        tiny_processor(text="<video>", videos=[[str(refused), str(refused)]])


# ---- 3. audio given without its rate ------------------------------------------------------------------------------


def test_a_bare_array_taken_as_16_khz_is_logged_with_its_length(tiny_processor, caplog):
    recorded_at_44k = tone(5.0, rate=44100)  # 5 s, but read as 13.78 s at 16 kHz
    with caplog.at_level(logging.INFO, logger=PROCESSOR_LOGGER):
        out = tiny_processor(text="<audio><audio>", audio=[recorded_at_44k, tone(1.0)])
    records = [r for r in caplog.records if r.name == PROCESSOR_LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.INFO  # once per call, naming every such item
    message = records[0].getMessage()
    assert "audio 0 (220500 samples: 13.78 s at 16000 Hz, 4 window(s) of 4 s)" in message
    assert "audio 1 (16000 samples: 1.00 s at 16000 Hz, 1 window(s) of 4 s)" in message
    assert "(array, rate)" in message and '"sampling_rate": rate' in message
    assert out["input_features"].shape[0] == 5  # 4 windows + 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROCESSOR_LOGGER):
        given = tiny_processor(text="<audio>", audio=[(recorded_at_44k, 44100)])
        tiny_processor(text="<audio>", audio=[recorded_at_44k], sampling_rate=44100)
    assert not [r for r in caplog.records if r.name == PROCESSOR_LOGGER]
    assert given["input_features"].shape[0] == 2  # 5 s: two 4 s windows, not four


# ---- 4. every other bad input: a named ValueError or TypeError ----------------------------------------------------


@pytest.mark.parametrize("text, error, message", [
    (b"<image> hi", TypeError, r"text must be a string or a list of strings .*got bytes \(decode bytes first"),
    ([], ValueError, r"text is an empty list"),
    ([["hello", "there"]], TypeError, r"sample 0: text must be a string, got list"),
    (["hello", None], TypeError, r"sample 1: text must be a string, got NoneType"),
    (["hello", b"there"], TypeError, r"sample 1: text must be a string, got bytes"),
    (42, TypeError, r"text must be a string or a list of strings .*got int"),
])
def test_bad_text_is_named(tiny_processor, text, error, message):
    with pytest.raises(error, match=message):
        tiny_processor(text=text)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"images": 5}, TypeError, r"`images`: expected one image item, a list of them .* got int"),
    ({"images": {"path": "a.png"}}, TypeError, r"`images`: .* got dict"),
    ({"videos": b"\x00\x01"}, TypeError, r"`videos`: .* got bytes"),
    ({"audio": 3.5}, TypeError, r"`audio`: .* got float"),
    ({"images": [5]}, TypeError, r"image 0: expected a PIL image, an array or a file path, got int"),
    ({"truncation": "longest_first"}, TypeError, r"truncation must be True or False .* got 'longest_first'"),
    ({"sampling_rate": 0}, ValueError, r"sampling_rate: the sampling rate must be between 1000 and 1000000 Hz, got 0"),
    ({"sampling_rate": "16000"}, ValueError, r"sampling_rate: the sampling rate must be a whole number of Hz, got '16000'"),
])
def test_wrongly_typed_arguments_are_named(tiny_processor, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_processor(text="<image>" if "images" in kwargs else "hi", **kwargs)


@pytest.mark.parametrize("image", [
    np.zeros((0, 0, 3), np.uint8),  # was a ZeroDivisionError
    np.zeros((0, 0), np.float32),
    np.zeros((0, 10, 3), np.uint8),
    torch.zeros(3, 0, 0),
    Image.new("RGB", (0, 0)),
    Image.new("L", (5, 0)),
])
def test_empty_images_are_refused(tiny_processor, image):
    with pytest.raises(ValueError, match=r"image 1 is empty"):
        tiny_processor(text="<image><image>", images=[gradient(), image])


def test_empty_video_frames_are_refused(tiny_processor):
    with pytest.raises(ValueError, match=r"video 0 frame 0 is empty"):
        tiny_processor(text="<video>", videos=[np.zeros((4, 0, 0, 3), np.uint8)])


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, float("nan"), 16, True, "44100"])
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_bad_sampling_rates_are_refused(tiny_processor, rate, form):
    audio = (tone(1.0), rate) if form == "tuple" else {"array": tone(1.0), "sampling_rate": rate}
    with pytest.raises(ValueError, match=r"audio 1: the sampling rate must be"):
        tiny_processor(text="<audio><audio>", audio=[tone(1.0), audio])


def test_an_audio_dict_without_its_rate_is_named(tiny_processor):
    with pytest.raises(ValueError, match=r"audio 0: an audio dict needs the keys 'array' and 'sampling_rate' .*missing \['sampling_rate'\], given \['array'\]"):
        tiny_processor(text="<audio>", audio=[{"array": tone(1.0)}])
    with pytest.raises(ValueError, match=r"audio 0: an audio dict needs .*missing \['array'\]"):
        tiny_processor(text="<audio>", audio=[{"path": "a.wav", "sampling_rate": 16000}])


@pytest.mark.parametrize("samples, rate", [(16, 8000), (1, 8000), (3, 44100), (40, 1000), (100, 22050)])
def test_very_short_audio_is_resampled_to_its_length_not_to_nothing(tiny_processor, tmp_path, samples, rate):
    wave = np.full(samples, 0.25, np.float32)
    expected = max(1, round(samples * 16000 / rate))
    assert load_audio((wave, rate), 16000, 0).size == expected  # was 0 samples: "audio 0 is empty"
    soundfile.write(tmp_path / "short.wav", wave, rate)
    assert load_audio(str(tmp_path / "short.wav"), 16000, 0).size == expected
    out = tiny_processor(text="<audio>", audio=[(wave, rate)])
    assert out["input_features"].shape[0] == 1 and out["input_features_mask"].sum() >= 1


def test_files_without_the_stream_asked_for_are_named(tiny_processor, tmp_path):
    video = write_video(tmp_path / "silent.mp4")
    image = write_image(tmp_path / "red.png")
    sound = write_audio_only_mp4(tmp_path / "sound.mp4")
    with pytest.raises(ValueError, match=r"audio 0: file '.*silent\.mp4' has no audio stream \(its streams: video\)"):
        tiny_processor(text="<audio>", audio=[str(video)])
    with pytest.raises(ValueError, match=r"audio 0: file '.*red\.png' has no audio stream"):
        tiny_processor(text="<audio>", audio=[str(image)])
    with pytest.raises(ValueError, match=r"video 0: file '.*sound\.mp4' has no video stream \(its streams: audio\)"):
        tiny_processor(text="<video>", videos=[str(sound)])
    assert tiny_processor(text="<audio>", audio=[str(sound)])["input_features"].shape[0] == 1  # as audio, it is fine


@pytest.mark.parametrize("num_frames", [-1, 0, 2.5, True, "4"])
def test_bad_num_frames_are_refused_with_the_valid_range(tiny_processor, tmp_path, num_frames):
    video = write_video(tmp_path / "move.mp4")
    for given in (str(video), [np.zeros((8, 8, 3), np.uint8)] * 3):
        with pytest.raises(ValueError, match=r"num_frames must be a positive integer \(1 or more frames sampled per video\)"):
            tiny_processor(text="<video>", videos=[given], num_frames=num_frames)
    assert tiny_processor(text="<video>", videos=[str(video)], num_frames=1)["pixel_values_videos"].shape[1] == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_audio_is_refused(tiny_processor, tmp_path, bad):
    wave = tone(1.0)
    wave[100:103] = bad
    for given in (wave, (wave, 16000), {"array": wave, "sampling_rate": 16000}, torch.from_numpy(wave), (wave, 8000)):
        with pytest.raises(ValueError, match=r"audio 1: 3 of 16000 samples are NaN or infinite \(the first at sample 100\)"):
            tiny_processor(text="<audio><audio>", audio=[tone(1.0), given])
    soundfile.write(tmp_path / "bad.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"audio 0 \(file '.*bad\.wav'\): 3 of 16000 samples are NaN or infinite"):
        tiny_processor(text="<audio>", audio=[str(tmp_path / "bad.wav")])


def test_integer_pcm_audio_is_scaled_and_other_dtypes_refused(tiny_processor):
    wave = tone(1.0)
    reference = tiny_processor(text="<audio>", audio=[wave])["input_features"]
    pcm16 = np.round(wave * 32767).astype(np.int16)
    torch.testing.assert_close(tiny_processor(text="<audio>", audio=[pcm16])["input_features"], reference, atol=1e-3, rtol=0)
    pcm32 = (wave.astype(np.float64) * 2**31).astype(np.int32)
    torch.testing.assert_close(tiny_processor(text="<audio>", audio=[(pcm32, 16000)])["input_features"], reference, atol=1e-3, rtol=0)
    with pytest.raises(TypeError, match=r"audio 0: unsupported waveform dtype int64; expected float samples .* or int16, int32 or uint8 PCM"):
        tiny_processor(text="<audio>", audio=[torch.from_numpy(pcm16.astype(np.int64))])
    with pytest.raises(TypeError, match=r"audio 0: unsupported waveform dtype bool"):
        tiny_processor(text="<audio>", audio=[wave > 0])


def test_a_tuple_with_a_numpy_rate_is_one_audio_item(tiny_processor):
    out = tiny_processor(text="<audio>", audio=(tone(1.0, rate=8000), np.int64(8000)))
    assert out["input_features"].shape[0] == 1
