"""The CUDA C++ MBR kernel (csrc/) compiles with the machine's nvcc for sm_90 and the module imports without a
GPU. Its numbers are checked against the reference in test_mbr_kernel.py under `-m gpu`."""

import importlib.util

import pytest

from sealong_kernels import cuda_build


@pytest.mark.skipif(cuda_build.nvcc_path() is None, reason="nvcc is not on PATH (compile-only test)")
def test_csrc_compiles_and_imports(tmp_path):
    path = cuda_build.build(str(tmp_path), arch="90")
    assert path.endswith(".so") and [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[1]]
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
