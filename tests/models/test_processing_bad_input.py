"""UniMoEProcessor on bad or unusual media and text: every input is handled correctly or refused with an error that
names the item and what was expected; nothing is corrupted, dropped or crashes without a word (issue 14)."""

import io
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

from modeling_unimoe.processing_unimoe import load_audio, load_image
from tests.utils import REPO_ROOT
from tests.utils.media import encode_audio, tone, write_audio, write_image, write_video


REPO_ROOT = REPO_ROOT
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
    return encode_audio(path, tone(seconds), "aac", 16000)


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
    ({"images": [5]}, TypeError, r"image 0: expected a PIL image, an array or tensor, a file path or a binary file object, got int"),
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


# ---- 5. second review: EXIF orientation, float audio scale, file objects, audio pairs, truncated files, batches ----


def write_exif_jpeg(path: Path, orientation: int | None, size=(60, 30)) -> Path:
    """A JPEG whose left half is white, with an EXIF Orientation tag (None: no EXIF)."""
    picture = np.zeros((size[1], size[0], 3), np.uint8)
    picture[:, : size[0] // 2] = 255
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(picture).save(path, exif=exif, quality=95)
    return path


def test_image_files_are_turned_by_their_exif_orientation_as_transformers_does(tiny_processor, tmp_path):
    from transformers.image_utils import load_image as transformers_load_image

    path = write_exif_jpeg(tmp_path / "sideways.jpg", 6)  # stored 60x30, shown 30x60
    upright = transformers_load_image(str(path))
    assert upright.size == (30, 60)
    assert load_image(str(path), 0).size == (30, 60)  # was 60x30: the model saw the photo sideways
    np.testing.assert_array_equal(np.asarray(load_image(str(path), 0)), np.asarray(upright))
    expected = pixels(tiny_processor, upright)
    torch.testing.assert_close(pixels(tiny_processor, str(path)), expected, atol=0, rtol=0)
    with open(path, "rb") as file:  # a file object is a file: turned too
        torch.testing.assert_close(pixels(tiny_processor, file), expected, atol=0, rtol=0)
    torch.testing.assert_close(  # frame files as well (training and evaluation read files through load_image)
        frames_pixels(tiny_processor, [str(path)] * 2), frames_pixels(tiny_processor, [upright] * 2), atol=0, rtol=0
    )
    # a PIL image given in memory is taken as the caller decoded it (as transformers' image processors take it)
    assert load_image(Image.open(path), 0).size == (60, 30)


@pytest.mark.parametrize("name, mode", [("plain.jpg", None), ("upright.jpg", 1), ("rgba.png", "RGBA"), ("p.png", "P"),
                                        ("sixteen.png", "I;16")])  # fmt: skip
def test_image_files_without_an_orientation_are_read_as_stored(tmp_path, name, mode):
    path = tmp_path / name
    if name.endswith(".jpg"):
        write_exif_jpeg(path, mode)
    elif mode == "I;16":
        Image.fromarray((gradient().astype(np.uint16) * 257)).save(path)
    else:
        Image.fromarray(np.dstack([gradient()] * 3)).convert(mode).save(path)
    with Image.open(path) as stored:
        stored.load()
        loaded = load_image(str(path), 0)
        if mode != "I;16":  # (16-bit files become 8 bits by the value rule)
            assert loaded.mode == stored.mode
            np.testing.assert_array_equal(np.asarray(loaded), np.asarray(stored))
        else:
            assert loaded.size == stored.size


@pytest.mark.parametrize("form", ["array", "tensor", "tuple", "dict", "list pair", "stereo"])
def test_float_audio_on_a_pcm_scale_is_refused_naming_the_peak(tiny_processor, form):
    wave = tone(1.0) * 32767  # int16 values as float32: peak 16383
    given = {
        "array": wave,
        "tensor": torch.from_numpy(wave),
        "tuple": (wave, 16000),
        "dict": {"array": wave, "sampling_rate": 16000},
        "list pair": (wave.tolist(), 16000),
        "stereo": np.stack([wave, -wave]),  # averages to silence: the peak is looked for before the mix to mono
    }[form]
    with pytest.raises(ValueError, match=(
        r"^audio 1: float samples must be in \[-1, 1\] \(peaks up to 2 pass as codec or resampler overshoot\), found a "
        r"peak of 1638\d(\.\d+)?; scale the waveform to \[-1, 1\] \(16-bit PCM values: divide by 32768, or pass them as int16\)$"
    )):  # fmt: skip
        tiny_processor(text="<audio><audio>", audio=[tone(1.0), given])
    scaled = tiny_processor(text="<audio>", audio=[wave / 32768])["input_features"]  # as told: fine
    torch.testing.assert_close(scaled, tiny_processor(text="<audio>", audio=[tone(1.0)])["input_features"], atol=1e-4, rtol=0)


def test_float_audio_files_past_full_scale_are_refused_naming_the_file(tiny_processor, tmp_path):
    soundfile.write(tmp_path / "five.wav", np.full(16000, 5.0, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"^audio 0 \(file '.*five\.wav'\): float samples must be in \[-1, 1\] .*found a peak of 5;"):
        tiny_processor(text="<audio>", audio=[str(tmp_path / "five.wav")])
    soundfile.write(tmp_path / "pcm.wav", tone(1.0) * 32767, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"^audio 0 \(file '.*pcm\.wav'\): .*found a peak of 1638"):
        tiny_processor(text="<audio>", audio=[str(tmp_path / "pcm.wav")])


def write_loud_mp3(path: Path, rate: int = 44100) -> Path:
    """A 0.999 square wave as MP3: lossy coding overshoots full scale (it decodes to peaks of about 1.46)."""
    wave = (0.999 * np.sign(np.sin(2 * np.pi * 440 * np.arange(rate) / rate))).astype(np.float32)
    return encode_audio(path, wave, "libmp3lame", rate)


def test_overshoot_of_loud_recordings_and_rounding_are_accepted(tiny_processor, tmp_path):
    """Float samples a little past 1 are real audio (a lossy decoder's or resampler's overshoot), not another scale."""
    import av

    path = write_loud_mp3(tmp_path / "loud.mp3")
    with av.open(str(path)) as container:
        peak = max(np.abs(frame.to_ndarray()).max() for frame in container.decode(audio=0))
    assert 1.2 < peak <= 2.0
    assert tiny_processor(text="<audio>", audio=[str(path)])["input_features"].shape[0] == 1
    for high in (1.0 + 1e-6, 1.5, 2.0):
        wave = tone(1.0)
        wave[100], wave[200] = high, -high
        assert tiny_processor(text="<audio>", audio=[(wave, 16000)])["input_features"].shape[0] == 1


def png_bytes(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


class ReadOnlyStream:
    """A file object that can only be read, once (a socket, a pipe): not seekable."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, size=-1):
        return self._data.read(size)


def test_file_objects_are_read_like_files(tiny_processor, tmp_path):
    image, video, sound = write_image(tmp_path / "red.png"), write_video(tmp_path / "move.mp4"), write_audio(tmp_path / "beep.wav")
    for argument, token, path, key in (("images", "<image>", image, "pixel_values"), ("videos", "<video>", video, "pixel_values_videos"),
                                       ("audio", "<audio>", sound, "input_features")):  # fmt: skip
        expected = tiny_processor(text=token, **{argument: str(path)})[key]
        data = path.read_bytes()
        buffer = io.BytesIO(data)
        buffer.seek(0, io.SEEK_END)  # read from its start, wherever it was left (e.g. just written)
        for given in (buffer, buffer, ReadOnlyStream(data)):  # the same object twice: read whole each time
            torch.testing.assert_close(tiny_processor(text=token, **{argument: given})[key], expected, atol=0, rtol=0)
        with open(path, "rb") as file:
            torch.testing.assert_close(tiny_processor(text=token, **{argument: [file]})[key], expected, atol=0, rtol=0)
    assert load_image(io.BytesIO(png_bytes()), 0).size == (40, 30)


def test_bad_file_objects_are_named(tiny_processor, tmp_path):
    with pytest.raises(ValueError, match=r"^image 1: cannot read image file <BytesIO> \(cannot identify image file"):
        tiny_processor(text="<image><image>", images=[gradient(), io.BytesIO(b"not an image")])
    with pytest.raises(ValueError, match=r"^audio 0: cannot decode audio file <BytesIO> "):
        tiny_processor(text="<audio>", audio=io.BytesIO(b"not a sound"))
    with pytest.raises(ValueError, match=r"^video 0: cannot decode video file <BytesIO> "):
        tiny_processor(text="<video>", videos=[io.BytesIO(b"not a video")])
    (tmp_path / "notes.txt").write_text("hello")
    with open(tmp_path / "notes.txt") as text_file:
        with pytest.raises(TypeError, match=r"^audio 0: the file object '.*notes\.txt' \(a TextIOWrapper\) is open in text mode; open media files in binary mode"):
            tiny_processor(text="<audio>", audio=text_file)
    closed = io.BytesIO(png_bytes())
    closed.close()
    with pytest.raises(ValueError, match=r"^image 0: cannot read the file object <BytesIO> \(I/O operation on closed file"):
        tiny_processor(text="<image>", images=closed)
    with pytest.raises(TypeError, match=r"^image 0: expected a PIL image, .* got bytes \(encoded file bytes\? wrap them in io\.BytesIO\)$"):
        tiny_processor(text="<image>", images=[png_bytes()])


@pytest.mark.parametrize("pair, error, message", [
    ((tone(1.0), "16000"), ValueError, r"^audio 0: the sampling rate must be a whole number of Hz, got '16000'$"),
    ((tone(1.0), None), ValueError, r"^audio 0: the sampling rate must be a whole number of Hz, got None$"),
    ((tone(1.0), 16), ValueError, r"^audio 0: the sampling rate must be between 1000 and 1000000 Hz, got 16 \(a rate in kHz\? give it in Hz\)$"),
    (("beep.wav", 16000), TypeError,
     r"^audio 0: the waveform given with a sampling rate must be an array, a tensor or a list of samples, got str; a file's rate is read from the file: give the file alone$"),
    ((tone(1.0).tolist(), 0.5), ValueError, r"^audio 0: the sampling rate must be a whole number of Hz, got 0.5$"),
])  # fmt: skip
def test_malformed_waveform_rate_pairs_are_named_as_pairs(tiny_processor, pair, error, message):
    """A 2-tuple whose second element was meant as a rate is one (waveform, rate) item, however wrong: not two."""
    for audio in (pair, [pair], [[pair]]):
        with pytest.raises(error, match=message):
            tiny_processor(text="<audio>", audio=audio)


def test_a_list_of_samples_is_a_waveform_with_its_rate(tiny_processor):
    wave = tone(1.0, rate=8000)
    expected = tiny_processor(text="<audio>", audio=(wave, 8000))["input_features"]
    for given in ((wave.tolist(), 8000), {"array": wave.tolist(), "sampling_rate": 8000}, (wave, np.array(8000)), (wave, torch.tensor(8000))):
        torch.testing.assert_close(tiny_processor(text="<audio>", audio=given)["input_features"], expected, atol=1e-6, rtol=0)
    two = tiny_processor(text="<audio><audio>", audio=(tone(1.0), tone(2.0)))
    assert two["input_features"].shape[0] == 2  # two waveforms stay two items
    # bare, a list is no waveform (it could be a list of items): refused, saying what to give
    with pytest.raises(TypeError, match=r"^audio 0: expected .* got list \(samples as a list\? give them as an array, or with their rate: \(samples, rate\)\)$"):
        tiny_processor(text="<audio>", audio=[wave.tolist()])
    with pytest.raises(ValueError, match=r"^1 audio placeholder\(s\) .* but 8000 audio item\(s\) given; item 0 is of type float, which no audio item is$"):
        tiny_processor(text="<audio>", audio=wave.tolist())


def cut_to_no_streams(data: bytes) -> bytes:
    """The longest prefix of an MP4 that PyAV still opens but finds no stream in (its track table cut off)."""
    import av

    def streams(prefix: bytes):
        try:
            with av.open(io.BytesIO(prefix)) as container:
                return len(container.streams)
        except av.error.FFmpegError:
            return None

    cut = next(n for n in range(data.index(b"moov"), len(data)) if streams(data[:n]) == 0)
    while streams(data[: cut + 1]) == 0:
        cut += 1
    return data[:cut]


def test_truncated_media_files_are_named_unreadable_not_streamless(tiny_processor, tmp_path):
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(cut_to_no_streams(write_video(tmp_path / "move.mp4").read_bytes()))
    with pytest.raises(ValueError, match=(
        r"^video 0: cannot read video file '.*cut\.mp4': PyAV opens it \(as mov,mp4,.*\) but finds no streams, no video or "
        r"audio stream; the file is truncated or corrupt, or not a media file$"
    )):  # fmt: skip
        tiny_processor(text="<video>", videos=[str(truncated)])
    with pytest.raises(ValueError, match=r"^audio 0: cannot read audio file '.*cut\.mp4': PyAV opens it .* but finds no streams"):
        tiny_processor(text="<audio>", audio=[str(truncated)])


def test_several_samples_returned_as_tensors_are_padded_by_default(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    out = tiny_processor(text=["", "a b c"])  # was "Unable to convert output 'input_ids' to tensor"
    explicit = tiny_processor(text=["", "a b c"], padding=True)
    torch.testing.assert_close(out["input_ids"], explicit["input_ids"], atol=0, rtol=0)
    assert out["attention_mask"].sum(1).tolist() == [len(tokenizer("")["input_ids"]), len(tokenizer("a b c")["input_ids"])]
    pads = out["attention_mask"][0] == 0
    assert pads[0 if tokenizer.padding_side == "left" else -1] and (out["input_ids"][0][pads] == tokenizer.pad_token_id).all()
    # one sample, lists, and an explicit choice are as before
    assert tiny_processor(text="a b c")["input_ids"].tolist() == [tokenizer("a b c")["input_ids"]]
    assert tiny_processor(text=["", "a b c"], return_tensors=None)["input_ids"] == [tokenizer(t)["input_ids"] for t in ("", "a b c")]
    with pytest.raises(ValueError, match="padding=True"):
        tiny_processor(text=["", "a b c"], padding=False)


def test_the_length_limit_names_the_long_sample_of_a_padded_batch(tiny_processor):
    tiny_processor.tokenizer.model_max_length = 30
    two_images = [gradient(), gradient()]  # 2 x 16 soft tokens
    for texts, images, long in ((["hi", "<image><image>"], [[], two_images], 1), (["<image><image>", "hi"], [two_images, []], 0)):
        with pytest.raises(ValueError, match=rf"^sample {long} is 33 tokens long after expanding its media \(2 images"):
            tiny_processor(text=texts, images=images, padding=True)  # (explicit: also how the collator calls it)


def test_a_placeholder_after_transformers_control_token_mark_is_never_left_unexpanded(tiny_processor):
    """transformers >= 5.24's placeholder expansion leaves a placeholder right after U+F0000 (its mark for text that
    is no placeholder) as text: refused there, since its image would have no soft tokens; expanded before."""
    try:
        out = tiny_processor(text="a \U000f0000<image> b", images=[gradient()])
    except ValueError as error:
        assert str(error).startswith("sample 0: a placeholder follows U+F0000, transformers' mark"), error
    else:
        assert (out["input_ids"][0] == tiny_processor.image_token_id).sum() == tiny_processor.image_seq_length
