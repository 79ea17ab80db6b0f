"""Assemble a Uni-MoE model and processor from local pretrained pieces, the way a user with downloaded weights builds
the paper's model: a dense LLaMA-architecture LM (upcycled into the MoE decoder), a CLIP vision model, a Whisper
model (its encoder is the speech tower, its decoder initialises the speech aligner) and an official BEATs `.pt`.

    python -m trl_scripts.assemble --language_model PATH --clip PATH --whisper PATH --beats BEATs.pt --output_dir DIR
"""

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    HfArgumentParser,
    PreTrainedModel,
    WhisperModel,
)

from modeling_unimoe import UniMoEConfig, UniMoEForCausalLM, UniMoEProcessor, load_beats_checkpoint

from ..console import check_output_dir, command_line
from ..training.presets import CHAT_TEMPLATE_PATH
from ..training.upcycling import upcycle_llama


logger = logging.getLogger(__name__)

PLACEHOLDERS = {"image_token": "<image>", "video_token": "<video>", "audio_token": "<audio>"}


# Options a tokenizer class consumes in its own `__init__`; transformers saves only the keyword arguments the base
# class received, so without this they fall back to their defaults on reload. LLaMA's `legacy=True` (the original's
# transformers 4.31 default) puts the SentencePiece `▁` prefix on the text after every special token: "</s>USER" is
# `</s> ▁USER`, and "<image>\n" gives the lone `▁` (LLaMA id 29871) before the newline; `legacy=False` gives neither.
SAVED_TOKENIZER_OPTIONS = ("legacy",)


def keep_tokenizer_options(tokenizer):
    """Record `SAVED_TOKENIZER_OPTIONS` in `tokenizer.init_kwargs`, so `save_pretrained` writes them to
    `tokenizer_config.json` and a reload tokenises exactly as `tokenizer` does. Returns the tokenizer."""
    for name in SAVED_TOKENIZER_OPTIONS:
        if getattr(tokenizer, name, None) is not None:
            tokenizer.init_kwargs[name] = getattr(tokenizer, name)
    return tokenizer


def _with_placeholders(tokenizer):
    """The tokenizer with `<image>`, `<video>`, `<audio>` as named special tokens (`tokenizer.image_token`, ...;
    the original spliced negative ids instead). Named special tokens are an init-time option in transformers, so a
    tokenizer lacking them is reloaded with them; the reload keeps `SAVED_TOKENIZER_OPTIONS`."""
    keep_tokenizer_options(tokenizer)
    if any(getattr(tokenizer, name, None) != token for name, token in PLACEHOLDERS.items()):
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            tokenizer = keep_tokenizer_options(AutoTokenizer.from_pretrained(folder, extra_special_tokens=PLACEHOLDERS))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation
    return tokenizer


def assemble_unimoe(
    language_model: str | Path | PreTrainedModel,
    tokenizer=None,
    clip: str | Path | None = None,
    whisper: str | Path | None = None,
    beats: str | Path | None = None,
    *,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "all",
    router_type: str = "topk_softmax",
    expert_ffn_state_dicts: list[dict[str, torch.Tensor]] | None = None,
    num_query_tokens: int = 50,
    vision_feature_layer: int = -2,
    video_pooling: str = "mean",
    num_frames: int = 8,
    chat_template: str | None = None,
) -> tuple[UniMoEForCausalLM, UniMoEProcessor]:
    """A `UniMoEForCausalLM` and its `UniMoEProcessor` from pretrained pieces.

    The LM is upcycled (`upcycle_llama`) after its embeddings grow by the three placeholder tokens; the towers keep
    their pretrained weights exactly; the connectors (vision projector, aligner query tokens and output Linear)
    start from fresh initialisation, as before Uni-MoE's stage 1. At least one tower must be given.
    """
    if clip is None and whisper is None and beats is None:
        raise ValueError("assemble_unimoe needs at least one tower: clip, whisper or beats")
    if tokenizer is None:
        if isinstance(language_model, PreTrainedModel):
            raise ValueError("pass the tokenizer when the language model is given as a model object")
        tokenizer = AutoTokenizer.from_pretrained(language_model)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    tokenizer = _with_placeholders(tokenizer)

    dense = AutoModelForCausalLM.from_pretrained(language_model) if isinstance(language_model, (str, Path)) else language_model
    if dense.get_input_embeddings().num_embeddings < len(tokenizer):
        dense.resize_token_embeddings(len(tokenizer))  # new rows: the mean embedding (transformers' default)
    lm = upcycle_llama(
        dense,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        router_type=router_type,
        expert_ffn_state_dicts=expert_ffn_state_dicts,
    )

    vision = CLIPVisionModel.from_pretrained(clip) if clip is not None else None
    speech = WhisperModel.from_pretrained(whisper) if whisper is not None else None
    sound = load_beats_checkpoint(beats) if beats is not None else None
    audio_config = None
    if sound is not None:
        # the tower stays frozen in every Uni-MoE stage: BEATs' LayerDrop (0.05 in AS2M) would only add noise
        audio_config = sound.config.to_dict() | {"encoder_layerdrop": 0.0}
    config = UniMoEConfig(
        text_config=lm.config.to_dict(),
        vision_config=vision.config.to_dict() if vision is not None else None,
        speech_config=speech.config.to_dict() if speech is not None else None,
        audio_config=audio_config,
        image_token_id=tokenizer.image_token_id if vision is not None else None,
        video_token_id=tokenizer.video_token_id if vision is not None else None,
        audio_token_id=tokenizer.audio_token_id if speech is not None or sound is not None else None,
        vision_feature_layer=vision_feature_layer,
        video_pooling=video_pooling,
        num_query_tokens=num_query_tokens,
        # Whisper's window: max_source_positions encoder positions = 2 x that many mel frames, 100 per second
        audio_window_seconds=speech.config.max_source_positions // 50 if speech is not None else 30,
    )
    model = UniMoEForCausalLM(config).to(lm.dtype)

    state = model.state_dict()
    pieces = {"model.language_model.": lm.model.state_dict(), "lm_head.": lm.lm_head.state_dict()}
    if vision is not None:
        pieces["model.vision_tower."] = vision.state_dict()
    if speech is not None:
        pieces["model.speech_tower."] = speech.encoder.state_dict()
        model.model.speech_aligner.load_whisper_decoder(speech.decoder.state_dict())
        pieces["model.speech_aligner."] = model.model.speech_aligner.state_dict()
    if sound is not None:
        pieces["model.audio_tower."] = sound.state_dict()
    for prefix, piece in pieces.items():
        unknown = [key for key in piece if prefix + key not in state]
        if unknown:
            raise KeyError(f"pretrained piece {prefix!r} has weights our model does not: {unknown[:10]}")
        state.update({prefix + key: value for key, value in piece.items()})
    model.load_state_dict(state, strict=True)
    model.generation_config = lm.generation_config

    processor = UniMoEProcessor.from_model_config(
        config,
        tokenizer,
        chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE_PATH.read_text(),
        num_frames=num_frames,
    )
    logger.info("Assembled Uni-MoE with towers %s", [p.split(".")[1] for p in pieces if "tower" in p])
    return model.eval(), processor


@dataclass
class AssembleArguments:
    language_model: str = field(metadata={"help": "Dense LLaMA-architecture causal LM (HF folder)."})
    output_dir: str = field(metadata={"help": "Where to save the model, processor and remote code."})
    clip: str | None = field(default=None, metadata={"help": "CLIP (vision) model folder."})
    whisper: str | None = field(default=None, metadata={"help": "Whisper model folder."})
    beats: str | None = field(default=None, metadata={"help": "Official BEATs checkpoint (.pt with cfg and model)."})
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str = field(
        default="all",
        metadata={"help": "Sparse decoder layers: all, even, odd, comma-separated indices, or none (a dense language "
                  "model, as CuMo-7B's and Uni-MoE's stage 1-2 models)."},
    )
    num_query_tokens: int = 50


def _moe_layers(value: str) -> str | list[int]:
    """`--moe_layers`: a pattern, `none` (no sparse layer: []) or comma-separated layer indices."""
    if value in ("all", "even", "odd"):
        return value
    if value == "none":
        return []
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"--moe_layers {value!r}: expected all, even, odd, none or comma-separated layer indices") from None


@command_line
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    (args,) = HfArgumentParser(AssembleArguments).parse_args_into_dataclasses(args=argv)
    check_output_dir(args.output_dir)
    model, processor = assemble_unimoe(
        args.language_model,
        clip=args.clip,
        whisper=args.whisper,
        beats=args.beats,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_layers=_moe_layers(args.moe_layers),
        num_query_tokens=args.num_query_tokens,
    )
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
