"""Tiny models built from the `tiny` preset, random token ids, and a batch of images and a video for them."""

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


TINY_IMAGE_PATCHES = 16  # the tiny preset's CLIP: 28 px images, 7 px patches


def image_and_video_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: 2 images and 1 video of 3 frames (mean-pooled: 16 tokens each), with labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([
        [1] + [3] * TINY_IMAGE_PATCHES + [9, 10] + [4] * TINY_IMAGE_PATCHES + [11],
        [1] + [3] * TINY_IMAGE_PATCHES + [12, 13, 14] + [15] * TINY_IMAGE_PATCHES,
    ])  # fmt: skip
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
        "pixel_values_videos": torch.randn(1, 3, 3, 28, 28, generator=generator),
        "labels": ids.clone(),
    }


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def make_tiny_cumo_model(seed: int = 0, **upcycle_options) -> UniMoEForCausalLM:
    """`make_tiny_model(seed, text_only=False)` co-upcycled (CuMo): by default a sparse projector and sparse MLPs in
    both CLIP layers, 4 experts top-2 each, then `perturb_cumo_blocks`."""
    from trl_scripts.training.upcycling import upcycle_multimodal_experts

    options = dict(projector_num_experts=4, vision_moe_layers="all") | upcycle_options
    return perturb_cumo_blocks(upcycle_multimodal_experts(make_tiny_model(seed, text_only=False), **options), seed=seed)


@torch.no_grad()
def perturb_cumo_blocks(model: UniMoEForCausalLM, scale: float = 0.1, seed: int = 0) -> UniMoEForCausalLM:
    """Noise of std `scale` added to every weight of the CuMo blocks' experts and routers, so that the experts differ
    and the routing matters (co-upcycled experts are identical copies, routers start near uniform)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        cumo_block = name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        if cumo_block and (".experts." in name or name.endswith(".gate.weight")):
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model
