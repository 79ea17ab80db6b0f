"""Original Uni-MoE per-expert checkpoints load into the fused layout through the conversion mapping."""

import pytest
import torch

from modeling_unimoe import UniMoEForCausalLM, UniMoETextConfig
from tests.utils.models import make_tiny_model, random_ids


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


def test_loading_info_on_request_returns_the_problems_instead_of_raising(tmp_path):
    model = make_tiny_model()
    state = original_layout_state_dict(model)
    del state["model.layers.1.mlp.gate.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    write_original_checkpoint(model, tmp_path / "odd", state)
    loaded, info = UniMoEForCausalLM.from_pretrained(tmp_path / "odd", output_loading_info=True)
    assert isinstance(loaded, UniMoEForCausalLM)
    assert set(info["missing_keys"]) == {"model.language_model.layers.1.mlp.gate.weight"}
    assert any("extra.weight" in key for key in info["unexpected_keys"])
    model.save_pretrained(tmp_path / "clean")
    _, clean = UniMoEForCausalLM.from_pretrained(tmp_path / "clean", output_loading_info=True)
    assert not clean["missing_keys"] and not clean["unexpected_keys"] and not clean["mismatched_keys"]


def test_a_config_of_another_architecture_is_refused(tmp_path):
    """transformers only warns, and would build a default-sized (7B-class) Uni-MoE around the foreign weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"UniMoEConfig reads `model_type` 'unimoe', but this config is 'llama'"):
        UniMoEForCausalLM.from_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"UniMoETextConfig reads `model_type` 'unimoe_text', but this config is 'llama'"):
        UniMoETextConfig.from_pretrained(tmp_path / "llama")


def test_a_kernel_name_applies_to_the_experts_and_leaves_the_towers_alone(tmp_path):
    make_tiny_model(text_only=False).save_pretrained(tmp_path / "multimodal")
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        loaded = UniMoEForCausalLM.from_pretrained(tmp_path / "multimodal", experts_implementation=implementation)
        chosen = loaded.get_experts_implementation()
        assert chosen[""] == chosen["text_config"] == implementation
        assert chosen["vision_config"] == "eager"
