"""``python -m effattn``: the command line (see :mod:`effattn.tools.cli`)."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
