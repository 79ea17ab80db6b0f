"""`python -m trl_scripts.upcycling ...` = `unimoe-upcycle ...`: a dense LLaMA upcycled into a Uni-MoE language model (`trl_scripts.training.upcycling`)."""

from .training.upcycling import main


if __name__ == "__main__":
    main()
