"""The README, followed verbatim by a new user: every bash and python block runs, in order, in a fresh copy of the
repository (its tracked and unignored files), with the paths the README itself creates. A block may be skipped only
with a `<!-- not run by tests/test_readme.py: reason -->` line right above it (the two `make` commands, which run this
test and the demo). Pushing goes to `tests/utils/local_hub.py` through `HF_ENDPOINT` and `HF_TOKEN`, as the README says.
A bash block of one command ending in `&` starts a service (the server, the chat app), as a user would in another
terminal: it runs in the background, the next blocks wait until its `--port` answers HTTP, and it is stopped at the
end; it must still be running then."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.utils import REPO_ROOT
from tests.utils.local_hub import LocalHub


BLOCK = re.compile(r"(?:<!-- not run by tests/test_readme\.py: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, reason it is skipped or None) of every fenced block, in order."""
    return [(m["lang"], m["code"], m["skip"]) for m in BLOCK.finditer(text)]


def service_command(code: str) -> str | None:
    """The command of a block that starts a service (one command line ending in `&`), else None."""
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) == 1 and re.search(r"&\s*(#.*)?$", lines[0]):
        return re.sub(r"&\s*(#.*)?$", "", lines[0]).strip()
    return None


def start_service(command: str, workdir: Path, env: dict, log: Path) -> subprocess.Popen:
    """Start `command` in the background and wait (up to 300 s) until its `--port` answers HTTP."""
    port = re.search(r"--port\s+(\d+)", command)
    assert port, f"a service block names its --port: {command}"
    with open(log, "w") as output:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, f"service {command!r} exited:\n{log.read_text()[-3000:]}"
        try:
            httpx.get(f"http://127.0.0.1:{port.group(1)}/", timeout=5)
            return process
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"service {command!r} did not answer in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


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
    assert [lang for lang, _ in skipped] == ["bash", "bash", "bash"]  # make demo / test, make lock / compat, vLLM
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
        services = []
        try:
            run_blocks(runnable, workdir, env, services)
            for process, command in services:
                assert process.poll() is None, f"service {command!r} stopped before the end of the README"
        finally:
            for process, _ in services:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=60)
        assert [command.split()[0] for _, command in services] == ["unimoe-serve", "unimoe-chat"]
        # what the blocks claim to create is there
        assert (workdir / "outputs/quickstart/stage3/config.json").is_file()
        assert (workdir / "out/stage3/model.safetensors").is_file() and (workdir / "out/eval/metrics.json").is_file()
        assert ("model", "YOUR_NAME/tiny-unimoe") in hub.repos


def run_blocks(runnable: list[tuple[str, str]], workdir: Path, env: dict, services: list) -> None:
    """Run the README's blocks in order; services started are appended to `services` as (process, command)."""
    for number, (lang, code) in enumerate(runnable):
        command = service_command(code) if lang == "bash" else None
        if command is not None:
            services.append((start_service(command, workdir, env, workdir / f"service_{number}.log"), command))
            continue
        if lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            script = workdir / f"readme_block_{number}.py"
            script.write_text(code)
            command = [sys.executable, script.name]
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"README block {number} ({lang}) failed:\n{code}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
