"""Tile tables of the attention kernels, chosen from real ahead-of-time compiles (no GPU needed to read them).

A tile is (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M always runs along queries and BLOCK_N along keys:
the forward and dQ kernels keep a [BLOCK_M, D] query tile resident and stream key blocks; the dK/dV kernel keeps
a [BLOCK_N, D] key tile resident and streams query blocks.

`TILES[(kind, arch)][block_d]` lists, per kernel kind, compute capability table (90: H100 / H200, 80: A100 and
every other GPU) and head-dim block, the tiles the launcher may run: the first of `CANDIDATES[kind]` (larger tiles
first: fewer passes over the streamed operand) that `ptxas -v` reported free of spill stores and loads for sm_90
or sm_80 under both Triton 3.6 (the GPU machines') and Triton 3.9, compiled with a real launch's alignment
specialization and the packed-training flags (`TRITON_INTERPRET=0 python -m bench.compile_report --candidates`
compiles every candidate). `BOUNDED` names the entries without a spill-free candidate and their spill bound.
`SHARED[(kind, arch, block_d, 2, tile)]` is the `metadata.shared` the compile report recorded (the largest over
its flag sets and the two Tritons): the launcher checks it against the device's per-block limit.

Every launchable tile is in the committed compile reports, bench/results/compile_<date>_triton-<v>.json
(`TRITON_INTERPRET=0 python -m bench.compile_report` under each Triton), which tests/kernels/test_compile_report.py
checks: zero spills at head dims 64 and 128, shared memory within 227 KB (sm_90) / 163 KB (sm_80).
"""

# every tile the compile report tries, per kernel kind (largest first)
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    "dq": [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}
MAX_TILES = 1  # launchable tiles per (kind, arch, head dim); with more, the launcher measures them and caches the best
KINDS = tuple(CANDIDATES)
ARCHS = (90, 80)  # tables per compute capability; other GPUs use the sm_80 table (see `table_arch`)
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)  # BLOCK_D = max(16, next power of two of the head dim)

# (kind, arch) -> {BLOCK_D: [tiles, best first]}: the first candidate free of spills in every compile tried
TILES = {
    ("fwd", 90): {64: [(128, 64, 8, 3)], 128: [(128, 64, 8, 3)], 256: [(64, 32, 4, 2)]},
    ("fwd", 80): {64: [(64, 32, 4, 2)], 128: [(128, 64, 8, 3)], 256: [(32, 32, 4, 2)]},
    ("dq", 90): {64: [(128, 32, 8, 2)], 128: [(128, 32, 8, 2)], 256: [(128, 32, 8, 2)]},
    ("dq", 80): {64: [(128, 32, 8, 2)], 128: [(128, 32, 8, 2)], 256: [(32, 32, 4, 2)]},
    ("dkdv", 90): {64: [(64, 64, 8, 2)], 128: [(32, 64, 8, 2)], 256: [(16, 32, 4, 2)]},
    ("dkdv", 80): {64: [(32, 32, 4, 2)], 128: [(32, 64, 8, 2)], 256: [(16, 32, 4, 2)]},
}
# (kind, arch, BLOCK_D, 2, tile) -> bytes of shared memory, the largest in bench/results/compile_2026-12-01_triton-*.json
SHARED = {
    ('dkdv', 80, 64, 2, (32, 32, 4, 2)): 18944,
    ('dkdv', 80, 128, 2, (32, 64, 8, 2)): 53760,
    ('dkdv', 80, 256, 2, (16, 32, 4, 2)): 53504,
    ('dkdv', 90, 64, 2, (64, 64, 8, 2)): 50688,
    ('dkdv', 90, 128, 2, (32, 64, 8, 2)): 66048,
    ('dkdv', 90, 256, 2, (16, 32, 4, 2)): 53504,
    ('dq', 80, 64, 2, (128, 32, 8, 2)): 45312,
    ('dq', 80, 128, 2, (128, 32, 8, 2)): 86272,
    ('dq', 80, 256, 2, (32, 32, 4, 2)): 69888,
    ('dq', 90, 64, 2, (128, 32, 8, 2)): 49408,
    ('dq', 90, 128, 2, (128, 32, 8, 2)): 98560,
    ('dq', 90, 256, 2, (128, 32, 8, 2)): 196864,
    ('fwd', 80, 64, 2, (64, 32, 4, 2)): 16640,
    ('fwd', 80, 128, 2, (128, 64, 8, 3)): 99328,
    ('fwd', 80, 256, 2, (32, 32, 4, 2)): 51456,
    ('fwd', 90, 64, 2, (128, 64, 8, 3)): 66560,
    ('fwd', 90, 128, 2, (128, 64, 8, 3)): 132096,
    ('fwd', 90, 256, 2, (64, 32, 4, 2)): 98560,
}
# (kind, arch, BLOCK_D) -> (tile, spill bytes per thread): no spill-free candidate, the least-spilling one and its
# worst spill over both Tritons and both flag sets in the same reports (dK/dV keeps [BLOCK_N, 256] dK and dV in
# float32 registers plus K and V)
BOUNDED = {("dkdv", 90, 256): ((16, 32, 4, 2), 48), ("dkdv", 80, 256): ((16, 32, 4, 2), 56)}


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
    """The tiles the launcher may run for this kernel kind ("fwd", "dq", "dkdv"), head dim, dtype and arch, best first.

    Head dims up to 64 use the head-dim-64 table (their registers and shared memory are at most its own). float32
    (tests and GPU checks only) gets the 16-bit tiles whose recorded shared memory, doubled, fits. With
    `shared_limit` (the device's per-block bytes) tiles whose recorded shared memory exceeds it are dropped.
    """
    if kind not in CANDIDATES:
        raise ValueError(f"attention tiles: kind must be one of {KINDS}, got {kind!r}")
    arch = table_arch(arch)
    block_d = max(64, block_d_of(head_dim))
    if block_d > 256:
        raise ValueError(f"attention tiles: head dim {head_dim} is not supported (at most 256)")
    scale = elem_bytes_of(dtype) // 2
    tiles = TILES.get((kind, arch), {}).get(block_d, [])
    if shared_limit is not None or scale > 1:
        limit = shared_limit if shared_limit is not None else {90: 227 * 1024, 80: 163 * 1024}[arch]
        tiles = [t for t in tiles if SHARED.get((kind, arch, block_d, 2, t), 0) * scale <= limit]
    return list(tiles)


def recorded_shared(kind, head_dim, dtype, tile, arch=90):
    """metadata.shared of this tile's compile (bytes), scaled for float32; None when it was never compiled."""
    block_d = max(64, block_d_of(head_dim))
    shared = SHARED.get((kind, table_arch(arch), block_d, 2, tuple(tile)))
    return None if shared is None else shared * (elem_bytes_of(dtype) // 2)
