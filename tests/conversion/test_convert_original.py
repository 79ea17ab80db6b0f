"""Conversion of the released original Uni-MoE v1 checkpoints (synthetic ones in the real layouts, tiny shapes).

Every weight of the converted model is compared with the value computed here from the tensors written in the
original layout: the renames, the expert fusion, the LoRA merge `W + (alpha / r) B A`, the 8-expert files with their
per-expert LoRA, the original load order (stage-3 files over the base, `mlp_gates.bin` over a merged router LoRA).
"""

import json
import re

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, CLIPVisionModel, WhisperModel

from modeling_unimoe import UniMoEForCausalLM, UniMoEProcessor, load_beats_checkpoint
from tests.utils.media import tone, write_audio, write_image, write_video
from tests.utils.original_checkpoints import (
    EXPERT_FILES_8E,
    EXPERTS,
    LORA_ALPHA,
    LORA_R,
    VOCAB,
    linear_modules,
    original_input_ids,
    sparse_layers,
    write_original_checkpoint,
    write_sentencepiece_tokenizer,
    write_towers,
)
from tests.utils.processes import run_fresh_python
from trl_scripts import load_preset
from trl_scripts.conversion.convert_original import convert_original, main
from trl_scripts.training.presets import CHAT_TEMPLATE_PATH


PLACEHOLDERS = ["<image>", "<video>", "<audio>"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return write_towers(tmp_path_factory.mktemp("towers"))


def expected_weights(checkpoint, towers) -> dict[str, torch.Tensor]:
    """What every weight of the converted model must be, computed from the original-layout tensors."""
    variant, base, files = checkpoint.variant, checkpoint.base, checkpoint.files
    stage3 = checkpoint.stage3_dir is not None
    scaling = LORA_ALPHA / LORA_R
    adapter = files.get("stage3/adapter_model.bin", {})
    lora_targets = set(linear_modules(variant)) if stage3 else set()

    def merged(module: str, weight: torch.Tensor) -> torch.Tensor:
        if module not in lora_targets:
            return weight.float()
        key = f"base_model.model.{module}.lora_"
        return weight.float() + scaling * adapter[key + "B.weight"].float() @ adapter[key + "A.weight"].float()

    expected = {}
    vocabulary = (("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"))
    for name, source in vocabulary:
        rows = base[source].float()
        expected[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(len(PLACEHOLDERS), -1)])
    expected["model.language_model.norm.weight"] = base["model.norm.weight"].float()
    gates = files.get("stage3/mlp_gates.bin", {})
    for layer in range(4):
        source, target = f"model.layers.{layer}.", f"model.language_model.layers.{layer}."
        for projection in "qkvo":
            module = f"{source}self_attn.{projection}_proj"
            expected[f"{target}self_attn.{projection}_proj.weight"] = merged(module, base[module + ".weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"{target}{norm}.weight"] = base[f"{source}{norm}.weight"].float()
        if layer not in sparse_layers(variant):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                module = f"{source}mlp.{projection}"
                expected[f"{target}mlp.{projection}.weight"] = merged(module, base[module + ".weight"])
            continue
        ffns = []
        for expert in range(EXPERTS[variant]):
            if variant == "8e":  # expert file (the original's list) + that expert's LoRA-in-expert
                dense = files[f"experts/{EXPERT_FILES_8E[expert]}.bin"]
                lora = files[f"stage3/{expert}_mlp_experts.bin"]
                prefix = f"{source}mlp.deepspeed_moe.experts.deepspeed_experts.0."
                ffns.append({
                    p: dense[f"{source}mlp.{p}.weight"].float()
                    + scaling * lora[f"{prefix}{p}_lora_B.weight"].float() @ lora[f"{prefix}{p}_lora_A.weight"].float()
                    for p in ("gate_proj", "up_proj", "down_proj")
                })
            else:
                module = f"{source}mlp.experts.{expert}."
                ffns.append({p: merged(module + p, base[f"{module}{p}.weight"]) for p in ("gate_proj", "up_proj", "down_proj")})
        expected[f"{target}mlp.experts.gate_up_proj"] = torch.stack([torch.cat([f["gate_proj"], f["up_proj"]]) for f in ffns])
        expected[f"{target}mlp.experts.down_proj"] = torch.stack([f["down_proj"] for f in ffns])
        router = f"{source}mlp.deepspeed_moe.gate.wg.weight" if variant == "8e" else f"{source}mlp.gate.weight"
        # the stage-3 routers replace the base's, after (and despite) any router LoRA merged before them
        expected[f"{target}mlp.gate.weight"] = gates[router].float() if stage3 else base[router].float()

    projector = (
        {k.removeprefix("base_model.model."): v for k, v in files["stage3/non_lora_trainables.bin"].items()}
        if stage3 else files["base/mm_projector.bin"]
    )
    for index, name in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            expected[f"model.multi_modal_projector.{name}.{kind}"] = projector[f"model.mm_projector.{index}.{kind}"].float()
    aligner = files["stage3/mm_audio_aligner.bin" if stage3 else "base/mm_audio_aligner.bin"]
    for key, tensor in aligner.items():
        if variant == "audio-4e":
            key = key.replace("model.mm_audio_aligner.qformer.qformer.", "model.audio_aligner.qformer.")
            key = key.replace("model.mm_audio_aligner.", "model.audio_aligner.")
        elif key.endswith("audio_decoder.embed_tokens.weight"):
            continue  # never read by the original (its queries enter as inputs_embeds)
        else:
            key = key.replace("model.mm_audio_aligner.decoder.audio_decoder.", "model.speech_aligner.")
            key = key.replace("model.mm_audio_aligner.projector.", "model.speech_aligner.projector.")
            key = key.replace("model.query_tokens", "model.speech_aligner.query_tokens")
        expected[key] = tensor.float()

    tower_states = {"model.vision_tower.": CLIPVisionModel.from_pretrained(towers.clip).state_dict()}
    if variant == "audio-4e":
        tower_states["model.audio_tower."] = load_beats_checkpoint(towers.beats).state_dict()
    else:
        tower_states["model.speech_tower."] = WhisperModel.from_pretrained(towers.whisper).encoder.state_dict()
    for prefix, state in tower_states.items():
        expected.update({prefix + key: tensor.float() for key, tensor in state.items()})
    return expected


def assert_converted(folder, expected: dict[str, torch.Tensor]) -> UniMoEForCausalLM:
    model = UniMoEForCausalLM.from_pretrained(folder, dtype=torch.float32)  # strict: nothing missing or unexpected
    converted = model.state_dict()
    assert sorted(converted) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(converted[key], tensor, atol=1e-6, rtol=1e-6, msg=key)
    return model


@pytest.mark.parametrize("variant", ["speech-4e", "audio-4e", "speech-v1.5", "8e"])
def test_every_tensor_arrives_where_it_belongs(variant, towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, variant)
    _, _, report = convert_original(variant, dtype=torch.float32, output_dir=tmp_path / "out", **checkpoint.arguments(towers))
    model = assert_converted(tmp_path / "out", expected_weights(checkpoint, towers))

    text = model.config.text_config
    assert text.num_experts == EXPERTS[variant] and text.num_experts_per_tok == 2
    assert text.sparse_layer_indices == sparse_layers(variant)
    assert text.vocab_size == VOCAB + 3
    if variant != "speech-v1.5":  # our presets for the released variants agree on the MoE semantics
        preset = load_preset(f"unimoe-v1-{variant}").text_config
        for name in ("moe_layers", "router_type", "norm_topk_prob", "router_aux_loss_coef", "num_experts"):
            assert getattr(text, name) == getattr(preset, name), name
    config = model.config
    assert config.audio_towers == (["beats"] if variant == "audio-4e" else ["whisper"])
    assert config.num_query_tokens == 4 and config.vision_feature_layer == -2 and config.mask_audio_padding is False

    processor = UniMoEProcessor.from_pretrained(tmp_path / "out")
    assert processor.chat_template == CHAT_TEMPLATE_PATH.read_text()
    assert [processor.tokenizer.image_token_id, processor.tokenizer.video_token_id, processor.tokenizer.audio_token_id] == [512, 513, 514]
    assert (config.image_token_id, config.video_token_id, config.audio_token_id) == (512, 513, 514)
    assert processor.tokenizer.convert_ids_to_tokens([512, 513, 514]) == PLACEHOLDERS
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # stage 3 trained with "square"
    # the original sliced audio every window + 1 samples (its off-by-one), each slice cut to the window
    extractor = processor.feature_extractor
    assert extractor.window_stride == extractor.window_samples + 1
    assert model.generation_config.suppress_tokens == [512, 513, 514]  # the original could never emit them

    # the load order's overrides and the unused groups are reported, not silent
    dropped = " ".join(report.dropped)
    assert "tower weights" in dropped and "rotary inv_freq" in dropped
    assert ("Whisper token embedding" in dropped) == (variant != "audio-4e")
    assert ("base's 4-expert MoE weights" in dropped) == (variant == "8e")
    overridden = {slot for slot, _, by in report.lora_overridden}
    if variant in ("audio-4e", "speech-v1.5"):  # their routers had a LoRA, which mlp_gates.bin overrides
        assert overridden == {f"model.language_model.layers.{layer}.mlp.gate.weight" for layer in sparse_layers(variant)}
        assert all(by.startswith("mlp_gates.bin:") for _, _, by in report.lora_overridden)
        assert "router LoRA saved with the routers" in dropped
    else:
        assert overridden == set()
    assert report.files_not_read == [
        str(checkpoint.stage3_dir / "mm_projector.bin"), str(checkpoint.base_dir / "mm_projector.bin"),
        str(checkpoint.base_dir / "mm_audio_aligner.bin"),
    ]


def test_base_checkpoint_alone(towers, tmp_path):
    """A base (stage-2) checkpoint without stage 3: connectors from its own side files, routers from its shards,
    and its config's `image_aspect_ratio="pad"` carried into the processor as LLaVA's pad-to-square."""
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e", stage3=False)
    arguments = checkpoint.arguments(towers) | {"stage3_dir": None}
    _, processor, report = convert_original("speech-4e", dtype=torch.float32, output_dir=tmp_path / "out", **arguments)
    assert_converted(tmp_path / "out", expected_weights(checkpoint, towers))
    assert report.lora_overridden == []
    reloaded = UniMoEProcessor.from_pretrained(tmp_path / "out")
    assert type(reloaded.image_processor).__name__ == "LlavaImageProcessorPil" and reloaded.image_processor.do_pad
    # a wide image is padded to a square with the CLIP mean colour before the resize and crop, as expand2square did
    wide = torch.zeros(28, 56, 3, dtype=torch.uint8).numpy()
    pixels = reloaded.image_processor(wide, return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(reloaded.image_processor.image_mean), torch.tensor(reloaded.image_processor.image_std)
    padding = (torch.tensor([int(m * 255) for m in reloaded.image_processor.image_mean]) / 255 - mean) / std
    torch.testing.assert_close(pixels[:, 0, 14], padding, atol=1e-4, rtol=0)  # top rows: padding colour
    torch.testing.assert_close(pixels[:, 14, 14], (0 - mean) / std, atol=1e-4, rtol=0)  # middle: the black image


def test_cli_conversion_loads_in_a_fresh_process(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e", seed=3)
    out = tmp_path / "converted"
    main([
        "--variant", "speech-4e", "--base_dir", str(checkpoint.base_dir), "--stage3_dir", str(checkpoint.stage3_dir),
        "--clip", str(towers.clip), "--whisper", str(towers.whisper), "--output_dir", str(out), "--dtype", "float32",
    ])
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_unimoe.py", "processing_unimoe.py", "chat_template.jinja"} <= files
    assert not any(name.endswith(".bin") for name in files)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith("UniMoEForCausalLM")

    model = assert_converted(out, expected_weights(checkpoint, towers)).eval()
    processor = UniMoEProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [
        {"type": "image", "path": str(write_image(tmp_path / "red.png"))}, {"type": "audio", "audio": tone(2.0)},
        {"type": "text", "text": "What is it?"},
    ]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not set(ids[0, inputs["input_ids"].shape[1]:].tolist()) & {512, 513, 514}
    torch.save({"messages": messages, "logits": logits, "ids": ids}, tmp_path / "expected.pt")
    stdout = run_fresh_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=False)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        inputs = processor.apply_chat_template(expected["messages"], tokenize=True, return_dict=True, add_generation_prompt=True)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected["logits"], atol=1e-5, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected["ids"])
        print("LOADED", type(model).__module__.split(".")[0], model.config.text_config.num_experts)
        """,
        tmp_path,
    )
    assert "LOADED transformers_modules 4" in stdout


@pytest.mark.parametrize("location, legacy", [("base", None), ("own folder", None), ("own folder", True)])
def test_converted_tokenizer_tokenises_prompts_as_the_original(location, legacy, towers, tmp_path):
    """The released checkpoints ship a SentencePiece LLaMA tokenizer; the original (transformers 4.31) tokenised with
    legacy=True unless the config said otherwise. The converted checkpoint, reloaded, must give the same ids, whether
    transformers 5 reads the tokenizer as a `LlamaTokenizer` (its own folder, `--tokenizer`) or, next to the
    original's `llava` config.json, as a converted `TokenizersBackend`."""
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    tokenizer_dir = checkpoint.base_dir if location == "base" else tmp_path / "tokenizer"
    sp = write_sentencepiece_tokenizer(tokenizer_dir, legacy=legacy)
    out = tmp_path / "converted"
    convert_original(
        "speech-4e", checkpoint.base_dir, stage3_dir=checkpoint.stage3_dir, clip=towers.clip, whisper=towers.whisper,
        tokenizer_dir=tokenizer_dir, dtype=torch.float32, output_dir=out,
    )
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    tokenizer = processor.tokenizer
    placeholder_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}
    image, video, audio = write_image(tmp_path / "red.png"), write_video(tmp_path / "move.mp4"), write_audio(tmp_path / "beep.wav")

    def user(*content):
        return {"role": "user", "content": [*content]}

    def text(value):
        return {"type": "text", "text": value}

    conversations = {
        "single-turn": [user({"type": "image", "path": str(image)}, text("What is in the picture?"))],
        "multi-turn": [
            user(text("Describe it.")), {"role": "assistant", "content": [text("A red square.")]}, user(text("What is it?")),
        ],
        "all media": [
            user({"type": "image", "path": str(image)}, {"type": "video", "path": str(video)},
                 {"type": "audio", "path": str(audio)}, text("What is in the picture, the video and the clip?")),
            {"role": "assistant", "content": [text("A red square, a moving square and a tone.")]},
            user({"type": "audio", "path": str(audio)}, text("What is in the audio?")),
        ],
    }
    lone_prefix, newline, eos = sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>"), sp.eos_id()
    for name, messages in conversations.items():
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
        ids = inputs["input_ids"][0].tolist()
        # one id per placeholder, as the original spliced one: collapse each run of expanded media tokens
        ids = [token for i, token in enumerate(ids) if token not in placeholder_ids.values() or token != ids[i - 1]]
        assert ids == original_input_ids(prompt, sp, placeholder_ids), name
        for i, token in enumerate(ids[:-2]):
            if token in placeholder_ids.values():  # the original's `▁` (LLaMA id 29871) before the newline
                assert ids[i + 1 : i + 3] == [lone_prefix, newline], name
            if token == eos:  # `</s>USER` is `</s> ▁USER`
                assert ids[i + 1] == sp.piece_to_id("▁USER"), name
    # the case is not vacuous: transformers 5's LlamaTokenizer default (legacy=False) tokenises the prompt otherwise
    multi_turn = processor.apply_chat_template(conversations["multi-turn"], add_generation_prompt=True)
    llama_default = AutoTokenizer.from_pretrained(tokenizer_dir, legacy=False)
    assert llama_default(multi_turn)["input_ids"] != original_input_ids(multi_turn, sp, {})


def test_unmapped_sources_and_unset_weights_are_listed(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    name, shard = next(iter(checkpoint.shards.items()))
    shard = dict(shard)
    shard["model.layers.0.mlp.experts.7.up_proj.weight"] = torch.zeros(48, 32)  # there are 4 experts
    shard["model.mm_extra.weight"] = torch.zeros(2)
    removed = next(key for key in shard if key.endswith("self_attn.k_proj.weight"))
    del shard[removed]
    checkpoint.write_shard(name, shard)
    with pytest.raises(ValueError) as error:
        convert_original("speech-4e", dtype=torch.float32, **checkpoint.arguments(towers))
    message = str(error.value)
    assert f"{name}:model.layers.0.mlp.experts.7.up_proj.weight: expert 7 does not exist (num_experts=4)" in message
    assert f"{name}:model.mm_extra.weight" in message
    layer = removed.split(".")[2]
    assert f"no source sets model.language_model.layers.{layer}.self_attn.k_proj.weight" in message


@pytest.mark.parametrize("written, asked", [
    ("speech-v1.5", "speech-4e"), ("speech-4e", "speech-v1.5"), ("audio-4e", "speech-4e"), ("8e", "speech-4e"),
    ("speech-4e", "audio-4e"),
])
def test_wrong_variant_names_the_variant_the_checkpoint_looks_like(written, asked, towers, tmp_path):
    """A checkpoint converted as the wrong variant is refused in one sentence naming the right one (before, an
    even-layer checkpoint converted as speech-4e listed 212 unmapped or unset weights)."""
    checkpoint = write_original_checkpoint(tmp_path, written)
    arguments = {"base_dir": checkpoint.base_dir, "stage3_dir": checkpoint.stage3_dir, **towers.arguments(asked)}
    with pytest.raises(ValueError, match=rf"--variant {asked} does not match this checkpoint: it looks like {re.escape(written)} .*; pass --variant {re.escape(written)}$"):
        convert_original(asked, dtype=torch.float32, **arguments)


def test_checkpoints_that_do_not_convert_list_every_problem(towers, tmp_path):
    """Past the variant check (a single unindexed shard does not tell even from all layers), weights with nowhere
    to go and slots no source sets are all named."""
    checkpoint = write_original_checkpoint(tmp_path, "speech-v1.5")
    index = checkpoint.base_dir / "pytorch_model.bin.index.json"
    merged = {}
    for name in json.loads(index.read_text())["weight_map"].values():
        merged |= torch.load(checkpoint.base_dir / name, weights_only=True)
    torch.save(merged, checkpoint.base_dir / "pytorch_model.bin")
    index.unlink()
    with pytest.raises(ValueError) as error:
        convert_original("speech-4e", dtype=torch.float32, **checkpoint.arguments(towers))
    message = str(error.value)
    assert "model.layers.1.mlp.gate_proj.weight: layer 1 is a sparse MoE layer in the speech-4e layout" in message
    assert "no source sets model.language_model.layers.3.mlp.gate.weight" in message
    assert "no source sets model.language_model.layers.1.mlp.experts.gate_up_proj[expert 2][rows 48:96]" in message


def test_lora_on_a_module_that_does_not_convert_is_an_error(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    adapter = dict(checkpoint.files["stage3/adapter_model.bin"])
    adapter["base_model.model.model.mm_projector.0.lora_A.weight"] = torch.zeros(LORA_R, 16)
    adapter["base_model.model.model.vision_tower.vision_tower.fc.lora_A.weight"] = torch.zeros(LORA_R, 16)
    adapter["base_model.model.model.vision_tower.vision_tower.fc.lora_B.weight"] = torch.zeros(16, LORA_R)
    torch.save(adapter, checkpoint.stage3_dir / "adapter_model.bin")
    with pytest.raises(ValueError) as error:
        convert_original("speech-4e", dtype=torch.float32, **checkpoint.arguments(towers))
    message = str(error.value)
    assert "LoRA of model.mm_projector.0 lacks lora_B" in message
    assert "its target model.vision_tower.vision_tower.fc.weight does not convert" in message


def test_missing_files_are_listed(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "8e")
    (checkpoint.stage3_dir / "mlp_gates.bin").unlink()
    (checkpoint.stage3_dir / "5_mlp_experts.bin").unlink()
    (checkpoint.experts_dir / "mlp_base7.bin").unlink()
    (checkpoint.base_dir / "pytorch_model-00002-of-00002.bin").unlink()
    arguments = checkpoint.arguments(towers)
    del arguments["whisper"]
    with pytest.raises(FileNotFoundError) as error:
        convert_original("8e", **arguments)
    message = str(error.value)
    for missing in (
        checkpoint.stage3_dir / "mlp_gates.bin", checkpoint.stage3_dir / "5_mlp_experts.bin",
        checkpoint.experts_dir / "mlp_base7.bin", checkpoint.base_dir / "pytorch_model-00002-of-00002.bin", "--whisper",
    ):
        assert str(missing) in message


def test_corrupt_or_truncated_shards_are_named(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    first, second = list(checkpoint.shards)
    # a shard that lost weights its index lists (an interrupted download re-saved, a wrong file)
    truncated = dict(checkpoint.shards[second])
    lost = sorted(truncated)[0]
    del truncated[lost]
    checkpoint.write_shard(second, truncated, update_index=False)
    with pytest.raises(ValueError, match=rf"Base shard .*{second} lacks 1 weights its index lists: {lost}"):
        convert_original("speech-4e", **checkpoint.arguments(towers))
    # a shard that is not a checkpoint at all
    (checkpoint.base_dir / first).write_bytes(b"\x00not a torch file" * 8)
    with pytest.raises(ValueError, match=rf"Cannot read checkpoint file .*{first}"):
        convert_original("speech-4e", **checkpoint.arguments(towers))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mm_projector_type", "linear", r"`mm_projector_type`='linear'; only \('mlp2x_gelu',\) converts"),
        ("mm_use_im_patch_token", None, r"`mm_use_im_patch_token` is absent \(the original code then uses True\)"),
        ("moe", False, r"`moe` is not set: this is not a Uni-MoE checkpoint config"),
    ],
)
def test_unsupported_original_settings_are_refused(field, value, message, towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-v1.5")
    config = dict(checkpoint.config)
    if value is None:
        del config[field]
    else:
        config[field] = value
    (checkpoint.stage3_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{checkpoint.stage3_dir / 'config.json'}: {message}"):
        convert_original("speech-v1.5", **checkpoint.arguments(towers))


def test_unreadable_sentencepiece_tokenizer_says_what_it_needs(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint.base_dir / name).unlink()
    (checkpoint.base_dir / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
    (checkpoint.base_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match=r"Cannot load the tokenizer of .*base: .*`sentencepiece` and `protobuf`"):
        convert_original("speech-4e", **checkpoint.arguments(towers))


def test_keys_that_collapse_under_the_prefix_clean_up_are_an_error(towers, tmp_path):
    checkpoint = write_original_checkpoint(tmp_path, "speech-4e")
    trainables = dict(checkpoint.files["stage3/non_lora_trainables.bin"])
    trainables["model.model.mm_projector.0.weight"] = torch.zeros(32, 16)  # same weight once `base_model.` is gone
    torch.save(trainables, checkpoint.stage3_dir / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match=r"non_lora_trainables.bin: these keys become the same weight .*mm_projector\.0\.weight"):
        convert_original("speech-4e", **checkpoint.arguments(towers))
