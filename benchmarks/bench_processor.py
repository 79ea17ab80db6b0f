"""Processor throughput on 2 CPU cores: an image, a 30 s audio clip and an 8-frame video, as files, at the paper's
sizes (CLIP ViT-L/14 at 336 px, Whisper 80-bin log-mel and BEATs 128-bin fbank per 30 s window, 8 video frames).
The audio is a 44.1 kHz stereo WAV (decoded and resampled by PyAV), and for both towers also a 16 kHz mono WAV (read
by libsndfile).

Each row compares the full `UniMoEProcessor` call (file decoding, placeholder expansion, tokenisation) with the bare
transformers component on already-decoded data, measured in the same run: the ratio is the share of time left after
our decoding and bookkeeping (1.0 = no overhead).

    python benchmarks/bench_processor.py [--repeats 5]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, WhisperFeatureExtractor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from modeling_unimoe import UniMoEFeatureExtractor, UniMoEProcessor
from modeling_unimoe.feature_extraction_beats import beats_fbank
from modeling_unimoe.processing_unimoe import load_image, load_video
from trl_scripts.training.presets import TINY_TOKENIZER_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.utils.media import write_audio, write_image, write_video  # noqa: E402
from timing import best_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    image = write_image(folder / "photo.png", size=(640, 480))
    audio = write_audio(folder / "speech.wav", seconds=30.0, rate=44100, channels=2)  # resampled and mixed down
    audio_16k = write_audio(folder / "speech16k.wav", seconds=30.0)  # 16 kHz mono: read by libsndfile, no resampling
    video = write_video(folder / "clip.mp4", num_frames=250, size=(320, 240))  # 10 s at 25 fps (mpeg4)

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.model_max_length = 10_000
    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processors = {
        towers: UniMoEProcessor(
            clip, UniMoEFeatureExtractor(audio_towers=list(towers)), tokenizer, image_seq_length=576, num_frames=8
        )
        for towers in (("whisper",), ("beats",), ("whisper", "beats"))
    }
    processor = processors[("whisper",)]
    decoded_image = load_image(image, 0)
    decoded_frames = load_video(video, 8, 0)
    waveform = np.random.default_rng(0).standard_normal(480000).astype(np.float32) * 0.1
    whisper = WhisperFeatureExtractor(feature_size=80)

    rows = [
        ("image (640x480 png -> 336 px)", lambda: processor(text="<image>", images=[str(image)]),
         lambda: clip([decoded_image], return_tensors="np")),
        ("video (10 s mp4 -> 8 frames)", lambda: processor(text="<video>", videos=[str(video)]),
         lambda: clip(decoded_frames, return_tensors="np")),
        ("audio 30 s, Whisper log-mel", lambda: processor(text="<audio>", audio=[str(audio)]),
         lambda: whisper([waveform], sampling_rate=16000, return_tensors="np")),
        ("audio 30 s, BEATs fbank", lambda: processors[("beats",)](text="<audio>", audio=[str(audio)]),
         lambda: beats_fbank(waveform)),
        ("audio 30 s, both towers", lambda: processors[("whisper", "beats")](text="<audio>", audio=[str(audio)]),
         lambda: (whisper([waveform], sampling_rate=16000, return_tensors="np"), beats_fbank(waveform))),
        ("  the same, 16 kHz mono wav", lambda: processors[("whisper", "beats")](text="<audio>", audio=[str(audio_16k)]),
         lambda: (whisper([waveform], sampling_rate=16000, return_tensors="np"), beats_fbank(waveform))),
    ]
    header = f"{'item':<32} {'processor items/s':>17} {'bare component items/s':>23} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, ours, bare in rows:
        ours_time, bare_time = best_seconds(ours, args.repeats), best_seconds(bare, args.repeats)
        print(f"{name:<32} {1 / ours_time:>17.1f} {1 / bare_time:>23.1f} {bare_time / ours_time:>6.2f}", flush=True)
    print("(bare component: the transformers image processor / Whisper feature extractor / our fbank on decoded data)")


if __name__ == "__main__":
    main()
