"""Build script: everything is declared in pyproject.toml except the optional CUDA extension.

The extension `sealong_kernels._C` (sources in csrc/) is a pybind11 module whose functions take raw
device pointers and a CUDA stream, so it does not compile against torch's C++ API. It is built with
ninja only when CUDA's compiler and a CUDA-enabled torch are both found; otherwise the package installs
without it, says so once, and every kernel falls back to Triton or plain torch.

Environment switch: SEALONG_BUILD_CUDA=1 forces the build (fails loudly if it cannot), =0 skips it.
Architectures: $TORCH_CUDA_ARCH_LIST when set (e.g. "8.0;9.0+PTX"), else sm_80 + sm_90 + compute_90 PTX
(kernels/sealong_kernels/cuda_build.py: arch_list / gencode_flags, shared with `python -m sealong_kernels.cuda_build`).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup


def _cuda_build_reason():
    """Return (build: bool, reason: str)."""
    switch = os.environ.get("SEALONG_BUILD_CUDA", "")
    if switch == "0":
        return False, "SEALONG_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return switch == "1", "torch is not importable in the build environment (use --no-build-isolation to build it)"
    if torch.version.cuda is None:
        return switch == "1", f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return switch == "1", "no CUDA compiler (nvcc) found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _load_cuda_build():
    """kernels/sealong_kernels/cuda_build.py by path (the package is not importable while it is being built)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "sealong_kernels", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("_sealong_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    build, reason = _cuda_build_reason()
    if not sources or not build:
        print(f"sealong: installing without the CUDA extension ({reason or 'no sources'}); "
              "kernels use Triton or plain torch", file=sys.stderr)
        return [], {}
    import pybind11
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cuda_build = _load_cuda_build()
    gencode = cuda_build.gencode_flags(cuda_build.arch_list())
    ext = CUDAExtension(
        name="sealong_kernels._C",
        sources=sources,
        include_dirs=[pybind11.get_include(), os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode],  # explicit: torch adds none of its own
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
