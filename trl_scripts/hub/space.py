"""Write a Hugging Face Space that runs the Uni-MoE chat app (`trl_scripts.serving.chat_app`) on a Hub checkpoint.

    unimoe-push-to-hub --model DIR --repo-id ORG/NAME --space ORG/NAME-chat  # the model, then its Space
    python -c "from trl_scripts.hub.space import write_space; write_space('outputs/space', 'ORG/NAME')"  # the folder only

The folder holds:

- `app.py`: the chat app's command line on the checkpoint, listening on 0.0.0.0:7860 as Spaces expect.
- `modeling_unimoe/` and `trl_scripts/`: a copy of this package's Python files. The app is part of this package,
  which is not on PyPI, so the Space carries it (`app.py` imports it from next to itself). The checkpoint's weights,
  config and processor files come from the Hub repository; its classes are the copy's: importing `modeling_unimoe`
  registers them with the Auto classes, which transformers prefers to the repository's remote code.
- `requirements.txt`: this package's runtime requirements and the `chat` extra (gradio) from `setup.cfg`, each pinned
  to its version in `requirements.lock`, the versions the tests ran with; pip resolves their own dependencies. The
  lock's torch is the CPU build (`+cpu`, from PyTorch's CPU index): Spaces' free hardware is CPU.
- `README.md`: the Space card, its front matter (`sdk: gradio`, `sdk_version` the locked gradio, `python_version`
  this interpreter's, `app_file: app.py`, `models: [ORG/NAME]`) and how the Space works.

Writing needs the source checkout (`setup.cfg` and `requirements.lock` next to the packages).
"""

import configparser
import json
import logging
import re
import shutil
import sys
import textwrap
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
SETUP_CFG = REPO_ROOT / "setup.cfg"
PACKAGES = ("modeling_unimoe", "trl_scripts")  # copied into the Space: the app and everything it imports
APP_EXTRAS = ("chat",)  # setup.cfg extras the app needs besides install_requires
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """`{canonical name: "name==version"}` of a pip lock file (`name==version` lines, `#` comments)."""
    if not path.is_file():
        raise FileNotFoundError(f"no lock file {path}: writing a Space needs the source checkout (run `make lock`)")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{path}: line {number} is not an exact pin (name==version): {line!r}")
        pins[canonicalize_name(match["name"])] = line
    return pins


def app_requirements(setup_cfg: Path = SETUP_CFG, extras: tuple[str, ...] = APP_EXTRAS) -> list[Requirement]:
    """This package's `install_requires` plus the given extras, from `setup.cfg` (those whose environment markers
    hold here)."""
    if not setup_cfg.is_file():
        raise FileNotFoundError(f"no {setup_cfg}: writing a Space needs the source checkout")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg)
    sections = [parser["options"]["install_requires"]]
    for extra in extras:
        if extra not in parser["options.extras_require"]:
            raise ValueError(f"{setup_cfg} has no extra {extra!r} in [options.extras_require]")
        sections.append(parser["options.extras_require"][extra])
    lines = [line.split("#", 1)[0].strip() for section in sections for line in section.splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    return [requirement for requirement in requirements if requirement.marker is None or requirement.marker.evaluate()]


def pinned_requirements(lock: Path = LOCK_FILE, setup_cfg: Path = SETUP_CFG) -> list[str]:
    """`app_requirements` as the lock's exact pins (`name==version`, the lock's spelling), sorted by name."""
    pins = read_lock(lock)
    pinned = {}
    for requirement in app_requirements(setup_cfg):
        name = canonicalize_name(requirement.name)
        if name not in pins:
            raise ValueError(f"{lock} has no pin for {requirement.name} (required in {setup_cfg}): run `make lock`")
        pinned[name] = pins[name]
    return [pinned[name] for name in sorted(pinned)]


def requirements_txt(pins: list[str]) -> str:
    """The Space's `requirements.txt` of `pinned_requirements`, after PyTorch's CPU index when a pin is a CPU build."""
    lines = [f"# unimoe[{','.join(APP_EXTRAS)}]'s requirements (setup.cfg) at their versions in requirements.lock."]
    if any(pin.endswith("+cpu") for pin in pins):
        lines.append(f"--extra-index-url {TORCH_CPU_INDEX}")
    return "\n".join([*lines, *pins]) + "\n"


def app_py(model_id: str) -> str:
    """The Space's `app.py`: the chat app on `model_id`, listening where Spaces expect it."""
    return textwrap.dedent(
        f'''\
        """Hugging Face Space: the Uni-MoE chat app on {model_id} (written by `trl_scripts.hub.space.write_space`).

        The app and the packages it imports (`trl_scripts`, `modeling_unimoe`: the model and processor classes too)
        are copied next to this file; the checkpoint's files come from the Hub repository.
        """

        from trl_scripts.serving import chat_app


        MODEL_ID = {json.dumps(model_id)}


        if __name__ == "__main__":
            chat_app.main([MODEL_ID, "--host", "0.0.0.0", "--port", "7860"])
        '''
    )


def space_card(model_id: str, gradio_version: str) -> SpaceCard:
    """The Space's README: front matter for the gradio SDK at `gradio_version`, linked to `model_id`."""
    data = SpaceCardData(
        title=f"Uni-MoE chat: {model_id.split('/')[-1]}",
        sdk="gradio",
        sdk_version=gradio_version,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        models=[model_id],
        tags=["uni-moe", "mixture-of-experts", "multimodal"],
        emoji="💬",
        colorFrom="indigo",
        colorTo="blue",
        short_description="Chat with a Uni-MoE multimodal mixture-of-experts model",
        pinned=False,
    )
    body = f"""
# {data.title}

A chat with [{model_id}](https://huggingface.co/{model_id}), a Uni-MoE model (a multimodal mixture of experts):
attach images, audio or video and ask about them. The answer streams token by token; under it, a heatmap shows which
experts each sparse layer chose for the answer's tokens, per modality.

The app is `trl_scripts/serving/chat_app.py` of the Uni-MoE transformers package, copied here with the package
(`trl_scripts/`, and `modeling_unimoe/` whose model and processor classes load the checkpoint); the checkpoint's
files come from {model_id}. `requirements.txt` pins the package's requirements to the versions its tests ran with,
torch as its CPU build: on GPU hardware, replace that line with a CUDA build of the same version. A private model
needs an `HF_TOKEN` secret (Settings) that can read it.
"""
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def copy_packages(folder: Path) -> list[Path]:
    """Copy the Python files of `PACKAGES` (from this checkout) into `folder`; returns the copies."""
    copied = []
    for package in PACKAGES:
        source = REPO_ROOT / package
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            target = folder / path.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(target)
    return copied


def write_space(folder: str | Path, model_id: str, *, lock: Path = LOCK_FILE, setup_cfg: Path = SETUP_CFG) -> Path:
    """Write the Space running the chat app on the Hub checkpoint `model_id` (ORG/NAME) into `folder` (created if
    needed; files of the same names are replaced); returns the folder. Raises `ValueError` for a bad repo id, a
    requirement the lock does not pin, or the checkout itself as the folder."""
    validate_repo_id(model_id)
    if "/" not in model_id:
        raise ValueError(f"model id {model_id!r} must be ORG/NAME (or USER/NAME): the Hub repository of the checkpoint")
    folder = Path(folder)
    if folder.resolve() == REPO_ROOT:
        raise ValueError(f"{folder} is this package's checkout: write the Space into a folder of its own")
    pins = pinned_requirements(lock, setup_cfg)
    versions = {canonicalize_name(name): version for name, version in (pin.split("==") for pin in pins)}
    gradio_version = versions.get("gradio")
    if gradio_version is None:
        raise ValueError(f"{setup_cfg}: the {'/'.join(APP_EXTRAS)} extra does not require gradio, the Space's SDK")
    folder.mkdir(parents=True, exist_ok=True)
    copied = copy_packages(folder)
    (folder / "app.py").write_text(app_py(model_id))
    (folder / "requirements.txt").write_text(requirements_txt(pins))
    (folder / "README.md").write_text(str(space_card(model_id, gradio_version)))
    logger.info("Wrote the Space for %s in %s (app.py, requirements.txt, README.md and %d package files)",
                model_id, folder, len(copied))
    return folder
