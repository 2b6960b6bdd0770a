"""Compile csrc/ into the pybind11 module `sealong_kernels._C` with nvcc alone (no torch C++ API).

    python -m sealong_kernels.cuda_build                 # writes kernels/sealong_kernels/_C<ext-suffix>, next to this file
    python -m sealong_kernels.cuda_build --out-dir /tmp --arch 90

The module's functions take raw device pointers and a CUDA stream handle, so compiling it needs only nvcc,
pybind11's headers and Python's headers (about 12 s for sm_90). It imports on a machine without a GPU (the
CUDA runtime is linked statically); calling a kernel there raises RuntimeError. `pip install -e .` on a
machine with CUDA torch builds the same sources through setup.py instead.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")  # the repo's csrc/


def nvcc_path():
    """nvcc from PATH or $CUDA_HOME/bin, else None."""
    found = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if found is None and cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        found = os.path.join(cuda_home, "bin", "nvcc")
    return found


def build(out_dir=None, arch="90", csrc=CSRC, verbose=False):
    """Compile every csrc/*.cu and *.cpp into <out_dir>/_C<EXT_SUFFIX>; return its path. Atomic: the module
    appears only when the compile succeeded. Raises RuntimeError with nvcc's output on failure."""
    import pybind11

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH or under $CUDA_HOME/bin")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no CUDA sources in {csrc} (is this a source checkout?)")
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    tmp = f"{target}.{os.getpid()}.tmp"
    cmd = [
        nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--use_fast_math",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"], "-I", csrc,
        *sources, "-o", tmp,
    ]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    os.replace(tmp, target)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="where to write _C<ext> (default: the sealong_kernels folder)")
    parser.add_argument("--arch", default=os.environ.get("SEALONG_CUDA_ARCH", "90"), help="SM version, e.g. 90 or 80")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.arch, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
