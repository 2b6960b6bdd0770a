"""The CUDA C++ MBR kernel (csrc/) compiles with the machine's nvcc for sm_80 and sm_90 (+ PTX), both land in
the binary, and the module imports without a GPU; an extension that cannot run on the GPU falls back to Triton
once. Its numbers are checked against the reference in test_mbr_kernel.py under `-m gpu`."""

import importlib.util
import os
import subprocess
import warnings

import pytest
import torch
import triton

import sealong_kernels.mbr as mbr
from sealong_kernels import cuda_build, reference

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def test_arch_list_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_build.arch_list() == ["8.0", "9.0+PTX"]
    assert cuda_build.gencode_flags(cuda_build.arch_list()) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0a;10.0+PTX")
    assert cuda_build.arch_list() == ["8.6", "9.0a", "10.0+PTX"]
    assert cuda_build.gencode_flags(["9.0a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_build.arch_list("90") == ["9.0"]
    with pytest.raises(ValueError, match="CUDA architecture 'Ampere'"):
        cuda_build.arch_list("Ampere")


@pytest.mark.skipif(cuda_build.nvcc_path() is None, reason="nvcc is not on PATH (compile-only test)")
def test_csrc_compiles_for_two_architectures_and_imports(tmp_path):
    path = cuda_build.build(str(tmp_path), arch="8.0;9.0+PTX")
    assert path.endswith(".so") and [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[1]]
    if os.path.exists(CUOBJDUMP):  # the fatbin holds an sm_80 and an sm_90 cubin and compute_90 PTX
        elf = subprocess.run([CUOBJDUMP, "--list-elf", path], capture_output=True, text=True, check=True).stdout
        ptx = subprocess.run([CUOBJDUMP, "--list-ptx", path], capture_output=True, text=True, check=True).stdout
        assert ".sm_80." in elf and ".sm_90." in elf, elf
        assert ".sm_90." in ptx and ".sm_80." not in ptx, ptx
    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "mbr_scores" in dir(mod)
    # argument checks happen on the host, before any CUDA call: they work without a GPU
    args = dict(emb=1, mask=0, out=1, B=2, N=4, D=3, stride_b=12, stride_n=3, stride_d=1, dtype=0,
                normalize=True, include_self=False, eps=1e-12, stream=0)
    for bad, match in [({"N": 2000}, "N must be"), ({"D": 0}, "D must be"), ({"dtype": 7}, "dtype code"),
                       ({"emb": 0}, "device pointers")]:
        with pytest.raises(ValueError, match=match):
            mod.mbr_scores(**{**args, **bad})
    mod.mbr_scores(**{**args, "B": 0})  # an empty batch launches nothing


def test_build_reports_missing_sources(tmp_path):
    if cuda_build.nvcc_path() is None:
        with pytest.raises(RuntimeError, match="nvcc"):
            cuda_build.build(str(tmp_path))
    else:
        with pytest.raises(RuntimeError, match="no CUDA sources"):
            cuda_build.build(str(tmp_path), csrc=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_auto_backend_falls_back_to_triton_once(monkeypatch):
    """An extension built for other GPUs fails its launch (RuntimeError "no kernel image ..."): backend "auto"
    warns once, returns the Triton kernel's scores, and never tries the extension again in this process.
    (CPU tensors stand in for CUDA ones: the Triton kernel runs under the interpreter.)"""
    calls = []

    def failing_launch(*args):
        calls.append(1)
        raise RuntimeError("mbr_scores launch failed: no kernel image is available for execution on the device")

    monkeypatch.setattr(mbr, "cuda_extension", lambda: object())
    monkeypatch.setattr(mbr, "mbr_scores_cuda", failing_launch)
    monkeypatch.setattr(mbr, "_EXTENSION_USABLE", [True])
    emb = torch.randn(2, 5, 24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mbr._cuda_or_triton(emb, None, True, False, 1e-12)
        second = mbr._cuda_or_triton(emb, None, True, False, 1e-12)
    assert len(calls) == 1 and len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "cannot run on this GPU (mbr_scores launch failed: no kernel image" in str(caught[0].message)
    want = reference.mbr_scores(emb.double())
    assert torch.allclose(first.double(), want, atol=1e-6) and torch.equal(first, second)


# Compiles the Triton kernel for sm_90 without a GPU (TRITON_INTERPRET unset, in a fresh process) at the launch
# configurations `mbr_scores` picks, and reads the register use from the cubin: no spills (STACK/LOCAL 0) and
# at least two programs per SM up to N = 256 (memory-bound: occupancy keeps loads in flight).
_TRITON_SM90 = r"""
import os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sealong_kernels.mbr import _block_sizes, _mbr_scores_kernel
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
sig = {"E": "", "M": "*i1", "W": "*fp32", "OUT": "*fp32", "N": "i32", "D": "i32", **{k: "i64" for k in
       ["stride_eb", "stride_en", "stride_ed", "stride_mb", "stride_mn", "stride_wb", "stride_wn", "stride_ob"]},
       "eps": "fp32", **{k: "constexpr" for k in ["HAS_MASK", "HAS_WEIGHTS", "NORMALIZE", "INCLUDE_SELF", "BLOCK_N",
                                                  "BLOCK_D"]}}
for dtype, n, d, weighted in [("fp32", 32, 1024, False), ("bf16", 32, 1024, False), ("fp32", 256, 1024, False),
                              ("fp16", 512, 4096, False), ("fp32", 5, 37, False), ("fp16", 512, 4096, True)]:
    block_n, block_d, num_warps = _block_sizes(n, d, weighted)
    const = {"HAS_MASK": True, "HAS_WEIGHTS": weighted, "NORMALIZE": True, "INCLUDE_SELF": False, "BLOCK_N": block_n,
             "BLOCK_D": block_d}
    src = ASTSource(fn=_mbr_scores_kernel, signature={**sig, "E": "*" + dtype}, constexprs=const)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    path = os.path.join(sys.argv[1], f"mbr_{dtype}_{n}_{weighted}.cubin")
    open(path, "wb").write(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    reg, stack, local = (int(re.search(k + r":(\d+)", usage).group(1)) for k in ("REG", "STACK", "LOCAL"))
    print(dtype, n, d, block_n, block_d, num_warps, reg, stack, local)
"""


def test_triton_kernel_compiles_for_sm90_without_spills(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SM90, str(tmp_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton wheel ships no cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 6  # the last: peer-weighted (--scorer mbr+certainty)
    for dtype, n, d, block_n, block_d, num_warps, reg, stack, local in rows:
        assert int(stack) == 0 and int(local) == 0, f"{dtype} N={n}: register spills ({reg} registers, stack {stack})"
        programs_per_sm = 65536 // (int(reg) * 32 * int(num_warps))  # register file of an H100 SM: 64K
        assert programs_per_sm >= (2 if int(n) <= 256 else 1), f"{dtype} N={n}: {reg} registers x {num_warps} warps"
