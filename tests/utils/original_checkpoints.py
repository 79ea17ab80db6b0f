"""Synthetic checkpoints in the layouts of the released Uni-MoE v1 models, for the conversion tests.

Tiny shapes, but the real file names (`pytorch_model-0000i-of-0000n.bin` + index, `non_lora_trainables.bin`,
`adapter_config.json` + `adapter_model.bin` in the PEFT 0.4 format, `mm_audio_aligner.bin`, `mlp_gates.bin`, the
8-expert `{e}_mlp_experts.bin` and expert FFN files), the real key names (the speech aligner's keys are those of a
real `WhisperDecoder`, the sound aligner's those of a real `Blip2QFormerModel`), the key prefixes each file was saved
with, and the dtypes (fp32 shards, bf16 side files). Every tensor is random, so a tensor put in the wrong place or
transformed wrongly shows. The tokenizer is the tiny one without the `<image>`/`<video>`/`<audio>` placeholders, as
the original LLaMA tokenizer lacks them.
"""

import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    WhisperConfig,
    WhisperModel,
)

from . import FIXTURES, REPO_ROOT


TINY_TOKENIZER = REPO_ROOT / "processing" / "tiny-tokenizer"
BEATS_OFFICIAL = FIXTURES / "beats_tiny_official.pt"

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 512, 32, 48, 4, 4
CLIP_HIDDEN, WHISPER_WIDTH, QFORMER_WIDTH, QUERY_TOKENS = 16, 16, 32, 4
LORA_R, LORA_ALPHA = 4, 12  # scaling 3 (the releases used 8 and 16): the formula, not a constant, is tested
EXPERTS = {"speech-4e": 4, "audio-4e": 4, "speech-v1.5": 4, "8e": 8}
EXPERT_FILES_8E = ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4", "mlp_base7", "mlp_base", "mlp_base7")
QFORMER_CONFIG = {
    "hidden_size": QFORMER_WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "cross_attention_frequency": 2, "encoder_hidden_size": 32,  # the BEATs fixture's width
}


def sparse_layers(variant: str, base_of_8e: bool = False) -> list[int]:
    """The MoE layers of a variant's code (the 8e base is the all-layer 4-expert speech base)."""
    if variant in ("audio-4e", "speech-v1.5") and not base_of_8e:
        return [layer for layer in range(LAYERS) if layer % 2 == 0]
    return list(range(LAYERS))


@dataclass
class Towers:
    clip: Path
    whisper: Path
    beats: Path
    qformer_config: Path

    def arguments(self, variant: str) -> dict:
        if variant == "audio-4e":
            return {"clip": self.clip, "beats": self.beats, "audio_qformer_config": self.qformer_config}
        return {"clip": self.clip, "whisper": self.whisper}


def write_towers(folder: Path) -> Towers:
    """Tiny tower checkpoints: a CLIP vision folder with its image processor, a Whisper folder, the BEATs fixture."""
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
    ))
    clip.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder / "clip")
    whisper = WhisperModel(whisper_config())
    whisper.save_pretrained(folder / "whisper")
    (folder / "qformer.json").write_text(json.dumps(QFORMER_CONFIG))
    return Towers(folder / "clip", folder / "whisper", BEATS_OFFICIAL, folder / "qformer.json")


def whisper_config() -> WhisperConfig:
    return WhisperConfig(
        vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, d_model=WHISPER_WIDTH, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=200,
        max_target_positions=64,
    )


class _Random:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(dtype)

    def like(self, names_and_shapes: dict, prefix: str, dtype=torch.float32) -> dict:
        return {prefix + name: self(*shape, dtype=dtype) for name, shape in names_and_shapes.items()}


def _shapes(module: torch.nn.Module) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def aligner_tensors(variant: str, rand: _Random, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """`mm_audio_aligner` (+ query tokens) in the original names, as `mm_audio_aligner.bin` holds them."""
    if variant == "audio-4e":
        qformer = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER_CONFIG))
        state = rand.like(_shapes(qformer), "model.mm_audio_aligner.qformer.qformer.", dtype)
        state["model.mm_audio_aligner.query_tokens"] = rand(1, QUERY_TOKENS, QFORMER_WIDTH, dtype=dtype)
        width = QFORMER_WIDTH
    else:
        decoder = WhisperModel(whisper_config()).decoder
        state = rand.like(_shapes(decoder), "model.mm_audio_aligner.decoder.audio_decoder.", dtype)
        state["model.query_tokens"] = rand(1, QUERY_TOKENS, WHISPER_WIDTH, dtype=dtype)
        width = WHISPER_WIDTH
    state["model.mm_audio_aligner.projector.weight"] = rand(HIDDEN, width, dtype=dtype)
    state["model.mm_audio_aligner.projector.bias"] = rand(HIDDEN, dtype=dtype)
    return state


def projector_tensors(rand: _Random, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        "model.mm_projector.0.weight": rand(HIDDEN, CLIP_HIDDEN, dtype=dtype), "model.mm_projector.0.bias": rand(HIDDEN, dtype=dtype),
        "model.mm_projector.2.weight": rand(HIDDEN, HIDDEN, dtype=dtype), "model.mm_projector.2.bias": rand(HIDDEN, dtype=dtype),
    }


def linear_modules(variant: str) -> dict[str, tuple[int, int]]:
    """The stage-3 LoRA targets (module name -> (out, in)) of each code folder's `find_all_llm_linear_names`."""
    modules = {}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        for projection in "qkvo":
            modules[f"{prefix}self_attn.{projection}_proj"] = (HIDDEN, HIDDEN)
        if variant == "8e":  # experts carry their own LoRA; routers are excluded
            continue
        ffn = {"gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
        if layer in sparse_layers(variant):
            for expert in range(EXPERTS[variant]):
                modules.update({f"{prefix}mlp.experts.{expert}.{name}": shape for name, shape in ffn.items()})
            if variant != "speech-4e":  # the audio and dp code exclude "mlp.gate." (with a dot): the router gets LoRA
                modules[f"{prefix}mlp.gate"] = (EXPERTS[variant], HIDDEN)
        else:
            modules.update({f"{prefix}mlp.{name}": shape for name, shape in ffn.items()})
    return modules


def original_config(variant: str, *, stage3: bool, image_aspect_ratio: str = "square") -> dict:
    """The original `config.json` (LlavaConfig over transformers 4.31's LlamaConfig, plus the Uni-MoE fields)."""
    config = {
        "_name_or_path": "checkpoints/Uni-MoE-base", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 4096, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.31.0", "use_cache": True,
        "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": CLIP_HIDDEN,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": image_aspect_ratio,
        "tune_mm_mlp_adapter": stage3, "use_mm_proj": True, "mm_audio_select_layer": 0,
        "mm_audio_select_feature": "patch", "audio_projector_type": "linear", "query_tokens_size": QUERY_TOKENS,
        "mm_query_tokens": True, "language": "English", "task": "transcribe", "local_files_only": False,
        "moe": True, "num_experts": EXPERTS[variant], "num_experts_per_tok": 2,
    }
    if variant == "audio-4e":
        config |= {"mm_audio_tower": "BEATs_iter3_plus_AS2M.pt", "mm_audio_hidden_size": QFORMER_WIDTH}
    else:
        config |= {"mm_audio_tower": "openai/whisper-small", "mm_audio_hidden_size": WHISPER_WIDTH}
    if variant == "8e":
        config |= {
            "model_type": "llava_llama", "moe_type": "dense", "ep_size": 8, "capacity_factor": 1.5, "lora_r": LORA_R,
            "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05, "aux_balance_loss": True, "aux_balance_loss_coef": 0.01,
            "aux_multimodal_loss": False, "aux_kl_loss": False, "use_fm_block": False,
        }
    return config


@dataclass
class OriginalCheckpoint:
    """The written folders and every tensor written, by file and key, for the tests to compute expectations."""

    variant: str
    base_dir: Path
    stage3_dir: Path | None
    experts_dir: Path | None
    config: dict
    base: dict[str, torch.Tensor]  # the union of the base shards
    shards: dict[str, dict[str, torch.Tensor]]  # shard file name -> its state dict
    files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # side file path (relative) -> state

    def arguments(self, towers: Towers) -> dict:
        arguments = {"base_dir": self.base_dir, "stage3_dir": self.stage3_dir, **towers.arguments(self.variant)}
        if self.experts_dir is not None:
            arguments["experts_dir"] = self.experts_dir
        return arguments

    def write_shard(self, name: str, state: dict[str, torch.Tensor], *, update_index: bool = True) -> None:
        """Rewrite one base shard (tests that break a checkpoint), keeping the index consistent if asked."""
        torch.save(state, self.base_dir / name)
        if update_index:
            index_path = self.base_dir / "pytorch_model.bin.index.json"
            index = json.loads(index_path.read_text())
            index["weight_map"] = {key: file for key, file in index["weight_map"].items() if file != name}
            index["weight_map"] |= {key: name for key in state}
            index_path.write_text(json.dumps(index, indent=2))


def write_original_tokenizer(folder: Path) -> None:
    """The tiny tokenizer as an original LLaMA-style checkpoint ships it: no named media placeholders in the vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    renames = {"<image>": "<reserved_3>", "<video>": "<reserved_4>", "<audio>": "<reserved_5>"}
    for added in tokenizer["added_tokens"]:
        added["content"] = renames.get(added["content"], added["content"])
    vocab = tokenizer["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    for name in ("image_token", "video_token", "audio_token"):
        config.pop(name)
    config["padding_side"] = "right"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_sentencepiece_tokenizer(
    folder: Path, vocab_size: int = VOCAB, legacy: bool | None = None,
) -> sentencepiece.SentencePieceProcessor:
    """A LLaMA-style SentencePiece tokenizer as the released checkpoints ship it, trained here: `tokenizer.model`
    (BPE with byte fallback and the dummy `▁` prefix, `<unk>`/`<s>`/`</s>` = 0/1/2) and a `tokenizer_config.json`
    that names `LlamaTokenizer` and sets `legacy` only when given. Returns the SentencePiece model itself."""
    rand = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rand.choices(syllables, k=rand.randint(1, 3))) for _ in range(300)]
    words += "What is in the picture video audio clip Describe it".split()
    corpus = [
        f"A chat. USER: {' '.join(rand.choices(words, k=6))}? ASSISTANT: {' '.join(rand.choices(words, k=6))}."
        for _ in range(3000)
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "padding_side": "right", "model_max_length": 2048,
    }
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def original_input_ids(prompt: str, sp: sentencepiece.SentencePieceProcessor, placeholder_ids: dict[str, int]) -> list[int]:
    """The token ids the original gave `prompt` (one id per placeholder: the original spliced one negative id per
    `<image>`/`<video>`/`<audio>`). `tokenizer_image_audio_video_token` (`mm_utils.py`) split the prompt at the
    placeholders and tokenised each chunk alone, keeping only the first chunk's BOS; its slow LLaMA tokenizer
    (transformers 4.31, `legacy=True`) split each chunk at the special tokens and SentencePiece-encoded every piece
    on its own, so each piece got the dummy `▁` prefix."""
    ids = [sp.bos_id()]
    for piece in re.split(r"(<image>|<video>|<audio>|</s>)", prompt):
        if piece in placeholder_ids:
            ids.append(placeholder_ids[piece])
        elif piece == "</s>":
            ids.append(sp.eos_id())
        else:
            ids.extend(sp.encode(piece))
    return ids


def _base_tensors(variant: str, rand: _Random) -> dict[str, torch.Tensor]:
    """The base (stage-2) checkpoint: LLaMA + MoE weights in the original names, stale connector copies (stage-3
    files replace them), tower leftovers and the fork's persistent rotary buffers."""
    head_dim = HIDDEN // HEADS
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    base_is_speech = variant == "8e"  # the 8-expert model starts from the 4-expert speech base
    state = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        for projection in "qkvo":
            state[f"{prefix}self_attn.{projection}_proj.weight"] = rand(HIDDEN, HIDDEN)
        state[f"{prefix}self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        state[f"{prefix}input_layernorm.weight"] = rand(HIDDEN)
        state[f"{prefix}post_attention_layernorm.weight"] = rand(HIDDEN)
        if layer in sparse_layers(variant, base_of_8e=base_is_speech):
            experts = 4 if base_is_speech else EXPERTS[variant]
            state[f"{prefix}mlp.gate.weight"] = rand(experts, HIDDEN)
            for expert in range(experts):
                state[f"{prefix}mlp.experts.{expert}.gate_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
                state[f"{prefix}mlp.experts.{expert}.up_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
                state[f"{prefix}mlp.experts.{expert}.down_proj.weight"] = rand(HIDDEN, INTERMEDIATE)
        else:
            state[f"{prefix}mlp.gate_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
            state[f"{prefix}mlp.up_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
            state[f"{prefix}mlp.down_proj.weight"] = rand(HIDDEN, INTERMEDIATE)
    state |= projector_tensors(rand) | aligner_tensors("speech-4e" if base_is_speech else variant, rand)
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = rand(CLIP_HIDDEN)
    state["model.audio_tower.encoder.conv1.weight"] = rand(WHISPER_WIDTH, 80, 3)
    return state


def write_original_checkpoint(
    folder: Path, variant: str, *, stage3: bool = True, image_aspect_ratio: str = "square", seed: int = 0,
) -> OriginalCheckpoint:
    """Write a released-layout checkpoint of `variant` under `folder`: `base/` (+ `stage3/`, + `experts/` for 8e)."""
    rand = _Random(seed)
    base_dir = folder / "base"
    base_dir.mkdir(parents=True)
    base = _base_tensors(variant, rand)
    # two shards, keys alternating, so every layer's experts straddle both files
    names = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    shards = {name: {} for name in names}
    for position, (key, tensor) in enumerate(base.items()):
        shards[names[position % 2]][key] = tensor
    for name, state in shards.items():
        torch.save(state, base_dir / name)
    weight_map = {key: name for name, state in shards.items() for key in state}
    total = sum(t.numel() * t.element_size() for t in base.values())
    (base_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    base_config = original_config("speech-4e" if variant == "8e" else variant, stage3=False, image_aspect_ratio="pad")
    (base_dir / "config.json").write_text(json.dumps(base_config, indent=2))
    (base_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}))
    write_original_tokenizer(base_dir)
    checkpoint = OriginalCheckpoint(variant, base_dir, None, None, base_config if not stage3 else {}, base, shards)
    # the stage-1 connectors the base was trained from (read only when a base is converted alone)
    checkpoint.files["base/mm_projector.bin"] = projector_tensors(rand, torch.bfloat16)
    checkpoint.files["base/mm_audio_aligner.bin"] = aligner_tensors("speech-4e" if variant == "8e" else variant, rand, torch.bfloat16)
    if stage3:
        checkpoint.stage3_dir = folder / "stage3"
        checkpoint.config = original_config(variant, stage3=True, image_aspect_ratio=image_aspect_ratio)
        _write_stage3(checkpoint, rand)
    for relative, state in checkpoint.files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return checkpoint


def _write_stage3(checkpoint: OriginalCheckpoint, rand: _Random) -> None:
    variant, stage3_dir = checkpoint.variant, checkpoint.stage3_dir
    stage3_dir.mkdir()
    (stage3_dir / "config.json").write_text(json.dumps(checkpoint.config, indent=2))
    files = checkpoint.files
    # saved from the PEFT-wrapped model without key clean-up (the second write of the file: projector only)
    files["stage3/non_lora_trainables.bin"] = {
        "base_model.model." + key: tensor for key, tensor in projector_tensors(rand, torch.bfloat16).items()
    }
    files["stage3/mm_projector.bin"] = projector_tensors(rand, torch.bfloat16)  # uploaded, never read by the loader
    files["stage3/mm_audio_aligner.bin"] = aligner_tensors(variant, rand, torch.bfloat16)
    modules = linear_modules(variant)
    adapter = {}
    for module, (out_features, in_features) in modules.items():
        adapter[f"base_model.model.{module}.lora_A.weight"] = rand(LORA_R, in_features, dtype=torch.bfloat16)
        adapter[f"base_model.model.{module}.lora_B.weight"] = rand(out_features, LORA_R, dtype=torch.bfloat16)
    files["stage3/adapter_model.bin"] = adapter
    (stage3_dir / "adapter_config.json").write_text(json.dumps({
        "auto_mapping": None, "base_model_name_or_path": "checkpoints/Uni-MoE-base", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05, "modules_to_save": None,
        "peft_type": "LORA", "r": LORA_R, "revision": None, "target_modules": sorted(modules), "task_type": "CAUSAL_LM",
    }, indent=2))
    gates = {}
    for layer in sparse_layers(variant):
        if variant == "8e":
            gates[f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.weight"] = rand(EXPERTS[variant], HIDDEN, dtype=torch.bfloat16)
            continue
        gates[f"model.layers.{layer}.mlp.gate.weight"] = rand(EXPERTS[variant], HIDDEN, dtype=torch.bfloat16)
        if f"model.layers.{layer}.mlp.gate" in modules:  # named_parameters matching "mlp.gate." include its LoRA
            gates[f"model.layers.{layer}.mlp.gate.lora_A.default.weight"] = rand(LORA_R, HIDDEN, dtype=torch.bfloat16)
            gates[f"model.layers.{layer}.mlp.gate.lora_B.default.weight"] = rand(EXPERTS[variant], LORA_R, dtype=torch.bfloat16)
    files["stage3/mlp_gates.bin"] = gates
    if variant == "8e":
        checkpoint.experts_dir = stage3_dir.parent / "experts"
        for name in dict.fromkeys(EXPERT_FILES_8E):  # 6 dense FFNs for 8 experts
            files[f"experts/{name}.bin"] = {
                f"model.layers.{layer}.mlp.{projection}.weight": rand(*shape, dtype=torch.bfloat16)
                for layer in range(LAYERS)
                for projection, shape in (("gate_proj", (INTERMEDIATE, HIDDEN)), ("up_proj", (INTERMEDIATE, HIDDEN)), ("down_proj", (HIDDEN, INTERMEDIATE)))
            }
        for expert in range(EXPERTS[variant]):
            lora = {}
            for layer in range(LAYERS):
                prefix = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.0."  # one expert per rank
                for projection, (out_features, in_features) in (
                    ("gate_proj", (INTERMEDIATE, HIDDEN)), ("up_proj", (INTERMEDIATE, HIDDEN)), ("down_proj", (HIDDEN, INTERMEDIATE)),
                ):
                    lora[f"{prefix}{projection}_lora_A.weight"] = rand(LORA_R, in_features, dtype=torch.bfloat16)
                    lora[f"{prefix}{projection}_lora_B.weight"] = rand(out_features, LORA_R, dtype=torch.bfloat16)
            files[f"stage3/{expert}_mlp_experts.bin"] = lora
