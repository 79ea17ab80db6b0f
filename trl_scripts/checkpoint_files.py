"""Reading one state-dict file (`.safetensors`, or a `.bin` written by `torch.save`), for the tools that take weight
files as they are: `unimoe-convert-original` (the original release's pieces), `unimoe-upcycle --expert_ffns` and
`unimoe-train --stage 3` (stage 2's expert files).

Shared by conversion/ and training/, so it sits beside them; transformers' reader is imported when a file is read."""

from pathlib import Path

import torch


WEIGHTS_ONLY_REFUSAL = "WeightsUnpickler error:"


def _reason(error: Exception) -> str:
    """`error` in one line: its first line, or, for torch's many-line refusal under `weights_only=True` (a corrupt
    file, or a pickle of objects other than weights), what it refused, without its advice to load the file unsafely."""
    text = " ".join(str(error).split())
    if WEIGHTS_ONLY_REFUSAL not in text:
        return str(error).strip().split("\n")[0]
    refused = text.split(WEIGHTS_ONLY_REFUSAL)[1].split(" Please use ")[0].split(" Check the documentation")[0]
    return f"not a pickle of weights only ({refused.strip()})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, read by transformers' own reader (`transformers.modeling_utils.load_state_dict`: on
    the CPU, `weights_only=True`, zip-format `.bin` files memory-mapped, so a checkpoint of many gigabytes costs no RAM
    until its tensors are used). Checked, each a one-line `ValueError` naming the file: the file reads (a missing,
    truncated or corrupt file, a pickle of objects other than weights), and it holds a dict of tensors."""
    from transformers.modeling_utils import load_state_dict

    try:
        state = load_state_dict(path, map_location="cpu", weights_only=True)
    except Exception as error:  # OS, pickle, zip, EOF, safetensors and runtime errors all mean the same: unreadable
        raise ValueError(f"Cannot read checkpoint file {path}: {type(error).__name__}: {_reason(error)}") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        kind = type(state).__name__
        if isinstance(state, dict):
            kind += " with " + ", ".join(sorted({type(value).__name__ for value in state.values()}))
        raise ValueError(f"Checkpoint file {path} does not hold a state dict of tensors (got {kind})")
    return state
