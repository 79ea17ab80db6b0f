"""`python -m trl_scripts.convert_original ...` = `unimoe-convert-original ...`: converting an original Uni-MoE checkpoint (`trl_scripts.conversion.convert_original`)."""

from .conversion.convert_original import main


if __name__ == "__main__":
    main()
