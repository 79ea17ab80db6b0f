"""Per-expert checkpoints (original Uni-MoE ones, and co-upcycled ones saved before CuMo's experts were fused) load
into the fused layout through the conversion mapping."""

import re
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM, UniMoETextConfig
from tests.utils.models import image_and_video_batch, make_tiny_cumo_model, make_tiny_model, random_ids


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
    # named as in the file, or (transformers 5.19's per-expert pattern matching) renamed with the experts it resembles
    with pytest.raises(ValueError, match=r"unexpected_keys: .*(weight_extra|down_proj_extra)"):
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
    """Through the class and through the Auto classes with remote code (which set the name on the config first: before,
    CLIP refused grouped_mm there), and on a config directly."""
    from transformers import AutoModelForCausalLM

    make_tiny_model(text_only=False).save_pretrained(tmp_path / "multimodal")
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        for load in (UniMoEForCausalLM.from_pretrained, partial(AutoModelForCausalLM.from_pretrained, trust_remote_code=True)):
            loaded = load(tmp_path / "multimodal", experts_implementation=implementation)
            chosen = loaded.get_experts_implementation()
            assert chosen[""] == chosen["text_config"] == implementation
            assert chosen["vision_config"] == "eager"
    config = UniMoEConfig.from_pretrained(tmp_path / "multimodal", experts_implementation="grouped_mm")
    assert config.text_config._experts_implementation == "grouped_mm"
    assert config.vision_config._experts_implementation != "grouped_mm"


# ---- CuMo's experts, saved per expert before they were fused --------------------------------------------------------

_FUSED_CUMO_KEY = re.compile(r"^(model\.multi_modal_projector\.experts|model\.vision_tower\..+\.mlp\.experts)\.(up|down)_proj(_bias)?$")


def per_expert_cumo_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused state dict with CuMo's experts written in the layout this package saved before they were fused: one
    copy of the dense MLP per expert (`experts.{e}.linear_1/2` in the projector, `mlp.experts.{e}.fc1/2` in CLIP)."""
    converted = {}
    for key, value in state.items():
        match = _FUSED_CUMO_KEY.match(key)
        if match is None:
            converted[key] = value
            continue
        experts, projection, bias = match.groups()
        first, second = ("linear_1", "linear_2") if "multi_modal_projector" in experts else ("fc1", "fc2")
        linear = first if projection == "up" else second
        for expert, tensor in enumerate(value):
            converted[f"{experts}.{expert}.{linear}.{'bias' if bias else 'weight'}"] = tensor.clone()
    return converted


def write_per_expert_cumo_checkpoint(model, folder, drop: tuple[str, ...] = ()):
    """`model.save_pretrained(folder)`, its weights then rewritten in the per-expert CuMo layout."""
    model.save_pretrained(folder)
    (path,) = folder.glob("*.safetensors")
    state = per_expert_cumo_state_dict(load_file(path))
    assert not drop or set(drop) <= state.keys()
    save_file({key: value for key, value in state.items() if key not in drop}, path, metadata={"format": "pt"})
    return state


def cumo_logits(model) -> torch.Tensor:
    batch = {key: value for key, value in image_and_video_batch().items() if key != "labels"}
    with torch.no_grad():
        return model(**batch).logits


def test_a_per_expert_cumo_checkpoint_loads_into_the_fused_experts(tmp_path):
    """A co-upcycled checkpoint saved with CuMo's experts as per-expert MLPs (the layout before they were fused) loads
    strictly, every weight in place: the same state dict and logits."""
    model = make_tiny_cumo_model()
    state = write_per_expert_cumo_checkpoint(model, tmp_path / "per-expert")
    assert "model.multi_modal_projector.experts.3.linear_2.bias" in state
    assert "model.vision_tower.encoder.layers.1.mlp.experts.0.fc1.weight" in state
    assert not any(_FUSED_CUMO_KEY.match(key) for key in state)
    loaded = UniMoEForCausalLM.from_pretrained(tmp_path / "per-expert").eval()
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(cumo_logits(loaded), cumo_logits(model))


def test_a_per_expert_cumo_checkpoint_missing_an_expert_is_an_error(tmp_path):
    write_per_expert_cumo_checkpoint(
        make_tiny_cumo_model(), tmp_path / "broken", drop=("model.vision_tower.encoder.layers.0.mlp.experts.2.fc2.bias",)
    )
    with pytest.raises(ValueError, match=r"lacks expert weights .*layers\.0\.mlp\.experts\.2\.fc2\.bias"):
        UniMoEForCausalLM.from_pretrained(tmp_path / "broken")


def test_save_original_format_writes_every_expert_in_its_own_per_expert_layout(tmp_path):
    """`save_original_format=True` on a model with sparse LLM layers and CuMo blocks: the LLM's experts as original
    Uni-MoE keys, CuMo's as their per-expert MLPs (CLIP's and the LLM's `mlp.experts.down_proj` kept apart); it loads
    back to the same model."""
    model = make_tiny_cumo_model()
    model.save_pretrained(tmp_path / "original", save_original_format=True)
    (path,) = (tmp_path / "original").glob("*.safetensors")
    keys = set(load_file(path))
    assert not any(key.endswith(("_proj", "_proj_bias")) and ".experts." in key for key in keys), sorted(keys)
    expected = {
        "model.layers.0.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.experts.3.gate_proj.weight",
        "model.vision_tower.encoder.layers.0.mlp.experts.3.fc2.weight", "model.vision_tower.encoder.layers.0.mlp.experts.3.fc1.bias",
        "model.multi_modal_projector.experts.3.linear_2.weight", "model.multi_modal_projector.experts.3.linear_1.bias",
    }  # fmt: skip
    assert expected <= keys
    loaded = UniMoEForCausalLM.from_pretrained(tmp_path / "original").eval()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in model.state_dict().items())
    assert torch.equal(cumo_logits(loaded), cumo_logits(model))


def test_a_kernel_name_at_loading_reaches_the_cumo_experts(tmp_path):
    """`experts_implementation` picks the kernel of CuMo's experts too (the CLIP config itself stays eager: CLIP
    accepts no other), except the projector's, which maps CLIP's width to the LLM's (see `UniMoEMoeSpec`)."""
    make_tiny_cumo_model().save_pretrained(tmp_path / "cumo")
    loaded = UniMoEForCausalLM.from_pretrained(tmp_path / "cumo", experts_implementation="batched_mm")
    assert loaded.get_experts_implementation()[""] == "batched_mm"
    assert loaded.model.vision_tower.encoder.layers[0].mlp.experts.config._experts_implementation == "batched_mm"
    assert loaded.model.multi_modal_projector.experts.config._experts_implementation == "eager"
