"""Compile csrc/ into the pybind11 module `sealong_kernels._C` with nvcc alone (no torch C++ API).

    python -m sealong_kernels.cuda_build                 # writes kernels/sealong_kernels/_C<ext-suffix>, next to this file
    python -m sealong_kernels.cuda_build --out-dir /tmp --arch "8.0;9.0+PTX"
    TORCH_CUDA_ARCH_LIST="8.6 8.9" python -m sealong_kernels.cuda_build

Architectures: `--arch`, else $TORCH_CUDA_ARCH_LIST (torch's format: "8.0;9.0+PTX", ';' or spaces, "+PTX" also
embeds PTX that newer GPUs compile at load time), else DEFAULT_ARCHS = sm_80 (A100) + sm_90 (H100 / H200) +
compute_90 PTX (Blackwell and later JIT it). A cubin for X.Y runs on X.Y' >= X.Y of the same major only, so an
sm_90-only build fails on an A100 and a build without PTX fails on a B200; `sealong_kernels.mbr` then falls
back to Triton with a one-line warning.

The module's functions take raw device pointers and a CUDA stream handle, so compiling it needs only nvcc,
pybind11's headers and Python's headers (about 12 s per architecture). It imports on a machine without a GPU (the
CUDA runtime is linked statically); calling a kernel there raises RuntimeError. `pip install -e .` on a
machine with CUDA torch builds the same sources through setup.py instead.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

DEFAULT_ARCHS = "8.0;9.0+PTX"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")  # the repo's csrc/


def nvcc_path():
    """nvcc from PATH or $CUDA_HOME/bin, else None."""
    found = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if found is None and cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        found = os.path.join(cuda_home, "bin", "nvcc")
    return found


def arch_list(spec=None):
    """Architectures to build, as torch's TORCH_CUDA_ARCH_LIST entries ("8.0", "9.0a", "9.0+PTX"): `spec` (that
    format, ';' or whitespace separated; a bare "90" means "9.0"), else $TORCH_CUDA_ARCH_LIST when set, else
    DEFAULT_ARCHS. Raises ValueError naming an entry it cannot read (e.g. torch's named "Ampere")."""
    spec = spec if spec is not None else (os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    out = []
    for entry in re.split(r"[;\s]+", str(spec).strip()):
        if re.fullmatch(r"\d\d\d?", entry):
            entry = f"{entry[:-1]}.{entry[-1]}"
        if not _ARCH.match(entry):
            raise ValueError(f"CUDA architecture {entry!r} (from {spec!r}): expected entries like 8.0, 9.0a or 9.0+PTX")
        out.append(entry)
    if not out:
        raise ValueError(f"no CUDA architecture in {spec!r}")
    return out


def gencode_flags(archs):
    """nvcc -gencode flags: a cubin (sm_XY) per entry, plus the PTX (compute_XY) for "+PTX" entries."""
    flags = []
    for entry in archs:
        major, minor, suffix, ptx = _ARCH.match(entry).groups()
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def build(out_dir=None, arch=None, csrc=CSRC, verbose=False):
    """Compile every csrc/*.cu and *.cpp into <out_dir>/_C<EXT_SUFFIX> for the architectures `arch_list(arch)`;
    return its path. Atomic: the module appears only when the compile succeeded. Raises RuntimeError with
    nvcc's output on failure."""
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
        *gencode_flags(arch_list(arch)),
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
    parser.add_argument("--arch", default=None, help="architectures, e.g. '8.0;9.0+PTX' (default: $TORCH_CUDA_ARCH_LIST, "
                        f"else {DEFAULT_ARCHS!r})")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.arch, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
