"""Serving Uni-MoE checkpoints: the OpenAI-compatible HTTP server (`server`) and the Gradio chat app (`chat_app`),
with the options they share (`arguments`).

Both need the `serve` / `chat` extras (`pip install unimoe[serve,chat]`); importing this package imports neither."""
