"""Training and publishing side of Uni-MoE: presets, upcycling, backbones, the quickstart (imports `modeling_unimoe`)."""

from .presets import PRESETS_DIR, load_preset, load_tiny_processor
from .upcycling import upcycle_llama


__all__ = ["PRESETS_DIR", "load_preset", "load_tiny_processor", "upcycle_llama"]
