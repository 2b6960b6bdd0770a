"""`python -m sealong.score`."""

import sys

from sealong.score.stage import main

if __name__ == "__main__":
    sys.exit(main())
