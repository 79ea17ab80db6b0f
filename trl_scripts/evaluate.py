"""`python -m trl_scripts.evaluate ...` = `unimoe-evaluate ...`: held-out evaluation with a local `evaluate` metric (`trl_scripts.evaluation.evaluate`)."""

from .evaluation.evaluate import main


if __name__ == "__main__":
    main()
