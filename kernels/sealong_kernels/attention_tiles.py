"""Tile tables of the attention kernels, chosen from real ahead-of-time compiles (no GPU needed to read them).

A tile is (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M always runs along queries and BLOCK_N along keys:
the forward and dQ kernels keep a [BLOCK_M, D] query tile resident and stream key blocks; the dK/dV kernel keeps
a [BLOCK_N, D] key tile resident and streams query blocks.

`TILES[(kind, arch, elem)][block_d]` lists, per kernel kind, compute capability table (90: H100 / H200, 80: A100
and every other GPU), element bytes (2: float16 / bfloat16, 4: float32) and head-dim block, the tile the
launcher runs: among the candidates (`CANDIDATES`, `FP32_CANDIDATES`) that `ptxas -v` (Triton's own ptxas call,
with its options: bench/aot.py) reported free of spill stores and loads, within the shared-memory limit and pipelined (>= 3 buffers in every main loop of the TTGIR)
for that arch under both Triton 3.6 (the GPU machines') and Triton 3.9, compiled with a real launch's alignment
specialization and the packed-training flags (`TRITON_INTERPRET=0 python -m bench.compile_report --candidates`),
and clean in the full reports' other flag sets and length alignments too, the one with the best `cost_model`
score (`python -m bench.compile_report --table` prints it; `REJECTED` names the candidates a full report showed
spilling, with the measured bytes). `BOUNDED` names the 16-bit entries without a clean candidate (head dim
256 only) and their spill bound; a float32 entry without a clean candidate is absent, and the launcher then runs
the reference path (`launchable_tiles` returns []). `SHARED[(kind, arch, block_d, elem, tile)]` is the
`metadata.shared` recorded (the largest over the Tritons): the launcher checks it against the device's limit.

Every launchable tile is in the committed compile reports, bench/results/compile_<date>_triton-<v>.json
(`TRITON_INTERPRET=0 python -m bench.compile_report` under each Triton), which tests/kernels/test_compile_report.py
checks: zero spills at head dims 64 and 128 (also with lengths that are not multiples of 16), every spill at 256
within `BOUNDED` (the ring's accumulating variants too), >= 3 buffers in
every main loop, shared memory within 227 KB (sm_90) / 163 KB (sm_80), no m64n16 wgmma in dK/dV at head dim 128.
"""

# every tile the compile report tries, per (kernel kind, arch), 16-bit inputs. All pipelined: num_stages 3 where
# the tile runs wgmma (sm_90, 64 or more rows: it reads its operands from the copy buffers, 3 buffers) and 4 where
# it runs mma.sync (sm_80, and sm_90 tiles under 64 rows: the operands go to registers one stage before use, so
# 4 stages give 3 copy buffers and 3 give 2)
CANDIDATES = {
    ("fwd", 90): [(128, 64, 8, 3), (64, 32, 4, 3)],
    ("dq", 90): [(128, 32, 8, 3), (64, 32, 4, 3)],
    ("dkdv", 90): [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (32, 32, 8, 4), (32, 32, 4, 4),
                   (16, 32, 8, 4), (16, 32, 4, 4)],
    ("fwd", 80): [(128, 64, 8, 4), (64, 32, 4, 4), (32, 32, 4, 4)],
    ("dq", 80): [(128, 32, 8, 4), (64, 32, 4, 4), (32, 32, 4, 4)],
    ("dkdv", 80): [(32, 64, 8, 4), (32, 64, 4, 4), (32, 32, 4, 4), (16, 32, 4, 4)],
}
# float32 inputs (IEEE products on CUDA cores; tests and GPU checks), head dims up to 128; where no candidate
# compiles clean (and at head dim 256) the launcher runs the reference path instead (`launchable_tiles` -> [])
FP32_CANDIDATES = {key: [(16, 32, 4, 4)] for key in CANDIDATES}
FP32_HEAD_DIMS = (64, 128)
MAX_TILES = 1  # launchable tiles per (kind, arch, head dim); with more, the launcher measures them and caches the best
KINDS = ("fwd", "dq", "dkdv")
ARCHS = (90, 80)  # tables per compute capability; other GPUs use the sm_80 table (see `table_arch`)
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)  # BLOCK_D = max(16, next power of two of the head dim)

# (kind, arch, elem) -> {BLOCK_D: [tile]}: the best-scoring clean candidate (see the module docstring)
TILES = {
    ('dkdv', 80, 2): {64: [(32, 32, 4, 4)], 128: [(16, 32, 4, 4)], 256: [(16, 32, 4, 4)]},
    ('dkdv', 90, 2): {64: [(32, 128, 8, 3)], 128: [(32, 32, 8, 4)], 256: [(16, 32, 8, 4)]},
    ('dkdv', 90, 4): {64: [(16, 32, 4, 4)]},
    ('dq', 80, 2): {64: [(128, 32, 8, 4)], 128: [(64, 32, 4, 4)], 256: [(32, 32, 4, 4)]},
    ('dq', 80, 4): {64: [(16, 32, 4, 4)], 128: [(16, 32, 4, 4)]},
    ('dq', 90, 2): {64: [(128, 32, 8, 3)], 128: [(128, 32, 8, 3)], 256: [(128, 32, 8, 3)]},
    ('dq', 90, 4): {64: [(16, 32, 4, 4)]},
    ('fwd', 80, 2): {64: [(128, 64, 8, 4)], 128: [(128, 64, 8, 4)], 256: [(32, 32, 4, 4)]},
    ('fwd', 80, 4): {64: [(16, 32, 4, 4)], 128: [(16, 32, 4, 4)]},
    ('fwd', 90, 2): {64: [(128, 64, 8, 3)], 128: [(128, 64, 8, 3)], 256: [(64, 32, 4, 3)]},
}
# (kind, arch, BLOCK_D, elem, tile) -> bytes of shared memory, the largest in the candidate files and full
# reports bench/results/compile_2026-12-08_[candidates_]triton-{3.6.0,3.9.0}.json
SHARED = {
    ('dkdv', 80, 64, 2, (32, 32, 4, 4)): 28160,
    ('dkdv', 80, 128, 2, (16, 32, 4, 4)): 35584,
    ('dkdv', 80, 256, 2, (16, 32, 4, 4)): 70400,
    ('dkdv', 90, 64, 2, (32, 128, 8, 3)): 58368,
    ('dkdv', 90, 64, 4, (16, 32, 4, 4)): 43776,
    ('dkdv', 90, 128, 2, (32, 32, 8, 4)): 54784,
    ('dkdv', 90, 256, 2, (16, 32, 8, 4)): 70400,
    ('dq', 80, 64, 2, (128, 32, 8, 4)): 54016,
    ('dq', 80, 64, 4, (16, 32, 4, 4)): 60160,
    ('dq', 80, 128, 2, (64, 32, 4, 4)): 68352,
    ('dq', 80, 128, 4, (16, 32, 4, 4)): 117504,
    ('dq', 80, 256, 2, (32, 32, 4, 4)): 103168,
    ('dq', 90, 64, 2, (128, 32, 8, 3)): 57856,
    ('dq', 90, 64, 4, (16, 32, 4, 4)): 60160,
    ('dq', 90, 128, 2, (128, 32, 8, 3)): 115200,
    ('dq', 90, 256, 2, (128, 32, 8, 3)): 229888,
    ('fwd', 80, 64, 2, (128, 64, 8, 4)): 67072,
    ('fwd', 80, 64, 4, (16, 32, 4, 4)): 56128,
    ('fwd', 80, 128, 2, (128, 64, 8, 4)): 132608,
    ('fwd', 80, 128, 4, (16, 32, 4, 4)): 109312,
    ('fwd', 80, 256, 2, (32, 32, 4, 4)): 117504,
    ('fwd', 90, 64, 2, (128, 64, 8, 3)): 66560,
    ('fwd', 90, 128, 2, (128, 64, 8, 3)): 132096,
    ('fwd', 90, 256, 2, (64, 32, 4, 3)): 131584,
}
# (kind, arch, BLOCK_D) -> (tile, spill bytes per thread): 16-bit entries without a clean candidate, the
# pipelined one least spilling, and its worst spill over both Tritons, every flag set (the ring's accumulating
# variants included) and both length alignments (`python -m bench.compile_report --table`). The dK/dV spills are
# in its main loop too (`local_in_loops` in the reports: the SASS's local-memory instructions inside loops).
BOUNDED = {
    ("dkdv", 80, 256): ((16, 32, 4, 4), 264),  # fp16 plain causal, ring variant, Triton 3.6
    ("fwd", 90, 256): ((64, 32, 4, 3), 4),  # the ring's flag set without accumulation, Triton 3.9
}
# (kind, arch, elem, BLOCK_D, tile) -> why not: candidates clean in the candidate files (bf16, all flags on) that
# spilled in a full report's other flag sets or alignments (2026-12-07, both Tritons), so the table skips them;
# at head dim 256, candidates never compiled in the other flag sets lose to the measured bound of BOUNDED
REJECTED = {
    ("dkdv", 90, 2, 128, (32, 64, 8, 3)): "fp16 plain causal: 12-48 B aligned, 36-200 B unaligned; 64 m64n16k16 wgmma",
    ("dkdv", 90, 2, 128, (32, 32, 4, 4)): "fp16 plain causal, unaligned lengths: 40-48 B",
    ("dkdv", 80, 2, 128, (32, 64, 8, 4)): "fp16 plain causal: 8-32 B",
    ("dkdv", 80, 2, 128, (32, 32, 4, 4)): "fp16 plain causal: 60-184 B",
    ("dq", 90, 4, 128, (16, 32, 4, 4)): "float32 plain causal: 400 B (Triton 3.9)",
    ("dkdv", 80, 4, 64, (16, 32, 4, 4)): "float32 plain causal: 24-36 B",
    ("dkdv", 90, 2, 256, (32, 32, 4, 4)): "only its bf16 plan path compiled (208-216 B)",
    ("dkdv", 90, 2, 256, (32, 32, 8, 4)): "fp16 plain causal: 16 / 20 B, accumulating 24 / 32 B (Triton 3.6 / 3.9, "
                                          "2026-12-08)",
    ("dkdv", 80, 2, 256, (32, 64, 8, 4)): "only its bf16 plan path compiled (208 B)",
}
SM_SHARED = {90: 228 * 1024, 80: 164 * 1024}  # shared memory per SM (all resident blocks together)
SM_REGISTERS = 65536


def cost_model(kind, arch, tile, registers, shared, wgmma):
    """The score that orders clean tiles (higher is better): mma x reuse x occupancy, each in (0, 1].

    * mma: on sm_90, min over the kernel's wgmma shapes m64nNk16 of min(1, N / 64). Every wgmma reads a 64 x 16
      A tile and a 16 x N B tile from shared memory; below N = 64 the bytes read per multiply-add grow as 1 / N
      and the tensor cores wait on shared memory (m64n16: about a quarter of peak). 0.5 on sm_90 without wgmma
      (mma.sync reaches about half of Hopper's wgmma peak: FlashAttention-2 vs -3 on H100); 1 on sm_80.
    * reuse: min(1, R / 128), R the resident rows (BLOCK_M queries for fwd / dQ, BLOCK_N keys for dK/dV): each
      streamed tile is loaded once per R resident rows, so the streamed bytes per flop go as 1 / R (FlashAttention
      2 / 3 keep 128).
    * occupancy: min(1, W / 8), W the warps resident per SM, blocks per SM limited by registers (64K per SM) and
      shared memory (228 KB sm_90, 164 KB sm_80): 8 warps (two warp groups) keep the tensor cores fed while one
      waits on a copy or the softmax.
    """
    bm, bn, warps, _ = tile
    mma = 1.0
    if arch == 90:
        mma = min(min(1.0, int(shape.split("n")[1].split("k")[0]) / 64) for shape in wgmma) if wgmma else 0.5
    resident = bn if kind == "dkdv" else bm
    reuse = min(1.0, resident / 128)
    blocks = min(SM_REGISTERS // max(1, registers * 32 * warps), SM_SHARED[table_arch(arch)] // max(1, shared))
    occupancy = min(1.0, blocks * warps / 8)
    return dict(mma=mma, reuse=reuse, occupancy=occupancy, score=round(mma * reuse * occupancy, 4))


def table_arch(capability):
    """The table serving a device of this compute capability (major * 10 + minor): 90 for Hopper, else 80."""
    return 90 if capability == 90 else 80


def block_d_of(head_dim):
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def elem_bytes_of(dtype):
    """2 for float16 / bfloat16 (str or torch dtype), 4 for float32."""
    name = str(dtype).replace("torch.", "")
    if name in ("float16", "bfloat16", "fp16", "bf16"):
        return 2
    if name in ("float32", "fp32"):
        return 4
    raise ValueError(f"attention tiles: unsupported dtype {dtype!r}")


def launchable_tiles(kind, head_dim, dtype, arch=90, shared_limit=None):
    """The tiles the launcher may run for this kernel kind ("fwd", "dq", "dkdv"), head dim, dtype and arch, best
    first; [] when none compiled clean (float32 at large head dims: the caller falls back to the reference).

    Head dims up to 64 use the head-dim-64 table (their registers and shared memory are at most its own). With
    `shared_limit` (the device's per-block bytes) tiles whose recorded shared memory exceeds it are dropped.
    """
    if kind not in KINDS:
        raise ValueError(f"attention tiles: kind must be one of {KINDS}, got {kind!r}")
    arch = table_arch(arch)
    block_d = max(64, block_d_of(head_dim))
    if block_d > 256:
        raise ValueError(f"attention tiles: head dim {head_dim} is not supported (at most 256)")
    elem = elem_bytes_of(dtype)
    tiles = TILES.get((kind, arch, elem), {}).get(block_d, [])
    if shared_limit is not None:
        tiles = [t for t in tiles if SHARED.get((kind, arch, block_d, elem, t), 0) <= shared_limit]
    return list(tiles)


def recorded_shared(kind, head_dim, dtype, tile, arch=90):
    """metadata.shared of this tile's compile (bytes); None when it was never compiled."""
    block_d = max(64, block_d_of(head_dim))
    return SHARED.get((kind, table_arch(arch), block_d, elem_bytes_of(dtype), tuple(tile)))
