"""`python -m trl_scripts.make_synthetic_data ...` = `unimoe-make-synthetic-data ...`: the quickstart's synthetic data (`trl_scripts.quickstart.make_synthetic_data`)."""

from .quickstart.make_synthetic_data import main


if __name__ == "__main__":
    main()
