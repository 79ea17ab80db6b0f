"""Uni-MoE processor: chat messages with images, videos and audio -> the model's inputs.

Media may be given decoded (PIL images, arrays, waveforms) or as local file paths; files are decoded here (images
with Pillow, video and audio with PyAV) and every failure names the file. Each `<image>`, `<video>` and `<audio>`
placeholder is expanded to exactly the number of soft tokens the model scatters in its place.
"""

import bisect
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


def _array_to_image(array: np.ndarray, index: int) -> Image.Image:
    """[H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4), uint8 or float in [0, 1] -> PIL."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"image {index}: expected an [H, W], [H, W, C] or [C, H, W] array, got shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).round()
    return Image.fromarray(array.astype(np.uint8))


def _as_numpy(value):
    """torch tensors -> numpy (leaves everything else alone)."""
    return value.detach().cpu().float().numpy() if hasattr(value, "detach") else value


def load_image(image, index: int):
    """A PIL image from a PIL image, an array or tensor ([H, W], [H, W, C] or [C, H, W]) or a file path."""
    if isinstance(image, Image.Image):
        return image
    image = _as_numpy(image)
    if isinstance(image, np.ndarray):
        return _array_to_image(image, index)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"image {index}: cannot read image file {str(image)!r} ({error})") from error
    raise TypeError(f"image {index}: expected a PIL image, an array or a file path, got {type(image).__name__}")


def _sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly over `total` frames (repeating frames when the clip is shorter)."""
    return [min(total - 1, math.floor((i + 0.5) * total / num_frames)) for i in range(num_frames)]


def _decode_video_frames(path: str, num_frames: int, index: int) -> list[np.ndarray]:
    """Decode every frame (inter-frame codecs need it) but convert to RGB only the `num_frames` sampled ones; the
    frame count comes from the container, with a full second pass when the container's count was wrong."""
    import av

    def decode(wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
        kept, count = {}, 0
        with av.open(path) as container:
            for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
                if wanted is None or count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        return kept, count

    try:
        with av.open(path) as container:
            declared = container.streams.video[0].frames
        wanted = _sample_indices(declared, num_frames) if declared > 0 else None
        kept, total = decode(set(wanted) if wanted else None)
        if total > 0 and (wanted is None or total != declared):
            wanted = _sample_indices(total, num_frames)
            if not set(wanted) <= kept.keys():
                kept, total = decode(set(wanted))
    except (av.error.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"video {index}: cannot decode video file {path!r} ({error})") from error
    return [kept[i] for i in wanted] if total > 0 else []


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
    """`num_frames` RGB frames [H, W, 3] sampled uniformly from a video file (PyAV), from given frames, or from frame
    image files (`is_frame_paths`; only the sampled files are read)."""
    if isinstance(video, (str, os.PathLike)):
        frames = _decode_video_frames(str(video), num_frames, index)
        if not frames:
            raise ValueError(f"video {index}: video file {str(video)!r} has no frames")
        return frames
    if is_frame_paths(video):
        paths = [video[i] for i in _sample_indices(len(video), num_frames)]
        frames = {}
        for path in dict.fromkeys(paths):
            try:
                frames[path] = np.asarray(load_image(path, index).convert("RGB"))
            except ValueError as error:
                raise ValueError(f"video {index}: cannot read frame file {str(path)!r} ({error.__cause__ or error})") from error
        return [frames[path] for path in paths]
    frames = [np.asarray(load_image(frame, index).convert("RGB")) for frame in _as_numpy(video)]
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


def _resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return waveform
    import av

    frame = av.AudioFrame.from_ndarray(waveform[None].astype(np.float32), format="fltp", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    chunks = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def load_audio(audio, sampling_rate: int, index: int, given_rate: int | None = None) -> np.ndarray:
    """A mono float32 waveform at `sampling_rate` from a file path (PyAV), a `(waveform, rate)` pair, a
    `{"array", "sampling_rate"}` dict (the `datasets` Audio format) or an array at `given_rate` (default: already
    at `sampling_rate`). Stereo is averaged to mono; other rates are resampled."""
    if isinstance(audio, (str, os.PathLike)):
        import av

        try:
            with av.open(str(audio)) as container:
                # decode to planar float [channels, samples] at the target rate, whatever the file's format
                resampler = av.AudioResampler(format="fltp", rate=sampling_rate)
                chunks = []
                for frame in container.decode(container.streams.audio[0]):
                    chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except (av.error.FFmpegError, IndexError, OSError) as error:
            raise ValueError(f"audio {index}: cannot decode audio file {str(audio)!r} ({error})") from error
        if not chunks:
            raise ValueError(f"audio {index}: audio file {str(audio)!r} is empty")
        waveform = _to_mono(np.concatenate(chunks, axis=1), index)
        if waveform.size == 0:
            raise ValueError(f"audio {index}: audio file {str(audio)!r} is empty")
        return waveform.astype(np.float32)
    if isinstance(audio, dict):
        waveform, rate = np.asarray(audio["array"], dtype=np.float32), audio["sampling_rate"]
    elif isinstance(audio, tuple):
        waveform, rate = np.asarray(audio[0], dtype=np.float32), audio[1]
    else:
        waveform, rate = np.asarray(_as_numpy(audio), dtype=np.float32), given_rate or sampling_rate
    waveform = _to_mono(waveform, index)
    if waveform.size == 0:
        raise ValueError(f"audio {index} is empty (0 samples)")
    return _resample(waveform, int(rate), sampling_rate)


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_array(x, *ndims: int) -> bool:
    return (isinstance(x, np.ndarray) or hasattr(x, "detach")) and x.ndim in ndims


def _is_image(x) -> bool:
    return _is_path(x) or isinstance(x, Image.Image) or _is_array(x, 2, 3)


def _is_video(x) -> bool:
    """A path, a [frames, H, W, C] or [frames, C, H, W] array or tensor, a sequence of frames (images), or a
    sequence of frame image files (`is_frame_paths`)."""
    if _is_path(x) or _is_array(x, 4) or is_frame_paths(x):
        return True
    return isinstance(x, (list, tuple)) and all(_is_image(f) and not _is_path(f) for f in x)


def _is_audio(x) -> bool:
    """A path, a waveform array or tensor ([samples] or with a channel axis), a `(waveform, rate)` pair or a
    `{"array", "sampling_rate"}` dict."""
    if isinstance(x, tuple):
        return len(x) == 2 and _is_array(x[0], 1, 2) and isinstance(x[1], (int, float))
    return _is_path(x) or isinstance(x, dict) or _is_array(x, 1, 2)


_IS_ITEM = {"image": _is_image, "video": _is_video, "audio": _is_audio}


class UniMoEProcessor(ProcessorMixin):
    r"""
    Tokenizer + CLIP image processor + [`UniMoEFeatureExtractor`] for Uni-MoE.

    image_seq_length (`int`): soft tokens per image (576 for CLIP ViT-L/14 at 336 px: (336/14)^2).
    num_frames (`int`): frames sampled uniformly from each video.
    video_pooling (`str`): `"mean"` (a video costs one image's tokens) or `"none"` (`num_frames` times that).
    num_query_tokens (`int`): audio tokens per audio window and audio tower.
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
        **kwargs,
    ):
        self.image_seq_length = image_seq_length
        self.num_frames = num_frames
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

    @property
    def video_seq_length(self) -> int:
        return self.image_seq_length * (1 if self.video_pooling == "mean" else self.num_frames)

    def audio_seq_length(self, windows: int) -> int:
        return windows * self.num_query_tokens * len(self.feature_extractor.audio_towers)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos", *self.feature_extractor.model_input_names]

    def _per_sample(self, media, counts: list[int], modality: str) -> list[list]:
        """Media given flat (in placeholder order across the batch) or nested per sample -> per-sample lists, with
        the count of each sample checked against its placeholders."""
        is_item = _IS_ITEM[modality]
        if media is None or (isinstance(media, (list, tuple)) and len(media) == 0):
            media = []
        elif is_item(media):
            media = [media]
        nested = (
            not all(is_item(item) for item in media)
            and len(media) == len(counts)
            and all(isinstance(items, (list, tuple)) and all(is_item(x) for x in items) for items in media)
        )
        if nested:
            for sample, (items, count) in enumerate(zip(media, counts)):
                if len(items) != count:
                    raise ValueError(
                        f"sample {sample}: {count} {modality} placeholder(s) in the text but {len(items)} {modality} item(s) given"
                    )
            return [list(items) for items in media]
        if len(media) != sum(counts):
            per_sample = ", ".join(f"sample {i}: {c}" for i, c in enumerate(counts))
            raise ValueError(
                f"{sum(counts)} {modality} placeholder(s) in the text ({per_sample}) but {len(media)} {modality} item(s) given"
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
        """`truncation` only applies to audio past `max_audio_windows` (text and media blocks are never cut);
        `num_frames` overrides the frames sampled per video for this call."""
        if text is None:
            raise ValueError("UniMoEProcessor needs `text` with one placeholder per image, video and audio item")
        unsupported = sorted(set(kwargs) - self._TOKENIZER_OPTIONS)
        if unsupported:
            raise ValueError(
                f"UniMoEProcessor does not support the option(s) {unsupported}; it takes text, images, videos, audio, "
                f"sampling_rate, truncation, num_frames, return_tensors and the tokenizer options {sorted(self._TOKENIZER_OPTIONS)}"
            )
        num_frames = num_frames or self.num_frames
        texts = [text] if isinstance(text, str) else list(text)
        counts = {
            token: [sample.count(token) for sample in texts] for token in (self.image_token, self.video_token, self.audio_token)
        }
        images = self._per_sample(images, counts[self.image_token], "image")
        videos = self._per_sample(videos, counts[self.video_token], "video")
        audios = self._per_sample(audio, counts[self.audio_token], "audio")

        data = {}
        flat_images = [load_image(image, i) for i, image in enumerate(item for sample in images for item in sample)]
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="np")["pixel_values"]
        flat_videos = [load_video(video, num_frames, i) for i, video in enumerate(v for sample in videos for v in sample)]
        if flat_videos:
            frames = [frame for video in flat_videos for frame in video]
            pixels = self.image_processor(frames, return_tensors="np")["pixel_values"]
            data["pixel_values_videos"] = pixels.reshape(len(flat_videos), num_frames, *pixels.shape[1:])
        audio_windows = []
        flat_audio = [
            load_audio(item, self.feature_extractor.sampling_rate, i, sampling_rate)
            for i, item in enumerate(a for sample in audios for a in sample)
        ]
        if flat_audio:
            features = self.feature_extractor(flat_audio, truncation=truncation, return_tensors="np")
            audio_windows = list(features.pop("audio_windows"))
            data.update(features)

        expanded, replacement_offsets = self._expand_placeholders(texts, audio_windows, num_frames)
        return_offsets = kwargs.pop("return_offsets_mapping", False)
        encoding = self.tokenizer(
            expanded, return_offsets_mapping=return_offsets, add_special_tokens=kwargs.pop("add_special_tokens", True), **kwargs
        )
        self._check_lengths(encoding["input_ids"], texts)
        data.update(encoding)
        if return_text_replacement_offsets:  # where each placeholder expansion landed, for assistant masks
            data["text_replacement_offsets"] = replacement_offsets
        return BatchFeature(data, tensor_type=return_tensors)

    def _expand_placeholders(
        self, texts: list[str], audio_windows: list[int], num_frames: int
    ) -> tuple[list[str], list[list[dict]]]:
        """Each placeholder -> its exact soft-token count; also where every expansion landed (for assistant masks)."""
        audio_iter = iter(audio_windows)
        video_length = self.image_seq_length * (1 if self.video_pooling == "mean" else num_frames)
        lengths = {self.image_token: self.image_seq_length, self.video_token: video_length}
        expanded, offsets = [], []
        for text in texts:
            pieces, sample_offsets, position, new_length = [], [], 0, 0
            while True:
                found = [(text.find(token, position), token) for token in lengths.keys() | {self.audio_token}]
                found = [(start, token) for start, token in found if start >= 0]
                if not found:
                    pieces.append(text[position:])
                    break
                start, token = min(found)
                pieces.append(text[position:start])
                new_length += start - position
                repeat = self.audio_seq_length(next(audio_iter)) if token == self.audio_token else lengths[token]
                replacement = token * repeat
                pieces.append(replacement)
                sample_offsets.append({"span": (start, start + len(token)), "new_span": (new_length, new_length + len(replacement))})
                new_length += len(replacement)
                position = start + len(token)
            expanded.append("".join(pieces))
            offsets.append(sample_offsets)
        return expanded, offsets

    def _check_lengths(self, input_ids, texts: list[str]):
        limit = self.tokenizer.model_max_length
        for sample, ids in enumerate(input_ids):
            if len(ids) > limit:
                media = {
                    name: texts[sample].count(token)
                    for name, token in (("images", self.image_token), ("videos", self.video_token), ("audio", self.audio_token))
                }
                raise ValueError(
                    f"sample {sample} is {len(ids)} tokens long after expanding its media "
                    f"({', '.join(f'{n} {name}' for name, n in media.items())}), more than the model maximum of {limit}; "
                    "shorten the text or pass fewer media items (media blocks are never cut)"
                )

    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        """Collect media from chat messages as given (paths stay paths): `__call__` decodes them, naming any bad file."""
        batch_images, batch_videos, batch_audios = [], [], []
        for conversation in conversations:
            images, videos = [], []
            for message in conversation:
                content = message.get("content")
                if isinstance(content, str) or not content:
                    continue
                for block in content:
                    sources = [block[key] for key in (block["type"], "path", "url") if key in block and key != "text"]
                    if block["type"] == "image":
                        images.extend(sources)
                    elif block["type"] == "video":
                        videos.extend(sources)
                    elif block["type"] == "audio":
                        batch_audios.extend(sources)
            batch_images.append(images)
            batch_videos.append(videos)
        return batch_images, batch_videos, batch_audios, {}

    def apply_chat_template(self, conversation, chat_template=None, return_labels: bool = False, **kwargs):
        """`ProcessorMixin.apply_chat_template`; with `tokenize=True, return_dict=True, return_labels=True` it also
        returns `labels`: the input ids on assistant replies (found from character offsets of the template's
        generation blocks), -100 everywhere else."""
        if not return_labels:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if not (kwargs.get("tokenize") and kwargs.get("return_dict")):
            raise ValueError("return_labels=True needs tokenize=True and return_dict=True")
        return_tensors = kwargs.pop("return_tensors", "pt")
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


UniMoEProcessor.register_for_auto_class("AutoProcessor")
