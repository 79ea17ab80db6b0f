import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_unimoe import UniMoEForCausalLM
from tests.utils.models import image_and_video_batch, make_tiny_cumo_model, make_tiny_model, random_ids


LORA = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,  # peft requires 0 for target_parameters
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)


def test_lora_on_attention_and_fused_experts(tmp_path):
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)

    model = get_peft_model(UniMoEForCausalLM.from_pretrained(base_dir), LoraConfig(**LORA))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in name and "lora_A" in name for name in trainable)
    assert any("q_proj.lora_B" in name for name in trainable)
    assert not any(name.endswith("experts.gate_up_proj") or name.endswith("mlp.gate.weight") for name in trainable)

    ids = random_ids(2, 8)
    with torch.no_grad():
        before = model(ids).logits
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    # B starts at zero, so the first step moves B (A gets gradient from the second step on)
    expert_grads = [p.grad for name, p in model.named_parameters() if "experts" in name and "lora_B" in name]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-4)  # the step changed the model

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(UniMoEForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged) is UniMoEForCausalLM
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(UniMoEForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits, adapted, atol=1e-5, rtol=0)


def test_lora_on_the_cumo_experts_fused_weights(tmp_path):
    """peft's `target_parameters` reaches CuMo's fused experts as it reaches the language model's: LoRA on CLIP's and
    the projector's `up_proj` / `down_proj` (the projector's map CLIP's width to the LLM's), trained, saved, reloaded
    and merged with the same logits."""
    base_dir = tmp_path / "base"
    make_tiny_cumo_model().save_pretrained(base_dir)
    cumo_experts = ["multi_modal_projector.experts", "encoder.layers.0.mlp.experts", "encoder.layers.1.mlp.experts"]
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_parameters=[f"{experts}.{name}" for experts in cumo_experts for name in ("up_proj", "down_proj")],
    )  # fmt: skip
    model = get_peft_model(UniMoEForCausalLM.from_pretrained(base_dir), config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for experts in cumo_experts:
        assert sum(experts in name and "lora_A" in name for name in trainable) == 2, experts  # up_proj and down_proj
    assert all("lora_" in name for name in trainable)

    batch = image_and_video_batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(**batch, output_router_logits=True)
    out.loss.backward()
    lora_b = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 6 and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert not torch.allclose(adapted, before, atol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(UniMoEForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged) is UniMoEForCausalLM
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=0)
