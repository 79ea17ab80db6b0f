"""What the command-line tools share: a user error is one line on stderr, not a traceback."""

import functools
import os
import sys
from pathlib import Path


# What our validation raises for bad arguments or inputs (a missing file, a wrong option, a row that does not convert)
# and for an unreachable server (a Hub endpoint: the tools raise a ConnectionError naming it).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ConnectionError)


def command_line(main):
    """Decorate a tool's `main(argv=None)`. Called with an argument list (tests, other code) it raises as usual;
    called without one (the command line: `python -m ...` or a console script) it returns nothing (exit status 0), and
    a `USER_ERRORS` exception ends the process with exit status 1 and the message alone. `UNIMOE_TRACEBACK=1` shows the
    traceback instead."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None):
        if argv is not None or os.environ.get("UNIMOE_TRACEBACK"):
            return main(argv)
        try:
            main()  # no return value: console scripts run `sys.exit(main())`, which would print it and exit with 1
        except USER_ERRORS as error:
            name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else main.__module__
            sys.exit(f"{name}: error: {error}")

    return run


def check_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """`path` as a folder to write into, before any work: a `NotADirectoryError` naming `option` when it is an
    existing file (transformers' `save_pretrained` only logs that and writes nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {str(path)!r} is a file; give a folder to write into")
    return path
