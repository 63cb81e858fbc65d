"""Ray job entry point for training: ``ray job submit -- python jobs/train.py --data URI ...``."""

import sys

from covidray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
