"""Ray job entry point for nightly rescoring:
``ray job submit -- python jobs/rescore.py --model URI --data URI --out URI``."""

import sys

from covidray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
