"""`python -m trl_scripts.push_to_hub ...` = `unimoe-push-to-hub ...`: publishing a checkpoint with its model card (`trl_scripts.hub.push_to_hub`)."""

from .hub.push_to_hub import main


if __name__ == "__main__":
    main()
