"""Benchmarks: one `bench_<name>.py` per kernel and stage, `python -m bench.run_all` for all of them.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here, before any
benchmark module imports triton (triton reads it when a kernel is decorated).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
