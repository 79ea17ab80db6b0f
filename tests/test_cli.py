"""The command-line tools as a new user meets them: every `--help`, the console scripts, one-line errors, and the
training CLI's defaults (media next to the data, YAML files with overrides, a missing model folder named)."""

import configparser
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO_ROOT
from tests.utils.data import write_training_rows


# the tools as `python -m trl_scripts.<name>` runs them: the thin entry modules (each imports `main` from its
# sub-package: `train` -> training.train) and the quickstart package (`__main__` runs quickstart.run)
CLI_MODULES = sorted(
    [path.stem for path in (REPO_ROOT / "trl_scripts").glob("*.py") if " import main\n" in path.read_text()]
    + [path.parent.name for path in (REPO_ROOT / "trl_scripts").glob("*/__main__.py")]
)


def tool_main(module: str):
    """The `main` that `python -m trl_scripts.<module>` runs."""
    package = importlib.import_module(f"trl_scripts.{module}")
    return package.main if hasattr(package, "main") else importlib.import_module(f"trl_scripts.{module}.run").main


def console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_prints_its_help(module, capsys):
    main = tool_main(module)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_every_tool_has_a_console_script_installed():
    scripts = console_scripts()
    mains = {}
    for name, target in scripts.items():
        module, function = target.split(":")
        mains[name] = getattr(importlib.import_module(module), function)
    # every tool a user runs has a console script running the same `main` (the tokenizer builder is a maintainer's tool)
    for module in set(CLI_MODULES) - {"build_tiny_tokenizer"}:
        assert tool_main(module) in mains.values(), f"python -m trl_scripts.{module} has no console script"
    for name in scripts:
        assert (Path(sys.executable).parent / name).is_file(), f"{name} is not installed (pip install -e .)"


def test_a_user_error_is_one_line_without_a_traceback(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "unimoe-convert-original"), "--variant", "speech-4e", "--base_dir",
         str(tmp_path / "missing"), "--clip", str(tmp_path / "clip"), "--whisper", str(tmp_path / "whisper"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("unimoe-convert-original: error: The conversion lacks:")
    assert str(tmp_path / "missing" / "pytorch_model.bin.index.json") in result.stderr


def test_a_missing_model_folder_is_named(tmp_path):
    from trl_scripts.training.train import main

    train = write_training_rows(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path 'out/stage1': no such folder .*not a preset \(.*tiny"):
        main(["--stage", "2", "--model_name_or_path", "out/stage1", "--experts", "image", "--train_files", train, "--output_dir", str(tmp_path / "o")])


def train_arguments(train, output_dir):
    return ["--stage", "1", "--model_name_or_path", "tiny", "--train_files", train, "--output_dir", str(output_dir),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true"]  # fmt: skip


def test_media_paths_are_relative_to_the_data_file_by_default(tmp_path, monkeypatch):
    """train, like evaluate, finds a row's media next to its data file when no --media_root is given, from any
    working directory; the original's absolute-looking paths (`/red.png`) are tried under the media folder too."""
    from trl_scripts.training.data import media_path_candidates
    from trl_scripts.training.train import main

    data = tmp_path / "data"
    data.mkdir()
    train = write_training_rows(data)
    rows = json.loads(Path(train).read_text())
    rows[0]["image"] = "/red.png"
    Path(train).write_text(json.dumps(rows))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(train_arguments(train, tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").is_file()
    assert media_path_candidates("/red.png", data) == [Path("/red.png"), data / "red.png"]
    assert media_path_candidates("red.png", None) == [Path("red.png")]


def test_train_files_in_several_folders_need_a_media_root(tmp_path):
    from trl_scripts.training.train import main

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = write_training_rows(tmp_path / "a"), write_training_rows(tmp_path / "b")
    arguments = train_arguments(first, tmp_path / "out")
    arguments[arguments.index("--train_files") + 1 : arguments.index("--train_files") + 2] = [first, second]
    with pytest.raises(ValueError, match=r"--train_files are in several folders .*--media_root"):
        main(arguments)


def test_a_yaml_file_takes_overrides_from_the_command_line(tmp_path):
    from trl_scripts.training.train import main

    train = write_training_rows(tmp_path)
    config = tmp_path / "stage1.yaml"
    config.write_text(
        f"stage: 1\nmodel_name_or_path: tiny\ntrain_files: [{train}]\noutput_dir: {tmp_path / 'from-yaml'}\n"
        "max_steps: 1\nper_device_train_batch_size: 2\nreport_to: none\nuse_cpu: true\nsave_strategy: \"no\"\n"
    )
    main([str(config), "--output_dir", str(tmp_path / "overridden")])
    assert (tmp_path / "overridden" / "config.json").is_file() and not (tmp_path / "from-yaml").exists()


def run_module(module: str, *args: str, cwd, env: dict | None = None, warnings_as_errors: bool = False) -> subprocess.CompletedProcess:
    flags = ["-W", "error::RuntimeWarning"] if warnings_as_errors else []
    return subprocess.run(
        [sys.executable, *flags, "-m", f"trl_scripts.{module}", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}, timeout=300,
    )


@pytest.mark.parametrize("module", ["upcycling", "training.upcycling", "quickstart", "serving.server"])
def test_running_a_tool_as_a_module_does_not_warn(module, tmp_path):
    """`trl_scripts/__init__.py` imported `upcycling` eagerly, so `python -m trl_scripts.upcycling` ran a module
    already in sys.modules (runpy's RuntimeWarning). No package imports its submodules; its names load lazily. The
    entry module and the sub-package module it names both run."""
    result = run_module(module, "--help", cwd=tmp_path, warnings_as_errors=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "RuntimeWarning" not in result.stderr
    code = ("import sys, trl_scripts; print(sorted(m for m in sys.modules if m.startswith('trl_scripts.')));"
            "from trl_scripts import PRESETS_DIR, load_preset, load_tiny_processor, upcycle_llama; print(callable(upcycle_llama))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[]" and result.stdout.splitlines()[1] == "True"


def one_line_error(result: subprocess.CompletedProcess, tool: str) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{tool}: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_stage1_text_only_rows_are_one_line_before_training(tmp_path):
    """They crashed mid-run with a 51-line "element 0 of tensors does not require grad" traceback."""
    train = write_training_rows(tmp_path)
    rows = json.loads(Path(train).read_text()) + [
        {"id": "txt-0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}]
    Path(train).write_text(json.dumps(rows))
    error = one_line_error(run_module("train", *train_arguments(train, tmp_path / "out"), cwd=tmp_path), "train.py")
    assert "1 text-only row(s) of 9 (no image, video or audio): txt-0. Stage 1 trains only the connectors" in error
    assert not (tmp_path / "out").exists()


def test_evaluate_names_a_missing_checkpoint_folder_in_one_line(tmp_path):
    """It printed a 109-line OSError traceback from transformers."""
    (tmp_path / "data.json").write_text(json.dumps([{"id": "q-1", "text": "Say red.", "gt": "red"}]))
    (tmp_path / "out").mkdir()
    result = run_module("evaluate", "--model", "out/nope", "--data", "data.json", "--task", "vqa", cwd=tmp_path)
    error = one_line_error(result, "evaluate.py")
    assert f"--model 'out/nope': no such folder ({tmp_path / 'out' / 'nope'}); expected a checkpoint folder" in error


def test_a_console_script_exits_0_when_its_tool_returns_results(monkeypatch):
    """Console scripts run `sys.exit(main())`; `unimoe-evaluate` returned its metrics dict there, which Python prints
    to stderr and turns into exit status 1 after a successful run."""
    from trl_scripts.console import command_line

    @command_line
    def tool(argv=None):
        return {"accuracy": 1.0}

    assert tool([]) == {"accuracy": 1.0}  # called with arguments (tests, other code): the results
    monkeypatch.setattr(sys, "argv", ["unimoe-tool"])
    with pytest.raises(SystemExit) as exited:
        sys.exit(tool())
    assert exited.value.code is None  # exit status 0
