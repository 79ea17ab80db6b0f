"""BEATs input features: the Kaldi log-mel filter bank of `torchaudio.compliance.kaldi.fbank`, without torchaudio.

BEATs (`BEATs.preprocess`) scales the 16 kHz waveform by 2**15, takes a 128-bin Kaldi fbank with torchaudio's
defaults (25 ms povey-windowed frames every 10 ms, no dither, DC offset removed, pre-emphasis 0.97, 512-point FFT power
spectrum, mel filters from 20 Hz to Nyquist triangular in Kaldi's mel scale, natural log floored at float32 epsilon,
`snip_edges=True`) and normalises it with `(fbank - 15.41663) / (2 * 6.55582)`. This module computes the same numbers
with `transformers.audio_utils`, as `ASTFeatureExtractor` does when torchaudio is missing, except on constant frames
(edge padding): there torchaudio's float32 DC removal leaves a residual that exact arithmetic does not, and
`beats_constant_frame_fbank` reproduces it.
"""

import warnings
from functools import lru_cache

import numpy as np
import torch
from transformers.audio_utils import spectrogram, window_function

from .transformers_compat import float64_mel_filter_bank


BEATS_SAMPLING_RATE = 16000
BEATS_NUM_MEL_BINS = 128
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582

_FRAME_LENGTH = 400  # 25 ms at 16 kHz
_FRAME_SHIFT = 160  # 10 ms at 16 kHz
_FFT_LENGTH = 512  # Kaldi pads each frame to the next power of two
_LOG_FLOOR = float(np.finfo(np.float32).eps)  # torchaudio floors the mel energies at torch.finfo(float32).eps


@lru_cache(maxsize=1)
def _kaldi_mel_filters() -> np.ndarray:
    # [fft_length // 2 + 1, mel bins]; the Nyquist row is zero, as Kaldi's banks only cover fft_length // 2 bins.
    # With 128 bins some low filters fall between two FFT bins and are all zero, in Kaldi too: silence the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float64_mel_filter_bank(
            num_frequency_bins=_FFT_LENGTH // 2 + 1,
            num_mel_filters=BEATS_NUM_MEL_BINS,
            min_frequency=20.0,
            max_frequency=BEATS_SAMPLING_RATE / 2,
            sampling_rate=BEATS_SAMPLING_RATE,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )


@lru_cache(maxsize=1)
def _povey_window() -> np.ndarray:
    return window_function(_FRAME_LENGTH, "povey", periodic=False)


def beats_num_frames(num_samples: int) -> int:
    """Fbank frames of a waveform of `num_samples` samples (Kaldi `snip_edges=True`: whole frames only)."""
    if num_samples < _FRAME_LENGTH:
        return 0
    return 1 + (num_samples - _FRAME_LENGTH) // _FRAME_SHIFT


_PREEMPHASIS = 0.97


def _normalised_log_mel(waveform: np.ndarray, remove_dc_offset: bool = True) -> np.ndarray:
    """Normalised log-mel `[frames, 128]` of a float32 waveform in [-1, 1]: `transformers.audio_utils.spectrogram` with
    Kaldi's settings (`reference_log_mel` below), computed on all frames at once. `spectrogram` runs its per-frame
    steps in a Python loop (about 14 ms for a 4 s window on one core, the largest part of an audio row's collation);
    these are the same float64 operations in the same order, array-wide, so the result is equal bit for bit
    (`tests/models/test_modeling_beats.py` checks it against `spectrogram`)."""
    amplitudes = (waveform * 2**15).astype(np.float64)  # Kaldi works on 16-bit integer amplitudes
    frames = np.lib.stride_tricks.sliding_window_view(amplitudes, _FRAME_LENGTH)[::_FRAME_SHIFT]  # [frames, 400]
    buffer = np.zeros((frames.shape[0], _FFT_LENGTH))  # each frame zero-padded to the FFT length
    buffer[:, :_FRAME_LENGTH] = frames
    if remove_dc_offset:
        buffer[:, :_FRAME_LENGTH] = frames - frames.mean(axis=1, keepdims=True)
    buffer[:, 1:_FRAME_LENGTH] -= _PREEMPHASIS * buffer[:, : _FRAME_LENGTH - 1]
    buffer[:, 0] *= 1 - _PREEMPHASIS
    buffer[:, :_FRAME_LENGTH] *= _povey_window().astype(np.float64)
    spectrum = np.fft.rfft(buffer, axis=-1).astype(np.complex64)  # [frames, 257], stored as `spectrogram` stores it
    power = np.abs(spectrum, dtype=np.float64) ** 2.0
    mel = np.maximum(_LOG_FLOOR, np.dot(_kaldi_mel_filters().T, power.T))  # [128, frames]
    log_mel = np.asarray(np.log(mel), np.float32).T
    return (log_mel - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


def reference_log_mel(waveform: np.ndarray, remove_dc_offset: bool = True) -> np.ndarray:
    """`_normalised_log_mel` through transformers' frame-by-frame `spectrogram`: the definition it must equal."""
    log_mel = spectrogram(
        waveform * 2**15,
        _povey_window(),
        frame_length=_FRAME_LENGTH,
        hop_length=_FRAME_SHIFT,
        fft_length=_FFT_LENGTH,
        power=2.0,
        center=False,
        preemphasis=_PREEMPHASIS,
        remove_dc_offset=remove_dc_offset,
        mel_filters=_kaldi_mel_filters(),
        mel_floor=_LOG_FLOOR,
        log_mel="log",
        dtype=np.float32,
    ).T  # [frames, mel bins]
    return (log_mel - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


def beats_constant_frame_fbank(value: float) -> torch.Tensor:
    """Normalised fbank `[1, 128]` of a frame whose 400 samples all hold `value` (in [-1, 1]), such as every frame of
    the edge padding (the last sample repeated) that BEATs windows are padded with.

    Exact arithmetic removes such a frame's DC offset to zero, leaving every bin at the log floor. torchaudio's fbank,
    which BEATs was trained with and the original used, subtracts the frame's float32 `torch.mean`; for most values
    that mean is off by a few ulps, and the constant residual reaches the low mel bins (up to about 0.7 normalised
    units above the floor). This computes the residual with the same float32 `torch.mean`, then the rest of the fbank.
    """
    return torch.from_numpy(_constant_frame_log_mel(float(value)).copy())


@lru_cache(maxsize=64)
def _constant_frame_log_mel(value: float) -> np.ndarray:
    frame = torch.full((1, _FRAME_LENGTH), value, dtype=torch.float32) * 2**15
    residual = (frame - frame.mean(dim=1, keepdim=True))[0].numpy().astype(np.float64) / 2**15
    return _normalised_log_mel(residual, remove_dc_offset=False)


def _fbank_one(waveform: np.ndarray) -> np.ndarray:
    features = _normalised_log_mel(waveform)
    frames = np.lib.stride_tricks.sliding_window_view(waveform, _FRAME_LENGTH)[::_FRAME_SHIFT]  # [frames, 400] view
    constant = frames.min(axis=1) == frames.max(axis=1)
    for value in np.unique(frames[constant, 0]):
        features[constant & (frames[:, 0] == value)] = _constant_frame_log_mel(float(value))
    return features


def beats_fbank(waveform: np.ndarray | torch.Tensor, sampling_rate: int = BEATS_SAMPLING_RATE) -> torch.Tensor:
    """Normalised 128-bin Kaldi fbank of a mono waveform in [-1, 1], BEATs' `input_values`.

    `waveform` is `[samples]` (returns `[frames, 128]`) or a batch of equal-length waveforms `[batch, samples]`
    (returns `[batch, frames, 128]`), with `frames = 1 + (samples - 400) // 160`: 2998 for a 30 s window.
    """
    if sampling_rate != BEATS_SAMPLING_RATE:
        raise ValueError(
            f"BEATs expects {BEATS_SAMPLING_RATE} Hz audio, got sampling_rate={sampling_rate}; resample first."
        )
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim not in (1, 2):
        raise ValueError(f"`waveform` must be [samples] or [batch, samples], got shape {waveform.shape}.")
    if waveform.shape[-1] < _FRAME_LENGTH:
        raise ValueError(f"`waveform` has {waveform.shape[-1]} samples; one 25 ms frame needs {_FRAME_LENGTH}.")
    if waveform.ndim == 1:
        return torch.from_numpy(_fbank_one(waveform))
    return torch.from_numpy(np.stack([_fbank_one(row) for row in waveform]))


def beats_frame_padding_mask(padding_mask: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
    """Sample-level padding mask `[batch, samples]` (True = padding) -> fbank-frame mask `[batch, num_frames]`.

    The official rule (`BEATs.forward_padding_mask`): drop the last `samples % num_frames` samples, cut the rest into
    `num_frames` equal consecutive groups, and call a frame padding when its whole group is padding.
    """
    padding_mask = torch.as_tensor(padding_mask, dtype=torch.bool)
    if padding_mask.ndim != 2:
        raise ValueError(f"`padding_mask` must be [batch, samples], got shape {tuple(padding_mask.shape)}.")
    batch, samples = padding_mask.shape
    if not 0 < num_frames <= samples:
        raise ValueError(f"`num_frames`={num_frames} must be between 1 and the {samples} samples of `padding_mask`.")
    usable = samples - samples % num_frames
    return padding_mask[:, :usable].reshape(batch, num_frames, -1).all(dim=-1)


__all__ = ["beats_constant_frame_fbank", "beats_fbank", "beats_frame_padding_mask", "beats_num_frames"]
