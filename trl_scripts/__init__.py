"""Everything that drives the model (imports `modeling_unimoe`, never the other way), one sub-package per task:
`training/`, `conversion/`, `hub/`, `evaluation/`, `serving/`, `quickstart/`. Shared by several rooms: `loading` (a
checkpoint and its processor for a tool), `checkpoint_files` (one state-dict file), `console` (what the command lines
share). The thin entry modules here (`train`, `evaluate`, `serve`, ...) keep `python -m trl_scripts.<tool>` short.

The public names load their submodule on first use (module `__getattr__`): importing the package imports none of
its submodules, so that `python -m trl_scripts.<tool>` runs a module that is not already imported (runpy would
warn, and the tool would run as a second copy of the module)."""

import importlib


_EXPORTS = {
    "PRESETS_DIR": "training.presets",
    "load_preset": "training.presets",
    "load_tiny_processor": "training.presets",
    "upcycle_llama": "training.upcycling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
