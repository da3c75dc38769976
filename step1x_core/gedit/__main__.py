"""python -m step1x_core.gedit: the step1x-edit-gedit command."""

import sys

from ..commands.gedit import main

if __name__ == "__main__":
    sys.exit(main())
