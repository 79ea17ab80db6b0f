"""UniMoETrainer with the stage-3 model: logged loss parts and expert load, NaN stop, resumption."""

import math

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from tests.utils.media import tone, write_image
from tests.utils.models import make_tiny_model
from trl_scripts.training.data import UniMoEDataCollator
from trl_scripts.training.stages import prepare_stage1, prepare_stage3
from trl_scripts.training.trainer import UniMoETrainer
from trl_scripts.training.upcycling import upcycle_unimoe


def rows(tmp_path, count=8):
    image = write_image(tmp_path / "red.png")
    import soundfile

    soundfile.write(tmp_path / "beep.wav", tone(1.0), 16000)
    data = []
    for i in range(count):
        if i % 2 == 0:
            data.append({"id": f"img-{i}", "image": str(image), "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]})
        else:
            data.append({"id": f"aud-{i}", "audio": str(tmp_path / "beep.wav"), "conversations": [
                {"from": "human", "value": "<audio>\nHow many beeps?"}, {"from": "gpt", "value": "one"}]})
    return data


def stage3_model():
    return prepare_stage3(upcycle_unimoe(make_tiny_model(text_only=False, moe_layers=[]), num_experts=4, num_experts_per_tok=2))


def arguments(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
        seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**(values | overrides))


def test_stage3_training_logs_loss_parts_and_expert_load(tmp_path, tiny_processor):
    trainer = UniMoETrainer(
        model=stage3_model(), args=arguments(tmp_path), train_dataset=rows(tmp_path),
        data_collator=UniMoEDataCollator(tiny_processor), group_by_modality=True,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert {"ce_loss", "aux_loss", "z_loss"} <= set(entry)
        logged = {key.split("/")[1] for key in entry if key.startswith("expert_load/")}
        assert "text" in logged and logged & {"image", "audio"}  # modality-grouped: one media modality per batch
        for modality in logged:
            assert math.isclose(sum(entry[f"expert_load/{modality}/e{e}"] for e in range(4)), 1.0, abs_tol=1e-3)
    assert trainer.expert_load_counts.shape == (4, 4, 4)  # modalities x sparse layers x experts
    assert trainer.expert_load_counts[1].sum() > 0 and trainer.expert_load_counts[2].sum() == 0  # images, no video


def test_non_finite_loss_names_the_step(tmp_path, tiny_processor):
    model = make_tiny_model(text_only=False)
    prepare_stage1(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.fill_(float("nan"))
    trainer = UniMoETrainer(model=model, args=arguments(tmp_path), train_dataset=rows(tmp_path),
                            data_collator=UniMoEDataCollator(tiny_processor))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at step 1"):
        trainer.train()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resumed_run_reaches_the_same_loss(tmp_path, tiny_processor):
    data = rows(tmp_path, count=12)
    collator = UniMoEDataCollator(tiny_processor)

    def run(output_dir, callbacks=(), resume=None):
        args = arguments(tmp_path, output_dir=str(output_dir), max_steps=6, save_strategy="steps", save_steps=3)
        trainer = UniMoETrainer(model=stage3_model(), args=args, train_dataset=data, data_collator=collator,
                                callbacks=list(callbacks), group_by_modality=True)
        trainer.train(resume_from_checkpoint=resume)
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer

    uninterrupted, _ = run(tmp_path / "full")
    interrupted, _ = run(tmp_path / "cut", callbacks=[StopAt(3)])
    assert len(interrupted) == 3
    resumed, _ = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed[-1] == pytest.approx(uninterrupted[-1], rel=1e-5)


def _snapshot(model, component):
    return {name: p.detach().clone() for name, p in model.named_parameters() if component in name.split(".") and p.requires_grad}


@pytest.mark.parametrize("stage", [1, 3])
def test_component_learning_rates(tmp_path, tiny_processor, stage):
    if stage == 1:
        model = make_tiny_model(text_only=False)
        prepare_stage1(model, train_towers=True)
        frozen, moving = "multi_modal_projector", "audio_aligner"
    else:  # peft names: base_model.model.model.speech_aligner.modules_to_save.default...
        model, frozen, moving = stage3_model(), "audio_aligner", "multi_modal_projector"
    before_frozen, before_moving = _snapshot(model, frozen), _snapshot(model, moving)
    assert before_frozen and before_moving
    trainer = UniMoETrainer(
        model=model, args=arguments(tmp_path, lr_scheduler_type="linear"), train_dataset=rows(tmp_path),
        data_collator=UniMoEDataCollator(tiny_processor), component_learning_rates={frozen: 0.0, "speech_aligner": 1e-4},
    )
    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before_frozen.items())
    assert any(not torch.equal(after[name], value) for name, value in before_moving.items())
    groups = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            groups[id(parameter)] = group["initial_lr"]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parts = name.split(".")
            expected = 0.0 if frozen in parts else 1e-4 if "speech_aligner" in parts else 1e-3
            assert groups[id(parameter)] == expected, name
    # the scheduler scales every group alike: linear decay to 0 at the last step
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {0.0}


def test_component_learning_rates_bad_use_is_an_error(tmp_path, tiny_processor):
    with pytest.raises(ValueError, match=r"does not have: \['speech_towr'\]"):
        UniMoETrainer(model=stage3_model(), args=arguments(tmp_path), train_dataset=rows(tmp_path),
                      data_collator=UniMoEDataCollator(tiny_processor), component_learning_rates={"speech_towr": 1e-3})
    model = stage3_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not to one passed in `optimizers`"):
        UniMoETrainer(model=model, args=arguments(tmp_path), train_dataset=rows(tmp_path), optimizers=(optimizer, None),
                      data_collator=UniMoEDataCollator(tiny_processor), component_learning_rates={"speech_tower": 1e-3})


def test_predictions_are_the_logits_not_the_media_features(tmp_path, tiny_processor):
    """Only batches with a medium carry its features: as predictions, Trainer would zip them away across batches."""
    from transformers import Trainer

    image = write_image(tmp_path / "red.png")
    row = {"id": "a", "image": str(image), "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    model = make_tiny_model(text_only=False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, data_collator=UniMoEDataCollator(tiny_processor))
    batch = trainer.data_collator([row])
    assert "pixel_values" in batch
    _, predictions, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    predictions = predictions if isinstance(predictions, tuple) else (predictions,)
    features = model(**batch).image_hidden_states
    assert not any(p.shape == features.shape for p in predictions)
    assert predictions[0].shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
