"""BEATs audio encoder: config, forward, official-checkpoint loading, agreement with the official code, Kaldi fbank."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_unimoe.configuration_beats import BEATsConfig
from modeling_unimoe.feature_extraction_beats import (
    _normalised_log_mel,
    beats_fbank,
    beats_frame_padding_mask,
    beats_num_frames,
    reference_log_mel,
)
from modeling_unimoe.modeling_beats import BEATsModel, beats_config_from_official, load_beats_checkpoint
from tests.utils import FIXTURES


FIXTURE = FIXTURES / "beats_tiny_official.pt"

# The `cfg` dict stored in BEATs_iter3_plus_AS2M.pt (the audio tower of Uni-MoE v1 audio).
AS2M_CFG = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_norm_first": False, "conv_bias": False, "conv_pos": 128,
    "conv_pos_groups": 16, "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800,
    "gru_rel_pos": True, "deep_norm": True, "input_patch_size": 16, "layer_wise_gradient_decay_ratio": 0.6,
    "embed_dim": 512, "finetuned_model": False,
}

# Same structure as AS2M (deep norm, gated relative positions, post_extract_proj, even pos-conv kernel), tiny widths.
TINY_CFG = {
    **AS2M_CFG, "encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 48,
    "encoder_attention_heads": 4, "encoder_layerdrop": 0.0, "conv_pos": 8, "conv_pos_groups": 4, "num_buckets": 32,
    "max_distance": 64, "embed_dim": 16,
}


def tiny_config(**overrides) -> BEATsConfig:
    return beats_config_from_official({**TINY_CFG, **overrides})


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official key names and shapes, written out from microsoft/unilm beats/ (BEATs.py,
    backbone.py): NOT derived from BEATsModel, so that the loading tests can fail."""
    generator = torch.Generator().manual_seed(seed)
    embed, dim, ffn = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    heads, patch, kernel = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]
    shapes = {
        "patch_embedding.weight": (embed, 1, patch, patch),
        "layer_norm.weight": (embed,),
        "layer_norm.bias": (embed,),
        "post_extract_proj.weight": (dim, embed),
        "post_extract_proj.bias": (dim,),
        "encoder.pos_conv.0.weight_g": (1, 1, kernel),  # nn.utils.weight_norm(conv, dim=2)
        "encoder.pos_conv.0.weight_v": (dim, dim // cfg["conv_pos_groups"], kernel),
        "encoder.pos_conv.0.bias": (dim,),
        "encoder.layer_norm.weight": (dim,),
        "encoder.layer_norm.bias": (dim,),
    }
    for i in range(cfg["encoder_layers"]):
        prefix = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{prefix}self_attn.{proj}.weight"] = (dim, dim)
            shapes[f"{prefix}self_attn.{proj}.bias"] = (dim,)
        shapes[f"{prefix}self_attn.grep_linear.weight"] = (8, dim // heads)
        shapes[f"{prefix}self_attn.grep_linear.bias"] = (8,)
        shapes[f"{prefix}self_attn.grep_a"] = (1, heads, 1, 1)
        shapes[f"{prefix}self_attn.relative_attention_bias.weight"] = (cfg["num_buckets"], heads)
        shapes[f"{prefix}self_attn_layer_norm.weight"] = (dim,)
        shapes[f"{prefix}self_attn_layer_norm.bias"] = (dim,)
        shapes[f"{prefix}fc1.weight"] = (ffn, dim)
        shapes[f"{prefix}fc1.bias"] = (ffn,)
        shapes[f"{prefix}fc2.weight"] = (dim, ffn)
        shapes[f"{prefix}fc2.bias"] = (dim,)
        shapes[f"{prefix}final_layer_norm.weight"] = (dim,)
        shapes[f"{prefix}final_layer_norm.bias"] = (dim,)
    state_dict = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    # the official encoder shares layer 0's table: every layer's key holds the same tensor
    table = state_dict["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    for i in range(1, cfg["encoder_layers"]):
        state_dict[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    return state_dict


def write_checkpoint(path: Path, cfg: dict, state_dict: dict) -> Path:
    torch.save({"cfg": cfg, "model": state_dict}, path)
    return path


# --- configuration ---------------------------------------------------------------------------------------------------


def test_config_defaults_are_beats_iter3_plus_as2m():
    config = BEATsConfig()
    for name, value in AS2M_CFG.items():
        if name != "finetuned_model":
            assert getattr(config, name) == value, name
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert BEATsConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"input_patch_size": -1}, "input_patch_size"),  # the official class default: must be set
        ({"encoder_attention_heads": 5}, "encoder_embed_dim"),
        ({"conv_pos_groups": 5}, "conv_pos_groups"),
        ({"activation_fn": "glu"}, "activation_fn"),
        ({"layer_norm_first": True}, "deep_norm"),
        ({"dropout": 1.5}, "dropout"),
        ({"encoder_layerdrop": -0.1}, "encoder_layerdrop"),
        ({"num_buckets": 2}, "num_buckets"),
        ({"max_distance": 8}, "max_distance"),
        ({"layer_wise_gradient_decay_ratio": 0.0}, "layer_wise_gradient_decay_ratio"),
    ],
)
def test_config_rejects_invalid_values(overrides, field):
    fields = {name: value for name, value in {**TINY_CFG, **overrides}.items() if name != "finetuned_model"}
    with pytest.raises(ValueError, match=f"`{field}`"):
        BEATsConfig(**fields)


def test_official_cfg_missing_fields_take_official_class_defaults():
    cfg = {key: value for key, value in TINY_CFG.items() if key not in ("max_distance", "dropout")}
    config = beats_config_from_official({**cfg, "some_training_flag": 1})  # unknown entries: ignored
    assert config.max_distance == 1280 and config.dropout == 0.1  # official BEATsConfig defaults, not AS2M's
    assert not hasattr(config, "finetuned_model")


# --- forward ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model() -> BEATsModel:
    torch.manual_seed(0)
    return BEATsModel(tiny_config()).eval()


def test_forward_shapes_and_padding_mask(tiny_model):
    fbank = torch.randn(2, 70, 128)  # 70 // 16 = 4 time steps x 8 mel patches = 32 patches
    padding = torch.zeros(2, 70, dtype=torch.bool)
    padding[1, 41:] = True
    with torch.no_grad():
        plain = tiny_model(fbank)
        unpadded = tiny_model(fbank, padding_mask=torch.zeros_like(padding))
        padded = tiny_model(fbank, padding_mask=padding)
    assert plain.last_hidden_state.shape == (2, 32, 32) and plain.padding_mask is None
    torch.testing.assert_close(unpadded.last_hidden_state, plain.last_hidden_state)
    # official rule: drop 70 % 32 = 6 frames, 2 frames per patch in patch order; patch 20 = frames 40, 41 (40 is real)
    expected = torch.zeros(2, 32, dtype=torch.bool)
    expected[1, 21:] = True
    assert torch.equal(padded.padding_mask, expected)
    torch.testing.assert_close(padded.last_hidden_state[0], plain.last_hidden_state[0])
    assert not torch.allclose(padded.last_hidden_state[1], plain.last_hidden_state[1], atol=1e-3)


def test_thirty_second_window_gives_1496_patches(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.randn(1, 2998, 128))  # 187 time steps x 8 mel patches; longer than max_distance
    assert out.last_hidden_state.shape == (1, 1496, 32)
    assert torch.isfinite(out.last_hidden_state).all()


def test_eager_and_sdpa_agree_and_hidden_states(tiny_model):
    fbank, padding = torch.randn(2, 48, 128), torch.zeros(2, 48, dtype=torch.bool)
    padding[0, 30:] = True
    with torch.no_grad():
        tiny_model.config._attn_implementation = "sdpa"
        sdpa = tiny_model(fbank, padding_mask=padding)
        tiny_model.config._attn_implementation = "eager"
        eager = tiny_model(fbank, padding_mask=padding, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(eager.hidden_states) == 3 and len(eager.attentions) == 2
    assert eager.attentions[0].shape == (2, 4, 24, 24)
    assert eager.attentions[0][0, :, :, 15:].max() == 0  # padded keys get no attention


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    model = BEATsModel(tiny_config(encoder_embed_dim=256, encoder_ffn_embed_dim=512))
    conv = model.encoder.pos_conv[0]
    weight_g, weight_v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert abs(weight_v.std().item() / (4 / (8 * 256)) ** 0.5 - 1) < 0.05
    torch.testing.assert_close(weight_g, weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())
    beta = (8 * 2) ** -0.25  # DeepNorm: Xavier-normal with gain beta for v, out, fc1, fc2; gain 1 for q, k
    fc1, q_proj = model.encoder.layers[1].fc1.weight, model.encoder.layers[1].self_attn.q_proj.weight
    assert abs(fc1.std().item() / (beta * (2 / (256 + 512)) ** 0.5) - 1) < 0.05
    assert abs(q_proj.std().item() / (2 / 512) ** 0.5 - 1) < 0.05
    assert abs(model.encoder.layers[0].self_attn.relative_attention_bias.weight.std().item() / 0.02 - 1) < 0.3
    assert (model.encoder.layers[0].self_attn.grep_a == 1).all()


def test_gradients_reach_every_parameter(tiny_model):
    tiny_model.train()
    tiny_model(torch.randn(2, 48, 128)).last_hidden_state.pow(2).mean().backward()
    for name, param in tiny_model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_layer_wise_gradient_decay_scales_gradients_per_layer(tiny_model):
    decayed = BEATsModel(tiny_config(layer_wise_gradient_decay_ratio=0.5))
    plain = BEATsModel(tiny_config(layer_wise_gradient_decay_ratio=1.0))
    for model in (decayed, plain):
        model.load_state_dict(tiny_model.state_dict())
    fbank = torch.randn(1, 32, 128)
    outputs = [model(fbank).last_hidden_state for model in (decayed, plain)]
    torch.testing.assert_close(outputs[0], outputs[1])  # forward unchanged
    for output in outputs:
        output.sum().backward()
    # every path to the patch embedding crosses both layer inputs: 0.5 ** 2
    torch.testing.assert_close(decayed.patch_embedding.weight.grad, 0.25 * plain.patch_embedding.weight.grad)


def test_save_pretrained_roundtrip_and_official_weight_norm_names(tiny_model, tmp_path):
    fbank = torch.randn(1, 32, 128)
    with torch.no_grad():
        expected = tiny_model(fbank).last_hidden_state
    tiny_model.save_pretrained(tmp_path)
    reloaded = BEATsModel.from_pretrained(tmp_path).eval()
    # transformers maps the official weight-norm names onto torch's parametrization when it loads
    weights = load_file(tmp_path / "model.safetensors")
    official_names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    renamed = {}
    for key, value in weights.items():
        for ours, official in official_names.items():
            key = key.replace(ours, official)
        renamed[key] = value
    assert "encoder.pos_conv.0.weight_g" in renamed
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    from_official_names, info = BEATsModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(fbank).last_hidden_state, expected)
        torch.testing.assert_close(from_official_names.eval()(fbank).last_hidden_state, expected)


# --- official checkpoints --------------------------------------------------------------------------------------------


def test_official_checkpoint_loads_strictly_into_the_right_parameters(tmp_path):
    state_dict = official_state_dict(TINY_CFG)
    model = load_beats_checkpoint(write_checkpoint(tmp_path / "beats.pt", TINY_CFG, state_dict))
    assert not model.training
    ours = dict(model.named_parameters())
    conv = model.encoder.pos_conv[0]
    for key, tensor in state_dict.items():
        if key == "encoder.pos_conv.0.weight_g":
            target = conv.parametrizations.weight.original0
        elif key == "encoder.pos_conv.0.weight_v":
            target = conv.parametrizations.weight.original1
        elif key.endswith("relative_attention_bias.weight"):
            target = model.encoder.layers[0].self_attn.relative_attention_bias.weight  # the one shared table
        else:
            target = ours[key]
        assert torch.equal(target, tensor), key
    # the convolution uses the weight-normalised kernel g * v / ||v|| (norm over all axes but the kernel axis)
    g, v = state_dict["encoder.pos_conv.0.weight_g"], state_dict["encoder.pos_conv.0.weight_v"]
    torch.testing.assert_close(conv.weight, v * g / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())


def test_finetuned_checkpoint_head_is_the_only_allowed_extra(tmp_path):
    cfg = {**TINY_CFG, "finetuned_model": True, "predictor_class": 5}
    state_dict = {**official_state_dict(cfg), "predictor.weight": torch.randn(5, 32), "predictor.bias": torch.randn(5)}
    load_beats_checkpoint(write_checkpoint(tmp_path / "finetuned.pt", cfg, state_dict))
    state_dict["predictor_dropout.weight"] = torch.randn(1)
    with pytest.raises(ValueError, match=r"unexpected keys: predictor_dropout\.weight"):
        load_beats_checkpoint(write_checkpoint(tmp_path / "extra.pt", cfg, state_dict))


def test_missing_unexpected_and_mismatched_keys_are_errors(tmp_path):
    state_dict = official_state_dict(TINY_CFG)
    del state_dict["encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: encoder\.layers\.1\.fc2\.bias"):
        load_beats_checkpoint(write_checkpoint(tmp_path / "missing.pt", TINY_CFG, state_dict))

    state_dict = {**official_state_dict(TINY_CFG), "encoder.layers.0.self_attn.bias_k": torch.zeros(1, 1, 32)}
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.layers\.0\.self_attn\.bias_k"):
        load_beats_checkpoint(write_checkpoint(tmp_path / "unexpected.pt", TINY_CFG, state_dict))

    state_dict = {**official_state_dict(TINY_CFG), "encoder.layers.0.fc1.weight": torch.zeros(7, 32)}
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.fc1\.weight \(7, 32\) vs \(48, 32\)"):
        load_beats_checkpoint(write_checkpoint(tmp_path / "shape.pt", TINY_CFG, state_dict))

    state_dict = official_state_dict(TINY_CFG)
    state_dict["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.self_attn\.relative_attention_bias\.weight"):
        load_beats_checkpoint(write_checkpoint(tmp_path / "tables.pt", TINY_CFG, state_dict))


def test_unreadable_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a torch checkpoint")
    with pytest.raises(ValueError, match=str(corrupt)):
        load_beats_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    write_checkpoint(truncated, TINY_CFG, official_state_dict(TINY_CFG))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=str(truncated)):
        load_beats_checkpoint(truncated)
    bare = tmp_path / "bare_state_dict.pt"
    torch.save(official_state_dict(TINY_CFG), bare)
    with pytest.raises(ValueError, match=f"{bare} is not an official BEATs checkpoint"):
        load_beats_checkpoint(bare)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_beats_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_the_official_implementation(tmp_path, attn_implementation):
    """The fixture was made by running the official code (microsoft/unilm `beats/` at 768a3c8, torchaudio stubbed,
    `preprocess` bypassed so `extract_features` takes the fbank directly) on CPU: a tiny BEATs with the AS2M structure
    whose every parameter was perturbed from its init, saved as `{"cfg", "model"}`, plus a random fbank
    [2, 50, 128], a frame padding mask (sample 1 padded from frame 30) and the official outputs with and without
    it. Nothing official is imported here: the test compares against those stored numbers."""
    fixture = torch.load(FIXTURE, weights_only=True)
    model = load_beats_checkpoint(write_checkpoint(tmp_path / "official.pt", fixture["cfg"], fixture["model"]))
    model.config._attn_implementation = attn_implementation
    fbank, padding = fixture["input_values"], fixture["padding_mask"]
    with torch.no_grad():
        plain = model(fbank)
        padded = model(fbank, padding_mask=padding)
    torch.testing.assert_close(plain.last_hidden_state, fixture["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.last_hidden_state, fixture["output_padded"], atol=1e-5, rtol=0)
    assert torch.equal(padded.padding_mask, fixture["output_padding_mask"])
    # the fixture exercises the mask: it changes the padded sample only
    assert (fixture["output_padded"][1] - fixture["output"][1]).abs().max() > 1e-2
    assert padding[1].any() and not padding[0].any()


# --- Kaldi fbank -----------------------------------------------------------------------------------------------------


def kaldi_fbank_reference(waveform: np.ndarray) -> np.ndarray:
    """Slow float64 Kaldi fbank written from the Kaldi / torchaudio.compliance.kaldi.fbank definitions, normalised
    like BEATs."""
    x = waveform.astype(np.float64) * 32768.0
    mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731 (Kaldi's mel scale)
    low, high = mel(20.0), mel(8000.0)
    step = (high - low) / (128 + 1)
    bank = np.zeros((128, 257))  # 256 FFT bins used by Kaldi, the Nyquist bin stays zero
    for m in range(128):
        left, center, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        for k in range(256):
            f = mel(k * 16000.0 / 512)
            if left < f < right:
                bank[m, k] = (f - left) / (center - left) if f <= center else (right - f) / (right - center)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85  # povey: symmetric Hann ** 0.85
    rows = []
    for start in range(0, len(x) - 400 + 1, 160):
        frame = x[start : start + 400] - x[start : start + 400].mean()  # remove DC offset
        emphasised = np.empty(400)
        emphasised[0] = frame[0] - 0.97 * frame[0]  # Kaldi's pre-emphasis replicates the first sample
        for j in range(1, 400):
            emphasised[j] = frame[j] - 0.97 * frame[j - 1]
        buffer = np.zeros(512)
        buffer[:400] = emphasised * window
        power = np.abs(np.fft.rfft(buffer)) ** 2
        rows.append(np.log(np.maximum(bank @ power, np.finfo(np.float32).eps)))
    return (np.array(rows) - 15.41663) / (2 * 6.55582)


def test_fbank_of_thirty_seconds_is_2998_by_128():
    assert beats_num_frames(480000) == 2998 and beats_num_frames(400) == 1 and beats_num_frames(399) == 0
    fbank = beats_fbank(np.random.RandomState(0).uniform(-0.5, 0.5, 480000).astype(np.float32))
    assert fbank.shape == (2998, 128) and fbank.dtype == torch.float32


def test_fbank_matches_a_handwritten_kaldi_reference():
    t = np.arange(8000) / 16000
    noise = np.random.RandomState(0).randn(8000)
    waveform = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t) + 0.05 * noise + 0.02)
    waveform = waveform.astype(np.float32)
    ours = beats_fbank(waveform).numpy()
    reference = kaldi_fbank_reference(waveform)
    assert ours.shape == reference.shape == (48, 128)
    # Tolerance: ours stores the FFT as complex64 (relative error ~1e-7 on each power) and returns float32 (values of
    # a few units: ulp ~2e-7), so agreement to ~5e-7 is expected (measured 1.2e-7). 1e-5 keeps a 20x margin, while a
    # real mistake (periodic instead of symmetric window: 4e-2; Hann instead of povey: 0.25) is far above it.
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("remove_dc_offset", [True, False])
def test_array_wide_fbank_equals_transformers_frame_by_frame_spectrogram_bit_for_bit(remove_dc_offset):
    """The fbank runs `spectrogram`'s per-frame steps on all frames at once (its Python loop was most of an audio row's
    collation); it must give the same bits, so that cached and uncached features, and runs before and after, agree.
    Lengths cover one frame, partial hops, and the 4 s and 30 s windows; levels from near silence to full scale,
    clipped noise, a tone with a DC offset, and edge padding."""
    rng = np.random.default_rng(0)
    t = np.arange(480000) / 16000
    signals = [
        np.clip(rng.standard_normal(480000), -1, 1),
        0.3 * np.sin(2 * np.pi * 440 * t) + 0.02,
        rng.standard_normal(480000) * 1e-4,
        np.pad(rng.uniform(-0.5, 0.5, 9000), (0, 480000 - 9000), mode="edge"),
    ]
    for signal in signals:
        for length in (400, 401, 559, 4321, 64000, 480000):
            waveform = signal[:length].astype(np.float32)
            ours = _normalised_log_mel(waveform, remove_dc_offset)
            assert np.array_equal(ours, reference_log_mel(waveform, remove_dc_offset)), (length, signal[:3])
            assert ours.dtype == np.float32 and ours.shape == (beats_num_frames(length), 128)


def test_fbank_reproduces_torchaudio_on_the_edge_padding():
    """Frames of the edge padding (the last sample repeated) hold one value; torchaudio's float32 DC removal leaves a
    rounding residual there that reaches the low mel bins, and BEATs and the original saw it. The fixture holds 16
    clips (0.04 s of tone and noise, then 0.085 s of edge padding) and their fbank, computed with the operations of
    `torchaudio.compliance.kaldi.fbank` in float32 on CPU (torch 2.13; the same on its AVX512, AVX2 and default
    kernels); torchaudio itself does not load next to this torch."""
    recorded = torch.load(FIXTURES / "beats_fbank_torchaudio.pt", weights_only=True)
    ours = beats_fbank(recorded["waveforms"])
    # natural frames agree to 6e-5 (float64 FFT here); padding frames to 4e-6
    torch.testing.assert_close(ours, recorded["fbank"], atol=2e-4, rtol=0)
    # not vacuous: exact arithmetic would put every padding frame at the log floor
    floor = (np.log(np.finfo(np.float32).eps) - 15.41663) / (2 * 6.55582)
    padding = recorded["fbank"][:, 5:]
    assert (padding.amax(dim=-1) > floor + 0.2).float().mean() > 0.4


def test_fbank_batches_tensors_and_rejects_bad_input():
    waveforms = np.random.RandomState(1).uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    batch = beats_fbank(torch.from_numpy(waveforms))
    assert batch.shape == (2, 23, 128)
    torch.testing.assert_close(batch[1], beats_fbank(waveforms[1]))
    with pytest.raises(ValueError, match="16000 Hz"):
        beats_fbank(waveforms[0], sampling_rate=8000)
    with pytest.raises(ValueError, match="399 samples"):
        beats_fbank(waveforms[0, :399])


def test_frame_padding_mask_follows_the_official_rule():
    samples = torch.zeros(1, 10, dtype=torch.bool)
    samples[0, 5:] = True  # 10 samples -> 3 frames: drop 1 sample, groups {0,1,2} {3,4,5} {6,7,8}
    assert beats_frame_padding_mask(samples, 3).tolist() == [[False, False, True]]
    window = torch.zeros(1, 480000, dtype=torch.bool)
    window[0, 400000:] = True  # 160 samples per frame, the last 320 samples dropped
    frames = beats_frame_padding_mask(window, 2998)
    assert frames.shape == (1, 2998) and frames[0, 2500:].all() and not frames[0, :2500].any()
