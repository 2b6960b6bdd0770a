"""`python -m sealong.evaluate`."""

import sys

from sealong.evaluate.report import main

if __name__ == "__main__":
    sys.exit(main())
