"""Audio features for Uni-MoE: Whisper log-mel and/or BEATs Kaldi fbank, per 30 s window, in one feature extractor."""

import logging
import math

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_unimoe import AUDIO_TOWERS
from .feature_extraction_beats import beats_constant_frame_fbank, beats_fbank, beats_frame_padding_mask, beats_num_frames


logger = logging.getLogger(__name__)


class UniMoEFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Cuts each audio item (mono, 16 kHz) into consecutive windows of `window_seconds` (30 s, Whisper's window, unless
    the model's Whisper reads shorter ones) and computes, per window, the inputs of every audio tower in
    `audio_towers` (shapes for 30 s windows):

    - `"whisper"`: `input_features` [windows, num_mel_bins, 3000], Whisper's log-mel spectrogram (zero-padded to the
      window), and `input_features_mask` [windows, 3000], 1 on frames of real audio;
    - `"beats"`: `input_values` [windows, 2998, 128], BEATs' normalised Kaldi fbank (the last window padded by
      repeating its last sample, as the original did) and `input_values_mask` [windows, 2998], 1 on real frames.

    `audio_windows` lists the window count of each item: the processor expands each `<audio>` placeholder to
    `windows * num_query_tokens * len(audio_towers)` tokens. An item longer than `max_audio_windows` windows is an
    error unless `truncation=True`, which keeps the first windows and logs a warning saying how much was cut.

    `window_stride` (samples, default: the window length) is the distance between window starts. The original
    Uni-MoE sliced `window length + 1` samples and cut each slice to the window length (`Uni_MoE_speech` data loading),
    so converted original checkpoints use `window_stride = window length + 1`; new models keep every sample.
    """

    model_input_names = ["input_features", "input_features_mask", "input_values", "input_values_mask"]

    def __init__(
        self,
        audio_towers: list[str] = ("whisper",),
        num_mel_bins: int = 80,
        sampling_rate: int = 16000,
        window_seconds: int = 30,
        max_audio_windows: int = 20,
        padding_value: float = 0.0,
        window_stride: int | None = None,
        **kwargs,
    ):
        kwargs.pop("feature_size", None)  # derived from num_mel_bins (present when reloading a saved config)
        super().__init__(feature_size=num_mel_bins, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        unknown = [tower for tower in audio_towers if tower not in AUDIO_TOWERS]
        if unknown or not audio_towers:
            raise ValueError(f"audio_towers={list(audio_towers)!r}: expected a non-empty list from {AUDIO_TOWERS}")
        self.audio_towers = list(audio_towers)
        self.num_mel_bins = num_mel_bins
        self.window_seconds = window_seconds
        self.max_audio_windows = max_audio_windows
        if window_stride is not None and window_stride < self.window_seconds * sampling_rate:
            raise ValueError(
                f"window_stride={window_stride} samples is shorter than a window ({self.window_seconds * sampling_rate}): "
                "windows would overlap"
            )
        self.window_stride = window_stride
        self._whisper = WhisperFeatureExtractor(
            feature_size=num_mel_bins, sampling_rate=sampling_rate, chunk_length=window_seconds
        )

    def to_dict(self):
        output = super().to_dict()
        output.pop("_whisper", None)
        return output

    @property
    def window_samples(self) -> int:
        return self.window_seconds * self.sampling_rate

    @property
    def stride_samples(self) -> int:
        """Samples from one window's start to the next: the window length by default (every sample in exactly one
        window). Converted original checkpoints use the window length + 1, as the original sliced (each slice then
        cut to the window length, so one sample per window is dropped): `convert_original` sets it."""
        return self.window_stride or self.window_samples

    def num_windows(self, num_samples: int) -> int:
        return max(1, math.ceil(num_samples / self.stride_samples))

    def _windows(self, waveform: np.ndarray, index: int, truncation: bool) -> list[np.ndarray]:
        if waveform.ndim != 1:
            raise ValueError(f"audio item {index}: expected a mono 1-D waveform, got shape {tuple(waveform.shape)}")
        if waveform.size == 0:
            raise ValueError(f"audio item {index} is empty (0 samples)")
        windows = [waveform[start : start + self.window_samples] for start in range(0, waveform.size, self.stride_samples)]
        if len(windows) > self.max_audio_windows:
            seconds = waveform.size / self.sampling_rate
            limit = self.max_audio_windows * self.window_seconds
            if not truncation:
                raise ValueError(
                    f"audio item {index} lasts {seconds:.1f} s ({len(windows)} windows of {self.window_seconds} s), "
                    f"more than max_audio_windows={self.max_audio_windows} ({limit} s); pass truncation=True to keep "
                    f"only the first {limit} s"
                )
            logger.warning("audio item %d: %.1f s truncated to the first %d s (%d windows)", index, seconds, limit, self.max_audio_windows)
            windows = windows[: self.max_audio_windows]
        return windows

    def _beats_window_fbank(self, window: np.ndarray) -> torch.Tensor:
        """BEATs fbank of one window padded to the window length by repeating its last sample (the original's padding).

        Frames that start after the real samples see only that constant, which the fbank maps to one fixed vector
        (DC removal zeroes the frame): compute the frames touching real samples and fill the rest with that vector,
        instead of running the fbank over the padding.
        """
        frames = beats_num_frames(self.window_samples)
        shift, length = self.sampling_rate // 100, self.sampling_rate // 40  # 10 ms hop, 25 ms frames
        real_frames = min(frames, (len(window) - 1) // shift + 1)
        if real_frames == frames:
            return beats_fbank(np.pad(window, (0, self.window_samples - len(window)), mode="edge"), self.sampling_rate)
        needed = (real_frames - 1) * shift + length
        head = beats_fbank(np.pad(window, (0, max(0, needed - len(window))), mode="edge")[:needed], self.sampling_rate)
        constant = beats_constant_frame_fbank(float(window[-1]))  # [1, bins]
        return torch.cat([head, constant.expand(frames - real_frames, -1)])

    def __call__(
        self,
        audio: np.ndarray | list[np.ndarray],
        sampling_rate: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"UniMoEFeatureExtractor expects {self.sampling_rate} Hz audio, got sampling_rate={sampling_rate}; "
                "resample first (the processor does this for files and arrays it is given with their rate)"
            )
        items = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
        windows, counts, valid = [], [], []
        for index, item in enumerate(items):
            item_windows = self._windows(np.asarray(item, dtype=np.float32), index, truncation)
            windows.extend(item_windows)
            counts.append(len(item_windows))
            valid.extend(len(window) for window in item_windows)

        features = {"audio_windows": counts}
        if "whisper" in self.audio_towers:
            mel = self._whisper(windows, sampling_rate=self.sampling_rate, return_tensors="np")
            features["input_features"] = mel["input_features"]  # [windows, mel, 100 * window_seconds]
            hop = self._whisper.hop_length
            frames = mel["input_features"].shape[-1]
            real = np.minimum(frames, np.ceil(np.asarray(valid) / hop).astype(np.int64))
            features["input_features_mask"] = (np.arange(frames)[None, :] < real[:, None]).astype(np.int64)  # 1 = real
        if "beats" in self.audio_towers:
            frames = beats_num_frames(self.window_samples)
            features["input_values"] = torch.stack([self._beats_window_fbank(w) for w in windows]).numpy()
            # the original's rule: a sample-level padding mask reduced to frames (`beats_frame_padding_mask`)
            sample_padding = np.arange(self.window_samples)[None, :] >= np.asarray(valid)[:, None]
            frame_padding = beats_frame_padding_mask(sample_padding, frames).numpy()
            features["input_values_mask"] = (~frame_padding).astype(np.int64)  # 1 = real frame
        return BatchFeature(features, tensor_type=return_tensors)


UniMoEFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
