"""`python -m trl_scripts.build_tiny_tokenizer ...`: the `tiny` preset's offline tokenizer
(`trl_scripts.quickstart.build_tiny_tokenizer`)."""

from .quickstart.build_tiny_tokenizer import main


if __name__ == "__main__":
    main()
