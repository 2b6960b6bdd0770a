"""`python -m sealong.sampler`, as before the stages became packages: the sampler is sealong.sample.sampler."""

import sys

from sealong.sample.sampler import main

if __name__ == "__main__":
    sys.exit(main())
