"""Helpers of the test suite: tiny models (`models`), fresh interpreters (`processes`), media files written at test
time (`media`), a local Hub server (`local_hub`), original-layout checkpoint builders (`original_checkpoints`) and the
worker scripts that launchers and vLLM run (`launch_worker`, `parallel_worker`, `vllm_worker`)."""

from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
UTILS_DIR = Path(__file__).resolve().parent
