"""Counts a CPU can prove about GPU work: a TorchDispatchMode that records, per phase, every matrix product,
every host synchronization and every allocation, and a hook counting Triton kernel launches.

Host synchronizations are the ops that, on a CUDA tensor, make the CPU wait for the GPU: a scalar read
(aten._local_scalar_dense: .item(), int(), float(), bool(), .tolist()), an op whose output size depends on the
data (nonzero, masked_select, unique, boolean-mask indexing, repeat_interleave without output_size), and
tensor equality tests that return a Python bool (equal, is_nonzero). On the CPU they cost nothing, which is
why they are counted, not timed.
"""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PRODUCTS = ("aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.mm.dtype", "aten.addmm.dtype",
            "aten.bmm.default", "aten.baddbmm.default")
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.equal", "aten.is_nonzero", "aten.item",
            "aten.allclose", "aten.nonzero_static")
ALLOCATING = ("aten.empty", "aten.zeros", "aten.ones", "aten.full", "aten.empty_like", "aten.zeros_like",
              "aten.full_like", "aten.ones_like", "aten.empty_strided", "aten.new_empty", "aten.new_zeros",
              "aten.new_full", "aten.new_empty_strided", "aten.clone")


def _is_bool_index(func, args):
    name = str(func)
    if not name.startswith(("aten.index.Tensor", "aten.index_put", "aten._index_put_impl_")):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def is_sync(func, args, kwargs):
    name = str(func)
    if name.startswith(SYNC_OPS) or _is_bool_index(func, args):
        return True
    return name.startswith("aten.repeat_interleave.Tensor") and (kwargs or {}).get("output_size") is None


class OpCounter(TorchDispatchMode):
    """products: (phase, op, output shape, bytes read + written); syncs: (phase, op); allocs: (phase, op, bytes)
    (ops that return a fresh tensor: factories and clones, not views or in-place ops). Set `phase` between the
    parts of the work being counted."""

    def __init__(self):
        super().__init__()
        self.phase, self.products, self.syncs, self.allocs = "forward", [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in PRODUCTS:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() * t.element_size() for t in tensors) + out.numel() * out.element_size()
            self.products.append((self.phase, name, tuple(out.shape), moved))
        elif is_sync(func, args, kwargs):
            self.syncs.append((self.phase, name))
        fresh = name.startswith(ALLOCATING) or (name in PRODUCTS and not name.split(".")[1].endswith("_"))
        if fresh and isinstance(out, torch.Tensor):
            self.allocs.append((self.phase, name, out.numel() * out.element_size()))
        return out

    def count(self, what, phase=None):
        rows = getattr(self, what)
        return sum(1 for r in rows if phase is None or r[0] == phase)


@contextlib.contextmanager
def count_launches(pause=None):
    """Every Triton kernel launch inside the block, as a list of kernel names (a launch hook on the JIT: works
    under the interpreter and on a GPU; CUDA-graph replays are not launches). pause: an object whose `phase`
    is set to None during each launch (so a dispatch counter skips the interpreter's own tensor copies)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names = []
    originals = {}
    for cls in (JITFunction, InterpretedFunction):
        if "run" in cls.__dict__:
            originals[cls] = cls.run

            def run(self, *args, _orig=cls.run, **kwargs):
                names.append(getattr(getattr(self, "fn", None), "__name__", None) or getattr(self, "__name__", "?"))
                saved = None if pause is None else pause.phase
                if pause is not None:
                    pause.phase = None
                try:
                    return _orig(self, *args, **kwargs)
                finally:
                    if pause is not None:
                        pause.phase = saved

            cls.run = run
    del triton
    try:
        yield names
    finally:
        for cls, orig in originals.items():
            cls.run = orig
