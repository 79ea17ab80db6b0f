"""`python -m trl_scripts.assemble ...` = `unimoe-assemble ...`: a model from pretrained LLaMA,
CLIP, Whisper and BEATs (`trl_scripts.conversion.assemble`)."""

from .conversion.assemble import main


if __name__ == "__main__":
    main()
