"""The three stages end to end through `trl_scripts.training.train` (tiny preset, a few steps each) and the CLI."""

import json

import pytest
import torch
from transformers import TrainingArguments

from tests.utils.data import write_training_rows
from tests.utils.processes import run_fresh_python
from trl_scripts.training.stages import parameter_counts
from trl_scripts.training.train import DataArguments, StageArguments, main, run


def training_args(output_dir, **overrides):
    return TrainingArguments(**({
        "output_dir": str(output_dir), "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0,
    } | overrides))


def test_three_stages(tmp_path):
    data = DataArguments(train_files=[write_training_rows(tmp_path)], media_root=str(tmp_path))

    trainer = run(StageArguments(stage=1, model_name_or_path="tiny"), data, training_args(tmp_path / "s1"))
    counts = parameter_counts(trainer.model)
    trainable = {component for component, (t, _) in counts.items() if t}
    assert trainable == {"multi_modal_projector", "speech_aligner", "audio_aligner"}  # only the connectors

    run(StageArguments(stage=2, model_name_or_path=str(tmp_path / "s1"), experts="image,audio"), data, training_args(tmp_path / "s2"))
    assert json.loads((tmp_path / "s2" / "experts" / "experts.json").read_text()) == ["image", "audio"]
    from safetensors.torch import load_file
    image_ffn = load_file(tmp_path / "s2" / "experts" / "image.safetensors")
    audio_ffn = load_file(tmp_path / "s2" / "experts" / "audio.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(image_ffn[key], audio_ffn[key])  # two different experts
    assert not torch.equal(image_ffn[key], load_file(tmp_path / "s1" / "model.safetensors")[f"model.language_model.{key[6:]}"])
    # only the experts' FFNs train in stage 2: the saved model (connectors, attention, towers) is stage 1's
    stage1, stage2 = (load_file(tmp_path / name / "model.safetensors") for name in ("s1", "s2"))
    assert stage1.keys() == stage2.keys() and all(torch.equal(stage1[k], stage2[k]) for k in stage1)

    trainer = run(StageArguments(stage=3, model_name_or_path=str(tmp_path / "s2")), data, training_args(tmp_path / "s3"))
    experts = trainer.model.model.language_model.layers[0].mlp.experts
    assert experts.num_experts == 2
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("aux_loss" in entry for entry in losses)
    # the merged, saved stage-3 model loads as remote code in a fresh process with its processor
    stdout = run_fresh_python(
        f"""
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "s3")!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(tmp_path / "s3")!r}, trust_remote_code=True)
        print("EXPERTS", model.config.text_config.num_experts, type(processor).__name__)
        """,
        tmp_path,
    )
    assert "EXPERTS 2 UniMoEProcessor" in stdout


def test_cached_encodings_train_the_same_steps(tmp_path):
    """`--cache_encodings`: every row encoded once before training; the losses of a two-epoch stage 1 are the
    uncached run's, step for step."""
    histories = []
    for cache in (False, True):
        data = DataArguments(train_files=[write_training_rows(tmp_path)], media_root=str(tmp_path), cache_encodings=cache)
        args = training_args(tmp_path / f"s1-{cache}", max_steps=-1, num_train_epochs=2, dataloader_num_workers=1)
        trainer = run(StageArguments(stage=1, model_name_or_path="tiny"), data, args)
        histories.append([(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry])
    assert len(histories[0]) == 8 and histories[1] == histories[0]


def test_cli_with_yaml(tmp_path):
    train = write_training_rows(tmp_path)
    config = tmp_path / "stage1.yaml"
    config.write_text(
        f"stage: 1\nmodel_name_or_path: tiny\ntrain_files: [{train}]\nmedia_root: {tmp_path}\n"
        f"output_dir: {tmp_path / 'cli'}\nmax_steps: 1\nper_device_train_batch_size: 2\nreport_to: none\nuse_cpu: true\n"
    )
    main([str(config)])
    assert (tmp_path / "cli" / "config.json").is_file() and (tmp_path / "cli" / "processor_config.json").is_file()


def test_output_layers_train_only_when_asked():
    from tests.utils.models import make_tiny_model
    from trl_scripts.training.stages import prepare_stage2, prepare_stage3
    from trl_scripts.training.upcycling import upcycle_unimoe

    model = make_tiny_model(text_only=False, moe_layers=[])
    assert parameter_counts(model) and prepare_stage2(model)["lm_head"][0] == 0
    counts = prepare_stage2(model, train_output_layers=True)
    assert counts["lm_head"][0] == counts["lm_head"][1] > 0
    assert model.model.language_model.norm.weight.requires_grad
    peft_model = prepare_stage3(upcycle_unimoe(model, num_experts=2, num_experts_per_tok=1), train_output_layers=True)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in name for name in trainable)
    assert any("language_model.norm.modules_to_save" in name for name in trainable)
    assert not any("input_layernorm" in name for name in trainable)


def test_stage0_text_warmup_trains_only_the_language_model(tmp_path):
    train = write_training_rows(tmp_path)
    captions = [
        {"id": "c-img", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]},
        {"id": "c-aud", "audio": "beep.wav", "conversations": [{"from": "human", "value": "<audio>\nDescribe."}, {"from": "gpt", "value": "One beep."}]},
    ]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    data = DataArguments(train_files=[train], media_root=str(tmp_path), captions_file=str(tmp_path / "captions.json"), system_prompt="")
    trainer = run(StageArguments(stage=0, model_name_or_path="tiny"), data, training_args(tmp_path / "s0"))
    trainable = {component for component, (t, _) in parameter_counts(trainer.model).items() if t}
    assert trainable == {"language_model", "lm_head"}
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert "pixel_values" not in batch and "input_features" not in batch  # text only: the captions replaced the media
    assert "USER: A red square.\nWhat colour? ASSISTANT:" in trainer.data_collator.processor.tokenizer.decode(batch["input_ids"][0])
    # stage 1 continues from the warmed-up folder
    run(StageArguments(stage=1, model_name_or_path=str(tmp_path / "s0")), data, training_args(tmp_path / "s1"))
    assert (tmp_path / "s1" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="stage 0 needs --captions_file"):
        run(StageArguments(stage=0, model_name_or_path="tiny"), DataArguments(train_files=[train], media_root=str(tmp_path)), training_args(tmp_path / "x"))


def test_towers_train_in_stage1_only_when_asked():
    from tests.utils.models import make_tiny_model
    from trl_scripts.training.stages import prepare_stage1

    model = make_tiny_model(text_only=False, moe_layers=[])
    frozen = prepare_stage1(model)
    assert all(frozen[tower][0] == 0 for tower in ("vision_tower", "speech_tower", "audio_tower"))
    counts = prepare_stage1(model, train_towers=True)
    for component in ("vision_tower", "speech_tower", "audio_tower", "multi_modal_projector", "speech_aligner", "audio_aligner"):
        assert counts[component][0] == counts[component][1] > 0, component
    assert counts["language_model"][0] == counts["lm_head"][0] == 0


def test_component_learning_rates_parse():
    from trl_scripts.training.train import StageArguments

    args = StageArguments(stage=1, model_name_or_path="tiny", component_learning_rates=" speech_tower=1e-3, audio_aligner=2.5e-4,")
    assert args.learning_rates() == {"speech_tower": 1e-3, "audio_aligner": 2.5e-4}
    assert StageArguments(stage=1, model_name_or_path="tiny").learning_rates() == {}
    with pytest.raises(ValueError, match=r"'speech_tower:1e-3' is not 'module=learning_rate'"):
        StageArguments(stage=1, model_name_or_path="tiny", component_learning_rates="speech_tower:1e-3").learning_rates()


# ---------------------------------------------------------------------------- review: checked before anything loads


def _nothing_loads(monkeypatch, *names):
    import trl_scripts.training.train as train

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the options or the data were checked")

    for name in names:
        monkeypatch.setattr(train, name, loaded)


def test_stage1_refuses_text_only_rows_before_training(tmp_path, monkeypatch):
    """A stage-1 batch of text-only rows has no gradient (stage 1 trains connectors, which text never reaches): it
    crashed mid-run with "element 0 of tensors does not require grad". Named before the model loads; --skip_invalid
    drops and counts them; stages 0, 2 and 3 (and --train_output_layers) train what text reaches."""
    from trl_scripts.training.train import stage1_media_reason

    train = write_training_rows(tmp_path)
    rows = json.loads((tmp_path / "train.json").read_text())
    rows += [{"id": f"txt-{i}", "modality": "text", "conversations": [
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]} for i in range(2)]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(rows))
    with monkeypatch.context() as patch:
        _nothing_loads(patch, "load_stage_model")
        with pytest.raises(ValueError, match=r"^2 text-only row\(s\) of 10 \(no image, video or audio\): txt-0, txt-1\. "
                           r"Stage 1 trains only the connectors, which a text-only row never reaches"):
            run(StageArguments(stage=1, model_name_or_path="tiny"), DataArguments(train_files=[train]), training_args(tmp_path / "s1"))
    trainer = run(StageArguments(stage=1, model_name_or_path="tiny"), DataArguments(train_files=[train], skip_invalid=True),
                  training_args(tmp_path / "s1", max_steps=1))  # fmt: skip
    assert len(trainer.train_dataset) == 8
    assert stage1_media_reason(StageArguments(stage=1, model_name_or_path="tiny", train_output_layers=True)) is None
    assert "connectors and towers" in stage1_media_reason(StageArguments(stage=1, model_name_or_path="tiny", train_towers=True))


@pytest.mark.parametrize(
    "stage, options, message",
    [
        (3, {"moe_layers": "1,x"}, r"^--moe_layers '1,x': 'x' is not a layer index \(expected all, even, odd or"),
        (3, {"moe_layers": "0,-2"}, r"^--moe_layers '0,-2': layer indices start at 0, got \[-2\]"),
        (3, {"moe_layers": "0,99"}, r"^--moe_layers '0,99': the model has layers 0 to 3; out of range: \[99\]"),
        (3, {"router_type": "top1"}, r"^--router_type 'top1': expected one of topk_softmax, softmax_topk"),
        (3, {"num_experts_per_tok": 3}, r"^--num_experts_per_tok 3: expected 1 to 2, the experts stage 2 trained \(image, audio\)"),
        (3, {"lora_r": 0}, r"^--lora_r must be >= 1"),
        (2, {"experts": ""}, r"^stage 2 needs --experts"),
        (2, {"experts": "image,audio,image"}, r"^--experts 'image,audio,image': image given twice"),
        (1, {"component_learning_rates": "speech_towr=1e-3"},
         r"^--component_learning_rates names modules the model does not have: \['speech_towr'\] \(its components: .*speech_tower"),
        (1, {"component_learning_rates": "speech_tower=-1e-3"}, r"^--component_learning_rates: 'speech_tower=-1e-3': a learning rate must be a positive"),
        (1, {"component_learning_rates": "=1e-3"}, r"^--component_learning_rates: '=1e-3' is not 'module=learning_rate'"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_options_are_checked_before_anything_loads(tmp_path, monkeypatch, stage, options, message):
    """`--moe_layers 1,x` failed with "invalid literal for int()" after the model had loaded; unknown component
    names after it too. Each option is checked first, naming it."""
    from safetensors.torch import save_file

    from trl_scripts import load_preset

    stage2 = tmp_path / "s2"  # what stage 3 reads of a stage-2 folder: its config and experts list
    load_preset("tiny", moe_layers=[]).save_pretrained(stage2)
    (stage2 / "experts").mkdir()
    for name in ("image", "audio"):
        save_file({}, stage2 / "experts" / f"{name}.safetensors")
    (stage2 / "experts" / "experts.json").write_text(json.dumps(["image", "audio"]))
    source = {1: "tiny", 2: str(tmp_path / "s1"), 3: str(stage2)}[stage]
    _nothing_loads(monkeypatch, "load_stage_model", "load_stage_processor", "load_conversations", "validate_dataset")
    with pytest.raises(ValueError, match=message):
        run(StageArguments(stage=stage, model_name_or_path=source, **options),
            DataArguments(train_files=[str(tmp_path / "train.json")]), training_args(tmp_path / "out"))  # fmt: skip


def test_every_expert_needs_rows_before_any_trains(tmp_path, monkeypatch):
    """`--experts image,imgae` trained the whole image expert before refusing 'imgae'."""
    train = write_training_rows(tmp_path)
    _nothing_loads(monkeypatch, "load_stage_model")
    with pytest.raises(ValueError, match=r"^--experts: no training rows with modality 'imgae' in .*train\.json \(the rows' "
                       r"modalities: audio, image\)$"):
        run(StageArguments(stage=2, model_name_or_path=str(tmp_path / "s1"), experts="image,imgae"),
            DataArguments(train_files=[train]), training_args(tmp_path / "s2"))  # fmt: skip
