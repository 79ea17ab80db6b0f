"""`python -m trl_scripts.serve DIR` = `unimoe-serve DIR`: the OpenAI-compatible server (`trl_scripts.serving.server`)."""

from .serving.server import main


if __name__ == "__main__":
    main()
