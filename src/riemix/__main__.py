"""``python -m riemix``: the ``riemix`` command line (``riemix.cli.main``)."""

import sys

from riemix.cli import main

if __name__ == "__main__":
    sys.exit(main())
