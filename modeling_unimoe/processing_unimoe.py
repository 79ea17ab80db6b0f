"""Uni-MoE processor: chat messages with images, videos and audio -> the model's inputs.

Media may be given decoded (PIL images, arrays, waveforms), as local file paths or as binary file objects
(`io.BytesIO`, `open(path, "rb")`, read from their start); files are decoded here (images with Pillow, their EXIF
orientation applied, video and audio with PyAV) and every failure names the file. Each `<image>`, `<video>` and
`<audio>` placeholder is expanded to exactly the number of soft tokens the model scatters in its place.

From transformers: the placeholder expansion (`ProcessorMixin.get_text_with_replacements` with our `replace_*_token`
hooks), the chat-template steps, the CLIP image processor and Whisper's features. Our own, each docstring opening
with what transformers' counterpart lacks: the loaders `load_image`, `load_video`, `load_audio`; and in the processor
`__call__`, `_per_sample` (media matched to each sample's placeholders), `_prepare_image` (the bounded resize),
`_check_lengths` (no truncation through a media block) and `model_input_names`.
"""

import contextvars
import io
import itertools
import math
import numbers
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import is_torch_tensor, logging

from .transformers_compat import UniMoEChatTemplateSteps, image_processor_rgb


logger = logging.get_logger(__name__)


# Float images may overshoot [0, 1] by this much (rounding in the user's own arithmetic).
_FLOAT_TOLERANCE = 1e-6
# PIL modes holding 16-bit samples (Pillow opens 16-bit grayscale PNG and TIFF files in these).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """An image array -> uint8 by the value rule of `load_image`, refusing what it cannot map without loss of meaning."""
    dtype = array.dtype
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint8:
        return array
    if dtype.kind == "f":
        if dtype.itemsize < 4:
            array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(
                f"{name}: {int(array.size - finite.sum())} of {array.size} values of the image (dtype {dtype}) are NaN or "
                "infinite; an image must be finite"
            )
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"{name}: an image of dtype {dtype} must have values in [0, 1], found values in [{low:g}, {high:g}]; "
                "divide 0-255 values by 255 or pass a uint8 array"
            )
        return np.clip(array * 255.0, 0, 255).round().astype(np.uint8)
    if dtype.kind == "u" and dtype.itemsize == 2:  # 16-bit: scaled by the full range, rounded (v * 257 -> v)
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{name}: an image of dtype {dtype} must have values in [0, 255], found values in [{low}, {high}]; pass 8-bit "
                "values as uint8 (or in [0, 255]), 16-bit ones as uint16 (scaled by 255/65535), or floats in [0, 1]"
            )
        return array.astype(np.uint8)
    raise TypeError(
        f"{name}: unsupported image dtype {dtype}; expected uint8, uint16, bool, another integer type with values in "
        "[0, 255] or a float type with values in [0, 1]"
    )


def _array_to_image(array: np.ndarray, index: int, label: str | None = None) -> Image.Image:
    """[H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> PIL, values mapped to 8 bits by the rule of `load_image`."""
    name = label or f"image {index}"
    shape = tuple(array.shape)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        hint = " (a batch of one image? take its first item)" if array.ndim == 4 and shape[0] == 1 else ""
        raise ValueError(
            f"{name}: expected an [H, W], [H, W, C] or [C, H, W] array with C in 1, 3 or 4, got shape {shape}{hint}"
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty: an array of shape {shape} has no pixels")
    return Image.fromarray(_to_uint8(array, name))


def _is_file(value) -> bool:
    """A file object (`io.BytesIO`, `open(path, "rb")`): anything with a `read` method but a path or bytes."""
    return not isinstance(value, (str, bytes, bytearray, os.PathLike)) and callable(getattr(value, "read", None))


def _source_name(source) -> str:
    """A file path or file object as errors name it: 'path', or <BytesIO> ('name' for an open file)."""
    if not _is_file(source):
        return repr(str(source))
    name = getattr(source, "name", None)
    return f"{name!r} (a {type(source).__name__})" if isinstance(name, str) else f"<{type(source).__name__}>"


def _file_source(source, name: str):
    """A path -> str; a binary file object -> itself, rewound to its start (read into memory if it cannot seek)."""
    if not _is_file(source):
        return str(source)
    if isinstance(source, io.TextIOBase):
        raise TypeError(
            f"{name}: the file object {_source_name(source)} is open in text mode; open media files in binary mode ('rb')"
        )
    try:
        has_seekable = callable(getattr(source, "seekable", None))
        seekable = source.seekable() if has_seekable else callable(getattr(source, "seek", None))
        if seekable:
            source.seek(0)
            return source
        data = source.read()
    except (OSError, ValueError) as error:  # closed files, unsupported operations
        raise ValueError(f"{name}: cannot read the file object {_source_name(source)} ({error})") from error
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"{name}: the file object {_source_name(source)} gave {type(data).__name__}, not bytes; open it in binary mode"
        )
    return io.BytesIO(data)


def _rewound(source):
    """`source` (from `_file_source`) ready to be opened again: file objects are read from their start each time."""
    if _is_file(source):
        source.seek(0)
    return source


def _as_numpy(value):
    """torch tensors -> numpy (leaves everything else alone): floating tensors as float32, others keep their dtype."""
    if not is_torch_tensor(value):
        return value
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


def _open_image_file(path, name: str) -> Image.Image:
    """An image file (path or binary file object), its EXIF orientation applied as transformers' `load_image` does
    (a photo stored sideways with Orientation=6 comes out upright); pixels of files without one are as stored."""
    source = _file_source(path, name)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: both are refused, by one named limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened)  # a plain copy when there is no orientation to apply
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"{name}: image file {_source_name(path)} is too large to decode ({error}); the limit is Pillow's guard against "
            f"decompression bombs, PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels (Pillow warns past it and "
            "fails past twice it; both are refused here): raise it to read this file"
        ) from error
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{name}: cannot read image file {_source_name(path)} ({error})") from error


def load_image(image, index: int, label: str | None = None) -> Image.Image:
    """Not transformers' `load_image`: its `convert("RGB")` clips 16-bit files, drops alpha; it takes no file objects.

    A PIL image from a PIL image, an array or tensor ([H, W], [H, W, C] or [C, H, W]), a file path or a binary
    file object (read from its start); errors name `label` (default `image {index}`).

    Files are turned by their EXIF orientation, as transformers' `load_image` turns the files it opens. PIL images
    given in memory are taken as they are, as transformers' image processors take them: the caller decoded them and
    may have turned them already (a turned copy keeps the original's EXIF, so turning it again would be wrong).

    Values become 8 bits by one rule for arrays, tensors, PIL images and files: uint8 as is; 16-bit images (uint16
    arrays, PIL modes I;16, I;16B, I;16L) scaled by their full range (x 255/65535); other integer types (and PIL
    mode I) only when all values are in [0, 255]; floats (and PIL mode F) only in [0, 1] (x 255); bool as 0/255.
    Anything else (values out of range, NaN or infinity, another dtype, an empty image) is refused, naming the item."""
    name = label or f"image {index}"
    if isinstance(image, (str, os.PathLike)) or _is_file(image):
        image = _open_image_file(image, name)
    elif not isinstance(image, Image.Image):
        array = _as_numpy(image)
        if not isinstance(array, np.ndarray):
            hint = " (encoded file bytes? wrap them in io.BytesIO)" if isinstance(image, (bytes, bytearray)) else ""
            raise TypeError(
                f"{name}: expected a PIL image, an array or tensor, a file path or a binary file object, got "
                f"{type(image).__name__}{hint}"
            )
        return _array_to_image(array, index, name)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):  # Pillow's own conversions would clip these
        image = _array_to_image(np.asarray(image), index, f"{name} (PIL mode {image.mode})")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels)")
    return image


def _sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly over `total` frames (repeating frames when the clip is shorter)."""
    return [min(total - 1, math.floor((i + 0.5) * total / num_frames)) for i in range(num_frames)]


def _decode_video_frames(path, num_frames: int, index: int) -> list[np.ndarray]:
    """Decode every frame (inter-frame codecs need it) but convert to RGB only the `num_frames` sampled ones; the
    frame count comes from the container, with a full second pass when the container's count was wrong. `path`
    is a path or a binary file object (from `_file_source`)."""
    import av

    label = _source_name(path)

    def decode(wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
        kept, count = {}, 0
        with av.open(_rewound(path)) as container:
            for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
                if wanted is None or count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        return kept, count

    try:
        with av.open(_rewound(path)) as container:
            if not container.streams.video:
                _check_has_media(container, f"video {index}", "video", label)
                raise ValueError(
                    f"video {index}: file {label} has no video stream (its streams: {_stream_kinds(container)}); "
                    "a video must be a video file, its frames or its frame image files"
                )
            declared = container.streams.video[0].frames
        wanted = _sample_indices(declared, num_frames) if declared > 0 else None
        kept, total = decode(set(wanted) if wanted else None)
        if total > 0 and (wanted is None or total != declared):
            wanted = _sample_indices(total, num_frames)
            if not set(wanted) <= kept.keys():
                kept, total = decode(set(wanted))
    except (av.error.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"video {index}: cannot decode video file {label} ({error})") from error
    return [kept[i] for i in wanted] if total > 0 else []


def _stream_kinds(container) -> str:
    return ", ".join(sorted({stream.type for stream in container.streams})) or "none"


def _check_has_media(container, name: str, kind: str, label: str) -> None:
    """Refuse a container with neither a video nor an audio stream as unreadable rather than as of the other kind:
    PyAV opens a truncated MP4 (its stream table cut off) as a container with no streams, or only a data stream."""
    if container.streams.video or container.streams.audio:
        return
    found = f"only a stream of type {_stream_kinds(container)}" if container.streams else "no streams"
    raise ValueError(
        f"{name}: cannot read {kind} file {label}: PyAV opens it (as {container.format.name}) but finds {found}, no "
        "video or audio stream; the file is truncated or corrupt, or not a media file"
    )


def _rgb_frame(image: Image.Image, name: str) -> np.ndarray:
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as error:  # modes Pillow cannot convert (e.g. La)
        raise ValueError(f"{name}: cannot convert PIL mode {image.mode!r} to RGB ({error})") from error


def _check_num_frames(num_frames, name: str = "num_frames") -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"{name} must be a positive integer (1 or more frames sampled per video), got {num_frames!r}")
    return int(num_frames)


def is_frame_paths(video) -> bool:
    """Whether `video` is one video given as its frame image files, in order: a non-empty list or tuple of paths
    whose extensions Pillow opens (the original Uni-MoE data format, `"video": ["frame_000.jpg", ...]`)."""
    return (
        isinstance(video, (list, tuple))
        and len(video) > 0
        and all(_is_path(frame) and os.path.splitext(str(frame))[1].lower() in _image_extensions() for frame in video)
    )


def _image_extensions() -> set[str]:
    return {extension for extension, format in Image.registered_extensions().items() if format in Image.OPEN}


def load_video(video, num_frames: int, index: int) -> list[np.ndarray]:
    """Not transformers' `load_video`: it needs a declared frame count (WebM, MKV: 0) of >= `num_frames`, and a path.

    `num_frames` RGB frames [H, W, 3] sampled uniformly from a video file (PyAV), from given frames, or from frame
    image files (`is_frame_paths`; only the sampled files are read). Given frames follow `load_image`'s value rule."""
    num_frames = _check_num_frames(num_frames, f"video {index}: num_frames")
    if isinstance(video, (str, os.PathLike)) or _is_file(video):
        frames = _decode_video_frames(_file_source(video, f"video {index}"), num_frames, index)
        if not frames:
            raise ValueError(
                f"video {index}: video file {_source_name(video)} has no frames that decode (truncated or corrupt?)"
            )
        return frames
    if is_frame_paths(video):
        paths = [video[i] for i in _sample_indices(len(video), num_frames)]
        frames = {}
        for path in dict.fromkeys(paths):
            name = f"video {index} frame file {str(path)!r}"
            try:
                frames[path] = _rgb_frame(load_image(path, index, name), name)
            except ValueError as error:
                if not isinstance(error.__cause__, (OSError, UnidentifiedImageError)):
                    raise  # already names the frame file (its values, its size)
                raise ValueError(f"video {index}: cannot read frame file {str(path)!r} ({error.__cause__})") from error
        return [frames[path] for path in paths]
    video = _as_numpy(video)
    if not isinstance(video, (list, tuple, np.ndarray)):
        raise TypeError(
            f"video {index}: expected a video file path or binary file object, a [frames, H, W, C] or [frames, C, H, "
            f"W] array or tensor, or a list of frames (images or image files), got {type(video).__name__}"
        )
    if isinstance(video, np.ndarray) and (video.ndim < 3 or (video.ndim == 3 and video.shape[-1] in (1, 3, 4))):
        raise ValueError(
            f"video {index}: expected a [frames, H, W, C] or [frames, C, H, W] array, got shape {tuple(video.shape)}"
            + (" (one image: give it as an image, or as [1, H, W, C] for a one-frame video)" if video.ndim == 3 else "")
        )
    frames = [
        _rgb_frame(load_image(frame, index, f"video {index} frame {i}"), f"video {index} frame {i}")
        for i, frame in enumerate(video)
    ]
    if not frames:
        raise ValueError(f"video {index}: the given frames are empty (no frames)")
    return [frames[i] for i in _sample_indices(len(frames), num_frames)]


def _to_mono(waveform: np.ndarray, index: int) -> np.ndarray:
    if waveform.ndim == 1:
        return waveform
    if waveform.ndim == 2:  # channels first or last: the smaller axis is the channel axis
        channel_axis = 0 if waveform.shape[0] <= waveform.shape[1] else 1
        return waveform.mean(axis=channel_axis)
    raise ValueError(f"audio {index}: expected a 1-D or 2-D (channels) waveform, got shape {tuple(waveform.shape)}")


# Sampling rates accepted for waveforms given with their rate: below 1 kHz is no audio (and usually kHz given for
# Hz: resampling it to 16 kHz would multiply the samples by 1000), above 1 MHz no audio format either.
_MIN_RATE, _MAX_RATE = 1_000, 1_000_000
# libswresample returns too few samples, none at all for the shortest, when its input is shorter than its filter:
# inputs shorter than this many samples (of the lower of the two rates) are padded with silence, the output cut back.
_MIN_RESAMPLE_LENGTH = 256
# integer PCM waveforms and their full scale (soundfile's and torchaudio's convention): -> float in [-1, 1)
_PCM_FULL_SCALE = {("i", 2): 32768.0, ("i", 4): 2147483648.0}
# Float samples are nominally in [-1, 1]; peaks up to this are taken as they are, since lossy decoders and resamplers
# overshoot full scale on loud or clipped recordings (a 0.999 square wave decodes to peaks of 1.26 from Opus, 1.40
# from AAC, 1.46 from MP3; Whisper's features shift by log10(peak^2)/4 at most, 0.08 for 1.46, as for any louder
# recording). Past it, samples are on another scale (PCM values as floats peak in the hundreds or thousands, which
# shifts every Whisper feature by up to +2.26): refused. No unit mistake gives peaks in (1, 2].
_MAX_FLOAT_PEAK = 2.0


def _check_rate(rate, name: str) -> int:
    """A sampling rate in Hz -> int, refusing anything but a whole number of Hz in [_MIN_RATE, _MAX_RATE]."""
    if (isinstance(rate, np.ndarray) or is_torch_tensor(rate)) and rate.ndim == 0:  # np.array(16000), torch.tensor(16000)
        rate = rate.item()
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate != int(rate):
        raise ValueError(f"{name}: the sampling rate must be a whole number of Hz, got {rate!r}")
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise ValueError(
            f"{name}: the sampling rate must be between {_MIN_RATE} and {_MAX_RATE} Hz, got {rate!r}"
            + (" (a rate in kHz? give it in Hz)" if 0 < rate < _MIN_RATE else "")
        )
    return int(rate)


def _waveform(value, index: int) -> np.ndarray:
    """A given waveform (an array, a tensor or a list of samples) -> finite, non-empty, mono float32: float samples
    as given (peaks up to `_MAX_FLOAT_PEAK`), int16/int32/uint8 PCM scaled to [-1, 1); other dtypes refused."""
    name = f"audio {index}"
    if not (isinstance(value, (np.ndarray, list, tuple)) or is_torch_tensor(value) or hasattr(value, "__array__")):
        is_file = _is_path(value) or _is_file(value)
        hint = "; a file's rate is read from the file: give the file alone" if is_file else ""
        raise TypeError(
            f"{name}: the waveform given with a sampling rate must be an array, a tensor or a list of samples, got "
            f"{type(value).__name__}{hint}"
        )
    try:
        array = np.asarray(_as_numpy(value))
    except (ValueError, TypeError) as error:  # ragged lists and the like
        raise TypeError(f"{name}: cannot read the waveform as an array ({error})") from error
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "f":
        array = array.astype(np.float32, copy=False)
    elif (kind, size) in _PCM_FULL_SCALE:
        array = (array.astype(np.float64) / _PCM_FULL_SCALE[kind, size]).astype(np.float32)
    elif (kind, size) == ("u", 1):
        array = ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    else:
        raise TypeError(
            f"{name}: unsupported waveform dtype {array.dtype}; expected float samples (nominally in [-1, 1]) or "
            "int16, int32 or uint8 PCM"
        )
    if array.size == 0:
        raise ValueError(f"audio {index} is empty (0 samples)")
    waveform = _check_finite(_to_mono(array, index), name)
    if kind == "f":
        _check_peak(array, name)
    return waveform


def _check_peak(samples: np.ndarray, name: str) -> None:
    """Refuse finite float samples (any channels) peaking past `_MAX_FLOAT_PEAK`: on another scale than [-1, 1]."""
    peak = max(float(samples.max()), -float(samples.min()))
    if peak > _MAX_FLOAT_PEAK:
        raise ValueError(
            f"{name}: float samples must be in [-1, 1] (peaks up to {_MAX_FLOAT_PEAK:g} pass as codec or resampler "
            f"overshoot), found a peak of {peak:g}; scale the waveform to [-1, 1] (16-bit PCM values: divide by "
            "32768, or pass them as int16)"
        )


def _check_finite(waveform: np.ndarray, name: str) -> np.ndarray:
    finite = np.isfinite(waveform)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name}: {bad.size} of {waveform.size} samples are NaN or infinite (the first at sample {bad[0]}); "
            "a waveform must be finite"
        )
    return waveform


def _swresample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    import av

    frame = av.AudioFrame.from_ndarray(waveform[None].astype(np.float32), format="fltp", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    chunks = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return waveform
    minimum = math.ceil(_MIN_RESAMPLE_LENGTH * max(1.0, rate / target))
    if waveform.size >= minimum:
        return _swresample(waveform, rate, target)
    length = max(1, round(waveform.size * target / rate))  # a short input: padded, then cut back to its length
    return _swresample(np.pad(waveform, (0, minimum - waveform.size)), rate, target)[:length]


# WAV files libsndfile decodes to the same float32 samples as PyAV (integer PCM scaled by its full scale, floats
# rounded to float32), read without FFmpeg's per-file setup: 0.8 ms instead of 9-19 ms for a 3 s WAV, most of an audio
# row's decoding. Other formats stay with PyAV: lossy ones decode differently in the two libraries, and libsndfile
# trusts a FLAC header's sample count and rate where FFmpeg reads the frames (a wrong header would cut the audio,
# mislabel its rate, or make it allocate what the header claims).
_SOUNDFILE_FORMATS = {"WAV", "WAVEX"}
_SOUNDFILE_SUBTYPES = {"PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"}


def _read_wav(path, sampling_rate: int) -> np.ndarray | None:
    """`[channels, samples]` float32 of an uncompressed WAV file already at `sampling_rate`, read with soundfile;
    None for any other file, or when soundfile is missing (remote code in an environment without it) or fails: PyAV
    then decodes it (and names what is wrong with it)."""
    try:
        import soundfile
    except ImportError:
        return None
    try:
        info = soundfile.info(_rewound(path))
        if info.format not in _SOUNDFILE_FORMATS or info.subtype not in _SOUNDFILE_SUBTYPES or info.samplerate != sampling_rate:
            return None
        data, _ = soundfile.read(_rewound(path), dtype="float32", always_2d=True)  # [samples, channels]
    except (RuntimeError, TypeError, ValueError, OSError, MemoryError):  # refused by libsndfile: PyAV decodes it or says why not
        return None
    return np.ascontiguousarray(data.T) if data.size else None


def _load_audio_file(path, sampling_rate: int, index: int) -> np.ndarray:
    """`path`: a path or a binary file object (from `_file_source`)."""
    label = _source_name(path)
    channels = _read_wav(path, sampling_rate)
    if channels is not None:
        waveform = _check_finite(_to_mono(channels, index), f"audio {index} (file {label})")
        _check_peak(channels, f"audio {index} (file {label})")
        return waveform

    import av

    def decode(rate: int | None) -> tuple[list[np.ndarray], int, int]:
        """Float [channels, samples] chunks at `rate` (None: the file's), the file's rate and sample count."""
        with av.open(_rewound(path)) as container:
            if not container.streams.audio:
                _check_has_media(container, f"audio {index}", "audio", label)
                raise ValueError(
                    f"audio {index}: file {label} has no audio stream (its streams: {_stream_kinds(container)})"
                )
            stream = container.streams.audio[0]
            # interleaved float, de-interleaved here: the same samples as planar float, whose `to_ndarray` crashes
            # the process (a segmentation fault in PyAV) for 8 or more channels
            resampler = av.AudioResampler(format="flt", rate=rate)
            chunks, samples, native_rate = [], 0, stream.rate
            for frame in itertools.chain(container.decode(stream), [None]):  # None: flush the resampler
                if frame is not None:
                    samples, native_rate = samples + frame.samples, frame.sample_rate or native_rate
                for out in resampler.resample(frame):
                    chunks.append(np.ascontiguousarray(out.to_ndarray().reshape(-1, len(out.layout.channels)).T))
        return chunks, native_rate, samples

    try:
        # decode to planar float [channels, samples] at the target rate, whatever the file's format
        chunks, native_rate, samples = decode(sampling_rate)
        minimum = _MIN_RESAMPLE_LENGTH * max(1.0, native_rate / sampling_rate) if native_rate else 0
        short = native_rate != sampling_rate and 0 < samples < minimum
        if short:  # too short for the streaming resampler (see `_resample`): decode as is, resample padded
            chunks, native_rate, samples = decode(None)
    except (av.error.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"audio {index}: cannot decode audio file {label} ({error})") from error
    if not chunks:
        raise ValueError(f"audio {index}: audio file {label} is empty")
    channels = np.concatenate(chunks, axis=1)
    waveform = _to_mono(channels, index)
    if waveform.size == 0:
        raise ValueError(f"audio {index}: audio file {label} is empty")
    waveform = _check_finite(waveform.astype(np.float32), f"audio {index} (file {label})")
    _check_peak(channels, f"audio {index} (file {label})")  # float files may hold any scale; decoded PCM is in [-1, 1)
    return _resample(waveform, native_rate, sampling_rate) if short else waveform


def load_audio(audio, sampling_rate: int, index: int, given_rate: int | None = None) -> np.ndarray:
    """Not transformers' `load_audio`: it needs torchcodec, or soxr (5.24) / librosa (5.19), and a path.

    A mono float32 waveform at `sampling_rate` from a file path or binary file object (PyAV), a `(waveform, rate)`
    pair, a `{"array", "sampling_rate"}` dict (the `datasets` Audio format) or an array at `given_rate` (default:
    already at `sampling_rate`); in a pair or dict the waveform may be a list of samples. Stereo is averaged to mono;
    other rates are resampled. Waveforms are float samples in [-1, 1] or int16/int32/uint8 PCM (scaled to [-1, 1)).
    Float peaks up to 2 (lossy decoders and resamplers overshoot full scale on loud recordings: MP3 up to ~1.5) are
    taken as they are; past 2, float waveforms and files (e.g. a float WAV holding PCM values) are refused, naming
    the peak: divide 16-bit PCM values by 32768. Empty, non-finite or otherwise typed waveforms and rates that are
    not a whole number of Hz in [1 kHz, 1 MHz] are refused, naming the item."""
    name = f"audio {index}"
    if isinstance(audio, (str, os.PathLike)) or _is_file(audio):
        return _load_audio_file(_file_source(audio, name), sampling_rate, index)
    if isinstance(audio, dict):
        missing = [key for key in ("array", "sampling_rate") if key not in audio]
        if missing:
            raise ValueError(
                f"{name}: an audio dict needs the keys 'array' and 'sampling_rate' (the datasets Audio format); "
                f"missing {missing}, given {sorted(map(str, audio))}"
            )
        waveform, rate = audio["array"], audio["sampling_rate"]
    elif isinstance(audio, tuple):
        if len(audio) != 2:
            raise ValueError(f"{name}: an audio tuple must be (waveform, sampling_rate), got {len(audio)} elements")
        waveform, rate = audio
    elif isinstance(audio, np.ndarray) or is_torch_tensor(audio):
        waveform, rate = audio, given_rate if given_rate is not None else sampling_rate
    else:
        hint = " (encoded file bytes? wrap them in io.BytesIO)" if isinstance(audio, (bytes, bytearray)) else ""
        if isinstance(audio, list):
            hint = " (samples as a list? give them as an array, or with their rate: (samples, rate))"
        raise TypeError(
            f"{name}: expected a file path or binary file object, a waveform array or tensor, a (waveform, "
            f"sampling_rate) pair or a {{'array', 'sampling_rate'}} dict, got {type(audio).__name__}{hint}"
        )
    rate = _check_rate(rate, name)
    waveform = _waveform(waveform, index)
    import av

    try:
        return _resample(waveform, rate, sampling_rate)
    except (av.error.FFmpegError, ValueError, OverflowError) as error:  # PyAV refusing a rate or a length
        raise ValueError(
            f"{name}: cannot resample {waveform.size} samples from {rate} Hz to {sampling_rate} Hz ({error})"
        ) from error


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_array(x, *ndims: int) -> bool:
    return (isinstance(x, np.ndarray) or is_torch_tensor(x)) and x.ndim in ndims


def _is_image(x) -> bool:
    return _is_path(x) or _is_file(x) or isinstance(x, Image.Image) or _is_array(x, 2, 3)


def _is_video(x) -> bool:
    """A path or file object, a [frames, H, W, C] or [frames, C, H, W] array or tensor, a sequence of frames
    (images), or a sequence of frame image files (`is_frame_paths`)."""
    if _is_path(x) or _is_file(x) or _is_array(x, 4) or is_frame_paths(x):
        return True
    return isinstance(x, (list, tuple)) and all(_is_image(f) and not (_is_path(f) or _is_file(f)) for f in x)


def _is_rate_like(value) -> bool:
    """Whether `value`, the second element of a 2-tuple, was meant as a sampling rate (however wrong): a number,
    None, a numeric string, anything that cannot be an audio item itself."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False  # a file path: the tuple is two audio items
        return True
    return not (
        _is_path(value) or _is_file(value) or isinstance(value, (dict, list, tuple)) or _is_array(value, *range(1, 8))
    )


def _is_audio(x) -> bool:
    """A path or file object, a waveform array or tensor ([samples] or with a channel axis), a `(waveform, rate)`
    pair (any 2-tuple whose second element was meant as a rate: `load_audio` checks both) or a
    `{"array", "sampling_rate"}` dict."""
    if isinstance(x, tuple):
        return len(x) == 2 and _is_rate_like(x[1])
    return _is_path(x) or _is_file(x) or isinstance(x, dict) or _is_array(x, 1, 2)


def _is_sample_list(items, modality: str) -> bool:
    """Whether `items`, an element of a media argument that is no item itself, is one sample's list of items: any
    list or tuple, except one holding numbers (samples or pixels as a list: one bad item) and (videos) one holding
    frames (images), which is one video, whatever its bad frame."""
    if not isinstance(items, (list, tuple)) or any(isinstance(x, numbers.Number) for x in items):
        return False
    if modality == "video":
        return not any(isinstance(x, Image.Image) or _is_array(x, 2, 3) for x in items)
    return True


class _PerSample(list):
    """Media collected from chat messages, one list per sample: never taken for one flat list of items."""


class _Flat(list):
    """Media collected from chat messages, one item per placeholder across the batch: never taken for per-sample
    lists (a bad item that is a list stays one item, named as such)."""


_IS_ITEM = {"image": _is_image, "video": _is_video, "audio": _is_audio}

# Up to this aspect ratio (the default max_aspect_ratio) the image processor's resize is done in full, as it would
# do it; past it only the window its center crop keeps is resized (the same pixels up to rounding), bounding memory.
_EXACT_RESIZE_MAX_RATIO = 20


class UniMoEProcessor(UniMoEChatTemplateSteps, ProcessorMixin):
    r"""
    Tokenizer + CLIP image processor + [`UniMoEFeatureExtractor`] for Uni-MoE.

    image_seq_length (`int`): soft tokens per image (576 for CLIP ViT-L/14 at 336 px: (336/14)^2).
    num_frames (`int`): frames sampled uniformly from each video.
    video_pooling (`str`): `"mean"` (a video costs one image's tokens) or `"none"` (`num_frames` times that).
    num_query_tokens (`int`): audio tokens per audio window and audio tower.
    max_aspect_ratio (`float`, *optional*, defaults to 20): images and video frames whose longer side is more than
        this many times their shorter side are refused (`None`: no limit). Beyond 20:1 the image processor's resize
        would still be bounded (only the window the center crop keeps is resized), up to rounding.
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 576,
        num_frames: int = 8,
        video_pooling: str = "mean",
        num_query_tokens: int = 50,
        max_aspect_ratio: float | None = 20.0,
        **kwargs,
    ):
        if max_aspect_ratio is not None and (
            isinstance(max_aspect_ratio, bool) or not isinstance(max_aspect_ratio, numbers.Real) or not max_aspect_ratio >= 1
        ):
            raise ValueError(f"max_aspect_ratio must be a number >= 1 or None (no limit), got {max_aspect_ratio!r}")
        self.max_aspect_ratio = max_aspect_ratio
        self.image_seq_length = image_seq_length
        self.num_frames = _check_num_frames(num_frames)
        self.video_pooling = video_pooling
        self.num_query_tokens = num_query_tokens
        self.image_token = tokenizer.image_token
        self.video_token = tokenizer.video_token
        self.audio_token = tokenizer.audio_token
        self.image_token_id = tokenizer.image_token_id
        self.video_token_id = tokenizer.video_token_id
        self.audio_token_id = tokenizer.audio_token_id
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_model_config(cls, config, tokenizer, chat_template: str | None = None, num_frames: int = 8, **kwargs):
        """A processor matching a `UniMoEConfig`: image size and soft-token counts from the vision config, audio
        towers, mel bins, query tokens and window limit from the audio side. `tokenizer` must define the
        `image_token`, `video_token` and `audio_token` whose ids the config uses."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from .feature_extraction_unimoe import UniMoEFeatureExtractor

        for name in ("image", "video", "audio"):
            expected = getattr(config, f"{name}_token_id")
            actual = getattr(tokenizer, f"{name}_token_id", None)
            if expected is not None and actual != expected:
                raise ValueError(f"tokenizer's {name}_token_id={actual} but the model config expects {expected}")
        image_size = config.vision_config.image_size if config.vision_config is not None else 336
        patch_size = config.vision_config.patch_size if config.vision_config is not None else 14
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        num_mel_bins = config.speech_config.num_mel_bins if config.speech_config is not None else 80
        feature_extractor = UniMoEFeatureExtractor(
            audio_towers=config.audio_towers or ["whisper"],
            num_mel_bins=num_mel_bins,
            window_seconds=config.audio_window_seconds,
            max_audio_windows=config.max_audio_windows,
        )
        return cls(
            image_processor,
            feature_extractor,
            tokenizer,
            chat_template=chat_template,
            image_seq_length=(image_size // patch_size) ** 2,
            num_frames=num_frames,
            video_pooling=config.video_pooling,
            num_query_tokens=config.num_query_tokens,
            **kwargs,
        )

    def video_seq_length(self, num_frames: int) -> int:
        """Soft tokens of a video of `num_frames` sampled frames: one image's with `video_pooling="mean"`, one image's
        per frame with `"none"`."""
        return self.image_seq_length * (1 if self.video_pooling == "mean" else num_frames)

    def audio_seq_length(self, windows: int) -> int:
        """Soft tokens of an audio item cut into `windows` windows: `num_query_tokens` per window and audio tower."""
        return windows * self.num_query_tokens * len(self.feature_extractor.audio_towers)

    # transformers' placeholder hooks: the text each placeholder becomes (`get_text_with_replacements` puts it there)
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def replace_video_token(self, video_inputs: dict, video_idx: int, num_frames: int, **kwargs) -> str:
        return self.video_token * self.video_seq_length(num_frames)

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        """`audio_inputs["audio_windows"]`: the window count of each audio item (the feature extractor's output)."""
        return self.audio_token * self.audio_seq_length(audio_inputs["audio_windows"][audio_idx])

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs) -> MultiModalData:
        """Soft tokens each item would expand to, from its size alone (transformers' processor hook; vLLM sizes its
        buffers and checks prompts with it).

        image_sizes: one (height, width) per image; every image costs `image_seq_length` tokens (it is resized and
        center-cropped to the CLIP input). video_sizes: one (frames, height, width) per video; a video costs
        `video_seq_length(num_frames)` tokens whatever its frame count (`num_frames` frames are sampled from it).
        audio_lengths: samples per audio item at the feature extractor's rate; `num_query_tokens` per started window
        and tower, at most `max_audio_windows` windows (longer audio is refused, or cut with `truncation=True`).
        """
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.image_seq_length] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)  # rows of `pixel_values` per image
        if video_sizes is not None:
            data["num_video_tokens"] = [self.video_seq_length(self.num_frames)] * len(video_sizes)
        if audio_lengths is not None:
            extractor = self.feature_extractor
            data["num_audio_tokens"] = [
                self.audio_seq_length(min(extractor.num_windows(length), extractor.max_audio_windows)) for length in audio_lengths
            ]
        return MultiModalData(**data)

    @property
    def model_input_names(self):
        """Not transformers' union of the sub-processors' names, which lacks `pixel_values_videos`: videos go through
        the image processor, and no video processor names them."""
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos", *self.feature_extractor.model_input_names]

    def _per_sample(self, media, counts: list[int], modality: str) -> list[list]:
        """Not in transformers: `ProcessorMixin` passes media on as given, while the model needs each sample's media
        matched to its own placeholders. Media given flat (in placeholder order across the batch) or nested per sample
        -> per-sample lists, with the count of each sample checked against its placeholders. Nested: as many lists as
        samples, none of them an item (`_is_sample_list`), so that a bad item inside is loaded, and named, as itself;
        chat messages give their media marked as nested (images, videos) or flat (audio), never guessed."""
        is_item = _IS_ITEM[modality]
        if isinstance(media, (_PerSample, _Flat)):
            pass
        elif media is None or (isinstance(media, (list, tuple)) and len(media) == 0):
            media = []
        elif is_item(media):
            media = [media]
        elif isinstance(media, np.ndarray) or is_torch_tensor(media):  # a batch as one array: its items
            media = list(media)
        elif not isinstance(media, (list, tuple)):
            argument = "audio" if modality == "audio" else f"{modality}s"
            raise TypeError(
                f"`{argument}`: expected one {modality} item, a list of them (in placeholder order) or one list per "
                f"sample, got {type(media).__name__}"
            )
        nested = isinstance(media, _PerSample) or (
            not isinstance(media, _Flat)
            and not all(is_item(item) for item in media)
            and len(media) == len(counts)
            and all(_is_sample_list(items, modality) for items in media)
        )
        if nested:
            for sample, (items, count) in enumerate(zip(media, counts)):
                if len(items) != count:
                    hint = ""
                    if modality == "video" and not isinstance(media, _PerSample) and any(_is_path(x) for x in items):
                        hint = " (a list of file paths is one video only when every path has an image extension: its frames)"
                    raise ValueError(
                        f"sample {sample}: {count} {modality} placeholder(s) in the text but {len(items)} {modality} "
                        f"item(s) given{hint}"
                    )
            return [list(items) for items in media]
        if len(media) != sum(counts):
            per_sample = ", ".join(f"sample {i}: {c}" for i, c in enumerate(counts))
            # a list of numbers (samples, pixels) read as that many items: say so
            bad = next((i for i, x in enumerate(media) if x is None or isinstance(x, (numbers.Number, bytes))), None)
            hint = "" if bad is None else f"; item {bad} is of type {type(media[bad]).__name__}, which no {modality} item is"
            raise ValueError(
                f"{sum(counts)} {modality} placeholder(s) in the text ({per_sample}) but {len(media)} {modality} item(s) "
                f"given{hint}"
            )
        result, start = [], 0
        for count in counts:
            result.append(list(media[start : start + count]))
            start += count
        return result

    # options passed on to the tokenizer; any other option is refused rather than silently ignored
    _TOKENIZER_OPTIONS = {"padding", "pad_to_multiple_of", "padding_side", "return_attention_mask", "add_special_tokens", "return_offsets_mapping"}

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        videos=None,
        audio=None,
        sampling_rate: int | None = None,
        truncation: bool = False,
        num_frames: int | None = None,
        return_text_replacement_offsets: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Not `ProcessorMixin.__call__`: it neither matches each sample's media to its placeholders nor samples
        frames or audio windows, and its tokenizer options may truncate through a media block; here unknown options
        are refused and nothing but audio is cut.
        `truncation` only applies to audio past `max_audio_windows` (text and media blocks are never cut);
        `num_frames` overrides the frames sampled per video for this call. Several samples returned as tensors are
        padded to the longest (on the tokenizer's `padding_side`) unless `padding` is given: unpadded, they could not
        be stacked; one sample, or lists (`return_tensors=None`), are never padded by default."""
        if text is None:
            raise ValueError("UniMoEProcessor needs `text` with one placeholder per image, video and audio item")
        unsupported = sorted(set(kwargs) - self._TOKENIZER_OPTIONS)
        if unsupported:
            raise ValueError(
                f"UniMoEProcessor does not support the option(s) {unsupported}; it takes text, images, videos, audio, "
                f"sampling_rate, truncation, num_frames, return_tensors and the tokenizer options {sorted(self._TOKENIZER_OPTIONS)}"
            )
        texts = self._check_text(text)
        if kwargs.get("padding") is None and return_tensors is not None and len(texts) > 1:
            kwargs["padding"] = True
        num_frames = self.num_frames if num_frames is None else _check_num_frames(num_frames)
        if sampling_rate is not None:
            sampling_rate = _check_rate(sampling_rate, "sampling_rate")
        if truncation is None:
            truncation = False
        if not isinstance(truncation, (bool, np.bool_)):
            raise TypeError(
                f"truncation must be True or False (it only cuts audio past max_audio_windows; text and media blocks "
                f"are never cut), got {truncation!r}"
            )
        counts = {
            token: [sample.count(token) for sample in texts] for token in (self.image_token, self.video_token, self.audio_token)
        }
        images = self._per_sample(images, counts[self.image_token], "image")
        videos = self._per_sample(videos, counts[self.video_token], "video")
        audios = self._per_sample(audio, counts[self.audio_token], "audio")

        data = {}
        flat_images = [
            self._prepare_image(load_image(image, i), f"image {i}")
            for i, image in enumerate(item for sample in images for item in sample)
        ]
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="np")["pixel_values"]
        flat_videos = [load_video(video, num_frames, i) for i, video in enumerate(v for sample in videos for v in sample)]
        if flat_videos:
            frames = [self._prepare_image(frame, f"video {i}") for i, video in enumerate(flat_videos) for frame in video]
            pixels = self.image_processor(frames, return_tensors="np")["pixel_values"]
            data["pixel_values_videos"] = pixels.reshape(len(flat_videos), num_frames, *pixels.shape[1:])
        audio_windows = []
        flat_audio = [
            load_audio(item, self.feature_extractor.sampling_rate, i, sampling_rate)
            for i, item in enumerate(a for sample in audios for a in sample)
        ]
        if flat_audio and sampling_rate is None:
            self._log_assumed_rate(flat_audio, [a for sample in audios for a in sample])
        if flat_audio:
            features = self.feature_extractor(flat_audio, truncation=truncation, return_tensors="np")
            audio_windows = list(features.pop("audio_windows"))
            data.update(features)

        expanded, replacement_offsets = self._expand_placeholders(texts, audio_windows, num_frames)
        return_offsets = kwargs.pop("return_offsets_mapping", False)
        encoding = self.tokenizer(
            expanded, return_offsets_mapping=return_offsets, add_special_tokens=kwargs.pop("add_special_tokens", True), **kwargs
        )
        self._check_lengths(encoding, texts)
        data.update(encoding)
        if return_text_replacement_offsets:  # where each placeholder expansion landed, for assistant masks
            data["text_replacement_offsets"] = replacement_offsets
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _check_text(text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if not isinstance(text, (list, tuple)):
            hint = " (decode bytes first, e.g. text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"text must be a string or a list of strings (one per sample), got {type(text).__name__}{hint}")
        if not text:
            raise ValueError("text is an empty list: pass at least one string (one per sample)")
        for sample, item in enumerate(text):
            if not isinstance(item, str):
                raise TypeError(f"sample {sample}: text must be a string, got {type(item).__name__}")
        return list(text)

    def _log_assumed_rate(self, waveforms: list[np.ndarray], given: list):
        """One INFO line for the waveforms given as bare arrays, taken as already at the feature extractor's rate."""
        rate = self.feature_extractor.sampling_rate
        bare = [
            f"audio {i} ({waveforms[i].size} samples: {waveforms[i].size / rate:.2f} s at {rate} Hz, "
            f"{self.feature_extractor.num_windows(waveforms[i].size)} window(s) of {self.feature_extractor.window_seconds} s)"
            for i, item in enumerate(given)
            if not (_is_path(item) or _is_file(item) or isinstance(item, (tuple, dict)))
        ]
        if bare:
            logger.info(
                "%s given as bare array(s) with no sampling rate: taken as %d Hz. If recorded at another rate, pass "
                "(array, rate), {\"array\": array, \"sampling_rate\": rate} or sampling_rate=rate.",
                ", ".join(bare),
                rate,
            )

    def _prepare_image(self, image, label: str):
        """Not the CLIP image processor's resize alone: it resizes the whole image, so a 20:1 image costs memory in
        proportion to its long side (pinned by the peak-memory test). Check an image or video frame (PIL or [H, W, 3]
        array) against `max_aspect_ratio` and, for a Pillow image processor that resizes the shortest edge and center-
        crops (CLIP's), do its resize here on the PIL image, where it costs no copies, bounding its size: an extreme
        aspect ratio (past 20:1, allowed only with a raised `max_aspect_ratio`) resizes only the window that the center
        crop keeps."""
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        if width == 0 or height == 0:
            raise ValueError(f"{label} is empty ({width}x{height} pixels)")
        ratio = max(width, height) / min(width, height)
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            raise ValueError(
                f"{label} is {width}x{height} pixels: its aspect ratio {ratio:.1f}:1 (longer side over shorter) is more "
                f"than the processor's max_aspect_ratio={self.max_aspect_ratio:g}; crop or pad it, or raise "
                "max_aspect_ratio (None for no limit)"
            )
        plan = self._shortest_edge_resize()
        if plan is None:
            return image
        shortest, crop_height, crop_width, resample = plan
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        if image.mode != "RGB" or image.info.get("transparency") is not None:
            try:  # exactly the image processor's conversion (transparency composited onto white, or dropped)
                image = image_processor_rgb(image)
            except ValueError as error:
                raise ValueError(f"{label}: cannot convert PIL mode {image.mode!r} to RGB ({error})") from error
        long_size = int(shortest * max(width, height) / min(width, height))
        new_width, new_height = (shortest, long_size) if width <= height else (long_size, shortest)
        if long_size <= _EXACT_RESIZE_MAX_RATIO * shortest or crop_height > new_height or crop_width > new_width:
            return image.resize((new_width, new_height), resample)  # the image processor's resize, identical
        # resize only a window around the center crop, its length of the same parity as the resized long side, so
        # that the image processor's resize leaves it as is and its center crop falls on the same pixels
        window = max(shortest, crop_height if width <= height else crop_width)
        window += (long_size - window) % 2
        start = (long_size - window) // 2
        if width > height:  # a wide image: with a box, Pillow computes only the window's columns
            scale = width / new_width
            return image.resize((window, new_height), resample, box=(start * scale, 0, (start + window) * scale, height))
        # a tall image: two passes (along rows, then along columns) over only the rows that the window's column
        # filters read (Pillow's widest filter, Lanczos, reads 3 pixels each side, times the scale); the same pixels
        # as the full resize up to rounding (Pillow may order its two passes the other way)
        scale = height / new_height
        top, bottom = start * scale, (start + window) * scale
        margin = 3 * max(scale, 1.0) + 2
        first, last = max(0, math.floor(top - margin)), min(height, math.ceil(bottom + margin))
        rows = image.crop((0, first, width, last)).resize((new_width, last - first), resample)
        return rows.resize((new_width, window), resample, box=(0, top - first, new_width, bottom - first))

    def _shortest_edge_resize(self):
        """(shortest edge, crop height, crop width, resample) when the image processor is a Pillow one that converts to
        RGB, resizes the shortest edge and center-crops (CLIP's); None otherwise (its own resize then runs as is)."""
        processor = self.image_processor

        def get(sizes, key):
            return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)

        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        resample = getattr(processor, "resample", None)
        if not (
            getattr(processor, "backend", None) == "pil"
            and getattr(processor, "do_convert_rgb", False)
            and getattr(processor, "do_resize", False)
            and getattr(processor, "do_center_crop", False)
            and get(size, "shortest_edge")
            and not any(get(size, key) for key in ("height", "width", "longest_edge", "max_height", "max_width"))
            and get(crop, "height")
            and get(crop, "width")
            and isinstance(resample, int)
        ):
            return None
        return get(size, "shortest_edge"), get(crop, "height"), get(crop, "width"), resample

    def _expand_placeholders(
        self, texts: list[str], audio_windows: list[int], num_frames: int
    ) -> tuple[list[str], list[list[dict]]]:
        """`texts` with each placeholder replaced by its `replace_*_token` text (`audio_windows`: the window count of
        each audio item, in placeholder order; `num_frames`: frames per video), by transformers'
        `get_text_with_replacements`; also, per sample, where each replacement landed (`type`: the modality, `span` /
        `new_span`: the character range before / after, `text`, `replacement`), which assistant masks and vLLM read."""
        images, videos = (sum(text.count(token) for text in texts) for token in (self.image_token, self.video_token))
        expanded, offsets = self.get_text_with_replacements(
            list(texts),
            [self.replace_image_token({}, index) for index in range(images)],
            [self.replace_video_token({}, index, num_frames=num_frames) for index in range(videos)],
            [self.replace_audio_token({"audio_windows": audio_windows}, index) for index in range(len(audio_windows))],
        )
        for sample, (text, replaced) in enumerate(zip(texts, offsets)):
            if len(replaced) != sum(text.count(token) for token in (self.image_token, self.video_token, self.audio_token)):
                raise ValueError(  # transformers >= 5.24 leaves a placeholder right after that mark as text
                    f"sample {sample}: a placeholder follows U+F0000, transformers' mark for text that is no placeholder; "
                    "remove the mark"
                )
        return expanded, offsets

    def _check_lengths(self, encoding, texts: list[str]):
        """Not the tokenizer's truncation, which would cut a media block's soft tokens: a sample past
        `model_max_length` is refused by name. Each sample's own length (padding excluded: a short sample padded to a
        long one is not too long)."""
        limit = self.tokenizer.model_max_length
        masks = encoding.get("attention_mask") or [None] * len(encoding["input_ids"])
        for sample, (ids, mask) in enumerate(zip(encoding["input_ids"], masks)):
            length = len(ids) if mask is None else int(sum(mask))
            if length > limit:
                media = {
                    name: texts[sample].count(token)
                    for name, token in (("images", self.image_token), ("videos", self.video_token), ("audio", self.audio_token))
                }
                raise ValueError(
                    f"sample {sample} is {length} tokens long after expanding its media "
                    f"({', '.join(f'{n} {name}' for name, n in media.items())}), more than the tokenizer's maximum of {limit} (model_max_length); "
                    "shorten the text or pass fewer media items (media blocks are never cut)"
                )

    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        """Collect media from chat messages as given (paths stay paths): `__call__` decodes them, naming any bad file.
        Every media block has exactly one source (`check_chat_messages`); images and videos are marked as one list
        per sample, audio (flat, as transformers passes it) as one item per block, so that `__call__` takes each
        block's value as one item, whatever it is, and names it."""
        batch_images, batch_videos, batch_audios = _PerSample(), _PerSample(), _Flat()
        for conversation in conversations:
            images, videos = [], []
            for message in conversation:
                content = message.get("content")
                if isinstance(content, str) or not content:
                    continue
                for block in content:
                    sources = [block[key] for key in _block_sources(block)]  # (checked: only its own, one)
                    if block["type"] == "image":
                        images.extend(sources)
                    elif block["type"] == "video":
                        videos.extend(sources)
                    elif block["type"] == "audio":
                        batch_audios.extend(sources)
            batch_images.append(images)
            batch_videos.append(videos)
        # `num_frames` given to `apply_chat_template` reaches `__call__` here: passed as a processor option,
        # transformers would add `do_sample_frames=True` to it (an option of its video processors, not ours)
        num_frames = _CHAT_NUM_FRAMES.get()
        return batch_images, batch_videos, batch_audios, {} if num_frames is None else {"num_frames": num_frames}

    def apply_chat_template(self, conversation, chat_template=None, return_labels: bool = False, **kwargs):
        """`ProcessorMixin.apply_chat_template`; with `tokenize=True, return_dict=True, return_labels=True` it also
        returns `labels`: the input ids on assistant replies (found from character offsets of the template's
        generation blocks), -100 everywhere else.

        The conversations are checked first, whether tokenized or not (`check_chat_messages`): whatever the chat
        template would drop or render wrongly is refused, naming the message (and the sample of a batch); tokenized,
        every media block needs its source. Several samples returned as tensors are padded by default (labels with
        -100), as in `__call__`.
        `num_frames`, as an argument or in `processor_kwargs`, sets the frames sampled per video, as in `__call__`."""
        self._check_conversations(conversation, kwargs)
        kwargs, num_frames = self._chat_num_frames(kwargs)
        token = _CHAT_NUM_FRAMES.set(num_frames)
        try:
            return self._apply_chat_template(conversation, chat_template, return_labels, **kwargs)
        finally:
            _CHAT_NUM_FRAMES.reset(token)

    def _check_conversations(self, conversation, kwargs: dict):
        """Refuse a conversation (or batch) the chat template would drop content of; see `check_chat_messages`."""
        for name in ("tools", "documents"):
            if kwargs.get(name):
                raise ValueError(f"Uni-MoE's chat template (Vicuna v1) has no format for {name}; `{name}` cannot be used")
        if kwargs.get("load_audio_from_video"):
            raise ValueError("UniMoEProcessor does not load audio from videos: give the audio as its own audio block")
        if not isinstance(conversation, (list, tuple)) and not hasattr(conversation, "messages"):
            hints = {
                dict: "; one message? a conversation of one message is [message]",
                str: "; a prompt? as a conversation: [{'role': 'user', 'content': text}]",
            }
            hint = hints.get(type(conversation), "")
            raise UniMoEChatContentTypeError(
                f"the conversation is of type {type(conversation).__name__}: a conversation is a list of message dicts "
                f"({{'role': ..., 'content': ...}}) and a batch a list of conversations{hint}"
            )
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("the conversation is empty: apply_chat_template needs at least one message")
        # transformers' own normalisation (message objects -> dicts, None-valued keys dropped, OpenAI `image_url`
        # blocks -> image blocks), so that what is checked is what the template will see
        conversations, is_batched = self._normalize_conversations(conversation)
        # tokenized, media come from the blocks (unless given as `processor_kwargs` images, transformers' option)
        sources = bool(kwargs.get("tokenize")) and not (kwargs.get("processor_kwargs") or {}).get("images")
        for sample, messages in enumerate(conversations):
            check_chat_messages(messages, f"sample {sample}" if is_batched else "", require_sources=sources)

    def _chat_num_frames(self, kwargs: dict) -> tuple[dict, int | None]:
        """(`kwargs` without `num_frames`, the `num_frames` given at the top level or in `processor_kwargs`)."""
        kwargs = dict(kwargs)
        processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
        if "fps" in kwargs or "fps" in processor_kwargs:
            raise ValueError("UniMoEProcessor samples `num_frames` frames uniformly from each video; it has no `fps` option")
        # transformers' video processors sample frames only when asked; Uni-MoE always samples `num_frames`
        if processor_kwargs.get("do_sample_frames", kwargs.get("do_sample_frames")) is False:
            raise ValueError(f"UniMoEProcessor always samples num_frames={self.num_frames} frames uniformly from each video")
        processor_kwargs.pop("do_sample_frames", None)
        kwargs.pop("do_sample_frames", None)
        given = {source: d.pop("num_frames") for source, d in (("argument", kwargs), ("processor_kwargs", processor_kwargs)) if "num_frames" in d}
        if len(given) == 2 and given["argument"] != given["processor_kwargs"]:
            raise ValueError(f"num_frames={given['argument']} and processor_kwargs num_frames={given['processor_kwargs']} disagree")
        num_frames = next(iter(given.values()), None)
        if num_frames is not None:
            num_frames = _check_num_frames(num_frames)
        if "processor_kwargs" in kwargs:
            kwargs["processor_kwargs"] = processor_kwargs
        return kwargs, num_frames

    def _apply_chat_template(self, conversation, chat_template, return_labels: bool, **kwargs):
        if not return_labels:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if not (kwargs.get("tokenize") and kwargs.get("return_dict")):
            raise ValueError("return_labels=True needs tokenize=True and return_dict=True")
        return_tensors = kwargs.pop("return_tensors", "pt")
        processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
        if return_tensors is not None and "padding" not in processor_kwargs and "padding" not in kwargs:
            # built as lists (for the labels), returned as tensors: padded as `__call__` pads them (a no-op for one
            # sample); pad tokens are zero-width, so outside every assistant span: their labels are -100
            kwargs["processor_kwargs"] = {**processor_kwargs, "padding": True}
        output = super().apply_chat_template(
            conversation, chat_template=chat_template, return_assistant_tokens_mask=True, return_tensors=None, **kwargs
        )
        masks = output["assistant_masks"]
        media = {self.image_token_id, self.video_token_id, self.audio_token_id}  # media in an assistant turn is input
        output["labels"] = [
            [token if keep and token not in media else -100 for token, keep in zip(ids, mask)]
            for ids, mask in zip(output["input_ids"], masks)
        ]
        output.convert_to_tensors(tensor_type=return_tensors)
        return output


# `num_frames` of the `apply_chat_template` call in progress (None: the processor's own), read when its media are
# collected; a context variable, so that concurrent calls on one processor (threads, async tasks) never mix them
_CHAT_NUM_FRAMES = contextvars.ContextVar("unimoe_chat_num_frames", default=None)

CHAT_ROLES = ("system", "user", "assistant")
CHAT_BLOCK_TYPES = ("text", "image", "video", "audio")
# message fields that hold content Vicuna v1 has no place for
_UNRENDERED_MESSAGE_FIELDS = ("tool_calls", "reasoning_content", "reasoning", "thinking")
_ROLE_HINTS = {
    "human": "; use 'user' (LLaVA's 'human' and 'gpt' are the training rows' `from` names, which trl_scripts.training.data maps)",
    "gpt": "; use 'assistant' (LLaVA's 'human' and 'gpt' are the training rows' `from` names, which trl_scripts.training.data maps)",
    "tool": "; Uni-MoE was not trained with tool messages",
}
_BLOCK_HINTS = {
    "input_audio": "; give audio as {'type': 'audio', 'path' | 'url' | 'audio': ...}",
    "image_url": "; give an image as {'type': 'image', 'path' | 'url' | 'image': ...}",
}


class UniMoEChatContentTypeError(TypeError, ValueError):
    """A chat message, content block or text of the wrong type. A `ValueError` as well, like every other refused
    input, so that handlers of bad rows (`validate_dataset(skip_invalid=True)`, evaluation) catch it too."""


def check_chat_messages(messages, where: str = "", require_sources: bool = False) -> None:
    """Refuse a conversation that Uni-MoE's chat template (Vicuna v1) would drop content of or render wrongly:
    an empty conversation, a message that is not a dict, without a role or with a role other than 'system' (first
    message only), 'user' and 'assistant' (case-sensitive), tool calls or reasoning, content that is neither a
    string nor a list of blocks, a block without a type or of a type other than text, image, video and audio, a
    text block whose text is not a string, a block carrying what another kind of block holds (text on a media
    block, media or a 'path' / 'url' on a text block, a video on an image block...), a text block holding a media
    placeholder (`<image>`, `<video>`, `<audio>`: it would stand for no media item), a media block with two
    sources (of its type key, 'path' and 'url') and, with `require_sources` (the blocks' media are loaded), one
    with none. Missing or None content is an empty message, a None key no key. Errors name the message and block
    index, after `where` (e.g. "sample 1" or "row 7")."""
    prefix = f"{where}, " if where else ""
    if not isinstance(messages, (list, tuple)):
        raise UniMoEChatContentTypeError(f"{where or 'the conversation'}: a conversation is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where + ': ' if where else ''}the conversation is empty: it needs at least one message")
    for index, message in enumerate(messages):
        at = f"{prefix}message {index}"
        if not isinstance(message, dict):
            raise UniMoEChatContentTypeError(f"{at} is of type {type(message).__name__}, expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role is None:
            raise ValueError(f"{at} has no role (expected 'system', 'user' or 'assistant')")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            hint = _ROLE_HINTS.get(role.lower(), "") if isinstance(role, str) else ""
            if isinstance(role, str) and role.lower() in CHAT_ROLES:
                hint = f"; roles are case-sensitive: use {role.lower()!r}"
            raise ValueError(
                f"{at} has role {role!r}, which Uni-MoE's chat template does not support (it knows 'system', "
                f"'user' and 'assistant'){hint}"
            )
        if role == "system" and index > 0:
            raise ValueError(
                f"{at} is a system message after the first turn: Vicuna v1 has one system prompt, the first message"
            )
        for field in _UNRENDERED_MESSAGE_FIELDS:
            if message.get(field):
                raise ValueError(f"{at} has {field!r}, which Uni-MoE's chat template (Vicuna v1) has no format for")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise UniMoEChatContentTypeError(
                f"{at}: content is of type {type(content).__name__}, expected a str or a list of content blocks"
            )
        for number, block in enumerate(content):
            at_block = f"{at}, content block {number}"
            if not isinstance(block, dict):
                raise UniMoEChatContentTypeError(
                    f"{at_block} is of type {type(block).__name__}, expected a dict with a 'type' ({', '.join(CHAT_BLOCK_TYPES)})"
                )
            kind = block.get("type")
            if kind is None:
                raise ValueError(f"{at_block} has no 'type' (expected one of {', '.join(CHAT_BLOCK_TYPES)})")
            if not isinstance(kind, str) or kind not in CHAT_BLOCK_TYPES:
                raise ValueError(
                    f"{at_block} has type {kind!r}, which Uni-MoE does not support (it takes "
                    f"{', '.join(CHAT_BLOCK_TYPES)}){_BLOCK_HINTS.get(kind, '') if isinstance(kind, str) else ''}"
                )
            if kind == "text":
                if "text" not in block:
                    raise ValueError(f"{at_block} is a text block without 'text'")
                if not isinstance(block["text"], str):
                    raise UniMoEChatContentTypeError(f"{at_block}: text must be a str, got {type(block['text']).__name__}")
                typed = next((kind for kind in ("image", "video", "audio") if f"<{kind}>" in block["text"]), None)
                if typed is not None:  # it would stand for no media item (the chat template refuses it too)
                    raise ValueError(
                        f"{at_block}: its text holds the placeholder <{typed}>, which stands for media; send the {typed} "
                        f"as a content block of type '{typed}'"
                    )
            elif block.get("text") is not None:
                raise ValueError(f"{at_block}: {kind} blocks carry no text (it would be dropped); put it in a text block")
            _check_block_sources(block, kind, at_block, require_sources)


_MEDIA_SOURCE_KEYS = ("image", "video", "audio", "path", "url")


def _block_sources(block: dict) -> list[str]:
    """The keys of `block` that give media: None and "" give none (`datasets` fills missing keys with None)."""
    return [key for key in _MEDIA_SOURCE_KEYS if not (block.get(key) is None or isinstance(block[key], str) and not block[key])]


def _check_block_sources(block: dict, kind: str, at_block: str, require_sources: bool) -> None:
    """A text block holds no media; a media block exactly one source, of its own type key, 'path' and 'url'."""
    present = _block_sources(block)
    foreign = [key for key in present if key in CHAT_BLOCK_TYPES and key != kind]
    if foreign:
        advice = "give each image, video and audio its own block of that type"
        raise ValueError(f"{at_block}: {kind} blocks carry no {foreign[0]!r} (it would be dropped); {advice}")
    if kind == "text":
        if present:
            raise ValueError(
                f"{at_block}: text blocks carry no {present[0]!r} (it would be dropped); give media their own block, "
                "e.g. {'type': 'image', 'path': ...}"
            )
        return
    expected = f"exactly one of {kind!r}, 'path' or 'url'"
    if len(present) > 1:
        raise ValueError(f"{at_block}: {kind} block with {' and '.join(map(repr, present))}: it takes {expected}")
    if require_sources and not present:
        raise ValueError(f"{at_block}: {kind} block without its {kind}: it takes {expected} (None or '' is none)")


UniMoEProcessor.register_for_auto_class("AutoProcessor")
