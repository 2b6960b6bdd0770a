"""Ahead-of-time compiles of `@triton.jit` kernels for a GPU this machine does not have, and ptxas' statistics.

Triton compiles from `ASTSource` for any `GPUTarget` down to PTX and a cubin with the ptxas it bundles, so the
registers, spills and shared memory of the real kernel are known without a GPU. Two things make the numbers
those of a real launch:

* the alignment specialization: a launch marks every pointer argument whose address is a multiple of 16 (all
  of torch's allocations at offset 0) and every integer argument that is a multiple of 16 with
  `tt.divisibility = 16`; without it Triton emits scalar loads and no cp.async / TMA pipeline, and the
  shared-memory figure is a fraction of the real one;
* the same options (num_warps, num_stages) and constexprs the launcher passes;
* the statistics of the cubin Triton itself builds: `ptxas -v` output of Triton's own ptxas call (its log,
  `knobs.nvidia.dump_ptxas_log`), not of a second ptxas run. Triton 3.9 passes `--regAllocOptLevel=2`, which
  allocates registers differently: a plain `ptxas -v` of the same PTX reported 168 registers and 28 B of spills
  for a dK/dV tile whose real cubin has 177 registers and none (the reports before this were made that way).

`compile_stats` returns registers per thread, spill stores / loads (bytes per thread), the stack frame, the
shared memory the compiled kernel allocates (`metadata.shared`, what a launch requests), the software pipeline
of every main loop as the TTGIR shows it (`loop_structure`: per innermost loop with a dot, the buffers of its
multi-buffered operand tiles and its async waits) and the wgmma shapes of the PTX (`wgmma_shapes`). Needs real Triton
functions: run it with TRITON_INTERPRET=0 (`bench/__init__.py` keeps an explicit 0), e.g. in a subprocess of an
interpreted test session.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per-block opt-in maximum (A100, H100 / H200)
PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_LINE = re.compile(r"Used (\d+) registers")


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (Triton 3.9 uses its newer `ptxas-blackwell` from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except ImportError:  # Triton 3.6: one bundled ptxas
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(fn, arg_types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 2, divisible_ints: tuple = (), unaligned: tuple = ()):
    """Compile `fn` as a launch with these arguments would.

    arg_types: every non-constexpr argument's Triton type ("*fp16", "*fp32", "*i32", "i32", "i64", "fp32").
    constexprs: name -> value. Pointers are 16-byte aligned unless named in `unaligned`; integer arguments named
    in `divisible_ints` are marked multiples of 16 (what a launch does when their value is).
    """
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in arg_types:
            raise KeyError(f"{fn.__name__}: no type for argument {name!r}")
        signature[name] = arg_types[name]
        aligned = (arg_types[name].startswith("*") and name not in unaligned) or name in divisible_ints
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    log = io.StringIO()
    # always compile (a cached kernel runs no ptxas, so there is no log) and print ptxas' -v log
    with knobs_set(always_compile=True, dump_ptxas_log=True), contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    kernel.ptxas_log = log.getvalue()
    return kernel


@contextlib.contextmanager
def knobs_set(always_compile: bool, dump_ptxas_log: bool):
    """Triton's compile knobs set for the block, restored after."""
    from triton import knobs

    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = always_compile, dump_ptxas_log
    try:
        yield
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def ptxas_stats(kernel, arch: int) -> dict:
    """Registers, spills and stack of the kernel's cubin, from the `ptxas -v` log of Triton's own ptxas call
    (`compile_kernel`), so with Triton's ptxas options."""
    out = kernel.ptxas_log
    frame = PTXAS_LINE.search(out)
    regs = REGS_LINE.search(out)
    if frame is None or regs is None:
        raise RuntimeError(f"unexpected ptxas -v log of Triton's compile for sm_{arch}:\n{out}")
    return dict(registers=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)))


SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
SASS_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")
LOCAL_MEMORY = re.compile(r"^(?:@!?U?P\w+\s+)?(?:STL|LDL)\b")


def local_memory_sites(cubin: bytes, arch: int) -> dict:
    """Where a compiled kernel reads and writes local memory (the spill slots: STL / LDL in its SASS, from the
    nvdisasm bundled beside ptxas): inside a loop (the address range of a backward branch, a main loop of the
    kernel) or outside every loop (a prologue or an epilogue, run once per program).

    Returns {"local_in_loops": n, "local_outside": m, "sass_loops": k}. A spill outside the loops costs a few
    memory operations per program; one inside a main loop costs them per key (or query) block."""
    nvdisasm = os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    return sass_local_sites(sass)


def sass_local_sites(sass: str) -> dict:
    """`local_memory_sites` of a disassembly (nvdisasm's text): loops are the ranges [target, branch] of the
    branches whose target label lies at or before them."""
    labels, pending, code = {}, [], []
    for line in sass.splitlines():
        label = SASS_LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        ins = SASS_INSTRUCTION.search(line)
        if ins:
            addr = int(ins.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            code.append((addr, ins.group(2).strip()))
    loops = []
    for addr, text in code:
        branch = SASS_BRANCH.search(text)
        if branch and labels.get(branch.group(1), addr + 1) <= addr:
            loops.append((labels[branch.group(1)], addr))
    local = [addr for addr, text in code if LOCAL_MEMORY.match(text)]
    inside = sum(any(lo <= a <= hi for lo, hi in loops) for a in local)
    return dict(local_in_loops=inside, local_outside=len(local) - inside, sass_loops=len(loops))


MEMDESC_INDEX = re.compile(r"ttg\.memdesc_(?:index|subview)\b.*?:\s*!ttg\.memdesc<((?:\d+x)+)")
ASYNC_WAIT = re.compile(r"ttg\.async_wait\b.*?\{num = (\d+)")
DOT_OP = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b")
WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)")


def loop_structure(ttgir: str) -> list:
    """The main loops of a compiled kernel (innermost `scf.for` with a matrix product), in program order, each
    {"buffers": b, "waits": [...]}: b is the fewest buffers among the multi-buffered operand tiles the loop
    indexes (shared-memory allocations of rank >= 3, [buffers, rows, cols]; 1 when it indexes none, i.e. its tiles
    are loaded synchronously), so a loop pipelined `num_stages` deep shows b = num_stages; waits are the `num` of
    its `ttg.async_wait` ops (0 at the top of every iteration: each copy is waited for before use)."""
    loops, stack = [], []
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append(dict(depth=0, inner=False, dot=False, bufs=[], waits=[]))
        if stack:
            top = stack[-1]
            m = MEMDESC_INDEX.search(line)
            if m and m.group(1).count("x") >= 3:
                top["bufs"].append(int(m.group(1).split("x")[0]))
            top["waits"] += [int(w) for w in ASYNC_WAIT.findall(line)]
            top["dot"] = top["dot"] or bool(DOT_OP.search(line))
            top["depth"] += line.count("{") - line.count("}")
            if top["depth"] <= 0:
                loop = stack.pop()
                if stack:
                    stack[-1]["inner"] = True
                    stack[-1]["dot"] = stack[-1]["dot"] or loop["dot"]
                if not loop["inner"] and loop["dot"]:
                    loops.append(dict(buffers=min(loop["bufs"]) if loop["bufs"] else 1, waits=loop["waits"]))
    return loops


def wgmma_shapes(ptx: str) -> dict:
    """{"m64n128k16": count, ...}: the wgmma instructions of the PTX by shape (empty before sm_90)."""
    shapes = {}
    for shape in WGMMA.findall(ptx):
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def compile_stats(fn, arg_types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4, num_stages: int = 2,
                  divisible_ints: tuple = (), unaligned: tuple = ()) -> dict:
    """compile_kernel + ptxas_stats + the shared memory the compiled kernel requests, as one JSON-able dict."""
    kernel = compile_kernel(fn, arg_types, constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages,
                            divisible_ints=divisible_ints, unaligned=unaligned)
    stats = ptxas_stats(kernel, arch)
    if stats["spill_stores"] or stats["spill_loads"]:  # where the spill slots are touched: in a loop or not
        stats.update(local_memory_sites(kernel.asm["cubin"], arch))
    stats.update(kernel=fn.__name__, arch=arch, num_warps=num_warps, num_stages=num_stages, shared=kernel.metadata.shared,
                 shared_limit=SHARED_LIMIT.get(arch), triton=triton.__version__,
                 loops=loop_structure(kernel.asm["ttgir"]), wgmma=wgmma_shapes(kernel.asm["ptx"]))
    return stats


_WORK: tuple = ()  # (func, items) of the fork_map call in progress: forked workers inherit it, nothing is pickled


def _work(i):
    func, items = _WORK
    return func(items[i])


def fork_map(func, items, workers=None) -> list:
    """[func(x) for x in items], over `workers` forked processes (default: the CPUs this process may use). For
    ahead-of-time compiles: each is one Triton frontend + ptxas run on one core, independent of the others, so
    the results are those of the serial loop, in less wall time. Needs no CUDA context (forks would not share it)."""
    import multiprocessing

    global _WORK
    items = list(items)
    workers = min(len(items), workers or len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [func(x) for x in items]
    _WORK = (func, items)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_work, range(len(items)), chunksize=1)
    finally:
        _WORK = ()


def compile_many(jobs, workers=None) -> list:
    """compile_stats of every (fn, arg_types, constexprs, options) in `jobs`, in that order (`fork_map`)."""
    return fork_map(lambda job: compile_stats(job[0], job[1], job[2], **job[3]), jobs, workers)
