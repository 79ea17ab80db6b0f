"""`python -m trl_scripts.train ...` = `unimoe-train ...`: a training stage (`trl_scripts.training.train`)."""

from .training.train import main


if __name__ == "__main__":
    main()
