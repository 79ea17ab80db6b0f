"""Training and publishing side of Uni-MoE: presets, upcycling, backbones, the quickstart (imports `modeling_unimoe`).

The public names load their submodule on first use (module `__getattr__`): importing the package imports none of
its submodules, so that `python -m trl_scripts.<tool>` runs a module that is not already imported (runpy would
warn, and the tool would run as a second copy of the module)."""

import importlib


_EXPORTS = {
    "PRESETS_DIR": "presets",
    "load_preset": "presets",
    "load_tiny_processor": "presets",
    "upcycle_llama": "upcycling",
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
