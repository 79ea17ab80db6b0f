"""Held-out evaluation: `evaluate` (the `unimoe-evaluate` command line, generation and scoring) and `metrics/`
(local `evaluate` metric modules).

Importing this package imports none of its modules (see `trl_scripts/__init__.py`)."""
