"""`python -m sealong.sample`."""

import sys

from sealong.sample.sampler import main

if __name__ == "__main__":
    sys.exit(main())
