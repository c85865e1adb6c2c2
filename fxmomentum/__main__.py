"""``python -m fxmomentum ...``: the same command line as ``fxmomentum ...``."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
