"""Building checkpoints from other checkpoints: the released original Uni-MoE v1 (`convert_original`, with its
key-mapping plan in `original_keys`), pretrained LLaMA + CLIP + Whisper + BEATs (`assemble`) and the offline backbones
(`backbones`).

Importing this package imports none of its modules (see `trl_scripts/__init__.py`)."""
