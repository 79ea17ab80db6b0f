"""CuMo as a recipe (issue 18): co-upcycling keeps the function, the CLI's `--recipe cumo` stages train what they
should, every router's losses reach the loss and the logs, CLIP stops at the feature layer, the published YAMLs, the
quickstart's `--recipe cumo`, and a co-upcycled checkpoint through remote code, the Hub, the evaluate CLI and the
server."""

import base64
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import CLIPVisionModel, TrainingArguments
from transformers.activations import ACT2FN

from modeling_unimoe import (
    UniMoEConfig,
    UniMoEExperts,
    UniMoEForCausalLM,
    UniMoETopKRouter,
    router_balance_loss,
    router_z_loss,
)
from tests.utils import REPO_ROOT
from tests.utils.media import write_image, write_video
from tests.utils.models import TINY_IMAGE_PATCHES as PATCHES, image_and_video_batch, make_tiny_cumo_model
from tests.utils.processes import run_fresh_python
from trl_scripts import load_preset, load_tiny_processor
from trl_scripts.training.stages import parameter_counts
from trl_scripts.training.train import DataArguments, StageArguments, run
from trl_scripts.training.upcycling import upcycle_multimodal_experts


CUMO_YAMLS = {stage: REPO_ROOT / "configuration" / "training" / f"cumo-mistral-7b-stage{stage}.yaml" for stage in (1, 2, 3)}


def tiny_vision_model(seed: int = 0, clip_layers: int = 2, feature_layer: int = -1, **text_overrides) -> UniMoEForCausalLM:
    """The `tiny` preset with its towers, CLIP `clip_layers` deep read at `feature_layer`."""
    config = load_preset("tiny", **text_overrides).to_dict()
    config["vision_config"]["num_hidden_layers"] = clip_layers
    config["vision_feature_layer"] = feature_layer
    torch.manual_seed(seed)
    return UniMoEForCausalLM(UniMoEConfig.from_dict(config)).eval()


# ------------------------------------------------------------------------------------------------- co-upcycling


@pytest.mark.parametrize(
    "projector_experts, clip_layers", [(4, "none"), (1, "all"), (4, "all")], ids=["projector", "clip", "both"]
)
def test_coupcycling_gives_the_dense_outputs(projector_experts, clip_layers):
    dense = tiny_vision_model()
    moe = upcycle_multimodal_experts(
        dense, projector_num_experts=projector_experts, projector_num_experts_per_tok=2, vision_moe_layers=clip_layers,
        vision_num_experts=4, vision_num_experts_per_tok=2,
    )
    batch = image_and_video_batch()
    with torch.no_grad():
        expected, got = dense(**batch), moe(**batch, output_router_logits=True)
    for name in ("logits", "image_hidden_states", "video_hidden_states"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)
    sparse = [*(got.projector_router_logits or ()), *(got.vision_router_logits or ())]
    assert len(sparse) == (projector_experts > 1) + (2 if clip_layers == "all" else 0)
    # live routers (the identity comes from identical experts, not a dead router) that pick different experts
    assert all(logits.std() > 0 and logits.argmax(-1).unique().numel() > 1 for logits in sparse)
    assert moe.generation_config.to_dict() == dense.generation_config.to_dict()


def test_coupcycling_refuses_what_it_cannot_do():
    dense = tiny_vision_model(clip_layers=3, feature_layer=-2)
    with pytest.raises(ValueError, match=r"CLIP layers 0 to 1 feed vision_feature_layer=-2 .*out of range: \[2\]"):
        upcycle_multimodal_experts(dense, vision_moe_layers=[0, 2])
    with pytest.raises(ValueError, match="nothing to co-upcycle"):
        upcycle_multimodal_experts(dense, projector_num_experts=1, vision_moe_layers="none")
    moe = upcycle_multimodal_experts(dense, projector_num_experts=2, vision_moe_layers="odd")
    assert moe.config.vision_moe_layers == [1]
    with pytest.raises(ValueError, match="already a mixture of experts"):
        upcycle_multimodal_experts(moe, projector_num_experts=2)


# ------------------------------------------------------------------------------------ the last layer (point 3)


def test_no_clip_layer_or_router_past_the_feature_layer_runs():
    """CuMo's CLIP MoE computed its 24th layer, router losses included, and returned that layer's input. Here CLIP
    stops at `vision_feature_layer`: `all` co-upcycles the layers that feed it, and no later layer runs at all."""
    dense = tiny_vision_model(clip_layers=3, feature_layer=-2)  # hidden_states[-2]: the output of layer 1 of 0-2
    assert dense.config.vision_feature_depth == 2
    moe = upcycle_multimodal_experts(dense, projector_num_experts=4, vision_moe_layers="all")
    assert moe.config.vision_moe_layers == [0, 1]
    layers = moe.model.vision_tower.encoder.layers
    calls = {f"layer {index}": 0 for index in range(3)} | {"router 0": 0, "router 1": 0, "projector router": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(count(f"layer {index}"))
        if index < 2:
            layer.mlp.gate.register_forward_hook(count(f"router {index}"))
    moe.model.multi_modal_projector.gate.register_forward_hook(count("projector router"))
    batch = image_and_video_batch()
    out = moe(**batch, output_router_logits=True)
    # one call for the images, one for the video frames; layer 2 and anything after never run
    assert calls == {"layer 0": 2, "layer 1": 2, "layer 2": 0, "router 0": 2, "router 1": 2, "projector router": 2}
    assert len(out.vision_router_logits) == 2 and out.vision_router_logits[0].shape == (5 * (1 + PATCHES), 4)
    expected_aux = torch.stack([router_balance_loss((logits,), 2) for logits in out.vision_router_logits]).mean()
    torch.testing.assert_close(out.vision_aux_loss, expected_aux)
    # layer 2 keeps its weights (CLIP checkpoints load strictly), and the features are still transformers' hidden
    # state -2 of the full CLIP, bit for bit
    assert len(layers) == 3 and "model.vision_tower.encoder.layers.2.mlp.fc1.weight" in moe.state_dict()
    full_clip = CLIPVisionModel(dense.config.vision_config).eval()
    full_clip.load_state_dict(dense.model.vision_tower.state_dict(), strict=True)
    with torch.no_grad():
        full = full_clip(batch["pixel_values"], output_hidden_states=True).hidden_states
        features = dense.model.get_image_features(batch["pixel_values"], output_hidden_states=True)
    assert len(full) == 4 and torch.equal(features.last_hidden_state, full[-2][:, 1:])
    assert len(features.hidden_states) == 3 and all(torch.equal(a, b) for a, b in zip(features.hidden_states, full))


# ------------------------------------------------------------------------------------------- router losses


def test_every_router_loss_reaches_the_total_loss_with_its_weight():
    """LLM, projector and CLIP routers: each group's balance and z-loss, unweighted on the output, weighted in the
    loss by its own coefficient, with gradient reaching every router."""
    dense = tiny_vision_model(clip_layers=2)  # the tiny LLM is sparse in all 4 layers
    moe = upcycle_multimodal_experts(dense, projector_num_experts=4, vision_moe_layers="all")
    text = moe.config.text_config
    text.router_aux_loss_coef, text.router_z_loss_coef = 0.3, 0.07
    moe.config.mm_router_aux_loss_coef, moe.config.mm_router_z_loss_coef = 0.11, 0.013
    moe.train()
    out = moe(**image_and_video_batch(), output_router_logits=True)
    terms = {
        "aux_loss": 0.3, "z_loss": 0.07, "projector_aux_loss": 0.11, "projector_z_loss": 0.013,
        "vision_aux_loss": 0.11, "vision_z_loss": 0.013,
    }
    assert all(getattr(out, name) is not None for name in terms)
    torch.testing.assert_close(out.loss, out.ce_loss + sum(coef * getattr(out, name) for name, coef in terms.items()))
    # each group's losses are those of its own routers' logits
    torch.testing.assert_close(out.projector_aux_loss, router_balance_loss(out.projector_router_logits, 2))
    torch.testing.assert_close(out.vision_z_loss, router_z_loss(out.vision_router_logits))
    # the router terms alone train every router: the LLM's, the projector's and each CLIP MoE layer's
    (out.loss - out.ce_loss).backward()
    gates = [layer.mlp.gate.weight for layer in moe.model.language_model.layers]
    gates += [moe.model.multi_modal_projector.gate.weight]
    gates += [moe.model.vision_tower.encoder.layers[i].mlp.gate.weight for i in (0, 1)]
    assert all(gate.grad is not None and gate.grad.abs().sum() > 0 for gate in gates)
    # no router logits asked for: no router loss, and the loss is the cross-entropy
    plain = moe(**image_and_video_batch())
    assert plain.projector_aux_loss is None and plain.vision_aux_loss is None
    torch.testing.assert_close(plain.loss, plain.ce_loss)


# ------------------------------------------------------------------------ one router and one experts class


def test_cumo_blocks_run_the_language_models_router_and_experts_classes():
    """The projector's and CLIP's sparse blocks hold the language model's router and experts classes: fused 3-D
    experts in the dense MLP's shape (no gate, biases; the projector maps CLIP's width to the LLM's), routed softmax ->
    top-k -> renormalised, as CuMo routes."""
    model = make_tiny_cumo_model()
    vision, text = model.config.vision_config, model.config.text_config
    llm = model.model.language_model.layers[0].mlp
    clip = model.model.vision_tower.encoder.layers[1].mlp
    projector = model.model.multi_modal_projector
    for block in (llm, clip, projector):
        assert type(block.gate) is UniMoETopKRouter and type(block.experts) is UniMoEExperts
    assert (llm.experts.has_gate, llm.experts.has_bias) == (True, False)
    assert (clip.experts.has_gate, clip.experts.has_bias) == (projector.experts.has_gate, projector.experts.has_bias) == (False, True)
    H, I, D = vision.hidden_size, vision.intermediate_size, text.hidden_size
    assert {name: tuple(p.shape) for name, p in clip.named_parameters()} == {
        "gate.weight": (4, H), "experts.up_proj": (4, I, H), "experts.down_proj": (4, H, I),
        "experts.up_proj_bias": (4, I), "experts.down_proj_bias": (4, H),
    }  # fmt: skip
    assert {name: tuple(p.shape) for name, p in projector.experts.named_parameters()} == {
        "up_proj": (4, D, H), "down_proj": (4, D, D), "up_proj_bias": (4, D), "down_proj_bias": (4, D),
    }  # fmt: skip
    assert (clip.gate.router_type, clip.gate.norm_topk_prob, clip.gate.top_k) == ("softmax_topk", True, 2)


@pytest.mark.parametrize("component", ["clip", "projector"])
def test_a_cumo_block_sums_its_top_k_expert_mlps_with_renormalised_weights(component):
    """What CuMo's blocks compute, written out per token: the top-k experts' MLPs (linear, activation, linear), each
    weighted by its softmax probability over the k chosen."""
    model = make_tiny_cumo_model()
    config = model.config
    block = model.model.vision_tower.encoder.layers[0].mlp if component == "clip" else model.model.multi_modal_projector
    act_fn = ACT2FN[config.vision_config.hidden_act if component == "clip" else config.projector_hidden_act]
    experts = block.experts
    hidden = torch.randn(2, 5, experts.hidden_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(hidden)
        expected = torch.zeros(10, experts.output_dim)
        for row, token in enumerate(hidden.reshape(10, -1)):
            probs = torch.softmax(block.gate.weight @ token, dim=-1)
            weights, chosen = probs.topk(2)
            for weight, e in zip(weights / weights.sum(), chosen.tolist()):
                activated = act_fn(experts.up_proj[e] @ token + experts.up_proj_bias[e])
                expected[row] += weight * (experts.down_proj[e] @ activated + experts.down_proj_bias[e])
    assert got.shape == (2, 5, experts.output_dim)
    torch.testing.assert_close(got.reshape(10, -1), expected)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_cumo_experts_follow_the_experts_implementation_switch(implementation, monkeypatch):
    """`set_experts_implementation` reaches CuMo's experts (they read the composite config's choice) as it reaches
    the language model's: CLIP's experts run transformers' kernel, with the eager kernel's logits, losses and
    gradients. The projector's experts map CLIP's width to the LLM's, which transformers' kernels cannot sum: they run
    the eager kernel whatever the choice."""
    from transformers.integrations import moe

    model = make_tiny_cumo_model().train()
    names = {id(module): name for name, module in model.named_modules()}
    ran = set()
    kernel = moe.ALL_EXPERTS_FUNCTIONS[implementation]

    def spy(experts, *args, **kwargs):
        ran.add(names[id(experts)])
        return kernel(experts, *args, **kwargs)

    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, implementation, spy)
    batch = image_and_video_batch()
    results = {}
    for name in ("eager", implementation):
        model.set_experts_implementation(name)
        model.zero_grad()
        out = model(**batch, output_router_logits=True)
        out.loss.backward()
        grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.logits.detach(), out.loss.detach(), out.vision_aux_loss.detach(), grads)
    clip = {f"model.vision_tower.encoder.layers.{i}.mlp.experts" for i in (0, 1)}
    llm = {f"model.language_model.layers.{i}.mlp.experts" for i in model.config.text_config.sparse_layer_indices}
    assert ran == clip | llm
    (eager_logits, eager_loss, eager_aux, eager_grads), (logits, loss, aux, grads) = results.values()
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close((loss, aux), (eager_loss, eager_aux))
    assert grads.keys() == eager_grads.keys()
    assert {"model.multi_modal_projector.experts.up_proj_bias", "model.vision_tower.encoder.layers.0.mlp.experts.up_proj"} <= grads.keys()
    for key in eager_grads:
        torch.testing.assert_close(grads[key], eager_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_unimoe_stage3_lora_stays_on_the_language_models_experts():
    """Uni-MoE's stage 3 on a co-upcycled model: peft matches `target_parameters` by suffix, and CLIP's fused experts
    end in `mlp.experts.down_proj` as the language model's do; the experts' LoRA goes on the language model's alone."""
    from trl_scripts.training.stages import prepare_stage3

    peft_model = prepare_stage3(make_tiny_cumo_model())
    expert_lora = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if ".experts." in name and ".lora_" in name}
    layers = peft_model.base_model.model.config.text_config.sparse_layer_indices
    assert len(expert_lora) == 2 * len(layers) and all(".language_model." in name for name in expert_lora), expert_lora


# ------------------------------------------------------------------------------- the CLI: stages and YAMLs


def parse_yaml(path: Path, **overrides):
    """The YAML as `unimoe-train PATH --option value ...` parses it (`activation_checkpointing` under the running
    release's name)."""
    from trl_scripts.training.train import parse_arguments

    options = []
    for name, value in overrides.items():
        values = value if isinstance(value, list) else [value]
        options += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return parse_arguments([str(path), *options])


def test_cumo_yamls_parse_to_the_published_settings():
    """configuration/training/cumo-mistral-7b-stage{1,2,3}.yaml against SHI-Labs/CuMo
    scripts/cumo/mistral_7b/{pretrain,pft,sft}_mistral_7b.sh: per-device batch x accumulation on 8 GPUs, learning
    rate, 1 epoch, cosine with 3 % warm-up, no weight decay; stage 3: 4 experts top-2 in the projector and all CLIP
    layers that run, balance 0.1 and z-loss 0.01."""
    published = {1: ((32, 1), 1e-3), 2: ((4, 2), 2e-6), 3: ((4, 2), 4e-6)}
    parsed = {stage: parse_yaml(path, use_cpu=True) for stage, path in CUMO_YAMLS.items()}  # bf16 needs a GPU or use_cpu
    for stage, (stage_args, data_args, training_args) in parsed.items():
        (batch, accumulation), learning_rate = published[stage]
        assert (stage_args.recipe, stage_args.stage) == ("cumo", stage)
        assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (batch, accumulation)
        assert (training_args.learning_rate, training_args.num_train_epochs) == (learning_rate, 1)
        assert (training_args.lr_scheduler_type, training_args.warmup_steps, training_args.weight_decay) == ("cosine", 0.03, 0.0)
        assert training_args.bf16 and not stage_args.train_towers and data_args.train_files
        if stage > 1:  # each stage continues from the previous one's folder
            assert stage_args.model_name_or_path == parsed[stage - 1][2].output_dir
    sparse = parsed[3][0]
    assert (sparse.projector_experts, sparse.projector_top_k, sparse.vision_experts, sparse.vision_top_k) == (4, 2, 4, 2)
    assert sparse.vision_moe_layers == "all"
    assert (sparse.mm_router_aux_loss_coef, sparse.mm_router_z_loss_coef) == (0.1, 0.01)
    assert sparse.router_aux_loss_coef is None  # CuMo-7B's LLM (Mistral) stays dense: no LLM router


@pytest.fixture
def image_video_rows(tmp_path) -> str:
    write_image(tmp_path / "red.png")
    write_video(tmp_path / "right.mp4", num_frames=8)
    rows = []
    for i in range(4):
        rows.append({"id": f"img-{i}", "modality": "image", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]})
        rows.append({"id": f"vid-{i}", "modality": "video", "video": "right.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "right"}]})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return str(tmp_path / "train.json")


def optimized(trainer) -> int:
    return sum(parameter.numel() for group in trainer.optimizer.param_groups for parameter in group["params"])


def test_cumo_stages_from_the_yamls_train_exactly_their_parameters_and_log_every_router(tmp_path, image_video_rows):
    """The three YAMLs, run as written but on the tiny preset (one optimizer step each): stage 1 the connectors only,
    stage 2 everything (dense), stage 3 everything after co-upcycling, the new experts and routers included; stage 3
    logs every router group's losses and the projector's and CLIP's expert load per medium."""
    overrides = dict(
        train_files=[image_video_rows], media_root=str(tmp_path), max_steps=1, logging_steps=1, bf16=False,
        use_cpu=True, activation_checkpointing=False, save_strategy="no", per_device_train_batch_size=2,
        gradient_accumulation_steps=1, dataloader_num_workers=0, warmup_steps=0,  # one step at the full rate
    )
    trainers = {}
    for stage, path in CUMO_YAMLS.items():
        source = "tiny" if stage == 1 else str(tmp_path / f"stage{stage - 1}")
        stage_args, data_args, training_args = parse_yaml(
            path, **overrides, model_name_or_path=source, output_dir=str(tmp_path / f"stage{stage}")
        )
        trainers[stage] = run(stage_args, data_args, training_args)

    counts = {stage: parameter_counts(trainer.model) for stage, trainer in trainers.items()}
    connectors = {name: counts[1][name][1] for name in ("multi_modal_projector", "speech_aligner", "audio_aligner")}
    assert {c: t for c, (t, _) in counts[1].items() if t} == connectors  # the tiny preset's audio connectors too
    assert optimized(trainers[1]) == sum(connectors.values())
    projector = connectors["multi_modal_projector"]
    total2 = sum(n for _, n in counts[2].values())
    assert all(t == n for t, n in counts[2].values()) and optimized(trainers[2]) == total2

    model = trainers[3].model
    config = model.config
    assert (config.projector_num_experts, config.vision_moe_layers, config.vision_num_experts) == (4, [0, 1], 4)
    assert (config.mm_router_aux_loss_coef, config.mm_router_z_loss_coef) == (0.1, 0.01)
    vision = config.vision_config
    clip_mlp = 2 * vision.hidden_size * vision.intermediate_size + vision.hidden_size + vision.intermediate_size
    added = 3 * projector + 4 * vision.hidden_size + 2 * (3 * clip_mlp + 4 * vision.hidden_size)  # experts 2-4, routers
    total3 = sum(n for _, n in counts[3].values())
    assert total3 == total2 + added
    assert all(t == n for t, n in counts[3].values()) and optimized(trainers[3]) == total3

    logs = trainers[3].state.log_history[0]
    for name in ("ce_loss", "projector_aux_loss", "projector_z_loss", "vision_aux_loss", "vision_z_loss"):
        assert logs[name] > 0, name
    assert "aux_loss" not in logs  # the LLM is dense: it has no router
    medium = "image" if "expert_load/projector/image/e0" in logs else "video"  # a batch holds one modality mix
    for group in ("projector", "vision"):
        shares = [logs[f"expert_load/{group}/{medium}/e{e}"] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    rows = {"image": 2 * PATCHES, "video": 2 * 4 * PATCHES}[medium]  # 2 items; the tiny processor samples 4 frames
    assert trainers[3].projector_load_counts.sum() == rows * 2  # top-2 assignments
    assert trainers[3].vision_load_counts.sum() == 2 * rows * (1 + PATCHES) / PATCHES * 2  # 2 layers, CLS included


@pytest.mark.parametrize(
    "stage, options, message",
    [
        (3, {"projector_experts": 0}, r"^--projector_experts must be >= 1"),
        (3, {"projector_top_k": 5}, r"^--projector_top_k 5: expected 1 to 4 \(--projector_experts\)"),
        (3, {"vision_top_k": 0}, r"^--vision_top_k 0: expected 1 to 4 \(--vision_experts\)"),
        (3, {"vision_moe_layers": "0,x"}, r"^--vision_moe_layers '0,x': 'x' is not a layer index \(expected all, even, odd, none or comma-separated"),
        (3, {"vision_moe_layers": "0,2"}, r"^--vision_moe_layers '0,2': .*CLIP layers 0 to 1 feed vision_feature_layer=-1 .*\[2\]"),
        (3, {"mm_router_z_loss_coef": -1.0}, r"^--mm_router_z_loss_coef must be a finite number >= 0"),
        (3, {"router_z_loss_coef": float("nan")}, r"^--router_z_loss_coef must be a finite number >= 0"),
        (3, {"projector_experts": 1, "vision_moe_layers": "none"}, r"^--recipe cumo --stage 3: nothing to co-upcycle"),
        (2, {"recipe": "llava"}, r"^--recipe 'llava': expected one of unimoe, cumo"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_cumo_options_are_checked_before_anything_loads(tmp_path, monkeypatch, stage, options, message):
    import trl_scripts.training.train as train

    load_preset("tiny", moe_layers=[]).save_pretrained(tmp_path / "stage2")  # what the check reads: the config
    for name in ("load_stage_model", "load_stage_processor", "load_conversations", "validate_dataset"):
        monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("loaded before the options were checked"))
    with pytest.raises(ValueError, match=message):
        run(StageArguments(stage=stage, model_name_or_path=str(tmp_path / "stage2"), **{"recipe": "cumo"} | options),
            DataArguments(train_files=[str(tmp_path / "train.json")]), TrainingArguments(str(tmp_path / "out")))  # fmt: skip


def test_cumo_stage2_refuses_a_model_without_vision_or_already_sparse(tmp_path):
    load_preset("tiny", text_only=True).save_pretrained(tmp_path / "text")
    upcycle_multimodal_experts(tiny_vision_model(), projector_num_experts=2).config.save_pretrained(tmp_path / "sparse")
    data = DataArguments(train_files=[str(tmp_path / "train.json")])
    with pytest.raises(ValueError, match=r"has no vision tower: CuMo's stage 2 needs CLIP"):
        run(StageArguments(stage=2, recipe="cumo", model_name_or_path=str(tmp_path / "text")), data, TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match=r"is already a mixture of experts"):
        run(StageArguments(stage=3, recipe="cumo", model_name_or_path=str(tmp_path / "sparse")), data, TrainingArguments(str(tmp_path)))


# ------------------------------------------------------------------------------------------------- quickstart


def test_quickstart_recipe_cumo_end_to_end(tmp_path):
    from trl_scripts.quickstart.run import main

    summary = main([
        "--recipe", "cumo", "--output_dir", str(tmp_path), "--num_train_per_task", "2", "--num_eval_per_task", "2",
        "--warmup_epochs", "1", "--stage1_epochs", "1", "--stage2_epochs", "1", "--stage3_epochs", "1", "--batch_size", "4",
    ])  # fmt: skip
    checkpoint = tmp_path / "stage3"
    for path in (checkpoint / "routing_heatmap.png", checkpoint / "eval_results.json", tmp_path / "summary.json"):
        assert path.is_file() and path.stat().st_size > 0, path
    metrics = summary["metrics"]
    expected = {"exact_match", "exact_match/image", "exact_match/video", "exact_match/image_colour", "exact_match/image_shape",
                "exact_match/video_direction", "exact_match/video_colour"}
    assert set(metrics) == expected and all(0.0 <= value <= 1.0 for value in metrics.values())
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4 * 2  # the image and video tasks only
    shares = {group: torch.tensor(value) for group, value in summary["routing_shares"].items()}
    assert shares["projector"].shape == (2, 1, 4) and shares["vision"].shape == (2, 2, 4)
    for value in shares.values():
        torch.testing.assert_close(value.sum(dim=-1), torch.ones(value.shape[:2]))
    assert len(summary["answers"]) == 2
    config = UniMoEForCausalLM.config_class.from_pretrained(checkpoint)
    assert (config.projector_num_experts, config.vision_moe_layers, config.text_config.sparse_layer_indices) == (4, [0, 1], [])


# ------------------------------------------------------------------------------------ checkpoints everywhere


@pytest.fixture(scope="module")
def cumo_checkpoint(tmp_path_factory) -> Path:
    """A co-upcycled tiny checkpoint (MoE projector, MoE CLIP MLPs, sparse LLM), routers trained a little so that
    they are not at their initialisation, with its processor and a media folder."""
    folder = tmp_path_factory.mktemp("cumo") / "checkpoint"
    model = upcycle_multimodal_experts(tiny_vision_model(), projector_num_experts=4, vision_moe_layers="all")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                parameter.mul_(3.0)
    model.save_pretrained(folder)
    load_tiny_processor(model.config).save_pretrained(folder)
    media = folder.parent / "media"
    media.mkdir()
    write_image(media / "red.png", color=(220, 40, 40))
    write_video(media / "right.mp4", num_frames=8)
    return folder


def test_coupcycled_checkpoint_through_the_hub_in_a_fresh_process(cumo_checkpoint, tmp_path, monkeypatch):
    """Pushed to the local Hub with its card, then loaded from there through AutoModelForCausalLM /
    AutoProcessor with trust_remote_code in a process that cannot import our packages: same logits."""
    from tests.utils.local_hub import LocalHub
    from trl_scripts.hub.push_to_hub import push_folder_to_hub

    model = UniMoEForCausalLM.from_pretrained(cumo_checkpoint).eval()
    batch = image_and_video_batch(seed=3)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    token = "hf_local_test_token"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with LocalHub(tokens={token}) as hub:
        push_folder_to_hub(cumo_checkpoint, "org/tiny-cumo", token=token, endpoint=hub.url)
        card = hub.repo("org/tiny-cumo").files["README.md"].decode()
        assert "cumo" in card and "Vision MoE (CuMo)" in card and "Vision router losses (CuMo)" in card
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        stdout = run_fresh_python(
            """
            import os
            os.environ["HF_HUB_OFFLINE"] = "0"  # the local hub is the only endpoint
            import torch
            from transformers import AutoModelForCausalLM, AutoProcessor
            expected = torch.load("expected.pt")
            model = AutoModelForCausalLM.from_pretrained("org/tiny-cumo", trust_remote_code=True).eval()
            batch = {k: v for k, v in expected["batch"].items() if k != "labels"}
            with torch.no_grad():
                out = model(**batch, output_router_logits=True)
            torch.testing.assert_close(out.logits, expected["logits"], atol=1e-5, rtol=0)
            processor = AutoProcessor.from_pretrained("org/tiny-cumo", trust_remote_code=True)
            print("LOADED", type(model).__name__, len(out.vision_router_logits), type(processor).__name__)
            """,
            tmp_path,
        )
    assert "LOADED UniMoEForCausalLM 2 UniMoEProcessor" in stdout


def test_coupcycled_checkpoint_in_the_evaluate_cli_and_the_server(cumo_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from trl_scripts.evaluation.evaluate import main as evaluate
    from trl_scripts.serving.server import create_app

    media = cumo_checkpoint.parent / "media"
    rows = [
        {"id": "img", "modality": "image", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]},
        {"id": "vid", "modality": "video", "video": "right.mp4",
         "conversations": [{"from": "human", "value": "<video>\nWhich way does the object move?"}, {"from": "gpt", "value": "right"}]},
    ]  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    evaluate(["--model", str(cumo_checkpoint), "--data", str(tmp_path / "eval.json"), "--task", "vqa", "--media_root",
              str(media), "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4", "--batch_size", "2"])  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and {"image", "video"} <= {key.split("/")[-1] for key in metrics["metrics"]}
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]

    image = base64.b64encode((media / "red.png").read_bytes()).decode()
    with TestClient(create_app(str(cumo_checkpoint))) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": str(cumo_checkpoint), "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "What colour is the shape?"}]}],
        })  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip() == predictions[0]  # the same greedy answer
