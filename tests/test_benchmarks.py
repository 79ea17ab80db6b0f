"""Every benchmark script imports (its helpers and test utilities at their current paths) and prints its help: the
scripts run outside the suite (`make bench`), so a moved module would otherwise break them silently."""

import subprocess
import sys

import pytest

from tests.utils import REPO_ROOT


SCRIPTS = sorted(path.name for path in (REPO_ROOT / "benchmarks").glob("bench_*.py"))


def test_every_benchmark_is_found():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]
