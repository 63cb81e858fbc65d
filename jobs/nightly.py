"""Ray job entry point for the nightly PACS round trip: ``ray job submit -- python
jobs/nightly.py --source dicomweb+https://HOST/PATH --data URI --links URI --model URI
--out URI`` (pull → score → publish; credentials from COVIDRAY_DICOMWEB_* variables)."""

import sys

from covidray.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
