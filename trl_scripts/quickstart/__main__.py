"""`python -m trl_scripts.quickstart` = `unimoe-quickstart` = `make demo` (`trl_scripts.quickstart.run`)."""

from .run import main


main()
