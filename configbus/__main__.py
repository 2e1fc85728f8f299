"""``python -m configbus``: the command line, as the ``configbus`` script runs it."""

import sys

from configbus.cli import main

if __name__ == "__main__":
    sys.exit(main())
