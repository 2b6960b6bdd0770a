"""The package's import surface: the README's spellings work from a bare `import sealong_kernels`, and the
plain-torch references import and run where triton is not installed (each check in a fresh interpreter, so
nothing this test session imported can help)."""

import os
import subprocess
import sys

import pytest


def run_python(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_register_transformers_attention_after_plain_import():
    pytest.importorskip("transformers")
    out = run_python(
        "import sealong_kernels\n"
        "name = sealong_kernels.hf.register_transformers_attention()\n"   # the README's spelling, verbatim
        "from transformers import AttentionInterface\n"
        "print(name, name in AttentionInterface._global_mapping)\n")
    assert out.split() == ["sealong", "True"]


NO_TRITON = r"""
import sys

class BlockTriton:  # a meta-path finder that makes `import triton` fail as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockTriton())
import torch
import sealong_kernels as sk
from sealong_kernels import reference

# the references compute on CPU tensors: MBR scores, the ORPO objective, decode attention
emb = torch.randn(2, 5, 8)
scores = reference.mbr_scores(emb)
chosen, rejected = reference.select_pairs(scores, torch.Generator().manual_seed(0))
h, w = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
labels = torch.randint(0, 11, (2, 6))
loss, metrics = reference.fused_linear_orpo_loss(h, w, labels)
q, k = torch.randn(3, 2, 8), torch.randn(4, 1, 8)
out, lse = reference.prefix_decode_attention(q, k, k, torch.tensor([0, 3]), torch.tensor([0, 4]))
assert "triton" not in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))
try:
    sk.flash_attention
except ImportError as err:
    print("kernel import fails clearly:", err)
print("ok", tuple(scores.shape), bool(torch.isfinite(loss)), tuple(out.shape))
"""


def test_reference_imports_and_runs_without_triton():
    out = run_python(NO_TRITON)
    assert "ok (2, 5) True (3, 2, 8)" in out
    assert "kernel import fails clearly: No module named 'triton'" in out
