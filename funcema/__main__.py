"""``python -m funcema``: the command line (see :mod:`funcema._cli`)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
