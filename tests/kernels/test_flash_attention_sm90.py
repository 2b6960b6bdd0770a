"""The attention kernels compile for an H100 (sm_90) with the autotuner's tile configs, without a GPU.

Triton compiles ahead of time from `ASTSource` for a given `GPUTarget` down to a cubin (its bundled ptxas),
so shared-memory overflows, type errors in constexpr branches and unsupported dot shapes show up here rather
than on the first GPU run. Runs in a subprocess because this test session interprets Triton (TRITON_INTERPRET=1).
"""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sealong_kernels import attention as A

ELEM = {"Lse": "*fp32", "Delta": "*fp32", "DK": "*fp32", "DV": "*fp32", "DQ": "*fp32",
        "SeqIdx": "*i32", "CuSeqlens": "*i32", "QSeg": "*i32", "KSeg": "*i32"}
TENSORS = {"Q", "K", "V", "Out", "DOut"}
results = []
# (dtype, head dim, CAUSAL, HAS_SEQ, HAS_SEG, configs per kernel): packed preference pairs, a causal ring step
# with segments, an unmasked ring block, head dim 256, and float32 (PRECISION "ieee", 4-byte tiles)
CASES = [("bf16", 128, True, True, True, 2), ("bf16", 128, True, False, True, 1), ("bf16", 64, False, False, False, 1),
         ("fp16", 256, False, False, False, 1), ("fp32", 128, True, False, False, 1)]
for dtype, d, causal, seq, seg, count in CASES:
    elem = 4 if dtype == "fp32" else 2
    for fn, kind in [(A._attn_fwd_kernel, "fwd"), (A._attn_bwd_dkdv_kernel, "dkdv"), (A._attn_bwd_dq_kernel, "fwd")]:
        tiles = A._fitting_tiles(kind, d, elem)  # what `_launch` runs: the first of these, or the autotuner over all
        for bm, bn, warps, stages in tiles[:count]:
            consts = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_SEQ=seq, HAS_SEG=seg,
                          PRECISION="ieee" if dtype == "fp32" else "tf32")
            sig = {}
            for name in fn.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in TENSORS:
                    sig[name] = "*" + dtype
                elif name in ELEM:
                    sig[name] = ELEM[name]
                else:
                    sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            opts = dict(num_warps=warps, num_stages=stages)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            results.append(dict(kernel=fn.__name__, dtype=dtype, d=d, tile=[bm, bn, warps, stages], shared=kernel.metadata.shared,
                                cubin=len(kernel.asm["cubin"])))
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run the real thing")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert len(results) == 18 and {r["kernel"] for r in results} == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    for r in results:
        assert r["cubin"] > 0, r
        assert r["shared"] <= 227 * 1024, f"{r['kernel']} {r['dtype']} at head dim {r['d']}, tile {r['tile']}: {r['shared']} bytes of shared memory"
