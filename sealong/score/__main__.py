"""`python -m sealong.score`."""

import sys

from sealong.score.mbr import main

if __name__ == "__main__":
    sys.exit(main())
