"""Fresh interpreters: remote code and command lines run the way users run them, without this repository on the path."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
