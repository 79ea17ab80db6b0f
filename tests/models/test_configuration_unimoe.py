import json

import pytest
import torch

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM, UniMoETextConfig
from trl_scripts import load_preset
from trl_scripts.training.presets import available_presets


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(router_type="sinkhorn"), "router_type"),
        (dict(num_hidden_layers=4, moe_layers=[0, 4]), "moe_layers"),
        (dict(num_hidden_layers=4, moe_layers=[1, 1]), "moe_layers"),
        (dict(moe_layers="every_third"), "moe_layers"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_invalid_values_name_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=rf"`{field}`=") as error:
        UniMoETextConfig(**overrides)
    bad_value = overrides[field]
    assert repr(bad_value) in str(error.value)


def test_invalid_text_config_fails_inside_composite():
    with pytest.raises(ValueError, match="`num_experts`=0"):
        UniMoEConfig(text_config={"num_experts": 0})


@pytest.mark.parametrize(
    "moe_layers, expected", [("all", [0, 1, 2, 3, 4]), ("even", [0, 2, 4]), ("odd", [1, 3]), ([3, 1], [1, 3])]
)
def test_sparse_layer_selection(moe_layers, expected):
    config = UniMoETextConfig(num_hidden_layers=5, hidden_size=32, num_attention_heads=4, moe_layers=moe_layers)
    assert config.sparse_layer_indices == expected
    model = UniMoEForCausalLM(UniMoEConfig(text_config=config.to_dict() | {"vocab_size": 16, "intermediate_size": 8}))
    kinds = [type(layer.mlp).__name__ for layer in model.model.language_model.layers]
    assert [i for i, kind in enumerate(kinds) if kind == "UniMoESparseMoeBlock"] == expected
    assert all(kind in ("UniMoESparseMoeBlock", "UniMoEMLP") for kind in kinds)


def test_defaults_and_composite_roundtrip(tmp_path):
    config = load_preset("tiny", router_type="softmax_topk", num_shared_experts=1)
    assert config.get_text_config() is config.text_config
    assert config.text_config.moe_intermediate_size == config.text_config.intermediate_size
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoConfig"] == "configuration_unimoe.UniMoEConfig"
    reloaded = UniMoEConfig.from_pretrained(tmp_path)
    assert reloaded.text_config.to_dict() == config.text_config.to_dict()


def test_tie_word_embeddings_follows_text_config():
    assert UniMoEConfig(text_config={"tie_word_embeddings": True}).tie_word_embeddings is True
    assert UniMoEConfig(text_config={"tie_word_embeddings": False}).tie_word_embeddings is False


def _param_counts(preset: str) -> tuple[int, int]:
    """(total, active per token) parameters of a preset, counted on the meta device."""
    with torch.device("meta"):
        model = UniMoEForCausalLM(load_preset(preset))
    return sum(p.numel() for p in model.parameters()), model.num_active_parameters()


def test_presets_exist():
    assert {"tiny", "small", "unimoe-v1-speech-4e", "unimoe-v1-audio-4e", "unimoe-v1-8e"} <= set(available_presets())


def test_active_parameters_by_hand():
    model = UniMoEForCausalLM(load_preset("tiny", num_experts=4, num_experts_per_tok=1, moe_layers=[1, 3]))
    text = model.config.text_config
    one_expert = 3 * text.hidden_size * text.moe_intermediate_size  # gate, up, down
    total = sum(p.numel() for p in model.parameters())
    assert model.num_active_parameters() == total - 2 * 3 * one_expert  # 2 sparse layers, 3 idle experts each


def test_tiny_is_tiny():
    total, _ = _param_counts("tiny")
    assert total < 5_000_000


@pytest.mark.parametrize(
    "preset, total_billions, active_billions",
    [
        # Vicuna-7B (6.74 B) with one 135.3 M FFN per expert, figures from the Uni-MoE v1 release.
        ("unimoe-v1-speech-4e", 19.7, 11.1),  # 4 experts, top-2, all 32 layers
        ("unimoe-v1-audio-4e", 13.2, 8.9),  # even layers only
        ("unimoe-v1-8e", 37.0, 11.1),  # 8 experts, top-2
    ],
)
def test_paper_presets_parameter_counts(preset, total_billions, active_billions):
    total, active = _param_counts(preset)
    assert total / 1e9 == pytest.approx(total_billions, abs=0.1)
    assert active / 1e9 == pytest.approx(active_billions, abs=0.1)


def test_paper_presets_moe_fields():
    speech, audio, eight = (load_preset(name).text_config for name in ("unimoe-v1-speech-4e", "unimoe-v1-audio-4e", "unimoe-v1-8e"))
    assert (speech.num_experts, speech.num_experts_per_tok, len(speech.sparse_layer_indices)) == (4, 2, 32)
    assert audio.sparse_layer_indices == list(range(0, 32, 2))
    assert (eight.num_experts, eight.num_experts_per_tok, eight.router_aux_loss_coef) == (8, 2, 0.01)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(audio_config=None, audio_qformer_config=None, audio_towers=["beats"]), "audio_towers"),  # no audio_config
        (dict(audio_towers=["whisper", "whisper"]), "audio_towers"),
        (dict(audio_towers=["wav2vec"]), "audio_towers"),
        (dict(video_pooling="max"), "video_pooling"),
        (dict(num_query_tokens=0), "num_query_tokens"),
        (dict(num_query_tokens=65), "num_query_tokens"),  # tiny Whisper aligner has 64 positions
        (dict(max_audio_windows=0), "max_audio_windows"),
        (dict(speech_aligner_layers=9), "speech_aligner_layers"),
        (dict(vision_feature_layer=-7), "vision_feature_layer"),
        (dict(image_token_id=None), "image_token_id"),
        (dict(audio_token_id=600), "audio_token_id"),
        (dict(projector_num_experts=0), "projector_num_experts"),
        (dict(projector_num_experts=2, projector_num_experts_per_tok=3), "projector_num_experts_per_tok"),
        (dict(vision_moe_layers=[1], vision_feature_layer=-2), "vision_moe_layers"),  # never reaches hidden_states[-2]
        (dict(vision_moe_layers=[0], vision_num_experts=2, vision_num_experts_per_tok=3), "vision_num_experts_per_tok"),
    ],
)
def test_invalid_multimodal_values_name_field_and_value(overrides, field):
    data = load_preset("tiny").to_dict() | overrides
    with pytest.raises(ValueError, match=rf"`{field}`="):
        UniMoEConfig.from_dict(data)


def test_audio_towers_default_to_the_configured_towers():
    assert load_preset("tiny").audio_towers == ["whisper", "beats"]
    assert load_preset("tiny", text_only=True).audio_towers == []


def test_audio_window_must_match_the_whisper_encoder():
    tiny = load_preset("tiny").to_dict()
    assert UniMoEConfig.from_dict(tiny).audio_window_seconds == 4  # max_source_positions 200 = 400 mel frames
    with pytest.raises(ValueError, match=r"`audio_window_seconds`=30.*4 s: the Whisper encoder's max_source_positions=200"):
        UniMoEConfig.from_dict(tiny | {"audio_window_seconds": 30})


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "overrides, field, expected",
    [
        (dict(hidden_size=0), "hidden_size", "a positive integer"),
        (dict(hidden_size=-64), "hidden_size", "a positive integer"),
        (dict(vocab_size=0), "vocab_size", "a positive integer"),
        (dict(intermediate_size=-1, moe_intermediate_size=8), "intermediate_size", "a positive integer"),
        (dict(max_position_embeddings=0), "max_position_embeddings", "a positive integer"),
        (dict(hidden_act="swishy"), "hidden_act", "one of transformers' activations ("),
        (dict(num_hidden_layers=-1), "num_hidden_layers", "0 or more decoder layers"),
        (dict(rms_norm_eps=-1e-5), "rms_norm_eps", "a small positive number"),
        (dict(rms_norm_eps=NAN), "rms_norm_eps", "a small positive number"),
        (dict(router_aux_loss_coef=NAN), "router_aux_loss_coef", "a finite, non-negative weight"),
        (dict(router_aux_loss_coef=INF), "router_aux_loss_coef", "a finite, non-negative weight"),
        (dict(router_z_loss_coef=NAN), "router_z_loss_coef", "a finite, non-negative weight"),
        (dict(num_attention_heads=0), "num_attention_heads", "a positive integer"),
        (dict(hidden_size=64, num_attention_heads=3), "num_attention_heads", "a divisor of hidden_size=64"),
        (dict(num_key_value_heads=0), "num_key_value_heads", "a divisor of num_attention_heads=32"),
        (dict(num_key_value_heads=-8), "num_key_value_heads", "a divisor of num_attention_heads=32"),
        (dict(head_dim=0), "head_dim", "a positive integer"),
        (dict(initializer_range=-0.02), "initializer_range", "a non-negative standard deviation"),
        (dict(initializer_range=NAN), "initializer_range", "a non-negative standard deviation"),
        (dict(attention_dropout=1.5), "attention_dropout", "a probability in [0, 1]"),
        (dict(vocab_size=512, pad_token_id=600), "pad_token_id", "None or an id below vocab_size=512"),
    ],
)
def test_build_breaking_text_values_are_refused(overrides, field, expected):
    """Each value used to pass the config and fail later: a KeyError on the activation, a negative tensor dimension or
    a division by zero when the model is built, NaN in the first forward or loss, or nothing at all (NaN weights)."""
    with pytest.raises(ValueError) as error:
        UniMoETextConfig(**overrides)
    message = str(error.value)
    assert message.startswith(f"UniMoETextConfig: invalid `{field}`={overrides[field]!r}; expected {expected}"), message


@pytest.mark.parametrize(
    "rope_parameters, message",
    [
        ({"rope_type": "bogus", "rope_theta": 10000.0}, "`rope_parameters['rope_type']`='bogus'; expected one of ('default', "),
        ({"rope_type": "default", "rope_theta": 0.0}, "`rope_parameters['rope_theta']`=0.0; expected a positive base wavelength"),
        ({"rope_type": "default", "rope_theta": -1.0}, "`rope_parameters['rope_theta']`=-1.0; expected a positive base wavelength"),
    ],
)
def test_bad_rope_parameters_are_refused(rope_parameters, message):
    with pytest.raises(ValueError) as error:
        UniMoETextConfig(rope_parameters=rope_parameters)
    assert message in str(error.value)


def test_edge_values_that_build_are_kept():
    assert UniMoETextConfig(num_hidden_layers=0, moe_layers="all").sparse_layer_indices == []
    assert UniMoETextConfig(pad_token_id=None, router_z_loss_coef=0.0, attention_dropout=1).pad_token_id is None
    assert UniMoETextConfig(hidden_size=64, num_attention_heads=3, head_dim=16).head_dim == 16  # explicit head width
    assert UniMoETextConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}).rope_parameters["rope_type"] == "linear"


def _tiny_with(overrides: dict) -> dict:
    """The tiny preset's dict with `overrides`; a dict value for a sub-config key updates that sub-config."""
    data = load_preset("tiny").to_dict()
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if key.endswith("_config") else value
    return data


@pytest.mark.parametrize(
    "overrides, field, value, expected",
    [
        (dict(video_token_id=3), "video_token_id", 3, "an id of its own: image_token_id is 3 too"),
        (dict(audio_token_id=3), "audio_token_id", 3, "an id of its own: image_token_id is 3 too"),
        (dict(audio_token_id=4), "audio_token_id", 4, "an id of its own: video_token_id is 4 too"),
        (dict(image_token_id=0), "image_token_id", 0, "an id of its own: text_config.pad_token_id is 0 too"),
        (dict(image_token_id=2), "image_token_id", 2, "an id of its own: text_config.eos_token_id is 2 too"),
        (dict(mm_router_aux_loss_coef=NAN), "mm_router_aux_loss_coef", NAN, "a finite, non-negative weight"),
        (dict(mm_router_z_loss_coef=-1.0), "mm_router_z_loss_coef", -1.0, "a finite, non-negative weight"),
        (dict(mm_router_z_loss_coef=INF), "mm_router_z_loss_coef", INF, "a finite, non-negative weight"),
        (dict(projector_hidden_act="swishy"), "projector_hidden_act", "swishy", "one of transformers' activations ("),
        (dict(vision_moe_layers=[0], vision_num_experts=0, vision_num_experts_per_tok=0), "vision_num_experts", 0, "at least 1"),
        (dict(vision_config={"hidden_act": "swishy"}), "vision_config.hidden_act", "swishy", "one of transformers' activations ("),
        (dict(vision_config={"patch_size": 0}), "vision_config.patch_size", 0, "a positive number of pixels"),
        (dict(vision_config={"num_channels": 1}), "vision_config.num_channels", 1, "3: the image processor gives RGB pixels"),
        (dict(vision_config={"layer_norm_eps": -1.0}), "vision_config.layer_norm_eps", -1.0, "a small positive number"),
        (dict(speech_config={"activation_function": "swishy"}), "speech_config.activation_function", "swishy", "one of transformers' activations ("),
        (dict(speech_config={"d_model": 33}), "speech_config.encoder_attention_heads", 2, "a divisor of speech_config.d_model=33"),
        (dict(speech_config={"decoder_attention_heads": 3}), "speech_config.decoder_attention_heads", 3, "a divisor of speech_config.d_model=32"),
        (dict(audio_qformer_config={"num_attention_heads": 3}), "audio_qformer_config.num_attention_heads", 3, "a divisor of audio_qformer_config.hidden_size=32"),
        (dict(audio_qformer_config={"hidden_act": "swishy"}), "audio_qformer_config.hidden_act", "swishy", "one of transformers' activations ("),
        (dict(audio_qformer_config={"cross_attention_frequency": 0}), "audio_qformer_config.cross_attention_frequency", 0, "at least 1"),
        (dict(audio_qformer_config={"layer_norm_eps": -1.0}), "audio_qformer_config.layer_norm_eps", -1.0, "a small positive number"),
        (dict(audio_qformer_config={"encoder_hidden_size": 48}), "audio_qformer_config.encoder_hidden_size", 48, "the BEATs width audio_config.encoder_embed_dim=32"),
    ],
)
def test_build_breaking_multimodal_values_are_refused(overrides, field, value, expected):
    """Shared placeholder ids made one modality's placeholders count as another's (or padding / end-of-sequence as
    media) and the forward fail on the count; the sub-config values failed at build (KeyError, ZeroDivisionError),
    at the first forward (shape mismatch) or gave NaN - transformers' CLIP, Whisper and Q-Former configs accept them."""
    with pytest.raises(ValueError) as error:
        UniMoEConfig.from_dict(_tiny_with(overrides))
    message = str(error.value)
    assert message.startswith(f"UniMoEConfig: invalid `{field}`={value!r}; expected {expected}"), message


def test_audio_config_carries_the_audio_token_budget_vllm_reads(tmp_path):
    """vLLM's multimodal backend reads `audio_config.max_source_positions` as the most tokens one audio item yields:
    derived from the composite config, and the same after a save and reload."""
    config = load_preset("tiny")
    assert config.audio_config.max_source_positions == 4 * 4 * 2  # max_audio_windows x num_query_tokens x towers
    config.save_pretrained(tmp_path)
    reloaded = UniMoEConfig.from_pretrained(tmp_path)
    assert reloaded.audio_config.max_source_positions == 32
    changed = UniMoEConfig.from_pretrained(tmp_path, max_audio_windows=2)
    assert changed.audio_config.max_source_positions == 16


def test_the_text_only_layout_holds_no_tower_fields_and_says_its_model_type():
    """The flat text-only config (`UniMoETextConfig` at the top of config.json) and the composite one must not be
    mixed up: tower fields in a flat config would stay stray attributes (ignored by the model, misread by tools),
    and a flat config read as a composite one (its model_type edited or lost) built the default 7B language model."""
    from modeling_unimoe import UniMoEConfig, UniMoETextConfig

    flat = UniMoETextConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128).to_dict()
    for extra in ({"vision_config": {}}, {"image_token_id": 5, "audio_towers": ["whisper"]}, {"text_config": {}}):
        with pytest.raises(ValueError, match=r"UniMoETextConfig \(model_type 'unimoe_text', the text-only layout\) has no towers, but got the composite config's fields \["):
            UniMoETextConfig.from_dict({**flat, **extra})
    for model_type in ("unimoe", None):
        broken = {key: value for key, value in flat.items() if key != "model_type"} | ({"model_type": model_type} if model_type else {})
        with pytest.raises(ValueError, match=r"fields \['hidden_size', 'num_attention_heads', 'num_hidden_layers', 'vocab_size'\] at the top.*model_type 'unimoe_text'"):
            UniMoEConfig.from_dict(broken)
    wrapped = UniMoEConfig.from_dict(flat)  # the flat config as the composite model without towers
    assert wrapped.text_config.hidden_size == 64 and wrapped.vision_config is None and not wrapped.audio_towers


@pytest.mark.parametrize("content, message", [
    ({"text_config": {}}, r"is a text-only config \(model_type 'unimoe_text'\) holding a 'text_config'|composite config's fields \['text_config'\]"),
    ([1, 2], r"holds a JSON list, not an object of config fields"),
    ({}, r"names no model_type"),
])
def test_config_files_that_would_build_the_default_model_are_refused(tmp_path, content, message):
    """A flat config holding a `text_config` (transformers would read that nested dict instead of the flat fields),
    a config.json that is no JSON object, and one without a model_type: each built the default 7B-class language
    model (out of memory), or failed with an AttributeError."""
    from modeling_unimoe import UniMoETextForCausalLM

    flat = UniMoETextConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128).to_dict()
    data = flat | content if isinstance(content, dict) and content else content
    (tmp_path / "config.json").write_text(json.dumps(data))
    for cls in (UniMoETextForCausalLM, UniMoEForCausalLM, UniMoETextConfig, UniMoEConfig):
        with pytest.raises(ValueError, match=message):
            cls.from_pretrained(tmp_path)
