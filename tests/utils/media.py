"""Small real media files for tests, written at test time: PNG images, MP4 videos (PyAV, h264/mpeg4), WAV audio,
other audio containers through PyAV's encoders (`encode_audio`)."""

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image


def write_image(path: Path, color=(255, 0, 0), size=(40, 30), mode="RGB") -> Path:
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_video(path: Path, num_frames: int = 12, size=(32, 32), moving: str = "right") -> Path:
    """A white square moving across a black background."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            x = index * (size[0] - 8) // max(1, num_frames - 1)
            x = x if moving == "right" else size[0] - 8 - x
            frame[12:20, x : x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def tone(seconds: float, frequency: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def write_audio(path: Path, seconds: float = 2.0, rate: int = 16000, channels: int = 1, frequency: float = 440.0) -> Path:
    wave = tone(seconds, frequency, rate)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return path


def encode_audio(path: Path, wave: np.ndarray, codec: str, rate: int) -> Path:
    """`wave` (mono float32 at `rate`) encoded with PyAV's `codec` into `path` (the container from its extension)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for start in range(0, wave.size, 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
