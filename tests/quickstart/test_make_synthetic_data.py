"""The synthetic multimodal dataset: schema, decodable media, splits, determinism, and answers that are really in the
media (checked from the files alone, independently of how they were drawn)."""

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from trl_scripts.quickstart.make_synthetic_data import (
    COLOURS,
    COUNTS,
    DIGITS,
    PITCH_BANDS,
    SAMPLING_RATE,
    SPEECH_ASSET_DIR,
    TASKS,
    SpeechSource,
    main,
    make_synthetic_dataset,
)


NUM_TRAIN, NUM_EVAL = 8, 4
MEDIA_KEY = {"image": "image", "video": "video", "audio": "audio", "speech": "audio"}


def load(root: Path, name: str):
    return json.loads((root / f"{name}.json").read_text())


def answer(row: dict) -> str:
    return row["conversations"][1]["value"]


def rows_of(root: Path, task: str) -> list[dict]:
    return [row for split in ("train", "eval") for row in load(root, split) if row["task"] == task]


def decode_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(float)


def read_wav(path: Path) -> np.ndarray:
    wave, rate = soundfile.read(path, dtype="float64")
    assert rate == SAMPLING_RATE and wave.ndim == 1
    return wave


def nearest_colour(rgb: np.ndarray, normalise: bool = False) -> str:
    palette = {name: np.array(value, dtype=float) for name, value in COLOURS.items()}
    if normalise:  # compare hues only: video objects are dimmed
        rgb = rgb / np.linalg.norm(rgb)
        palette = {name: value / np.linalg.norm(value) for name, value in palette.items()}
    return min(palette, key=lambda name: np.linalg.norm(palette[name] - rgb))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Built with the committed speech clips, so the tests behave the same with or without espeak-ng."""
    root = tmp_path_factory.mktemp("synthetic")
    result = make_synthetic_dataset(
        root, num_train_per_task=NUM_TRAIN, num_eval_per_task=NUM_EVAL, seed=3, use_espeak=False
    )
    assert result["use_espeak"] is False
    assert (result["num_train"], result["num_eval"]) == (NUM_TRAIN * len(TASKS), NUM_EVAL * len(TASKS))
    assert result["num_captions"] == NUM_TRAIN * 4
    return root


def check_schema(root: Path) -> None:
    captions, metadata = load(root, "captions"), load(root, "metadata")
    for split in ("train", "eval"):
        for row in load(root, split):
            modality, key = row["modality"], MEDIA_KEY[row["modality"]]
            speaker = {"speaker"} if modality == "speech" else set()
            assert set(row) == {"id", "modality", "task", key, "conversations"} | speaker
            assert TASKS[row["task"]][0] == modality
            human, gpt = row["conversations"]
            assert human == {"from": "human", "value": f"<{key}>\n{metadata['tasks'][row['task']]['question']}"}
            assert gpt["from"] == "gpt" and gpt["value"] in metadata["tasks"][row["task"]]["answers"]
    for row in captions:
        key = next(k for k in ("image", "video", "audio") if k in row)
        assert row["conversations"][0] == {"from": "human", "value": f"<{key}>\nDescribe the {key}."}
        assert row["conversations"][1]["from"] == "gpt" and row["conversations"][1]["value"].endswith(".")


def test_rows_schema_and_vocabularies(dataset):
    check_schema(dataset)
    metadata = load(dataset, "metadata")
    assert metadata["seed"] == 3 and metadata["speech"]["use_espeak"] is False
    assert metadata["counts"]["train"] == {task: NUM_TRAIN for task in TASKS}
    assert metadata["counts"]["eval"] == {task: NUM_EVAL for task in TASKS}
    assert metadata["counts"]["captions"] == {m: NUM_TRAIN for m in ("image", "video", "audio", "speech")}
    # answers are balanced within a task
    for task, (_, _, vocabulary) in TASKS.items():
        counts = [sum(answer(r) == word for r in load(dataset, "train") if r["task"] == task) for word in vocabulary]
        assert max(counts) - min(counts) <= 1


def test_every_path_exists_and_decodes(dataset):
    paths = {
        row[key]
        for name in ("captions", "train", "eval")
        for row in load(dataset, name)
        for key in ("image", "video", "audio")
        if key in row
    }
    assert len(paths) == (NUM_TRAIN + NUM_EVAL) * 4
    for relative in paths:
        assert not Path(relative).is_absolute()
        path = dataset / relative
        if relative.endswith(".png"):
            with Image.open(path) as image:
                assert image.size == (56, 56) and image.mode == "RGB"
        elif relative.endswith(".mp4"):
            frames = decode_video(path)
            assert 8 <= len(frames) <= 12 and frames.shape[1:] == (48, 48, 3)
        else:
            assert 0.3 < len(read_wav(path)) / SAMPLING_RATE <= 3.0


def test_splits_are_disjoint(dataset):
    train, evaluation, captions = load(dataset, "train"), load(dataset, "eval"), load(dataset, "captions")
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}
    assert len({r["id"] for r in train + evaluation + captions}) == len(train + evaluation + captions)
    media = lambda rows: {r.get("image") or r.get("video") or r.get("audio") for r in rows}  # noqa: E731
    assert not media(train) & media(evaluation)
    assert media(captions) == media(train)  # stage 1 never sees eval media
    speakers = load(dataset, "metadata")["speech"]
    assert not set(speakers["train_speakers"]) & set(speakers["eval_speakers"])
    assert {r["speaker"] for r in evaluation if r["modality"] == "speech"} <= set(speakers["eval_speakers"])
    assert {r["speaker"] for r in train if r["modality"] == "speech"} <= set(speakers["train_speakers"])


def test_same_seed_same_bytes(dataset, tmp_path):
    make_synthetic_dataset(tmp_path, num_train_per_task=NUM_TRAIN, num_eval_per_task=NUM_EVAL, seed=3, use_espeak=False)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(dataset / f) == digest(tmp_path / f) for f in files)

    other = tmp_path / "other_seed"
    make_synthetic_dataset(other, num_train_per_task=NUM_TRAIN, num_eval_per_task=NUM_EVAL, seed=4, use_espeak=False)
    assert (other / "train.json").read_bytes() != (dataset / "train.json").read_bytes()


def test_image_answers_are_in_the_pixels(dataset):
    for colour_row in rows_of(dataset, "image_colour"):
        shape_row = next(r for r in rows_of(dataset, "image_shape") if r["image"] == colour_row["image"])
        pixels = np.asarray(Image.open(dataset / colour_row["image"]).convert("RGB")).astype(float)
        shape = ~((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))  # background is grey
        assert nearest_colour(pixels[shape].mean(0)) == answer(colour_row)
        ys, xs = np.nonzero(shape)
        fill = shape.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # square 1, circle pi/4, triangle 1/2, star ~1/3
        expected = {"square": fill > 0.93, "circle": 0.7 < fill < 0.9, "triangle": 0.44 < fill < 0.62, "star": fill < 0.42}
        assert expected[answer(shape_row)]


def test_video_answers_survive_mean_pooling(dataset):
    steps = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
    for direction_row in rows_of(dataset, "video_direction"):
        colour_row = next(r for r in rows_of(dataset, "video_colour") if r["video"] == direction_row["video"])
        pooled = decode_video(dataset / direction_row["video"]).astype(float).mean(0)  # frame order is gone
        brightness = pooled.sum(-1)
        ys, xs = np.mgrid[: brightness.shape[0], : brightness.shape[1]]
        centroid = np.array([(xs * brightness).sum(), (ys * brightness).sum()]) / brightness.sum()
        offset = centroid - (np.array(brightness.shape[::-1]) - 1) / 2
        step = np.array(steps[answer(direction_row)])
        # the pooled frames lie on the side of the centre the object moved to, not towards a corner
        assert offset @ step >= 5 and abs(offset @ step[::-1]) <= 0.75 * (offset @ step)
        assert nearest_colour(pooled[brightness > 0.5 * brightness.max()].mean(0), normalise=True) == answer(colour_row)


def test_audio_answers_are_in_the_waveform(dataset):
    for count_row in rows_of(dataset, "audio_count"):
        pitch_row = next(r for r in rows_of(dataset, "audio_pitch") if r["audio"] == count_row["audio"])
        wave = read_wav(dataset / count_row["audio"])
        frame = SAMPLING_RATE // 100
        energy = np.sqrt((wave[: len(wave) // frame * frame].reshape(-1, frame) ** 2).mean(1))
        active = (energy > 0.5 * energy.max()).astype(int)
        assert COUNTS[np.count_nonzero(np.diff(active) == 1) + active[0] - 1] == answer(count_row)
        peak = np.argmax(np.abs(np.fft.rfft(wave))) * SAMPLING_RATE / len(wave)
        low, high = PITCH_BANDS[answer(pitch_row)]
        assert low - 5 <= peak <= high + 5  # within the FFT's resolution of the band


def best_match(wave: np.ndarray, template: np.ndarray) -> float:
    """Max normalised cross-correlation of `template` over all placements in `wave` (FFT correlation); at most 1."""
    wave = np.pad(wave, len(template))  # a template longer than the clip still gets placements
    n = len(wave) + len(template)
    dots = np.fft.irfft(np.fft.rfft(wave, n) * np.conj(np.fft.rfft(template, n)), n)[: len(wave) - len(template) + 1]
    energy = np.concatenate([[0.0], np.cumsum(wave**2)])
    local = np.sqrt(energy[len(template) :] - energy[: -len(template)]) + 1e-9
    return float((dots / local).max() / np.linalg.norm(template))


def test_speech_fallback_clips_say_the_answer(dataset):
    """Each clip contains its digit's committed recording (at its speaker's rate) far better than any other digit's."""
    assert len(list(SPEECH_ASSET_DIR.glob("*.wav"))) == 30
    assert sum(p.stat().st_size for p in SPEECH_ASSET_DIR.glob("*.wav")) < 600_000
    source = SpeechSource(use_espeak=False, seed=3)
    for row in rows_of(dataset, "speech_digit"):
        wave = read_wav(dataset / row["audio"])
        scores = {digit: best_match(wave, source.word(digit, row["speaker"])) for digit in DIGITS}
        assert max(scores, key=scores.get) == answer(row) and scores[answer(row)] > 0.9


def test_espeak_path_has_the_same_schema(dataset, tmp_path):
    result = make_synthetic_dataset(tmp_path, num_train_per_task=2, num_eval_per_task=1, seed=3)
    assert result["use_espeak"] is True and load(tmp_path, "metadata")["speech"]["source"] == "espeak-ng"
    check_schema(tmp_path)
    for name in ("captions", "train", "eval"):
        assert {tuple(sorted(r)) for r in load(tmp_path, name)} <= {tuple(sorted(r)) for r in load(dataset, name)}


def test_cli(tmp_path):
    result = main(
        ["--output_dir", str(tmp_path), "--num_train_per_task", "2", "--num_eval_per_task", "1", "--use_espeak", "false"]
    )
    assert result["use_espeak"] is False and result["num_eval"] == len(TASKS)
    assert load(tmp_path, "metadata")["num_train_per_task"] == 2
