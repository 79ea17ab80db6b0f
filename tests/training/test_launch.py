"""Launch configurations against one process: stage 3 expert-parallel and FSDP2 (transformers' DistributedConfig) and
under DeepSpeed ZeRO-2 (configuration/accelerate/deepspeed_zero2.yaml) on two gloo CPU processes gives the loss of a
single process that accumulates the same two micro-batches, and saves the same merged checkpoint; the accelerate FSDP2
config wraps one decoder layer per unit; every training YAML parses, and the tiny ones run.

SGD keeps the checkpoint comparison meaningful: Adam's first step is lr * sign(gradient), so gradients equal up to
float rounding could still flip the update of entries whose gradient is nearly zero. Training rows are image and text
only: the audio Q-Former keeps its dropout in training mode, which would draw different masks in one process than in
two.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, TrainingArguments

from modeling_unimoe import UniMoEForCausalLM
from tests.utils import REPO_ROOT, UTILS_DIR
from tests.utils.media import write_image
from tests.utils.processes import free_port
from trl_scripts import load_preset, load_tiny_processor
from trl_scripts.training.train import DataArguments, StageArguments, run
from trl_scripts.training.upcycling import dense_ffn_state_dict


REPO = REPO_ROOT
WORKER = UTILS_DIR / "launch_worker.py"
TRAINING_CONFIGS = sorted((REPO / "configuration" / "training").glob("*.yaml"))
EXPERTS = ["image", "text", "video", "speech"]
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-5
# two optimizer steps of two micro-batches of 2 rows each: two processes x 2 rows, or one process accumulating 2 x 2
STEPS = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "optim": "sgd", "logging_steps": 1,
         "save_strategy": "no", "report_to": "none", "seed": 0}


def cli(arguments: dict) -> list[str]:
    return [item for key, value in arguments.items() for item in (f"--{key}", str(value))]


def write_rows(root: Path) -> Path:
    """4 image rows and 4 text rows of different lengths (padding inside every micro-batch)."""
    write_image(root / "red.png")
    rows = []
    for i in range(4):
        rows.append({"id": f"img-{i}", "modality": "image", "image": "red.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is picture {i}?"},
            {"from": "gpt", "value": "red" + " very" * i}]})
        rows.append({"id": f"txt-{i}", "modality": "text", "conversations": [
            {"from": "human", "value": f"Count to {i + 1}."},
            {"from": "gpt", "value": " ".join(map(str, range(1, i + 2)))}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json"


def write_stage2_output(folder: Path) -> Path:
    """What stage 2 saves: the dense tiny model with its processor, and one FFN state dict per expert."""
    torch.manual_seed(0)
    config = load_preset("tiny", moe_layers=[])
    UniMoEForCausalLM(config).save_pretrained(folder)
    load_tiny_processor(config).save_pretrained(folder)
    (folder / "experts").mkdir()
    for index, name in enumerate(EXPERTS):
        torch.manual_seed(100 + index)
        save_file(dense_ffn_state_dict(UniMoEForCausalLM(config)), folder / "experts" / f"{name}.safetensors")
    (folder / "experts" / "experts.json").write_text(json.dumps(EXPERTS))
    return folder


def launcher_env(tmp_path: Path) -> dict:
    # DeepSpeed JIT-compiles its CPU communication op once (about 30 s); keep it with the environment, not per test
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
            "TORCH_EXTENSIONS_DIR": extensions}


def launch(launcher: list[str], worker_args: list[str], tmp_path: Path, cwd: Path) -> dict:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", *launcher, str(WORKER), worker_args[0], str(report), *worker_args[1:]],
        cwd=cwd, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return json.loads(report.read_text())


def accelerate_launch(config: str) -> list[str]:
    return ["accelerate.commands.launch", "--config_file", config, "--main_process_port", str(free_port())]


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def step_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry]


def assert_same_steps(distributed: list[dict], single: list[dict]):
    distributed, single = step_logs(distributed), step_logs(single)
    assert [entry["step"] for entry in distributed] == [entry["step"] for entry in single] == [1, 2]
    for ours, reference in zip(distributed, single):
        assert ours["loss"] == pytest.approx(reference["loss"], abs=LOSS_TOLERANCE)
        assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=LOSS_TOLERANCE)


def assert_same_checkpoint(distributed_dir: Path, single_dir: Path, start: dict[str, torch.Tensor], trained: tuple):
    """The distributed run's checkpoint loads in one process, equals the single-process one, and `trained` moved."""
    model = UniMoEForCausalLM.from_pretrained(distributed_dir)
    reference = load_file(single_dir / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=WEIGHT_TOLERANCE, rtol=0, msg=key)
    for fragment in trained:
        moved = [key for key in start if fragment in key and not torch.equal(state[key], start[key])]
        assert moved, f"no weight matching {fragment!r} changed in training"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data, a stage-2 output, the stage-3 starting checkpoint, and `trl_scripts.training.train` stage 3 in one process
    (2 micro-batches accumulated per step) as the reference."""
    from tests.utils.launch_worker import build_stage3_checkpoint

    root = tmp_path_factory.mktemp("launch")
    train_file = write_rows(root)
    stage2 = write_stage2_output(root / "stage2")
    # a balance-loss weight other than the preset's, so that the stage-3 option is seen to apply
    stage3_start = Path(build_stage3_checkpoint(str(stage2), str(root / "stage3-start"), router_aux_loss_coef=0.05))
    data = {"train_files": str(train_file), "media_root": str(root)}
    stage3 = {"stage": 3, "model_name_or_path": str(stage2), "router_aux_loss_coef": 0.05}
    trainer = run(
        StageArguments(**stage3),
        DataArguments(train_files=[str(train_file)], media_root=str(root)),
        TrainingArguments(output_dir=str(root / "single"), gradient_accumulation_steps=2, use_cpu=True, **STEPS),
    )
    return {
        "root": root, "data": data, "stage3": stage3, "stage3_start": stage3_start,
        "start_state": load_file(stage3_start / "model.safetensors"),
        "single_dir": root / "single", "single_logs": trainer.state.log_history,
    }


def sharded_run(workspace, name: str, launcher: list[str] | None, expert_lora: bool, **sizes) -> tuple[dict, Path]:
    """`launch_worker.train_sharded_stage3`: in this process without a launcher, else under it."""
    from tests.utils.launch_worker import ShardedStage3Arguments, train_sharded_stage3

    output_dir = workspace["root"] / name
    arguments = {"checkpoint": str(workspace["stage3_start"]), "expert_lora": expert_lora, **workspace["data"], **STEPS,
                 "use_cpu": True, "output_dir": str(output_dir)}
    if launcher is None:
        parser = HfArgumentParser((ShardedStage3Arguments, DataArguments, TrainingArguments))
        args, data_args, training_args = parser.parse_dict(
            {**arguments, "train_files": [arguments["train_files"]], "gradient_accumulation_steps": 2}
        )
        return train_sharded_stage3(args, data_args, training_args), output_dir
    worker_dir = workspace["root"] / f"{name}-launch"
    worker_dir.mkdir()
    return launch(launcher, ["sharded", *cli({**arguments, **sizes})], worker_dir, cwd=worker_dir), output_dir


def test_expert_parallel_stage3_matches_one_process(workspace):
    """torchrun, DistributedConfig(ep_size=2, fsdp_size=2): each rank holds 2 of the 4 experts. peft's LoRA on the
    fused experts cannot run on expert-sharded weights (see launch_worker), so the experts train in full here, with
    LoRA on attention and routers and connectors in full."""
    single, single_dir = sharded_run(workspace, "ep-single", None, expert_lora=False)
    report, output_dir = sharded_run(workspace, "ep", TORCHRUN, expert_lora=False, ep_size=2, fsdp_size=2)

    assert report["world_size"] == 2 and report["expert_parallel"] and report["fsdp_managed"]
    assert report["local_experts"] == 2 and single["local_experts"] == 4
    assert_same_steps(report["log_history"], single["log_history"])
    # before any update the loss is the one `trl_scripts.training.train` reports for the same upcycled model and batches
    first = step_logs(report["log_history"])[0]["loss"]
    assert first == pytest.approx(step_logs(workspace["single_logs"])[0]["loss"], abs=LOSS_TOLERANCE)
    trained = ("mlp.experts.gate_up_proj", "mlp.gate.weight", "self_attn.q_proj", "multi_modal_projector")
    assert_same_checkpoint(output_dir, single_dir, workspace["start_state"], trained)


def test_fsdp2_stage3_matches_one_process(workspace):
    """FSDP2 through DistributedConfig(fsdp_size=2) (transformers' plan: one decoder layer per fully_shard unit), the
    full stage-3 LoRA (attention and fused experts), two processes from `accelerate launch` with ddp.yaml.
    accelerate's own FSDP (fsdp2.yaml) cannot run without GPUs (see the next test)."""
    single, single_dir = sharded_run(workspace, "fsdp-single", None, expert_lora=True)
    launcher = accelerate_launch(str(REPO / "configuration/accelerate/ddp.yaml"))
    report, output_dir = sharded_run(workspace, "fsdp", launcher, expert_lora=True, fsdp_size=2)

    assert report["world_size"] == 2 and report["fsdp_managed"] and not report["expert_parallel"]
    assert_same_steps(report["log_history"], single["log_history"])
    trained = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight", "self_attn.o_proj")
    assert_same_checkpoint(output_dir, single_dir, workspace["start_state"], trained)


def test_fsdp2_accelerate_config_wraps_decoder_layers(monkeypatch):
    """What `accelerate launch --config_file configuration/accelerate/fsdp2.yaml` hands the training processes builds an
    FSDP2 plugin whose auto-wrap policy picks exactly the decoder layers."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from tests.utils.models import make_tiny_model

    config = REPO / "configuration/accelerate/fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
    model = make_tiny_model(text_only=False)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"model.language_model.layers.{i}" for i in range(model.config.text_config.num_hidden_layers)]


def test_deepspeed_zero2_stage3_matches_one_process(workspace, tmp_path):
    """`accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml -m trl_scripts.train --stage 3`
    (from the repository root, as the config's relative DeepSpeed path expects) on two gloo processes."""
    launcher = accelerate_launch("configuration/accelerate/deepspeed_zero2.yaml")
    # gloo: without GPUs accelerate picks no process-group backend for DeepSpeed, and each process would see all rows
    arguments = {**workspace["stage3"], **workspace["data"], **STEPS, "ddp_backend": "gloo",
                 "output_dir": str(tmp_path / "ds")}
    report = launch(launcher, ["stage", *cli(arguments)], tmp_path, cwd=REPO)

    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["world_size"] == 2
    assert report["zero_stage"] == 2
    assert report["sparse_blocks"] == report["zero_leaf_blocks"] == 4  # the MoE blocks are ZeRO leaves
    assert_same_steps(report["log_history"], workspace["single_logs"])
    assert_same_checkpoint(tmp_path / "ds", workspace["single_dir"], workspace["start_state"],
                           trained=("mlp.experts.gate_up_proj", "mlp.gate.weight", "self_attn.v_proj"))
    assert UniMoEForCausalLM.from_pretrained(tmp_path / "ds").config.text_config.router_aux_loss_coef == 0.05


def parse_training_config(path: Path):
    data = yaml.safe_load(path.read_text())
    if data.get("bf16") and not torch.cuda.is_available():
        data["use_cpu"] = True  # TrainingArguments refuses bf16 without a GPU unless told to train on the CPU
    parser = HfArgumentParser((StageArguments, DataArguments, TrainingArguments))
    return parser.parse_dict(data, allow_extra_keys=False)


# The released stage-3 scripts (reference/unimoe_v1_spec.md 4.2): lr 4e-5 everywhere; per-device batch x accumulation,
# epochs, balance-loss weight (none in the 4-expert code), sparse layers and router of each variant.
RECIPES = {
    "unimoe-v1-speech-4e-stage3": dict(batch=(4, 2), epochs=2, aux=0.0, moe_layers="all", router="topk_softmax"),
    "unimoe-v1-audio-4e-stage3": dict(batch=(2, 4), epochs=10, aux=0.0, moe_layers="even", router="topk_softmax"),
    "unimoe-v1-8e-stage3": dict(batch=(2, 4), epochs=2, aux=0.01, moe_layers="all", router="softmax_topk"),
}


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=[path.stem for path in TRAINING_CONFIGS])
def test_training_config_parses(path):
    stage_args, data_args, training_args = parse_training_config(path)
    assert path.stem.endswith(f"stage{stage_args.stage}")
    assert data_args.train_files and training_args.output_dir
    if stage_args.stage == 3 and stage_args.recipe == "unimoe":
        assert (stage_args.lora_r, stage_args.lora_alpha) == (8, 16)  # the paper's LoRA in every variant
        assert stage_args.router_aux_loss_coef is not None
    if path.stem in RECIPES:
        recipe = RECIPES[path.stem]
        assert training_args.learning_rate == 4e-5 and training_args.lr_scheduler_type == "cosine"
        assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == recipe["batch"]
        assert training_args.num_train_epochs == recipe["epochs"]
        assert stage_args.router_aux_loss_coef == recipe["aux"]
        assert (stage_args.moe_layers, stage_args.router_type) == (recipe["moe_layers"], recipe["router"])
    else:  # the tiny recipe's, checked below; CuMo's, checked in test_cumo.py
        assert path.stem.startswith(("tiny-", "cumo-"))


def test_recipe_list_covers_the_configs():
    assert set(RECIPES) <= {path.stem for path in TRAINING_CONFIGS}


def test_tiny_configs_are_the_quickstart_recipe():
    from trl_scripts.quickstart.run import QuickstartArguments

    recipe = QuickstartArguments()
    epochs = [recipe.warmup_epochs, recipe.stage1_epochs, recipe.stage2_epochs, recipe.stage3_epochs]
    for stage in range(4):
        stage_args, data_args, training_args = parse_training_config(REPO / "configuration" / "training" / f"tiny-stage{stage}.yaml")
        assert training_args.num_train_epochs == epochs[stage]
        learning_rate = recipe.stage1_learning_rate if stage == 1 else recipe.learning_rate
        assert (training_args.learning_rate, training_args.per_device_train_batch_size) == (learning_rate, recipe.batch_size)
        assert (training_args.lr_scheduler_type, training_args.warmup_steps) == ("cosine", 0.05)
        assert data_args.system_prompt == recipe.system_prompt
        assert stage_args.train_towers == (stage == 1) and not stage_args.train_output_layers
        assert stage_args.learning_rates() == {}


def test_tiny_configs_run_a_step(tmp_path, monkeypatch):
    """configuration/training/tiny-stage{0,1,2,3}.yaml, chained as written (paths relative to the working directory),
    one optimizer step each, on a small synthetic dataset."""
    from trl_scripts.quickstart.make_synthetic_data import make_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    make_synthetic_dataset(tmp_path / "outputs/synthetic_data", num_train_per_task=2, num_eval_per_task=1,
                           use_espeak=False)
    for stage in (0, 1, 2, 3):
        config = REPO / "configuration" / "training" / f"tiny-stage{stage}.yaml"
        stage_args, data_args, training_args = parse_training_config(config)
        training_args.max_steps = 1
        run(stage_args, data_args, training_args)
        assert (tmp_path / training_args.output_dir / "config.json").is_file()
    stage2 = json.loads((tmp_path / "outputs/tiny/stage2/experts/experts.json").read_text())
    assert stage2 == ["image", "video", "audio", "speech"]
    config = UniMoEForCausalLM.from_pretrained(tmp_path / "outputs/tiny/stage3").config.text_config
    assert (config.num_experts, config.num_experts_per_tok, config.sparse_layer_indices) == (4, 2, [0, 1, 2, 3])
