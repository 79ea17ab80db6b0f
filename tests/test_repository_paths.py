"""Every path of this repository that a tracked file names (`trl_scripts/...`, `tests/...`, `docs/...`,
`benchmarks/...`, `configuration/...`, `processing/...`, `modeling_unimoe/...`) exists: a moved module or test file
leaves no stale reference in the code, the docs, the YAMLs or the lock headers."""

import re
import subprocess

from tests.utils import REPO_ROOT


ROOTS = ("trl_scripts", "tests", "docs", "benchmarks", "configuration", "processing", "modeling_unimoe")
# a path: one of our top-level folders, then path characters; `{a,b}` alternatives and `<placeholders>` are expanded
# or cut below
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./{{}},<>*-]*[\w/}}>*])")
# paths of other projects that our files quote as sources (CuMo's docs, the original Uni-MoE's folders)
FOREIGN = {"docs/getting_started.md"}


def named_paths(text: str) -> set[str]:
    paths = set()
    for found in PATH.finditer(text):
        if text[found.end():found.end() + 1] == "\\":  # a regular expression's `tests/test_readme\.py`, not a path
            continue
        match = re.split(r"[<*]", found.group(1))[0].rstrip("/.")  # up to a placeholder or glob: its folder must exist
        braces = re.search(r"\{([^{}]*)\}", match)
        if braces:
            paths |= {match[: braces.start()] + choice + match[braces.end():] for choice in braces.group(1).split(",")}
        else:
            paths.add(match)
    return {path for path in paths if "{" not in path and "}" not in path}


def test_named_paths_exist():
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = {}
    for name in files:
        path = REPO_ROOT / name
        if path.suffix in {".wav", ".pt", ".png", ".json"} and not name.endswith(("config.json", ".lock")):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for named in named_paths(text) - FOREIGN:
            if not (REPO_ROOT / named).exists():
                missing.setdefault(named, []).append(name)
    assert not missing, "\n".join(f"{path} (named in {', '.join(sorted(set(where)))})" for path, where in sorted(missing.items()))


def test_the_path_pattern_reads_alternatives_and_placeholders():
    # (this file is checked too: its examples are real paths)
    assert named_paths("see `tests/{models,hub}/__init__.py` and trl_scripts/quickstart/assets/speech/<word>.wav.") == {
        "tests/models/__init__.py", "tests/hub/__init__.py", "trl_scripts/quickstart/assets/speech",
    }
