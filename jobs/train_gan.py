"""Ray job entry point for the CycleGAN: ``ray job submit -- python jobs/train_gan.py --data URI
--from normal --to covid --out URI ...`` (the arguments of ``covidray gan train``)."""

import sys

from covidray.cli import main

if __name__ == "__main__":
    sys.exit(main(["gan", "train", *sys.argv[1:]]))
