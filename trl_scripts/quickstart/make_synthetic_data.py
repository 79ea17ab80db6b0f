"""Writes a small, deterministic multimodal instruction dataset with learnable short answers.

It feeds the quickstart (three progressive stages on the `tiny` preset) and the tests. Four modalities, two splits:

- image  (56x56 PNG): one coloured shape (circle, square, triangle or five-pointed star), 38-50 px across, on a plain
  light background. Tasks: `image_colour`, `image_shape`.
- video  (48x48 MP4, mpeg4, 8 fps, 8-12 frames): one square moving left, right, up or down on black, leaving a
  fading trail, from near the centre towards an edge.
  Tasks: `video_direction`, `video_colour`.
- audio  (16 kHz mono WAV, 3 s, the BEATs/Whisper "audio" modality): 1-4 beeps (0.3 s each, 0.2 s apart) of a
  tone over faint noise, its pitch in one of four bands (`PITCH_BANDS`: very low 180-250 Hz, low 400-550, high
  900-1250, very high 2000-2750). Tasks: `audio_count`, `audio_pitch`.
- speech (16 kHz mono WAV): a spoken digit "zero".."nine". Task: `speech_digit`.

Video direction and mean pooling: Uni-MoE mean-pools the frames of a video by default, which discards their order,
so an object crossing the whole frame would look the same moving left or right. Here it starts near the centre and
moves out towards the edge it is heading for, so the pooled frames lie mostly on that side of the centre. Two
physical cues say the same: its brightness ramps up over time (25% of its colour in the first frame, 100% in the
last), so the pooled frames are brightest where it ended; and it leaves a fading trail, as a bright object does on a
slow-phosphor screen or a long exposure (each earlier position dimmer by `TRAIL_FADE` per frame), so every frame on
its own runs from dim (where it came from) to bright (where it is going). Moving away from the centre is what makes
the direction learnable for the tiny quickstart model: with the object crossing the whole frame, the answer hinged
on comparing the two ends of the pooled track, and the direction stayed at chance in four of seven runs. The hue
stays fixed, so `video_colour` is answerable from the pooled frames too. Nothing else encodes the answer (no text,
no markers).

Speech: with `espeak-ng` on PATH every clip is synthesised, a speaker being a (voice, speed, pitch) triple. Without
it (CI machines) the clips come from the committed recordings `trl_scripts/quickstart/assets/speech/<word>_<variant>.wav`
(three espeak-ng voices, written by `write_speech_assets`), a speaker being a (recording, resampling factor) pair,
where resampling changes speed and pitch together. Either way each voice's speakers are split between train and
eval, so eval clips come from speaker variants never heard in training; gain, noise and timing are drawn per clip.
Both sources give the same schema; `metadata.json` says which one was used.

Files, with media paths relative to the output directory (the Uni-MoE/LLaVA conversation format):

- `captions.json`  stage 1 (alignment): one caption per training media item.
- `train.json`, `eval.json`  stages 2-3 and held-out evaluation: one row per (media item, task) with `id`,
  `modality`, `task`, the media key (`image`, `video` or `audio`; speech rows also carry `speaker`) and
  `conversations` = [question with the placeholder on its first line, answer of one or two words]. Eval media
  come from their own random draws, so no eval file is ever seen in training.
- `metadata.json`  seed, counts, tasks with their questions and answer vocabularies, the speech source.

The same seed gives byte-identical JSON and media files. Answers are balanced within each task, and every task has
at least four, so chance is at most 25% on every question.

    python -m trl_scripts.make_synthetic_data --output_dir outputs/synthetic_data [--use_espeak false]
"""

import functools
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile
from PIL import Image, ImageDraw
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from ..console import command_line


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
BEEP_CLIP_SECONDS = 3.0
IMAGE_SIZE = 56
VIDEO_SIZE = 48
VIDEO_FPS = 8
TRAIL_FADE = 0.8
VIDEO_DIRECTION_CUE = (
    "the object moves from near the centre towards the edge it heads for, its brightness ramping from 25% to 100%, "
    f"leaving a trail fading by {TRAIL_FADE} per frame: mean-pooled frames lie and are brightest on that side"
)
SPEECH_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "speech"

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle", "star")
DIRECTIONS = ("left", "right", "up", "down")
COUNTS = ("one", "two", "three", "four")
# Four pitch bands an octave or more apart (Hz), so "high or low" has four answers and chance is 25%, as for the rest.
PITCH_BANDS = {"very low": (180, 250), "low": (400, 550), "high": (900, 1250), "very high": (2000, 2750)}
PITCHES = tuple(PITCH_BANDS)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Questions reuse the wording of the tiny tokenizer's corpus (processing/tiny-tokenizer), so they stay short there.
TASKS = {
    "image_colour": ("image", "What colour is the shape?", tuple(COLOURS)),
    "image_shape": ("image", "Which shape is it?", SHAPES),
    "video_direction": ("video", "Which way does the object move?", DIRECTIONS),
    "video_colour": ("video", "What colour is the object?", tuple(COLOURS)),
    "audio_count": ("audio", "How many beeps do you hear?", COUNTS),
    "audio_pitch": ("audio", "Is the tone high or low?", PITCHES),
    "speech_digit": ("speech", "What did the speaker say?", DIGITS),
}
MODALITIES = ("image", "video", "audio", "speech")
# modality -> (row key and placeholder, media folder, file extension)
_MEDIA = {
    "image": ("image", "images", "png"),
    "video": ("video", "videos", "mp4"),
    "audio": ("audio", "audio", "wav"),
    "speech": ("audio", "speech", "wav"),
}

# The committed fallback recordings: variant -> espeak-ng (voice, words per minute, pitch).
ASSET_SPEAKERS = {"m3": ("en+m3", 150, 40), "f2": ("en+f2", 160, 65), "m7": ("en+m7", 140, 55)}
ESPEAK_VOICES = ("en+m1", "en+m3", "en+m7", "en+f2", "en+f4")
EVAL_SPEAKER_FRACTION = 0.2


@dataclass
class SyntheticDataArguments:
    output_dir: str = field(default="outputs/synthetic_data", metadata={"help": "Where the JSON files and media go."})
    num_train_per_task: int = field(default=96, metadata={"help": "Training rows per task (= media per modality)."})
    num_eval_per_task: int = field(default=24, metadata={"help": "Held-out rows per task."})
    seed: int = 0
    use_espeak: bool | None = field(
        default=None, metadata={"help": "true/false: synthesise speech with espeak-ng (default: when it is on PATH)."}
    )


# ---------------------------------------------------------------------------------------------------- images, video


def _jitter_colour(name: str, rng: np.random.Generator, spread: int) -> np.ndarray:
    return np.clip(np.array(COLOURS[name]) + rng.integers(-spread, spread + 1, size=3), 0, 255)


def write_image(path: Path, answers: dict, rng: np.random.Generator) -> None:
    background = int(rng.integers(200, 256))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    colour = tuple(int(c) for c in _jitter_colour(answers["image_colour"], rng, 20))
    # Large (38-50 of 56 px): after the tiny CLIP's resize to 28x28 its outline spans several 7-px patches.
    size = int(rng.integers(38, 51))
    x, y = (int(v) for v in rng.integers(2, IMAGE_SIZE - size - 1, size=2))
    box = (x, y, x + size - 1, y + size - 1)
    draw = ImageDraw.Draw(image)
    shape = answers["image_shape"]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + size / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=colour)
    else:  # five-pointed star, inner radius 0.38 of the outer: a third of its box, half as much as the triangle
        radius = (size - 1) / 2
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.38 * radius)
        points = [(x + radius + r * np.cos(a), y + radius + r * np.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(points, fill=colour)
    image.save(path)


def video_frames(answers: dict, rng: np.random.Generator) -> list[np.ndarray]:
    """RGB frames of a square moving in the answered direction, brightening and trailing (see the module doc)."""
    num_frames = int(rng.integers(8, 13))
    side = int(rng.integers(10, 15))
    colour = _jitter_colour(answers["video_colour"], rng, 15)
    # From near the centre to near the edge it moves towards, along the middle band (never into a corner, where
    # "ends top-right" would fit both right and up).
    centre = (VIDEO_SIZE - side) // 2
    start, across = (int(rng.integers(centre - 3, centre + 4)) for _ in range(2))
    direction = answers["video_direction"]
    far = VIDEO_SIZE - side  # the last corner position that keeps the object inside the frame
    end = int(rng.integers(1, 4)) if direction in ("left", "up") else int(rng.integers(far - 3, far))
    brightness = np.linspace(0.25, 1.0, num_frames)
    corners = []
    for index in range(num_frames):
        along = round(start + (end - start) * index / (num_frames - 1))
        corners.append((along, across) if direction in ("left", "right") else (across, along))
    frames = []
    for index in range(num_frames):
        frame = np.zeros((VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
        # Oldest first, so the object's current position is drawn over its fading trail.
        for past in range(index + 1):
            x, y = corners[past]
            level = brightness[past] * TRAIL_FADE ** (index - past)
            frame[y : y + side, x : x + side] = (colour * level).astype(np.uint8)
        frames.append(frame)
    return frames


def write_video(path: Path, answers: dict, rng: np.random.Generator) -> None:
    import av

    with av.open(str(path), "w") as container:
        # Low quantiser bounds: default mpeg4 quality smears the dim early frames at this size.
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS, options={"qmin": "1", "qmax": "3"})
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for frame in video_frames(answers, rng):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------------------------------------ audio


def _write_wav(path: Path, wave: np.ndarray) -> None:
    soundfile.write(path, np.clip(wave, -1.0, 1.0), SAMPLING_RATE, subtype="PCM_16")


def beeps_waveform(answers: dict, rng: np.random.Generator) -> np.ndarray:
    count = COUNTS.index(answers["audio_count"]) + 1
    frequency = rng.uniform(*PITCH_BANDS[answers["audio_pitch"]])
    # Beep and gap lengths vary little, so the count is not confounded with how long each beep lasts, and each beep
    # is long (0.3 s, a tenth of the clip): pooling over frames then sees the count as a clearly graded share of tone.
    # With 0.15 s beeps a supervised probe of the tiny towers stayed at chance on the count for 8 epochs; with 0.3 s
    # it was exact after 2.
    beep, gap = rng.uniform(0.28, 0.32), rng.uniform(0.18, 0.22)
    span = count * beep + (count - 1) * gap
    # Every clip lasts BEEP_CLIP_SECONDS: with clip length varying, the share of tone in the clip (what attention
    # pooling over frames sees) was confounded with the count, e.g. two beeps in 1.5 s against three in 3 s.
    duration = BEEP_CLIP_SECONDS
    onset = rng.uniform(0.1, duration - span - 0.1)
    wave = rng.normal(0.0, rng.uniform(0.003, 0.01), int(duration * SAMPLING_RATE))
    length = int(beep * SAMPLING_RATE)
    # 10 ms raised-cosine edges: hard edges would add broadband clicks to a "pure" tone.
    ramp = np.sin(np.linspace(0, np.pi / 2, int(0.01 * SAMPLING_RATE))) ** 2
    envelope = np.ones(length)
    envelope[: len(ramp)], envelope[-len(ramp) :] = ramp, ramp[::-1]
    tone = rng.uniform(0.3, 0.6) * envelope * np.sin(2 * np.pi * frequency * np.arange(length) / SAMPLING_RATE)
    for k in range(count):
        first = int((onset + k * (beep + gap)) * SAMPLING_RATE)
        wave[first : first + length] += tone
    return wave


def write_beeps(path: Path, answers: dict, rng: np.random.Generator) -> None:
    _write_wav(path, beeps_waveform(answers, rng))


def resample(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Band-limited (FFT) resampling to `num_samples`: espeak-ng's 22.05 kHz to 16 kHz, and speed/pitch changes."""
    spectrum = np.fft.rfft(wave)[: num_samples // 2 + 1]
    return np.fft.irfft(spectrum, num_samples) * (num_samples / len(wave))


def _trim(wave: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > 0.02 * np.abs(wave).max())
    pad = int(0.02 * SAMPLING_RATE)
    return wave[max(0, loud[0] - pad) : loud[-1] + pad]


def espeak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """`word` spoken by espeak-ng, trimmed, at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "word.wav"
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), word]
        subprocess.run(command, check=True, capture_output=True)
        wave, rate = soundfile.read(out, dtype="float64")
    return _trim(resample(wave, round(len(wave) * SAMPLING_RATE / rate)))


def write_speech_assets(asset_dir: Path = SPEECH_ASSET_DIR) -> list[Path]:
    """(Re)writes the committed fallback recordings with espeak-ng: one 16-bit clip per digit and variant."""
    asset_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for word in DIGITS:
        for variant, speaker in ASSET_SPEAKERS.items():
            wave = espeak(word, *speaker)
            paths.append(asset_dir / f"{word}_{variant}.wav")
            _write_wav(paths[-1], 0.9 * wave / np.abs(wave).max())
    return paths


class SpeechSource:
    """Spoken digits by named speakers, each voice's speakers split between train and eval (see the module doc)."""

    def __init__(self, use_espeak: bool, seed: int):
        self.use_espeak = use_espeak
        if use_espeak:
            speeds_pitches = [(s, p) for s in range(130, 191, 10) for p in range(30, 71, 10)]
            grid = {voice: [f"{voice} s{s} p{p}" for s, p in speeds_pitches] for voice in ESPEAK_VOICES}
        else:
            names = [f"{word}_{variant}.wav" for word in DIGITS for variant in ASSET_SPEAKERS]
            missing = [name for name in names if not (SPEECH_ASSET_DIR / name).is_file()]
            if missing:
                raise FileNotFoundError(f"no espeak-ng and fallback clips missing in {SPEECH_ASSET_DIR}: {missing}")
            grid = {variant: [f"{variant} x{f:.2f}" for f in np.linspace(0.88, 1.12, 9)] for variant in ASSET_SPEAKERS}
        rng = np.random.default_rng([seed, 99])
        self.speakers = {"train": [], "eval": []}
        for voice_speakers in grid.values():
            shuffled = [voice_speakers[i] for i in rng.permutation(len(voice_speakers))]
            held_out = max(1, round(EVAL_SPEAKER_FRACTION * len(shuffled)))
            self.speakers["eval"] += shuffled[:held_out]
            self.speakers["train"] += shuffled[held_out:]
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def word(self, word: str, speaker: str) -> np.ndarray:
        """The trimmed 16 kHz clip of `word` by `speaker`, before per-item gain, noise and timing."""
        if (word, speaker) not in self._cache:
            if self.use_espeak:
                voice, speed, pitch = speaker.split()
                wave = espeak(word, voice, int(speed[1:]), int(pitch[1:]))
            else:
                variant, factor = speaker.split()
                wave, _ = soundfile.read(SPEECH_ASSET_DIR / f"{word}_{variant}.wav", dtype="float64")
                wave = resample(wave, round(len(wave) / float(factor[1:])))
            self._cache[word, speaker] = wave
        return self._cache[word, speaker]

    def draw(self, answers: dict, rng: np.random.Generator, split: str) -> tuple[str, np.ndarray]:
        speakers = self.speakers[split]
        speaker = speakers[int(rng.integers(len(speakers)))]
        word = self.word(answers["speech_digit"], speaker)
        word = rng.uniform(0.4, 0.9) * word / np.abs(word).max()
        lead, tail = (int(rng.uniform(a, b) * SAMPLING_RATE) for a, b in ((0.05, 0.3), (0.1, 0.2)))
        wave = np.concatenate([np.zeros(lead), word, np.zeros(tail)])
        return speaker, wave + rng.normal(0.0, rng.uniform(0.002, 0.008), len(wave))

    def write(self, path: Path, answers: dict, rng: np.random.Generator, split: str) -> dict:
        speaker, wave = self.draw(answers, rng, split)
        _write_wav(path, wave)
        return {"speaker": speaker}


# ---------------------------------------------------------------------------------------------------------- dataset


def balanced_answers(modality: str, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` answer dicts (task -> answer); each task's answers cycle through its vocabulary, shuffled per task."""
    columns = {}
    for task, (task_modality, _, vocabulary) in TASKS.items():
        if task_modality == modality:
            cycle = [vocabulary[i % len(vocabulary)] for i in range(count)]
            columns[task] = [cycle[i] for i in rng.permutation(count)]
    return [{task: column[i] for task, column in columns.items()} for i in range(count)]


def caption(modality: str, answers: dict) -> str:
    if modality == "image":
        return f"A {answers['image_colour']} {answers['image_shape']}."
    if modality == "video":
        return f"A {answers['video_colour']} object moves {answers['video_direction']}."
    if modality == "audio":
        count = answers["audio_count"]
        return f"{count.capitalize()} {answers['audio_pitch']} beep{'' if count == 'one' else 's'}."
    return f"The speaker says {answers['speech_digit']}."


def _conversation(placeholder: str, question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<{placeholder}>\n{question}"}, {"from": "gpt", "value": answer}]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_synthetic_dataset(
    output_dir: str | Path,
    *,
    num_train_per_task: int = 96,
    num_eval_per_task: int = 24,
    seed: int = 0,
    use_espeak: bool | None = None,
) -> dict:
    """Writes media, `captions.json`, `train.json`, `eval.json` and `metadata.json` under `output_dir`.

    `use_espeak`: None uses espeak-ng when it is on PATH, False forces the committed clips. Returns the four JSON
    paths (`captions`, `train`, `eval`, `metadata`), the row counts (`num_captions`, `num_train`, `num_eval`) and
    `use_espeak`.
    """
    if num_train_per_task < 1 or num_eval_per_task < 0:
        raise ValueError("need num_train_per_task >= 1 and num_eval_per_task >= 0")
    espeak_found = shutil.which("espeak-ng") is not None
    if use_espeak and not espeak_found:
        raise FileNotFoundError("use_espeak=True but espeak-ng is not on PATH")
    use_espeak = espeak_found if use_espeak is None else use_espeak
    speech = SpeechSource(use_espeak, seed)

    output_dir = Path(output_dir)
    for _, folder, _ in _MEDIA.values():
        (output_dir / "media" / folder).mkdir(parents=True, exist_ok=True)
    sizes = {"train": num_train_per_task, "eval": num_eval_per_task}
    captions, rows = [], {"train": [], "eval": []}
    progress = tqdm(total=len(MODALITIES) * sum(sizes.values()), desc="synthetic media", unit="item")
    for split_index, (split, size) in enumerate(sizes.items()):
        writers: dict[str, Callable] = {
            "image": write_image,
            "video": write_video,
            "audio": write_beeps,
            "speech": functools.partial(speech.write, split=split),
        }
        for modality_index, modality in enumerate(MODALITIES):
            key, folder, extension = _MEDIA[modality]
            # One stream per (modality, split) and one per item: counts of one part never shift the draws of another.
            answer_rows = balanced_answers(modality, size, np.random.default_rng([seed, modality_index, split_index]))
            for index, answers in enumerate(answer_rows):
                relative = f"media/{folder}/{split}-{index:05d}.{extension}"
                item_rng = np.random.default_rng([seed, modality_index, split_index, index])
                extra = writers[modality](output_dir / relative, answers, item_rng) or {}
                media = {key: relative, **extra}
                if split == "train":  # captions describe training media only, so eval media stay unseen
                    captions.append(
                        {
                            "id": f"{modality}-{split}-{index:05d}",
                            **media,
                            "conversations": _conversation(key, f"Describe the {key}.", caption(modality, answers)),
                        }
                    )
                for task, answer in answers.items():
                    question = TASKS[task][1]
                    rows[split].append(
                        {
                            "id": f"{task}-{split}-{index:05d}",
                            "modality": modality,
                            "task": task,
                            **media,
                            "conversations": _conversation(key, question, answer),
                        }
                    )
                progress.update()
    progress.close()

    # Rows grouped by task, in task order, so the files read naturally; trainers shuffle.
    task_order = {task: i for i, task in enumerate(TASKS)}
    for split in rows:
        rows[split].sort(key=lambda row: task_order[row["task"]])
    metadata = {
        "seed": seed,
        "num_train_per_task": num_train_per_task,
        "num_eval_per_task": num_eval_per_task,
        "counts": {
            "captions": {m: sum(r["id"].startswith(f"{m}-") for r in captions) for m in MODALITIES},
            **{split: {task: sum(r["task"] == task for r in rows[split]) for task in TASKS} for split in rows},
        },
        "tasks": {
            task: {"modality": modality, "question": question, "answers": list(vocabulary)}
            for task, (modality, question, vocabulary) in TASKS.items()
        },
        "media": {
            "image_size": IMAGE_SIZE,
            "video_size": VIDEO_SIZE,
            "video_fps": VIDEO_FPS,
            "video_frames": [8, 12],
            "video_direction_cue": VIDEO_DIRECTION_CUE,
            "sampling_rate": SAMPLING_RATE,
            "beep_clip_seconds": BEEP_CLIP_SECONDS,
            "pitch_bands_hz": PITCH_BANDS,
        },
        "speech": {
            "use_espeak": use_espeak,
            "source": "espeak-ng" if use_espeak else "committed clips in trl_scripts/quickstart/assets/speech",
            "train_speakers": speech.speakers["train"],
            "eval_speakers": speech.speakers["eval"],
        },
    }
    paths = {name: output_dir / f"{name}.json" for name in ("captions", "train", "eval", "metadata")}
    _write_json(paths["captions"], captions)
    _write_json(paths["train"], rows["train"])
    _write_json(paths["eval"], rows["eval"])
    _write_json(paths["metadata"], metadata)
    return {
        **paths,
        "num_captions": len(captions),
        "num_train": len(rows["train"]),
        "num_eval": len(rows["eval"]),
        "use_espeak": use_espeak,
    }


@command_line
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(SyntheticDataArguments).parse_args_into_dataclasses(args=argv)
    result = make_synthetic_dataset(
        args.output_dir,
        num_train_per_task=args.num_train_per_task,
        num_eval_per_task=args.num_eval_per_task,
        seed=args.seed,
        use_espeak=args.use_espeak,
    )
    logger.info(
        "Wrote %d captions, %d train and %d eval rows to %s (speech: %s)",
        result["num_captions"],
        result["num_train"],
        result["num_eval"],
        args.output_dir,
        "espeak-ng" if result["use_espeak"] else "committed clips",
    )
    return result


if __name__ == "__main__":
    main()
