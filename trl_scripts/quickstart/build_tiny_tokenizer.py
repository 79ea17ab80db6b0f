"""Builds the offline tokenizer of the `tiny` preset (`processing/tiny-tokenizer/`), deterministically.

A byte-level BPE with 512 entries trained on a small built-in English corpus (the vocabulary of the synthetic
multimodal tasks plus everyday words), LLaMA conventions (`<unk>`=0 doubles as padding, `<s>`=1 prepended, `</s>`=2)
and the placeholders `<image>`, `<video>`, `<audio>` as special tokens. Byte fallback means any text encodes.

    python -m trl_scripts.build_tiny_tokenizer [--output_dir processing/tiny-tokenizer]
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from trl_scripts.console import command_line


VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<video>", "<audio>"]
OUTPUT_DIR = Path(__file__).resolve().parents[2] / "processing" / "tiny-tokenizer"

_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and
polite answers to the user's questions. USER: ASSISTANT:
What colour is the shape? Which shape is it? The shape is red. The shape is green. The shape is blue. It is yellow.
It is a circle. It is a square. It is a triangle. It is a star. A red circle on a white background.
A blue square. A green triangle. A yellow star. Which way does the object move? It moves left. It moves right.
It moves up. It moves down. The ball moves from left to right. A video of a moving object.
How many beeps do you hear? One beep. Two beeps. Three beeps. Four beeps. Is the tone high or low? The tone is high.
The tone is low. A sound of noise. A short beep. A long beep. What did the speaker say? The speaker said the digit
zero one two three four five six seven eight nine. The speaker says hello. yes no stop go left right up down on off.
Describe the image. Describe the video. Describe the audio. Answer the question using a single word or phrase.
the of and to in is it that for you was with on as have be at not this but by from they we say her she or an will
my one all would there their what so up out if about who get which go me when make can like time no just him know
take people into year your good some could them see other than then now look only come its over think also back
after use two how our work first well way even new want because any these give day most us is are was were been
""".split("\n")


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in _CORPUS if line.strip()] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>", "audio_token": "<audio>"},
        model_max_length=2048,
        padding_side="left",
    )


@command_line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(OUTPUT_DIR))
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
