"""The ring's in-place accumulation: the forward op merges a block into the float32 (out, lse) accumulators in its
epilogue and the backward op adds a block's gradients into the given dq / dk / dv, so a ring step allocates no
tensor per block (before: a fresh float32 partial (out, lse) per block merged by a separate kernel, fresh dq / dk /
dv per block added afterwards).

Bounds, relative error ||x - ref|| / ||ref|| against the float64 reference (`reference.attention_forward` /
`attention_backward` over all keys at once): float32 inputs on the Triton kernels under the interpreter < 1e-5
(round-off of a few float32 merges is ~1e-7); float64 inputs on the reference path < 1e-12.
"""

import pytest
import torch

from bench.op_counts import OpCounter, count_launches
from sealong_kernels import attention, reference
from sealong_kernels.attention import triton_available
from sealong_kernels.ring import (
    Block, attend_step, attend_step_backward, attention_ops, simulate_ring, step_plans,
)

pytestmark = pytest.mark.skipif(not triton_available(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 on CPU")

TOL32, TOL64 = 1e-5, 1e-12


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def segments(t):
    p, c = t // 2, (t - t // 2) // 2
    return torch.tensor([0] * p + [1] * c + [2] * (t - p - c), dtype=torch.int32)


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "triton"), (torch.float64, "reference")])
@pytest.mark.parametrize("seg", [False, True])
def test_forward_op_merges_key_blocks_into_accumulator_views(dtype, backend, seg):
    """Keys split in two blocks (odd sizes, GQA, causal offsets so that some rows see no key of the first block),
    each merged into views of a larger accumulator (lse rows strided by the larger length): the result equals
    attention over all keys; the rows outside the views are untouched."""
    torch.manual_seed(0)
    tq, tk1, tk2, hq, hkv, d = 13, 11, 9, 4, 2, 24
    q = torch.randn(tq, hq, d, dtype=dtype)
    k, v = torch.randn(tk1 + tk2, hkv, d, dtype=dtype), torch.randn(tk1 + tk2, hkv, d, dtype=dtype)
    kseg = segments(tk1 + tk2) if seg else None
    qseg = segments(tq) if seg else None
    q_start, k_start = 7, 3  # query i at 7 + i sees key j at 3 + j when j <= i + 4
    fwd, _ = attention_ops(q.device, backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    big_out = torch.full((tq + 5, hq, d), 7.0, dtype=acc)
    big_lse = torch.full((hq, tq + 5), 7.0, dtype=acc)
    out, lse = big_out[2:2 + tq], big_lse[:, 2:2 + tq]
    out.zero_()
    lse.fill_(float("-inf"))
    for lo, hi in ((tk1, tk1 + tk2), (0, tk1)):  # the later keys first: rows empty in it stay (0, -inf) until merged
        res = fwd(q, k[lo:hi], v[lo:hi], causal=True, q_start=q_start, k_start=k_start + lo, segment_ids=qseg,
                  k_segment_ids=None if kseg is None else kseg[lo:hi], accumulate=(out, lse))
        assert res[0] is out and res[1] is lse
    ref_out, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), causal=True, q_start=q_start,
                                                   k_start=k_start, segment_ids=qseg, k_segment_ids=kseg)
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert rel_err(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], ref_lse[finite]) < tol
    assert (big_out[:2] == 7).all() and (big_out[2 + tq:] == 7).all()
    assert (big_lse[:, :2] == 7).all() and (big_lse[:, 2 + tq:] == 7).all()


def test_forward_op_without_accumulator_is_unchanged():
    """The old call shape: a fresh (out, lse) in the requested dtype, equal to the reference."""
    torch.manual_seed(1)
    q, k, v = torch.randn(10, 2, 16), torch.randn(7, 1, 16), torch.randn(7, 1, 16)
    out, lse = attention.attention_forward(q, k, v, causal=True, q_start=5, k_start=0)
    ref_out, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), causal=True, q_start=5)
    assert out.dtype == torch.float32 and lse.shape == (2, 10)
    assert rel_err(out, ref_out) < TOL32 and rel_err(lse, ref_lse) < TOL32


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "triton"), (torch.float64, "reference")])
def test_backward_op_adds_into_given_gradient_views(dtype, backend):
    """Gradients added to views of larger buffers that already hold values: buffer = before + gradients."""
    torch.manual_seed(2)
    tq, tk, hq, hkv, d = 13, 11, 4, 2, 24
    q, dout = torch.randn(tq, hq, d, dtype=dtype), torch.randn(tq, hq, d, dtype=dtype)
    k, v = torch.randn(tk, hkv, d, dtype=dtype), torch.randn(tk, hkv, d, dtype=dtype)
    qseg, kseg = segments(tq), segments(tk)
    kw = dict(causal=True, q_start=4, k_start=0, segment_ids=qseg, k_segment_ids=kseg)
    out, lse = reference.attention_forward(q.double(), k.double(), v.double(), **kw)
    ref = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(), out, lse, **kw)
    _, bwd = attention_ops(q.device, backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    big_dq, big_dkv = torch.randn(tq + 3, hq, d, dtype=acc), torch.randn(2, tk + 4, hkv, d, dtype=acc)
    before_dq, before_dkv = big_dq.clone(), big_dkv.clone()
    views = (big_dq[1:1 + tq], big_dkv[0, 2:2 + tk], big_dkv[1, 2:2 + tk])
    res = bwd(dout, q, k, v, out.to(dtype), lse.to(acc), accumulate=views, **kw)
    assert all(a is b for a, b in zip(res, views))
    tol = TOL64 if dtype == torch.float64 else TOL32
    for view, before, grad in zip(views, (before_dq[1:1 + tq], before_dkv[0, 2:2 + tk], before_dkv[1, 2:2 + tk]), ref):
        assert rel_err(view - before, grad) < tol
    assert torch.equal(big_dq[0], before_dq[0]) and torch.equal(big_dkv[:, :2], before_dkv[:, :2])


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "triton"), (torch.float64, "reference")])
def test_backward_op_computes_only_the_parts_asked_for(dtype, backend):
    """accumulate=(dq, None, None) adds dq only and (None, dk, dv) dK/dV only (the ring's own shard, split in two):
    each equal to its part of the full call (float64 reference over all keys, bounds as above); on the Triton
    path each runs one kernel, the dQ or the dK/dV one; a half-named pair is refused."""
    torch.manual_seed(5)
    tq, tk, hq, hkv, d = 13, 11, 4, 2, 24
    q, dout = torch.randn(tq, hq, d, dtype=dtype), torch.randn(tq, hq, d, dtype=dtype)
    k, v = torch.randn(tk, hkv, d, dtype=dtype), torch.randn(tk, hkv, d, dtype=dtype)
    kw = dict(causal=True, q_start=4, k_start=0, segment_ids=segments(tq), k_segment_ids=segments(tk))
    out, lse = reference.attention_forward(q.double(), k.double(), v.double(), **kw)
    ref = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(), out, lse, **kw)
    _, bwd = attention_ops(q.device, backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = TOL64 if dtype == torch.float64 else TOL32
    dq, dk, dv = torch.zeros(tq, hq, d, dtype=acc), torch.zeros(tk, hkv, d, dtype=acc), torch.zeros(tk, hkv, d, dtype=acc)
    args = (dout, q, k, v, out.to(dtype), lse.to(acc))
    kw["delta"] = (dout.to(acc) * out.to(acc)).sum(-1).transpose(0, 1).contiguous()  # given, as the ring does
    with count_launches() as launches:
        res = bwd(*args, accumulate=(dq, None, None), **kw)
    assert res[0] is dq and res[1] is None and res[2] is None and rel_err(dq, ref[0]) < tol
    dq_kernels = list(launches)
    with count_launches() as launches:
        bwd(*args, accumulate=(None, dk, dv), **kw)
    assert rel_err(dk, ref[1]) < tol and rel_err(dv, ref[2]) < tol
    if backend == "triton":
        assert dq_kernels == ["_attn_bwd_dq_kernel"] and list(launches) == ["_attn_bwd_dkdv_kernel"], (dq_kernels, launches)
    for bad in ((None, dk, None), (dq, dk, None), (None, None, None)):
        with pytest.raises(ValueError, match="accumulate must be"):
            bwd(*args, accumulate=bad, **kw)


@pytest.mark.parametrize("world, causal, seg", [(2, True, True), (3, True, False), (3, False, True), (2, False, False)])
def test_simulated_ring_accumulating_in_place_matches_reference(world, causal, seg):
    """World 2 and 3, zigzag chunks of 5 tokens (odd), GQA, head dim 24: out, lse, dq, dk, dv against the
    float64 reference over the whole sequence; float32 on the Triton kernels, float64 on the reference path."""
    torch.manual_seed(3)
    t = 2 * world * 5
    base = dict(q=torch.randn(t, 4, 24), k=torch.randn(t, 2, 24), v=torch.randn(t, 2, 24), dout=torch.randn(t, 4, 24))
    sids = segments(t) if seg else None
    ref_out, ref_lse = reference.attention_forward(base["q"].double(), base["k"].double(), base["v"].double(),
                                                   causal=causal, segment_ids=sids)
    ref = (ref_out, ref_lse, *reference.attention_backward(
        base["dout"].double(), base["q"].double(), base["k"].double(), base["v"].double(), ref_out, ref_lse,
        causal=causal, segment_ids=sids))
    for dtype, backend, tol in ((torch.float32, "triton", TOL32), (torch.float64, "reference", TOL64)):
        x = {n: t_.to(dtype) for n, t_ in base.items()}
        got = simulate_ring(x["q"], x["k"], x["v"], world, causal=causal, segment_ids=sids, dout=x["dout"],
                            backend=backend)
        for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            if name == "lse":
                assert rel_err(g[torch.isfinite(r)], r[torch.isfinite(r)]) < tol, (dtype, name)
            else:
                assert rel_err(g, r) < tol, (dtype, name)


def _step_counts(blocks, seg):
    """(allocations, bytes allocated, launched kernels) of one forward and one backward ring step on the Triton
    kernels (interpreter) running `blocks` of 16 local queries against 16 keys: allocations made outside the kernel
    launches (the interpreter's own copies of the launch arguments are not a GPU launch's); the step's plans and the
    backward's lse / delta row copies made before (once per step / once per backward and query range)."""
    torch.manual_seed(4)
    t = 16
    q, dout = torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    k, v = torch.randn(t, 1, 16), torch.randn(t, 1, 16)
    qseg = segments(t) if seg else None
    fwd, bwd = attention_ops(q.device, "triton")
    plans = step_plans(blocks, fwd, qseg, qseg)
    out = torch.zeros(q.shape)
    lse = torch.full((2, t), float("-inf"))
    delta = torch.randn(2, t)
    dq, dkv = torch.zeros(q.shape), torch.zeros(2, *k.shape)
    attention._dummy(q.device)  # the placeholder pointer, made once per process and device
    counter = OpCounter()
    with count_launches(pause=counter) as launches, counter:
        counter.phase = "step"
        attend_step(q, k, v, out, lse, blocks, fwd, softmax_scale=0.25, q_seg=qseg, k_seg=qseg, plans=plans)
        counter.phase = "backward setup"  # once per backward, not per step: the final lse's rows per query range
        row_cache = {(b.q_lo, b.q_hi): (lse[:, b.q_lo:b.q_hi].contiguous(), delta[:, b.q_lo:b.q_hi].contiguous())
                     for b in blocks}
        counter.phase = "step"
        attend_step_backward(dout, q, k, v, out, lse, delta, dq, dkv, blocks, bwd, softmax_scale=0.25, q_seg=qseg,
                             k_seg=qseg, row_cache=row_cache, plans=plans)
    allocs = [a for a in counter.allocs if a[0] == "step"]
    return len(allocs), sum(a[2] for a in allocs), list(launches), (out, lse, dq, dkv)


@pytest.mark.parametrize("seg", [False, True])
def test_ring_step_allocates_nothing_per_block(seg):
    """One step's keys (all visible: an off-diagonal step) as 1 block and as 4 blocks (2 query x 2 key ranges):
    neither step's forward nor backward allocates a tensor outside the kernels (the old path allocated a float32
    (out, lse) per block plus the merge's temporaries, and dq / dk / dv per block: counts growing with the
    blocks); the launches are the attention kernels only, one forward and one dQ + one dK/dV per block (no merge
    kernel); both schedules give the same result."""
    one = [Block(0, 16, 0, 16, causal=False)]
    four = [Block(q0, q0 + 8, k0, k0 + 8, causal=False) for q0 in (0, 8) for k0 in (0, 8)]
    counts, results = {}, []
    for blocks in (one, four):
        n_alloc, n_bytes, launches, result = _step_counts(blocks, seg)
        counts[len(blocks)] = (n_alloc, n_bytes)
        results.append(result)
        assert sorted(launches) == sorted(["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"] * len(blocks))
    assert counts == {1: (0, 0), 4: (0, 0)}, counts
    for a, b in zip(*results):
        assert rel_err(a[torch.isfinite(a)], b[torch.isfinite(b)]) < TOL32


def test_accumulating_launch_runs_once_and_is_never_benchmarked(monkeypatch):
    """On a GPU the launcher times each candidate tile once per size bucket by running the kernel; an accumulating
    kernel run twice would add its block twice. It is launched exactly once, with the tile its non-accumulating
    twin was tuned to (or the first), and the twin's tuning is not disturbed. (GPU path of `_launch`, with a
    recording kernel in place of a Triton one.)"""
    tiles = [(64, 64, 4, 3), (128, 64, 8, 3)]
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    monkeypatch.setattr(attention, "_tiles_for", lambda *a: tiles)
    monkeypatch.setattr(attention, "_device_arch", lambda device: 90)
    monkeypatch.setattr(attention, "_TUNED", {})
    runs = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: runs.append((meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]))

    q = torch.zeros(4, 1, 16)
    flags = dict(CAUSAL=True, HAS_SEQ=False, HAS_SEG=False, PRECISION="ieee", HAS_PLAN=False, PLAN_M=16, PLAN_N=16)
    grid = lambda meta: (1, 1)  # noqa: E731
    attention._launch(Kernel(), "fwd", grid, (q,), dict(flags, ACCUMULATE=True), 16, 16)
    assert runs == [tiles[0]] and attention._TUNED == {}
    runs.clear()
    attention._TUNED[("fwd", 90, 16, q.dtype, tuple(sorted(flags.items())), 5)] = tiles[1]  # the twin's tuned tile
    attention._launch(Kernel(), "fwd", grid, (q,), dict(flags, ACCUMULATE=True), 16, 16)
    assert runs == [tiles[1]]
