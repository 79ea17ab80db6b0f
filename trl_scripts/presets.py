"""Named model presets: the JSON configs in `configuration/models/`."""

import json
from pathlib import Path

from modeling_unimoe import UniMoEConfig


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configuration" / "models"


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def load_preset(name_or_path: str, **text_overrides) -> UniMoEConfig:
    """A `UniMoEConfig` from a preset name (`tiny`, `small`, `unimoe-v1-speech-4e`, ...) or a JSON file path.

    `text_overrides` replace fields of the text config (e.g. `num_experts=8`).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"No model preset {name_or_path!r}: expected one of {available_presets()} or a JSON file")
    data = json.loads(path.read_text())
    data["text_config"] = {**data.get("text_config", {}), **text_overrides}
    return UniMoEConfig.from_dict(data)
