"""``python -m covidray.cli``: the same as the ``covidray`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
