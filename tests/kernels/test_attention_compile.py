"""torch.compile(fullgraph=True) of a small attention layer that calls sealong_kernels.flash_attention: the
Triton forward and backward are torch.library custom ops with fake implementations, so the layer traces without a
graph break; compiled output and gradients equal eager. Runs in a subprocess (a fresh process with the
interpreter on; compiling inside this long pytest process with transformers imported has crashed before)."""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys, torch
import sealong_kernels as sk
from sealong_kernels.attention import varlen_plan

backend = sys.argv[1]
torch.manual_seed(0)
t, hidden, hq, hkv, d = 37, 32, 2, 1, 16


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, (hq + 2 * hkv) * d, bias=False)
        self.o = torch.nn.Linear(hq * d, hidden, bias=False)

    def forward(self, x, seg, plan):
        q, k, v = self.qkv(x).view(t, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
        out, _ = sk.flash_attention(q, k, v, causal=True, cu_seqlens=plan, segment_ids=seg, backend="triton")
        return x + self.o(out.reshape(t, hq * d))


layer = Layer()
x = torch.randn(t, hidden, requires_grad=True)
seg = torch.tensor([0] * 15 + [1] * 5 + [2] * 4 + [0] * 6 + [1] * 4 + [2] * 3, dtype=torch.int32)
plan = varlen_plan(torch.tensor([0, 24, 37]), t)
compiled = torch.compile(layer, fullgraph=True, backend=backend)
results = []
for fn in (layer, compiled):
    layer.zero_grad()
    x.grad = None
    y = fn(x, seg, plan)
    y.square().sum().backward()
    results.append((y.detach(), x.grad.clone(), layer.qkv.weight.grad.clone()))
for a, b in zip(*results):
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-5, err
print("COMPILED_OK")
"""


@pytest.mark.parametrize("backend", ["aot_eager"])  # "inductor" passes too (7 min on a loaded 2-core CPU)
def test_layer_compiles_fullgraph_and_matches_eager(backend):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, backend], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "COMPILED_OK" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
