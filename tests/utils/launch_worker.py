"""Multi-process workers for tests/training/test_launch.py, started by `torchrun` or `accelerate launch` (or called in-process
for the single-process reference runs).

    launch_worker.py stage REPORT_JSON [trl_scripts.training.train arguments]
        a stage through `trl_scripts.training.train.run` exactly as the CLI runs it; rank 0 writes the log history and what
        the launcher set up (world size, distributed type, ZeRO stage, MoE blocks registered as ZeRO leaves).
    launch_worker.py sharded REPORT_JSON [ShardedStage3Arguments, DataArguments, TrainingArguments]
        stage 3 on a model sharded at load time by transformers (`DistributedConfig`: expert parallel and/or FSDP2),
        see `train_sharded_stage3`.

Why the experts train in full under expert parallelism (transformers 5.23, peft 0.21): peft's `ParamWrapper` (LoRA
through `target_parameters`) adds its delta by registering a parametrization `W + scaling * B @ A` on the experts
module *before* calling it. Under EP that `W` is still the expert-sharded DTensor (`Shard(0)` over the EP mesh, from
the `grouped_gemm` plan); transformers swaps in the rank's local `[E / ep, ...]` slice only inside the experts'
forward (`EpDispatchExpertsParallel` -> `_use_local_dtensor_params`). So the first forward fails with
"aten.baddbmm.default got mixed torch.Tensor and DTensor", and even with matching tensor types the LoRA factors cover
all E experts (their `r * E` axis interleaves the experts, `lora_B` with E fastest) while each rank holds E / ep of
them. Without EP, FSDP2 all-gathers each layer's weights into plain tensors before its forward, so expert LoRA works.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoProcessor, HfArgumentParser, TrainingArguments, set_seed
from transformers.distributed import DistributedConfig
from transformers.distributed.utils import gather_full_state_dict

from modeling_unimoe import UniMoEForCausalLM
from trl_scripts.training.data import UniMoEDataCollator, load_conversations, validate_dataset
from trl_scripts.training.stages import CONNECTORS, EXPERT_PARAMETERS, LM_ATTENTION
from trl_scripts.training.train import DataArguments, StageArguments, load_stage_model, run
from trl_scripts.training.trainer import UniMoETrainer
from trl_scripts.training.upcycling import upcycle_unimoe


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def run_stage(report_path: str, argv: list[str]) -> dict:
    """`python -m trl_scripts.train ARGS` under the launcher, plus a report of what the launcher set up."""
    parser = HfArgumentParser((StageArguments, DataArguments, TrainingArguments))
    stage_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    trainer = run(stage_args, data_args, training_args)
    if isinstance(trainer, list):  # stage 2: one trainer per expert
        trainer = trainer[-1]
    blocks = [module for module in trainer.model.modules() if type(module).__name__ == "UniMoESparseMoeBlock"]
    report = {
        "log_history": trainer.state.log_history,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sparse_blocks": len(blocks),
        "zero_leaf_blocks": sum(bool(getattr(module, "_z3_leaf", False)) for module in blocks),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
    }
    if trainer.is_world_process_zero():
        Path(report_path).write_text(json.dumps(report))
    return report


@dataclass
class ShardedStage3Arguments:
    checkpoint: str = field(metadata={"help": "The stage-3 starting checkpoint (sparse): `build_stage3_checkpoint`."})
    ep_size: int = 1
    fsdp_size: int = 1
    expert_lora: bool = field(
        default=True, metadata={"help": "LoRA on the fused experts (peft target_parameters); False: trained in full."}
    )
    lora_r: int = 8
    lora_alpha: int = 16


def build_stage3_checkpoint(
    stage2_dir: str,
    output_dir: str,
    seed: int = 0,
    num_experts_per_tok: int = 2,
    router_aux_loss_coef: float | None = None,
) -> str:
    """The sparse model `trl_scripts.training.train.run_stage3` builds in memory from a stage-2 output (same seed, same routers),
    saved with its processor, so that `from_pretrained(distributed_config=...)` can shard it at load time."""
    set_seed(seed)
    source = Path(stage2_dir)
    names = json.loads((source / "experts" / "experts.json").read_text())
    ffns = [load_file(source / "experts" / f"{name}.safetensors") for name in names]
    dense, processor = load_stage_model(str(source), 3)
    model = upcycle_unimoe(dense, ffns, num_experts=len(ffns), num_experts_per_tok=num_experts_per_tok)
    if router_aux_loss_coef is not None:
        model.config.text_config.router_aux_loss_coef = router_aux_loss_coef
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def sharded_lora_config(args: ShardedStage3Arguments) -> LoraConfig:
    # No `modules_to_save`: peft deep-copies those modules, and modules FSDP2 manages cannot be copied ("Attempted to
    # call copy_() on an invalid python storage"). Routers and connectors train in place instead (same update).
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=LM_ATTENTION,
        target_parameters=EXPERT_PARAMETERS if args.expert_lora else None,
    )


def train_in_full(peft_model, experts: bool) -> list[str]:
    """Routers and connectors (and, without expert LoRA, the fused experts) trainable in place; returns their names."""
    names = []
    for name, parameter in peft_model.named_parameters():
        in_full = ".mlp.gate." in name or any(f".{connector}." in name for connector in CONNECTORS)
        in_full = in_full or (experts and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")))
        if in_full:
            parameter.requires_grad_(True)
            names.append(name)
    return names


def train_sharded_stage3(
    args: ShardedStage3Arguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    report_path: str | None = None,
) -> dict:
    """Stage 3 (LoRA on attention, routers and connectors in full, experts with LoRA or in full) with UniMoETrainer on a
    model that transformers shards at load time: `DistributedConfig(ep_size, fsdp_size)` (none for 1 x 1). After
    training the full state is gathered, the adapters merged on rank 0 and the plain checkpoint saved there."""
    sharded = args.ep_size > 1 or args.fsdp_size > 1
    distributed_config = DistributedConfig(ep_size=args.ep_size, fsdp_size=args.fsdp_size) if sharded else None
    model = UniMoEForCausalLM.from_pretrained(args.checkpoint, distributed_config=distributed_config)
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    set_seed(training_args.seed)  # the same LoRA initialisation in every process and in the reference run
    peft_model = get_peft_model(model, sharded_lora_config(args))
    train_in_full(peft_model, experts=not args.expert_lora)

    training_args.remove_unused_columns = False
    dataset = validate_dataset(load_conversations(data_args.train_files), data_args.media_root, data_args.skip_invalid)
    trainer = UniMoETrainer(
        model=peft_model,
        args=training_args,
        train_dataset=dataset,
        data_collator=UniMoEDataCollator(processor, data_args.media_root),
        group_by_modality=data_args.group_by_modality,
    )
    trainer.train()

    experts = model.model.language_model.layers[0].mlp.experts
    experts = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts  # under the LoRA wrappers
    report = {
        "log_history": trainer.state.log_history,
        "world_size": trainer.accelerator.num_processes,
        "local_experts": experts.num_experts,
        "expert_parallel": bool(getattr(experts, "_is_expert_parallel", False)),
        "fsdp_managed": bool(getattr(model, "_is_fsdp_managed_module", False)),
    }
    # every rank joins the gathers; rank 0 merges the adapters into a plain single-process copy and saves it
    state = gather_full_state_dict(peft_model) if sharded else peft_model.state_dict()
    if _rank() == 0:
        reference = get_peft_model(UniMoEForCausalLM.from_pretrained(args.checkpoint), sharded_lora_config(args))
        reference.load_state_dict(state, strict=True)
        merged = reference.merge_and_unload()
        merged.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
        if report_path is not None:
            Path(report_path).write_text(json.dumps(report))
    if sharded:
        dist.barrier()
    return report


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mode, report_path, rest = argv[0], argv[1], argv[2:]
    if mode == "stage":
        run_stage(report_path, rest)
    elif mode == "sharded":
        parser = HfArgumentParser((ShardedStage3Arguments, DataArguments, TrainingArguments))
        train_sharded_stage3(*parser.parse_args_into_dataclasses(args=rest), report_path=report_path)
    else:
        raise ValueError(f"unknown mode {mode!r}: expected 'stage' or 'sharded'")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
