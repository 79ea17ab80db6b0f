"""Tiny models built from the `tiny` preset, and random token ids."""

import torch

from modeling_unimoe import UniMoEForCausalLM, UniMoETextForCausalLM
from trl_scripts import load_preset


def make_tiny_model(seed: int = 0, text_only: bool = True, **text_overrides) -> UniMoEForCausalLM:
    """The `tiny` preset, by default without its towers (the language-model tests need none)."""
    torch.manual_seed(seed)
    return UniMoEForCausalLM(load_preset("tiny", text_only=text_only, **text_overrides)).eval()


def make_tiny_text_model(seed: int = 0, **text_overrides) -> UniMoETextForCausalLM:
    """The `tiny` preset's language model in the flat text-only layout; the same weights as
    `make_tiny_model(seed, **text_overrides)` (the same initialisation order)."""
    torch.manual_seed(seed)
    return UniMoETextForCausalLM(load_preset("tiny", text_only=True, **text_overrides).text_config).eval()


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)
