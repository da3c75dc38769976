"""python -m step1x_core.batch: the step1x-edit-batch command."""

import sys

from ..commands.batch import main

if __name__ == "__main__":
    sys.exit(main())
