"""Memory provable on the CPU: a TorchDispatchMode that records the largest tensor any op returns."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class SizeRecorder(TorchDispatchMode):
    """Largest tensor (in bytes) any op returns (factories, matmuls, in-place results alike), with its op.
    Bytes, not elements: the Triton interpreter copies kernel arguments through uint8 views."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest[0]:
                self.largest = (t.numel() * t.element_size(), str(func))
        return out
