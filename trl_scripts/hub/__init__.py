"""Publishing to the Hugging Face Hub: `push_to_hub` (the folder check and the upload), `model_card` (the card and its
model-index) and `space` (a Gradio Space running the chat app).

Importing this package imports none of its modules (see `trl_scripts/__init__.py`)."""
