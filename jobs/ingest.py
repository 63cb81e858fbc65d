"""Ray job entry point for ingestion: ``ray job submit -- python jobs/ingest.py SRC DEST``."""

import sys

from covidray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
