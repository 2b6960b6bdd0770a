"""Plain-torch twins of every kernel in sealong_kernels: the test oracle and the CPU fallback.

Each function here computes exactly what its kernel computes, in whatever dtype it is given (tests pass
float64), with no tiling, chunking or fusion, so that it can be read as the specification.
"""

import torch
