"""Where our Triton kernels can run: the one place that reads TRITON_INTERPRET (at call time, never at import)."""

import os


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set by the tests without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(t):
    """Our Triton kernels can run on tensor t: CUDA, or CPU under the Triton interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _interpreter_scalar_compat():
    """Let Triton 3.6's interpreter take a loop bound computed in the kernel (a scalar from `tl.load` or
    `tl.program_id`, which the interpreter holds as a shape-(1,) array).

    Its `tensor.__index__` is `int(array)`, which NumPy >= 2.4 refuses for arrays of one dimension ("only
    0-dimensional arrays can be converted to Python scalars"), so every `for ... in range(lo, hi)` with
    data-dependent bounds fails; later Tritons use `int(array.squeeze())` (triton/runtime/interpreter.py). This
    wraps the interpreter's tensor patch to do the same; a Triton whose patch already squeezes is left alone. It
    changes nothing outside interpreted launches (the interpreter applies and restores the patch per launch).
    """
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:  # no interpreter in this Triton build
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "sealong_compat", False):
        return
    try:
        if "squeeze" in inspect.getsource(original):
            return
    except (OSError, TypeError):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.sealong_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_interpreter_scalar_compat()
