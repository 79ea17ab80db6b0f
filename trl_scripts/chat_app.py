"""`python -m trl_scripts.chat_app DIR` = `unimoe-chat DIR`: the Gradio chat app (`trl_scripts.serving.chat_app`)."""

from .serving.chat_app import main


if __name__ == "__main__":
    main()
