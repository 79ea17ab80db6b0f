"""Small training-data files written at test time."""

import json
from pathlib import Path

import soundfile

from .media import tone, write_image


def write_training_rows(tmp_path: Path) -> str:
    """4 image and 4 audio conversation rows in `tmp_path/train.json` (media beside it); returns the file's path."""
    write_image(tmp_path / "red.png")
    soundfile.write(tmp_path / "beep.wav", tone(1.0), 16000)
    rows = []
    for i in range(4):
        rows.append({"id": f"img-{i}", "modality": "image", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]})
        rows.append({"id": f"aud-{i}", "modality": "audio", "audio": "beep.wav", "conversations": [
            {"from": "human", "value": "<audio>\nHow many beeps?"}, {"from": "gpt", "value": "one"}]})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return str(tmp_path / "train.json")
