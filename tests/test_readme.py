"""The README, followed verbatim by a new user: every bash and python block runs, in order, in a fresh copy of the
repository (its tracked and unignored files), with the paths the README itself creates. A block may be skipped only
with a `<!-- not run by tests/test_readme.py: reason -->` line right above it (the two `make` commands, which run this
test and the demo). Pushing goes to `tests/local_hub.py` through `HF_ENDPOINT` and `HF_TOKEN`, as the README says."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from local_hub import LocalHub


BLOCK = re.compile(r"(?:<!-- not run by tests/test_readme\.py: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, reason it is skipped or None) of every fenced block, in order."""
    return [(m["lang"], m["code"], m["skip"]) for m in BLOCK.finditer(text)]


def fresh_copy(target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT, capture_output=True,
        check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readme_runs_as_written(tmp_path):
    blocks = readme_blocks((REPO_ROOT / "README.md").read_text())
    skipped = [(lang, reason) for lang, _, reason in blocks if reason is not None]
    runnable = [(lang, code) for lang, code, reason in blocks if reason is None and lang in ("bash", "python")]
    assert all(reason.strip() for _, reason in skipped)
    assert [lang for lang, _ in skipped] == ["bash", "bash"]  # make demo / make test, make lock / make compat
    assert len(runnable) >= 6
    # the layout diagram is the one block in no language; nothing else may hide from this test
    assert [lang for lang, _, reason in blocks if reason is None and lang not in ("bash", "python")] == [""]

    workdir = fresh_copy(tmp_path / "clone")
    token = "hf_readme_test"
    with LocalHub(tokens={token}) as hub:
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the activated .venv
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": "",
        }
        for number, (lang, code) in enumerate(runnable):
            if lang == "bash":
                command = ["bash", "-euo", "pipefail", "-c", code]
            else:
                script = workdir / f"readme_block_{number}.py"
                script.write_text(code)
                command = [sys.executable, script.name]
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"README block {number} ({lang}) failed:\n{code}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        # what the blocks claim to create is there
        assert (workdir / "outputs/quickstart/stage3/config.json").is_file()
        assert (workdir / "out/stage3/model.safetensors").is_file() and (workdir / "out/eval/metrics.json").is_file()
        assert ("model", "YOUR_NAME/tiny-unimoe") in hub.repos
