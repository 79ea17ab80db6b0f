"""Model cards for Uni-MoE checkpoints, built with huggingface_hub's `ModelCard` / `ModelCardData`.

The card carries the Hub metadata (license, base models, `pipeline_tag`, tags, training datasets, evaluation results as
`model-index` entries) and a body with the architecture table (experts, top-k, sparse layers, towers, active versus
total parameters), a usage snippet with `trust_remote_code=True`, the routing heatmap when the checkpoint folder has
one, the evaluation table and the citation.

Evaluation results are the JSON files written by `python -m trl_scripts.evaluate`, one result per file:
`{"task": "vqa", "dataset": {"name": ..., "type": ..., "split": ...}, "metrics": {"accuracy": 0.71}}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM
from modeling_unimoe.transformers_compat import SUPPORTED_TRANSFORMERS


UNIMOE_TAGS = ["uni-moe", "mixture-of-experts", "moe", "custom_code"]
ROUTING_HEATMAP = "routing_heatmap.png"
EVAL_RESULTS_PATTERN = "eval_results*.json"
# Task names of `trl_scripts.evaluation.evaluate` -> Hub task ids (model-index `task.type`); other names are used as they are.
EVAL_TASK_TYPES = {
    "vqa": ("visual-question-answering", "Visual Question Answering"),
    "mcq": ("multiple-choice", "Multiple Choice"),
    "caption": ("image-to-text", "Captioning"),
    "asr": ("automatic-speech-recognition", "Speech Recognition"),
}
EVAL_RESULT_SHAPE = '{"task": str, "dataset": {"name": str, "type": str, "split": str}, "metrics": {name: number}}'
PAPER_URL = "https://arxiv.org/abs/2405.11273"
CITATION = """@article{li2025unimoe,
  author={Li, Yunxin and Jiang, Shenyuan and Hu, Baotian and Wang, Longyue and Zhong, Wanqi and Luo, Wenhan and Ma, Lin and Zhang, Min},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  title={Uni-MoE: Scaling Unified Multimodal LLMs With Mixture of Experts},
  year={2025},
  volume={47},
  number={5},
  pages={3424-3439},
  doi={10.1109/TPAMI.2025.3532688}
}"""

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Architecture

| Component | |
|---|---|
{% for name, value in architecture -%}
| {{ name }} | {{ value }} |
{% endfor %}
## Usage

The modelling code ships with the checkpoint (`modeling_unimoe.py` and its siblings), so nothing but `transformers`
is needed; `trust_remote_code=True` lets it run. It supports, and is tested on, the transformers releases
`{{ transformers_range }}`: `pip install "transformers{{ transformers_range }}"`.

```python
{{ usage }}
```
{% if routing_heatmap %}
## Expert routing

![Expert routing heatmap]({{ routing_heatmap }})

How the routers spread tokens over the experts of each sparse layer (`{{ routing_heatmap }}`, saved with the
checkpoint).
{% endif %}{% if evaluation %}
## Evaluation

| Task | Dataset | Split | Metric | Value |
|---|---|---|---|---|
{% for row in evaluation -%}
| {{ row.task }} | {{ row.dataset }} | {{ row.split }} | {{ row.metric }} | {{ row.value }} |
{% endfor %}{% endif %}{% if datasets %}
## Training data

{% for name in datasets -%}
- {{ name }}
{% endfor %}{% endif %}
## Citation

```bibtex
{{ citation }}
```
"""


# --- evaluation results ---------------------------------------------------------------------------------------------


def load_eval_result(path: str | Path) -> dict:
    """Reads and checks one results file of `trl_scripts.evaluation.evaluate`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Evaluation results file {path} does not exist")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Evaluation results file {path} is not valid JSON ({error}); expected {EVAL_RESULT_SHAPE}"
        ) from None

    def bad(key: str, problem: str):
        raise ValueError(f"Evaluation results file {path}: {problem} `{key}`; expected {EVAL_RESULT_SHAPE}")

    if not isinstance(result, dict):
        bad("<top level>", "a JSON object is needed at")
    if not isinstance(result.get("task"), str) or not result["task"]:
        bad("task", "missing or non-string")
    dataset = result.get("dataset")
    if not isinstance(dataset, dict):
        bad("dataset", "missing or non-object")
    for key in ("name", "type", "split"):
        if not isinstance(dataset.get(key), str) or not dataset[key]:
            bad(f"dataset.{key}", "missing or non-string")
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        bad("metrics", "missing or empty")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(f"metrics.{name}", f"a finite number is needed, got {value!r}, at")
    return result


def card_eval_results(results: list[dict]) -> list[EvalResult]:
    """One `EvalResult` (a model-index entry) per metric of each result."""
    entries = []
    for result in results:
        task_type, task_name = EVAL_TASK_TYPES.get(result["task"], (result["task"], result["task"]))
        dataset = result["dataset"]
        for metric, value in result["metrics"].items():
            entries.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_split=dataset["split"],
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return entries


# --- architecture ---------------------------------------------------------------------------------------------------


def parameter_counts(config: UniMoEConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the model `config` describes, counted on the meta device."""
    with torch.device("meta"):
        model = UniMoEForCausalLM(config)
    return model.num_parameters(), model.num_active_parameters()


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def modalities(config: UniMoEConfig) -> list[str]:
    """Input modalities of the model: text plus what its towers read."""
    found = ["text"]
    if config.vision_config is not None:
        found += ["image", "video"]
    if "whisper" in config.audio_towers:
        found.append("speech")
    if "beats" in config.audio_towers:
        found.append("sound")
    return found


def pipeline_tag(config: UniMoEConfig) -> str:
    if config.audio_towers:
        return "any-to-any"  # the checkpoint's custom pipeline for audio (+ image/video) and text
    if config.vision_config is not None:
        return "image-text-to-text"
    return "text-generation"


def card_tags(config: UniMoEConfig, adapter: bool = False) -> list[str]:
    tags = list(UNIMOE_TAGS)
    if len(modalities(config)) > 1:
        tags.append("multimodal")
    tags += [{"image": "vision", "sound": "audio"}.get(m, m) for m in modalities(config)[1:]]
    if config.projector_num_experts > 1 or config.vision_moe_layers:
        tags.append("cumo")
    if adapter:
        tags += ["peft", "lora"]
    return list(dict.fromkeys(tags))


def _sparse_layers(text) -> str:
    sparse, depth = text.sparse_layer_indices, text.num_hidden_layers
    if text.moe_layers == "all":
        return f"all {depth} decoder layers"
    which = f"{text.moe_layers} layers" if isinstance(text.moe_layers, str) else "layers " + ", ".join(map(str, sparse))
    return f"{len(sparse)} of {depth} decoder layers ({which})"


def architecture_rows(config: UniMoEConfig, total: int, active: int) -> list[tuple[str, str]]:
    """The architecture table: language model, experts, routing, towers and connectors, parameters."""
    text = config.text_config
    shared = f" + {text.num_shared_experts} shared" if text.num_shared_experts else ""
    rows = [
        ("Inputs", ", ".join(modalities(config))),
        (
            "Language model",
            f"LLaMA-style decoder: {_n(text.num_hidden_layers, 'layer')}, width {text.hidden_size}, "
            f"{_n(text.num_attention_heads, 'attention head')} ({text.num_key_value_heads} key/value), "
            f"vocabulary {text.vocab_size}",
        ),
        ("Experts", f"{text.num_experts} routed{shared} per sparse layer, FFN width {text.moe_intermediate_size} each"),
        ("Top-k", f"{text.num_experts_per_tok} experts per token, router `{text.router_type}`"),
        ("Sparse layers", _sparse_layers(text)),
        ("Router losses", f"balance x {text.router_aux_loss_coef}, z-loss x {text.router_z_loss_coef}"),
    ]
    if (vision := config.vision_config) is not None:
        patches = (vision.image_size // vision.patch_size) ** 2
        projector = "`mlp2x_gelu` projector"
        if config.projector_num_experts > 1:
            projector = (f"sparse MoE projector ({config.projector_num_experts} `mlp2x_gelu` experts, "
                         f"top-{config.projector_num_experts_per_tok})")
        rows.append((
            "Image / video tower",
            f"CLIP ViT ({_n(vision.num_hidden_layers, 'layer')}, width {vision.hidden_size}, {vision.image_size} px, patch "
            f"{vision.patch_size}) -> {projector}: {patches} tokens per image; video frames "
            + ("mean-pooled to one image's tokens" if config.video_pooling == "mean" else "kept in sequence"),
        ))
        if config.vision_moe_layers:
            rows.append((
                "Vision MoE (CuMo)",
                f"CLIP MLPs of layers {', '.join(map(str, config.vision_moe_layers))}: {config.vision_num_experts} "
                f"experts, top-{config.vision_num_experts_per_tok}",
            ))
        if config.projector_num_experts > 1 or config.vision_moe_layers:
            rows.append((
                "Vision router losses (CuMo)",
                f"balance x {config.mm_router_aux_loss_coef}, z-loss x {config.mm_router_z_loss_coef}, for the projector's "
                "and CLIP's routers each",
            ))
    window = f"per {config.audio_window_seconds} s window (at most {config.max_audio_windows} windows)"
    if (speech := config.speech_config) is not None:
        rows.append((
            "Speech tower",
            f"Whisper encoder ({_n(speech.encoder_layers, 'layer')}, width {speech.d_model}, {speech.num_mel_bins} mel bins) "
            f"-> aligner of {_n(config.speech_aligner_layers, 'Whisper decoder layer')} over {config.num_query_tokens} "
            f"learned queries: {config.num_query_tokens} tokens {window}",
        ))
    if (beats := config.audio_config) is not None:
        qformer = config.audio_qformer_config
        rows.append((
            "Sound tower",
            f"BEATs ({_n(beats.encoder_layers, 'layer')}, width {beats.encoder_embed_dim}) -> Q-Former "
            f"({_n(qformer.num_hidden_layers, 'layer')}, width {qformer.hidden_size}) over {config.num_query_tokens} "
            f"learned queries: {config.num_query_tokens} tokens {window}",
        ))
    if config.audio_towers:
        rows.append(("Audio items", "read by " + " then ".join(config.audio_towers)))
    rows.append((
        "Parameters",
        f"{_count(total)} total, {_count(active)} active per token ({active:,} of {total:,}; {active / total:.0%})",
    ))
    return rows


# --- usage ----------------------------------------------------------------------------------------------------------


def usage_snippet(repo_id: str, config: UniMoEConfig, has_processor: bool, base_repo_id: str | None = None) -> str:
    """Python that loads the published model and answers one prompt; `base_repo_id` makes it load an adapter."""
    model_repo = base_repo_id or repo_id
    media = []
    if config.vision_config is not None:
        media += ['{"type": "image", "path": "image.png"}', '{"type": "video", "path": "video.mp4"}']
    if config.audio_towers:
        media.append('{"type": "audio", "path": "audio.wav"}')
    question = "Describe what you see and hear." if media else "What is a mixture of experts?"
    preprocessor = "processor" if has_processor else "tokenizer"
    auto_class = "AutoProcessor" if has_processor else "AutoTokenizer"
    lines = []
    if base_repo_id:
        lines.append("from peft import PeftModel")
    lines += [
        f"from transformers import AutoModelForCausalLM, {auto_class}",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_repo}", trust_remote_code=True)',
    ]
    if base_repo_id:
        lines.append(f'model = PeftModel.from_pretrained(model, "{repo_id}")')
    lines.append(f'{preprocessor} = {auto_class}.from_pretrained("{model_repo}", trust_remote_code=True)')
    if has_processor:
        content = ",\n".join(f"    {item}" for item in [*media, f'{{"type": "text", "text": "{question}"}}'])
        lines.append(f'messages = [{{"role": "user", "content": [\n{content},\n]}}]')
    else:
        lines.append(f'messages = [{{"role": "user", "content": "{question}"}}]')
    if has_processor:
        lines += [
            f"inputs = {preprocessor}.apply_chat_template(",
            '    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"',
            ")",
        ]
    else:  # the Vicuna template leaves BOS to the tokenizer, which adds it when called on the text, as the processor does
        lines += [
            "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = tokenizer(prompt, return_tensors="pt")',
        ]
    lines += [
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        f'print({preprocessor}.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    return "\n".join(lines)


# --- the card -------------------------------------------------------------------------------------------------------


def build_model_card(
    folder: str | Path,
    repo_id: str,
    config: UniMoEConfig,
    *,
    license: str | None = "apache-2.0",
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    eval_results: list[dict] | None = None,
    has_processor: bool = True,
    adapter_config: dict | None = None,
) -> ModelCard:
    """The model card of the checkpoint in `folder`, to be published as `repo_id`.

    `config` is the model's configuration (for an adapter: its base model's). `eval_results` are checked results of
    `trl_scripts.evaluation.evaluate` (`load_eval_result`). `adapter_config` (peft's `adapter_config.json`) makes it the card of a
    LoRA adapter on `base_models[0]`.
    """
    folder = Path(folder)
    model_name = repo_id.split("/")[-1]
    total, active = parameter_counts(config)
    architecture = architecture_rows(config, total, active)
    results = card_eval_results(eval_results or [])
    adapter = adapter_config is not None
    if adapter and not base_models:
        raise ValueError(f"The card of the adapter in {folder} needs its base model's Hub id (base_models)")
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        base_model=list(base_models) if base_models else None,
        base_model_relation="adapter" if adapter else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=pipeline_tag(config),
        tags=card_tags(config, adapter),
        datasets=list(datasets) if datasets else None,
        eval_results=results or None,
    )
    summary = (
        f"A [Uni-MoE]({PAPER_URL}) model: a LLaMA-style language model whose feed-forward layers are sparse "
        f"mixtures of experts ({config.text_config.num_experts} experts, top-{config.text_config.num_experts_per_tok}), "
        f"reading {', '.join(modalities(config))}."
    )
    if adapter:
        targets = [*(adapter_config.get("target_modules") or []), *(adapter_config.get("target_parameters") or [])]
        summary = (
            f"A LoRA adapter (peft; r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, on "
            f"{', '.join(f'`{t}`' for t in targets)}) for the [Uni-MoE]({PAPER_URL}) model `{base_models[0]}`. "
            "The architecture below is the base model's."
        )
    evaluation = [
        {"task": r.task_name, "dataset": r.dataset_name, "split": r.dataset_split, "metric": r.metric_type,
         "value": f"{r.metric_value:.4g}"}
        for r in results
    ]
    heatmap = ROUTING_HEATMAP if (folder / ROUTING_HEATMAP).is_file() else None
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        summary=summary,
        architecture=[(name, value.replace("|", "\\|")) for name, value in architecture],
        usage=usage_snippet(repo_id, config, has_processor, base_models[0] if adapter else None),
        routing_heatmap=heatmap,
        evaluation=evaluation,
        datasets=list(datasets or []),
        citation=CITATION,
        transformers_range=SUPPORTED_TRANSFORMERS,
    )
