"""`UniMoETrainer`: transformers' Trainer plus what MoE training needs.

- Router logits are always requested, so the balance and z-losses really are in the loss (they vanish otherwise).
- Their weight survives gradient accumulation: the model scales the router terms by the micro-batch's share of the
  optimizer step's tokens whenever Trainer passes `num_items_in_batch` (see `UniMoEForCausalLM.forward`).
- The cross-entropy and every router group's balance and z-losses are logged separately: the language model's
  (`aux_loss`, `z_loss`), CuMo's projector (`projector_aux_loss`, `projector_z_loss`) and CLIP MLPs
  (`vision_aux_loss`, `vision_z_loss`), each unweighted (its weight is in the config).
- So is the expert load: for the language model, the share of each modality's tokens (image, video, audio, text)
  routed to each expert, averaged over sparse layers (`expert_load/{modality}/e{i}`); for CuMo's projector and CLIP
  routers, the share of the image and of the video-frame tokens (`expert_load/projector/{image,video}/e{i}`,
  `expert_load/vision/{image,video}/e{i}`, CLIP averaged over its MoE layers). The full per-layer counts are kept
  for heatmaps: `expert_load_counts` [modalities, layers, experts], `projector_load_counts` and
  `vision_load_counts` [2 (image, video), MoE layers, experts].
- A NaN or infinite loss stops training with an error naming the step.
- With `group_by_modality`, batches come from `ModalityGroupedSampler`: one modality mix per global batch.
- With `component_learning_rates` ({"speech_tower": 1e-3, ...}), the parameters under those modules get their own
  learning rate (the scheduler scales every group alike); the rest keep `args.learning_rate`.
"""

from collections import defaultdict

import torch
from transformers import Trainer

from .data import ModalityGroupedSampler, modality_mix, row_media


MODALITIES = ("text", "image", "video", "audio")
# Router groups logged besides the language model's, with the outputs' names: CuMo's MoE projector and CLIP MLPs.
MULTIMODAL_ROUTERS = ("projector", "vision")
VISION_MODALITIES = ("image", "video")  # the media those routers see
LOSSES = ("ce_loss", "aux_loss", "z_loss", *(f"{g}_{loss}" for g in MULTIMODAL_ROUTERS for loss in ("aux_loss", "z_loss")))


def modality_expert_counts(modality: torch.Tensor, chosen: torch.Tensor, num_modalities: int, num_experts: int) -> torch.Tensor:
    """[modalities, experts] counts of top-k assignments: `modality` [tokens] indexes each token's modality, `chosen`
    [tokens, k] its experts; one bincount over every (modality, expert) pair."""
    pairs = (modality[:, None] * num_experts + chosen).reshape(-1)
    return torch.bincount(pairs, minlength=num_modalities * num_experts).float().view(num_modalities, num_experts)


def _unwrap(model):
    """The `UniMoEForCausalLM` inside peft / DDP wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class UniMoETrainer(Trainer):
    def __init__(
        self, *args, group_by_modality: bool = False, component_learning_rates: dict[str, float] | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.group_by_modality = group_by_modality
        self.component_learning_rates = dict(component_learning_rates or {})
        if self.component_learning_rates:
            if self.optimizer is not None:
                raise ValueError("component_learning_rates apply to the optimizer the trainer builds, not to one passed in `optimizers`")
            names = {part for name, _ in self.model.named_parameters() for part in name.split(".")}
            unknown = sorted(set(self.component_learning_rates) - names)
            if unknown:
                raise ValueError(f"component_learning_rates names modules the model does not have: {unknown}")
        self._pending = defaultdict(list)
        config = _unwrap(self.model).config
        self._token_ids = {"image": config.image_token_id, "video": config.video_token_id, "audio": config.audio_token_id}
        text = config.text_config
        self.expert_load_counts = torch.zeros(len(MODALITIES), len(text.sparse_layer_indices), text.num_experts)
        self._window_counts = torch.zeros_like(self.expert_load_counts)
        # CuMo's routers: [image / video, MoE layers, experts] and their top-k
        projector_moe = config.projector_num_experts > 1
        self._multimodal_top_k = {"projector": config.projector_num_experts_per_tok, "vision": config.vision_num_experts_per_tok}
        self.projector_load_counts = torch.zeros(len(VISION_MODALITIES), int(projector_moe), config.projector_num_experts)
        self.vision_load_counts = torch.zeros(len(VISION_MODALITIES), len(config.vision_moe_layers), config.vision_num_experts)
        self._multimodal_window = {group: torch.zeros_like(getattr(self, f"{group}_load_counts")) for group in MULTIMODAL_ROUTERS}

    def _get_train_sampler(self, *args, **kwargs):
        if not self.group_by_modality:
            return super()._get_train_sampler(*args, **kwargs)
        dataset = self.train_dataset
        mixes = [modality_mix(row) for row in dataset]
        lengths = [sum(len(turn["value"]) for turn in row.get("conversations") or []) + 600 * len(row_media(row)) for row in dataset]
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return ModalityGroupedSampler(mixes, lengths, global_batch_size=global_batch, seed=args.seed)

    def create_optimizer(self, model=None):
        """Trainer's optimizer (its weight-decay groups, its optimizer class), each group then split by component so
        that `component_learning_rates` apply; built before the scheduler, which therefore scales every group."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if not (fresh and self.component_learning_rates):
            return optimizer
        names = {id(p): name.split(".") for name, p in (model or self.model).named_parameters()}
        for group in list(optimizer.param_groups):
            split = defaultdict(list)  # component -> its parameters in this group
            for parameter in group["params"]:
                parts = names[id(parameter)]
                split[next((c for c in self.component_learning_rates if c in parts), None)].append(parameter)
            group["params"] = split.pop(None, [])
            for component, parameters in split.items():
                options = {key: value for key, value in group.items() if key != "params"}
                optimizer.add_param_group({**options, "params": parameters, "lr": self.component_learning_rates[component]})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss).all():
            parts = ", ".join(f"{name} {getattr(outputs, name)}" for name in LOSSES if getattr(outputs, name, None) is not None)
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.state.global_step + 1} ({parts})")
        if model.training:
            self._record(inputs, outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, inputs, outputs, num_items_in_batch=None):
        for name in LOSSES:
            value = getattr(outputs, name, None)
            if value is not None:
                self._pending[name].append(value.detach().float().item())
        if outputs.ce_loss is not None and num_items_in_batch is not None:
            # the model's CE is this micro-batch's share of the whole step's tokens: log its own mean instead
            local_items = (inputs["labels"][..., 1:] != -100).sum().clamp(min=1)
            self._pending["ce_loss"][-1] *= float(num_items_in_batch) / float(local_items)
        self._record_multimodal_load(inputs, outputs)
        if not outputs.router_logits:
            return
        ids = inputs["input_ids"].reshape(-1)
        valid = inputs["attention_mask"].reshape(-1).bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
        modality = torch.zeros_like(ids)  # 0 = text
        for index, name in enumerate(MODALITIES[1:], start=1):
            if self._token_ids[name] is not None:
                modality[ids == self._token_ids[name]] = index
        keep = valid.cpu()
        modality = modality.cpu()[keep]  # [real tokens]; padding counts nowhere
        top_k = _unwrap(self.model).config.text_config.num_experts_per_tok
        num_experts = self.expert_load_counts.shape[-1]
        for layer, logits in enumerate(outputs.router_logits):
            chosen = logits.topk(top_k, dim=-1).indices.cpu()[keep]  # [real tokens, k]
            self._window_counts[:, layer] += modality_expert_counts(modality, chosen, len(MODALITIES), num_experts)

    def _record_multimodal_load(self, inputs, outputs):
        """Top-k assignments of CuMo's projector and CLIP routers, split into image and video-frame tokens: every image
        and frame gives the same number of router rows, images first (`UniMoEModel._merge_media`)."""
        pixels, videos = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
        items = torch.tensor([
            pixels.shape[0] if pixels is not None else 0,
            videos.shape[0] * videos.shape[1] if videos is not None else 0,
        ])  # [images, video frames]
        for group in MULTIMODAL_ROUTERS:
            router_logits = getattr(outputs, f"{group}_router_logits", None) or ()
            window = self._multimodal_window[group]
            for layer, logits in enumerate(router_logits):
                rows_per_item = logits.shape[0] // int(items.sum())
                modality = torch.repeat_interleave(torch.arange(len(VISION_MODALITIES)), items * rows_per_item)  # [rows]
                chosen = logits.topk(self._multimodal_top_k[group], dim=-1).indices.cpu()  # [rows, k]
                window[:, layer] += modality_expert_counts(modality, chosen, len(VISION_MODALITIES), window.shape[-1])

    @staticmethod
    def _load_shares(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[groups, layers, experts] counts -> (shares per group and expert averaged over layers [groups, experts],
        assignments per group and layer [groups, layers, 1])."""
        totals = window.sum(dim=-1, keepdim=True)  # tokens x k per group and layer
        shares = torch.where(totals > 0, window / totals.clamp(min=1), torch.zeros_like(window)).mean(dim=1)
        return shares, totals

    def log(self, logs: dict[str, float], *args, **kwargs):
        if "loss" in logs and self._pending:
            for name, values in self._pending.items():
                logs[name] = round(sum(values) / len(values), 6)
            self._pending.clear()
            window = self._window_counts
            shares, totals = self._load_shares(window)
            for index, name in enumerate(MODALITIES):
                if totals[index].sum() > 0:
                    for expert, share in enumerate(shares[index].tolist()):
                        logs[f"expert_load/{name}/e{expert}"] = round(share, 4)
            self.expert_load_counts += window
            self._window_counts = torch.zeros_like(window)
            for group, window in self._multimodal_window.items():
                shares, totals = self._load_shares(window)
                for index, name in enumerate(VISION_MODALITIES):
                    if totals[index].sum() > 0:
                        for expert, share in enumerate(shares[index].tolist()):
                            logs[f"expert_load/{group}/{name}/e{expert}"] = round(share, 4)
                getattr(self, f"{group}_load_counts").add_(window)
                window.zero_()
        super().log(logs, *args, **kwargs)
