"""Int8 quantisation of the language model (`quant_method="unimoe_int8"`) through transformers' quantizer interface."""

import json

import pytest
import torch
from torch import nn

from modeling_unimoe import quantization_unimoe
from modeling_unimoe import UniMoEForCausalLM, UniMoEInt8Config
from modeling_unimoe.quantization_unimoe import (
    UniMoEInt8Embedding,
    UniMoEInt8Experts,
    UniMoEInt8Linear,
    int8_linear,
    quantize_rows,
)
from tests.utils.models import make_tiny_model, random_ids
from tests.utils.processes import run_fresh_python


INT8 = {"quant_method": "unimoe_int8"}
# Stated tolerance: int8 weights and per-token int8 activations change the logits by at most 5 % in relative L2 norm.
LOGIT_TOLERANCE = 0.05


def save(model, path):
    model.save_pretrained(path)
    return path


def assert_logits_close(quantized, reference):
    error = (torch.linalg.vector_norm(quantized - reference) / torch.linalg.vector_norm(reference)).item()
    print(f"relative logit error {error:.4f}")
    assert error <= LOGIT_TOLERANCE


@pytest.fixture
def float_checkpoint(tmp_path):
    return save(make_tiny_model(num_shared_experts=1, moe_layers="even"), tmp_path / "float")


def test_quantize_rows_round_trips_within_half_a_step():
    weight = torch.randn(3, 5, 7)
    weight[1, 2] = 0  # an all-zero row
    quantized, scale = quantize_rows(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (3, 5)
    assert quantized.abs().max() <= 127 and scale[1, 2] == 1 and not quantized[1, 2].any()
    error = (quantized.float() * scale.unsqueeze(-1) - weight).abs()
    assert (error <= scale.unsqueeze(-1) / 2 + 1e-7).all()


def test_int8_linear_matches_the_float_product_and_keeps_leading_dims():
    torch.manual_seed(0)
    weight, inputs = torch.randn(48, 32), torch.randn(2, 3, 32)
    quantized, scale = quantize_rows(weight)
    output = int8_linear(inputs, quantized, scale)
    assert output.shape == (2, 3, 48) and output.dtype == torch.float32
    reference = inputs @ weight.t()
    assert (output - reference).abs().max() <= 0.03 * reference.abs().max()
    assert int8_linear(torch.zeros(0, 32), quantized, scale).shape == (0, 48)  # an expert without tokens
    with pytest.raises(ValueError, match="inputs have 31 features, the weight expects 32"):
        int8_linear(torch.randn(2, 31), quantized, scale)


def test_the_dequantising_path_for_other_devices_agrees_with_int_mm(monkeypatch):
    """Off CPU the product dequantises the weight (torch._int_mm's CUDA kernel needs > 16 rows); both ways agree."""
    torch.manual_seed(0)
    quantized, scale = quantize_rows(torch.randn(40, 24))
    inputs = torch.randn(5, 24)
    int_mm = int8_linear(inputs, quantized, scale)
    monkeypatch.setattr(quantization_unimoe, "_runs_int_mm", lambda tensor: False)
    dequantised = int8_linear(inputs, quantized, scale)
    torch.testing.assert_close(int_mm, dequantised, atol=0.02 * dequantised.abs().max().item(), rtol=0)


def test_from_pretrained_quantizes_every_language_model_matrix_and_nothing_else(float_checkpoint):
    model = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=UniMoEInt8Config())
    language_model = model.model.language_model
    assert isinstance(model.lm_head, UniMoEInt8Linear)
    assert isinstance(language_model.embed_tokens, UniMoEInt8Embedding)
    assert not [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))]
    sparse, dense = language_model.layers[0].mlp, language_model.layers[1].mlp
    assert isinstance(sparse.experts, UniMoEInt8Experts) and isinstance(sparse.shared_experts.up_proj, UniMoEInt8Linear)
    assert isinstance(dense.down_proj, UniMoEInt8Linear)
    assert sparse.gate.weight.dtype == torch.float32  # routers stay in floating point
    assert model.is_quantized and model.config.quantization_config.quant_method == "unimoe_int8"
    # Resident weights: int8 plus one fp32 scale per row, against fp32.
    reference = make_tiny_model(num_shared_experts=1, moe_layers="even")
    assert model.get_memory_footprint() <= 0.35 * reference.get_memory_footprint()


def test_quantized_logits_and_greedy_tokens_match_float(float_checkpoint):
    reference = UniMoEForCausalLM.from_pretrained(float_checkpoint).eval()
    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert_logits_close(quantized(ids).logits, reference(ids).logits)
    prompt = random_ids(1, 6, seed=3)
    expected = reference.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(quantized.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False), expected)
    static = quantized.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(static, expected)


def test_compiled_static_cache_decoding_of_the_int8_model_equals_eager(float_checkpoint):
    """The int8 experts have a graph-friendly path (every expert, weighted) that `fullgraph=True` compiles."""
    from transformers.generation.configuration_utils import CompileConfig

    model = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).eval()
    prompt = random_ids(1, 6, seed=3)
    expected = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told so
    torch._dynamo.reset()
    compiled = model.generate(
        prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch.equal(compiled, expected)
    assert model._compiled_call is not None  # the step did run compiled


def test_bfloat16_model_quantizes_and_keeps_its_dtype(float_checkpoint):
    reference = UniMoEForCausalLM.from_pretrained(float_checkpoint, dtype=torch.bfloat16).eval()
    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, dtype=torch.bfloat16, quantization_config=INT8).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits, expected = quantized(ids).logits, reference(ids).logits
    assert logits.dtype == torch.bfloat16
    assert_logits_close(logits.float(), expected.float())


def test_saved_int8_checkpoint_reloads_in_a_fresh_process_through_remote_code(float_checkpoint, tmp_path):
    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).eval()
    saved = save(quantized, tmp_path / "int8")
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "unimoe_int8", "modules_to_not_convert": None}
    assert (saved / "quantization_unimoe.py").is_file()
    assert (saved / "model.safetensors").stat().st_size < 0.35 * (float_checkpoint / "model.safetensors").stat().st_size
    ids = random_ids(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = quantized(ids).logits
    stdout = run_fresh_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        saved = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)
        print("HEAD", type(saved.lm_head).__name__, saved.lm_head.weight.dtype)
        # and a float checkpoint quantised on load, the config given as a plain dict
        fresh = AutoModelForCausalLM.from_pretrained({str(float_checkpoint)!r}, trust_remote_code=True,
                                                     quantization_config={{"quant_method": "unimoe_int8"}})
        with torch.no_grad():
            torch.save(saved(ids).logits, {str(tmp_path / "saved.pt")!r})
            torch.save(fresh(ids).logits, {str(tmp_path / "fresh.pt")!r})
        """,
        tmp_path,
    )
    assert "HEAD UniMoEInt8Linear torch.int8" in stdout
    assert torch.equal(torch.load(tmp_path / "saved.pt"), expected)
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), expected)


def test_the_backbone_loads_from_an_int8_checkpoint_without_its_head(float_checkpoint, tmp_path):
    """`AutoModel` on a saved int8 `UniMoEForCausalLM` leaves out the head (`lm_head.weight` and its scale) and
    nothing else; the backbone's hidden states are the int8 model's."""
    from modeling_unimoe import UniMoEModel

    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).eval()
    saved = save(quantized, tmp_path / "int8")
    backbone, info = UniMoEModel.from_pretrained(saved, output_loading_info=True)
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []
    assert isinstance(backbone.language_model.layers[0].mlp.experts, UniMoEInt8Experts)
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = quantized.model(ids).last_hidden_state
        assert torch.equal(backbone.eval()(ids).last_hidden_state, expected)


def test_a_bfloat16_int8_checkpoint_reloads_bit_for_bit(float_checkpoint, tmp_path):
    """The scales keep the model's dtype, so reloading (which casts float tensors to the model's dtype) changes none."""
    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, dtype=torch.bfloat16, quantization_config=INT8).eval()
    reloaded = UniMoEForCausalLM.from_pretrained(save(quantized, tmp_path / "int8-bf16")).eval()
    assert reloaded.lm_head.weight_scale.dtype == torch.bfloat16
    ours, theirs = quantized.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)


def test_parameter_counts_are_the_float_models(float_checkpoint, tmp_path):
    with_bias = save(make_tiny_model(attention_bias=True), tmp_path / "bias")  # e.g. upcycled from Qwen2
    for checkpoint in (float_checkpoint, with_bias):
        reference = UniMoEForCausalLM.from_pretrained(checkpoint)
        quantized = UniMoEForCausalLM.from_pretrained(checkpoint, quantization_config=INT8)
        assert quantized.num_parameters() == reference.num_parameters()
        assert quantized.num_active_parameters() == reference.num_active_parameters() > 0
        frozen = [name for name, param in quantized.named_parameters() if "proj" in name or "lm_head" in name or "embed" in name]
        assert frozen and not [name for name in frozen if dict(quantized.named_parameters())[name].requires_grad]


def test_gradients_reach_the_inputs_through_the_int8_language_model(float_checkpoint):
    """A float module before the language model (tower, connector, LoRA on them) trains against a frozen int8 one:
    the inputs get the gradient of the dequantised weights' products (straight through the activation rounding)."""
    reference = UniMoEForCausalLM.from_pretrained(float_checkpoint).eval()
    quantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).eval()
    dequantized = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8).dequantize().eval()
    ids = random_ids(2, 9)
    gradients = []
    for model in (quantized, dequantized, reference):
        embeds = model.get_input_embeddings()(ids).detach().float().requires_grad_()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        gradients.append(embeds.grad.flatten())
    for other in gradients[1:]:
        assert torch.nn.functional.cosine_similarity(gradients[0], other, dim=0) > 0.99


def test_modules_to_not_convert_keeps_them_in_floating_point(float_checkpoint):
    config = UniMoEInt8Config(modules_to_not_convert=["lm_head", "model.language_model.layers.1"])
    model = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=config)
    assert isinstance(model.lm_head, nn.Linear)
    assert not [module for module in model.model.language_model.layers[1].modules() if isinstance(module, UniMoEInt8Linear)]
    assert isinstance(model.model.language_model.layers[1].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, UniMoEInt8Linear)


def test_dequantize_returns_a_float_model_that_trains_again(float_checkpoint):
    model = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8)
    reference = UniMoEForCausalLM.from_pretrained(float_checkpoint)
    model = model.dequantize()
    assert not getattr(model, "is_quantized", False)
    assert isinstance(model.lm_head, nn.Linear) and type(model.model.language_model.layers[0].mlp.experts).__name__ == "UniMoEExperts"
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert_logits_close(model(ids).logits, reference(ids).logits)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_multimodal_model_keeps_its_towers_and_answers_media_prompts(tiny_multimodal_model, tiny_processor, tmp_path):
    from tests.utils.media import write_image

    checkpoint = save(tiny_multimodal_model, tmp_path / "towered")
    quantized = UniMoEForCausalLM.from_pretrained(checkpoint, quantization_config=INT8).eval()
    towers = [quantized.model.vision_tower, quantized.model.multi_modal_projector, quantized.model.speech_aligner]
    assert not [module for tower in towers for module in tower.modules() if isinstance(module, UniMoEInt8Linear)]
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(write_image(tmp_path / "red.png"))}, {"type": "text", "text": "What colour?"}]}]
    inputs = tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    with torch.no_grad():
        assert_logits_close(quantized(**inputs).logits, tiny_multimodal_model(**inputs).logits)


def test_bad_quantization_configs_are_refused_by_name(float_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="modules_to_not_convert names no module of this model: \\['lm_haed'\\]"):
        UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=UniMoEInt8Config(["lm_haed"]))
    with pytest.raises(ValueError, match="must be a list of module names"):
        UniMoEInt8Config(modules_to_not_convert="lm_head")
    with pytest.raises(ValueError, match="quant_method must be 'unimoe_int8'"):
        UniMoEInt8Config(quant_method="int8")
    with pytest.raises(TypeError, match="bits"):
        UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config={"quant_method": "unimoe_int8", "bits": 4})
    with pytest.raises(ValueError, match=r"names modules outside the language model and head: \['model.vision_tower'\]"):
        quantization_unimoe._converted_modules(make_tiny_model(text_only=False), ["model.vision_tower"])
    broken = make_tiny_model()
    with torch.no_grad():
        broken.model.language_model.layers[1].mlp.experts.down_proj[2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts: cannot quantise a weight of shape \[4, 64, 128\] with NaN"):
        UniMoEForCausalLM.from_pretrained(save(broken, tmp_path / "nan"), quantization_config=INT8)
    tied = save(make_tiny_model(tie_word_embeddings=True), tmp_path / "tied")
    with pytest.raises(ValueError, match="does not quantise tied word embeddings"):
        UniMoEForCausalLM.from_pretrained(tied, quantization_config=INT8)
    kept = UniMoEInt8Config(["lm_head", "model.language_model.embed_tokens"])
    assert isinstance(UniMoEForCausalLM.from_pretrained(tied, quantization_config=kept).lm_head, nn.Linear)


def test_trainer_refuses_to_train_a_quantized_model(float_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = UniMoEForCausalLM.from_pretrained(float_checkpoint, quantization_config=INT8)
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[]))
