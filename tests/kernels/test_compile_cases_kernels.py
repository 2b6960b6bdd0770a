"""Every non-attention Triton kernel of sealong_kernels (fused-loss rows, MBR, decode and its split merge, the
ring merge) compiles for sm_80 and sm_90 at every tile its launcher can choose (bench/compile_cases_kernels.py),
with a real launch's alignment specialization, without register spills and within the shared memory of the
architecture (163 KB sm_80, 227 KB sm_90). Runs in a subprocess with TRITON_INTERPRET=0 (this session
interprets Triton); the same compiles are recorded by `python -m bench.compile_cases_kernels`."""

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import inspect, json, triton
from bench import compile_cases_kernels as C
from sealong_kernels import decode, mbr, orpo, ring_merge
jitted = {name: f for m in (decode, mbr, orpo, ring_merge) for name, f in vars(m).items()
          if isinstance(f, triton.runtime.jit.JITFunction)}
kernels = sorted(name for name in jitted if name.endswith("_kernel"))   # launched: each needs compile cases
helpers = sorted(name for name in jitted if not name.endswith("_kernel"))  # inlined into kernels
callers = {h: sorted(k for k in kernels if h + "(" in jitted[k].src) for h in helpers}
cases = C.cases()
rows = C.compile_all(cases)
print("RESULT" + json.dumps({"kernels": kernels, "callers": callers, "covered": sorted({c["kernel"] for c in cases}),
                             "rows": len(rows), "archs": sorted({r["arch"] for r in rows}),
                             "problems": [(r["name"], r["arch"], r["registers"], r["spill_stores"], r["shared"])
                                          for r in C.problems(rows)]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the real thing")
def test_every_kernel_tile_compiles_without_spills_for_sm80_and_sm90():
    env = dict(os.environ)  # bench/__init__ would default to the interpreter without an explicit 0
    env.update(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["kernels"] == result["covered"], result         # every @triton.jit kernel has cases
    # a @triton.jit helper (a name not ending in _kernel) is compiled inside the kernels that call it
    assert all(result["callers"].values()), result["callers"]
    assert result["archs"] == [80, 90] and result["rows"] >= 2 * 40
    assert result["problems"] == [], result["problems"]           # no spills, shared memory within the limit

