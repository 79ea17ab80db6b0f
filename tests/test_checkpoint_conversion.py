"""Original Uni-MoE per-expert checkpoints load into the fused layout through the conversion mapping."""

import pytest
import torch

from modeling_unimoe import UniMoEForCausalLM
from conftest import make_tiny_model, random_ids


def original_layout_state_dict(model: UniMoEForCausalLM) -> dict[str, torch.Tensor]:
    """Our fused weights written by hand in the original LlavaLlamaForCausalLM key layout."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.language_model.", "model.")
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for expert, fused in enumerate(value):  # [2I, H] = [gate; up]
                gate, up = fused.chunk(2, dim=0)
                state[f"{prefix}{expert}.gate_proj.weight"] = gate.clone()
                state[f"{prefix}{expert}.up_proj.weight"] = up.clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for expert, down in enumerate(value):
                state[f"{prefix}{expert}.down_proj.weight"] = down.clone()
        else:
            state[key] = value.clone()
    return state


def write_original_checkpoint(model, folder, state):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")  # the original releases ship pickled .bin shards


def test_original_per_expert_checkpoint_loads(tmp_path):
    model = make_tiny_model(moe_layers="even")
    state = original_layout_state_dict(model)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in state and "model.layers.0.mlp.gate.weight" in state
    assert "model.layers.1.mlp.up_proj.weight" in state  # odd layers stay dense
    write_original_checkpoint(model, tmp_path / "original", state)

    loaded = UniMoEForCausalLM.from_pretrained(tmp_path / "original")
    ids = random_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_save_original_format_roundtrip(tmp_path):
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "ckpt", save_original_format=True)
    reloaded = UniMoEForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_missing_expert_weights_are_an_error(tmp_path):
    model = make_tiny_model()
    state = original_layout_state_dict(model)
    del state["model.layers.2.mlp.experts.1.gate_proj.weight"]
    del state["model.layers.2.mlp.experts.1.up_proj.weight"]
    del state["model.layers.2.mlp.experts.1.down_proj.weight"]
    write_original_checkpoint(model, tmp_path / "broken", state)
    with pytest.raises(ValueError, match=r"lacks expert weights .*model\.layers\.2\.mlp\.experts\.1\.(gate|down)_proj\.weight"):
        UniMoEForCausalLM.from_pretrained(tmp_path / "broken")


def test_missing_router_is_an_error(tmp_path):
    model = make_tiny_model()
    state = original_layout_state_dict(model)
    del state["model.layers.1.mlp.gate.weight"]
    write_original_checkpoint(model, tmp_path / "no-router", state)
    with pytest.raises(ValueError, match=r"missing_keys: model\.language_model\.layers\.1\.mlp\.gate\.weight"):
        UniMoEForCausalLM.from_pretrained(tmp_path / "no-router")


def test_unexpected_weights_are_an_error(tmp_path):
    model = make_tiny_model()
    state = original_layout_state_dict(model)
    state["model.layers.0.mlp.experts.9.down_proj.weight_extra"] = torch.zeros(2)
    write_original_checkpoint(model, tmp_path / "extra", state)
    with pytest.raises(ValueError, match=r"unexpected_keys: .*weight_extra"):
        UniMoEForCausalLM.from_pretrained(tmp_path / "extra")
