"""`python -m trl_scripts.quickstart` = `unimoe-quickstart` = `make demo` (`trl_scripts.quickstart.run`)."""

import sys

from .run import main


# the usage line and our one-line errors name the command, not __main__.py
sys.argv[0] = "python -m trl_scripts.quickstart"
main()
