"""`python -m sealong.train`."""

import sys

from sealong.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
