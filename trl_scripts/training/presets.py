"""Named model presets: the JSON configs in `configuration/models/`."""

import json
from pathlib import Path

from transformers import AutoTokenizer

from modeling_unimoe import UniMoEConfig, UniMoEProcessor


PRESETS_DIR = Path(__file__).resolve().parents[2] / "configuration" / "models"


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str, text_only: bool = False, **text_overrides) -> UniMoEConfig:
    """A `UniMoEConfig` from a preset name (`tiny`, `small`, `unimoe-v1-speech-4e`, ...) or a JSON file path.

    `text_only` keeps only the language model (no towers); `text_overrides` replace fields of the text config
    (e.g. `num_experts=8`).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"No model preset {name_or_path!r}: expected one of {available_presets()} or a JSON file")
    data = json.loads(path.read_text())
    data["text_config"] = {**data.get("text_config", {}), **text_overrides}
    if text_only:
        data = {"model_type": data["model_type"], "text_config": data["text_config"]}
    return UniMoEConfig.from_dict(data)


TINY_TOKENIZER_DIR = PRESETS_DIR.parent.parent / "processing" / "tiny-tokenizer"
CHAT_TEMPLATE_PATH = PRESETS_DIR.parent.parent / "processing" / "chat_template.jinja"


def load_tiny_processor(config: UniMoEConfig | None = None, num_frames: int = 4) -> UniMoEProcessor:
    """The processor of the `tiny` preset: the offline tokenizer and Vicuna v1 chat template in `processing/`."""
    config = config if config is not None else load_preset("tiny")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    return UniMoEProcessor.from_model_config(
        config, tokenizer, chat_template=CHAT_TEMPLATE_PATH.read_text(), num_frames=num_frames
    )
