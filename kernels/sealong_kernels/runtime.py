"""Where our Triton kernels can run: the one place that reads TRITON_INTERPRET (at call time, never at import)."""

import os


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set by the tests without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(t):
    """Our Triton kernels can run on tensor t: CUDA, or CPU under the Triton interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
