"""The pipelined attention loops and the dtype / Triton-version fallbacks, on the CPU.

* The listed (block-plan) loops load step i + 1's block start one iteration ahead; with the GPU's 128 x 128 plan
  and tiles that split a plan block into several steps (run here under the interpreter) the result still equals
  the float64 reference across plan-block boundaries.
* Triton 3.6's interpreter converts a loop bound computed in the kernel with int(array), which NumPy >= 2.4
  refuses; `sealong_kernels.runtime` makes it squeeze first, as later Tritons do (CI runs this file under 3.6).
* A dtype / head dim without a clean compiled tile (float32 at head dim 256) runs the reference path on a GPU.
"""

import torch
import triton
import triton.language as tl

from sealong_kernels import attention as attn
from sealong_kernels import runtime  # noqa: F401 (installs the interpreter compatibility patch)

from test_flash_attention import check, preference_segments, rand_qkv


@triton.jit
def _loop_over_loaded_bound(Counts, Out):
    pid = tl.program_id(0)
    n = tl.load(Counts + pid)  # a scalar the interpreter holds as a shape-(1,) array
    acc = tl.zeros([], dtype=tl.int32)
    for i in range(pid, pid + n):  # bounds from program_id and a load
        acc += i
    tl.store(Out + pid, acc)


def test_interpreter_takes_loop_bounds_computed_in_the_kernel():
    counts = torch.tensor([3, 0, 5], dtype=torch.int32)
    out = torch.full((3,), -1, dtype=torch.int32)
    _loop_over_loaded_bound[(3,)](counts, out)
    assert out.tolist() == [0 + 1 + 2, 0, 2 + 3 + 4 + 5 + 6]


def test_listed_loops_cross_plan_blocks_with_gpu_plan_and_tiles(monkeypatch):
    """128 x 128 plan blocks (the GPU's), tiles of 32 / 64 rows: every listed loop takes 2-4 steps per plan block
    and the prefetched start crosses plan blocks and the end of the list."""
    tiles = {"fwd": [(32, 64, 4, 3)], "dq": [(64, 32, 4, 3)], "dkdv": [(32, 64, 4, 3)]}
    monkeypatch.setattr(attn, "_tiles_for", lambda kind, *a: tiles[kind])
    monkeypatch.setattr(attn, "_device_arch", lambda dev: 90)
    monkeypatch.setattr(attn, "_TUNED", {})
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    seg = preference_segments(150, 70, 57, "cpu")  # 277 tokens: 3 plan blocks, a partial last one
    check(*rand_qkv(277, 277, 2, 1, 16, torch.float32, "cpu"), causal=True, segment_ids=seg)


def test_float32_without_a_clean_tile_falls_back_to_the_reference():
    assert attn.without_tile(("fwd",), 256, torch.float32, 90)  # every float32 compile spills at 256
    assert attn.without_tile(("dkdv", "dq"), 256, torch.float32, 80)
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128, 256):
            for arch in (90, 80):
                assert not attn.without_tile(("fwd", "dq", "dkdv"), d, dtype, arch), (d, dtype, arch)
    assert not attn.without_tile(("fwd",), 512, torch.float32, 90)  # unsupported: the input check says so
