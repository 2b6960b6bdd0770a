"""Triton flash attention vs the float64 reference: out, lse, dq, dk, dv on fresh random inputs at odd sizes.

Relative errors ||x - ref|| / ||ref|| against `reference.attention_forward/backward` run in float64.
Bounds: float32 1e-5 (out, lse) / 1e-4 (grads); float16 3e-3 / 1e-2 (P is rounded to float16 before P V and
dS before dS K, as in every flash attention). Without CUDA the kernels run under TRITON_INTERPRET=1 (conftest).
"""

import pytest
import torch
import triton.testing

import sealong_kernels as sk
from sealong_kernels import attention as attn
from sealong_kernels import reference as ref

BOUNDS = {torch.float32: (1e-5, 1e-4), torch.float16: (3e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


def rel(x, y):
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def rand_qkv(tq, tk, hq, hkv, d, dtype, device):
    q = torch.randn(tq, hq, d, device=device).to(dtype)
    k = torch.randn(tk, hkv, d, device=device).to(dtype)
    v = torch.randn(tk, hkv, d, device=device).to(dtype)
    return q, k, v


def check(q, k, v, **kw):
    """Run the raw Triton ops and the float64 reference on the same inputs; assert the stated bounds."""
    fwd_bound, bwd_bound = BOUNDS[q.dtype]
    out, lse = attn.attention_forward(q, k, v, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = attn.attention_backward(dout, q, k, v, out, lse, **kw)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out_r, lse_r = ref.attention_forward(q64, k64, v64, **kw)
    dq_r, dk_r, dv_r = ref.attention_backward(dout.double(), q64, k64, v64, out_r, lse_r, **kw)

    assert out.dtype == q.dtype and lse.dtype == torch.float32 and dq.dtype == dk.dtype == dv.dtype == torch.float32
    empty = torch.isinf(lse_r)
    assert torch.equal(torch.isinf(lse), empty), "rows that see no key must have lse = -inf, and only those"
    assert bool((lse[empty] < 0).all()) and bool((out.transpose(0, 1)[empty] == 0).all())
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool(torch.isfinite(x).all()), f"{name} has non-finite values"
    if bool((~empty).any()):
        assert rel(lse[~empty], lse_r[~empty]) < fwd_bound
        assert rel(out, out_r) < fwd_bound
        for name, x, y in (("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)):
            assert rel(x, y) < bwd_bound, f"{name}: rel err {rel(x, y):.2e}"
    else:  # nothing visible at all: everything is exactly zero
        assert not bool(out.any()) and not bool(dq.any()) and not bool(dk.any()) and not bool(dv.any())
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (8, 1)])
def test_dense_gqa(dtype, causal, hq, hkv, device):
    q, k, v = rand_qkv(37, 37, hq, hkv, 32, dtype, device)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("d", [16, 24])  # 24: head dim padded to a power of two inside, masked
def test_head_dim_and_scale(d, device):
    q, k, v = rand_qkv(21, 21, 4, 2, d, torch.float32, device)
    check(q, k, v, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences(causal, device):
    # lengths 11, 0 (an empty sequence), 19, 1, 22: boundaries inside blocks
    cu = torch.tensor([0, 11, 11, 30, 31, 53], dtype=torch.int32, device=device)
    q, k, v = rand_qkv(53, 53, 4, 2, 16, torch.float16, device)
    check(q, k, v, causal=causal, cu_seqlens=cu)


def test_packed_matches_separate_calls(device):
    cu = torch.tensor([0, 13, 40], dtype=torch.int32, device=device)
    q, k, v = rand_qkv(40, 40, 2, 1, 16, torch.float32, device)
    out, lse = sk.flash_attention(q, k, v, cu_seqlens=cu)
    for a, b in ((0, 13), (13, 40)):
        o, l = sk.flash_attention(q[a:b], k[a:b], v[a:b])
        assert rel(out[a:b], o) < 1e-6 and rel(lse[:, a:b], l) < 1e-6


def preference_segments(prompt, chosen, rejected, device):
    return torch.tensor([0] * prompt + [1] * chosen + [2] * rejected, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_preference_segments(dtype, device):
    seg = preference_segments(23, 9, 14, device)
    q, k, v = rand_qkv(46, 46, 4, 1, 32, dtype, device)
    check(q, k, v, causal=True, segment_ids=seg)


def test_rejected_never_sees_chosen(device):
    seg = preference_segments(20, 12, 15, device)
    q, k, v = rand_qkv(47, 47, 2, 2, 16, torch.float32, device)
    out, lse = sk.flash_attention(q, k, v, segment_ids=seg)
    k2, v2 = k.clone(), v.clone()
    k2[20:32] = torch.randn_like(k2[20:32])  # change the chosen answer's keys and values
    v2[20:32] = torch.randn_like(v2[20:32])
    out2, lse2 = sk.flash_attention(q, k2, v2, segment_ids=seg)
    assert torch.equal(out[32:], out2[32:]) and torch.equal(lse[:, 32:], lse2[:, 32:])  # rejected: unchanged
    assert torch.equal(out[:20], out2[:20])  # prompt: causal, unchanged
    assert rel(out[20:32], out2[20:32]) > 1e-2  # chosen: depends on itself


def test_packed_preference_examples(device):
    # two packed examples, each prompt + chosen + rejected
    seg = torch.cat([preference_segments(10, 5, 7, device), preference_segments(8, 3, 4, device)])
    cu = torch.tensor([0, 22, 37], dtype=torch.int32, device=device)
    q, k, v = rand_qkv(37, 37, 4, 2, 16, torch.float32, device)
    check(q, k, v, causal=True, cu_seqlens=cu, segment_ids=seg)


@pytest.mark.parametrize("q_start,k_start", [
    (40, 0),    # keys entirely before the queries: full blocks
    (17, 17),   # the diagonal block of a ring step
    (20, 33),   # keys partly ahead: some query rows see nothing
    (0, 60),    # keys entirely ahead: nothing visible, out 0, lse -inf, grads 0
])
def test_ring_step_offsets(q_start, k_start, device):
    q, k, v = rand_qkv(19, 23, 4, 2, 16, torch.float32, device)
    check(q, k, v, causal=True, q_start=q_start, k_start=k_start)


def test_ring_step_segments_per_side(device):
    qseg = preference_segments(0, 10, 9, device)  # query chunk holds chosen then rejected tokens
    kseg = preference_segments(15, 6, 0, device)  # key chunk holds prompt then chosen tokens
    q, k, v = rand_qkv(19, 21, 2, 1, 16, torch.float16, device)
    check(q, k, v, causal=True, q_start=30, k_start=0, segment_ids=qseg, k_segment_ids=kseg)


def test_lse_is_natural_log_and_merges(device):
    """Two key halves merged with lse = log(exp(a) + exp(b)) give the whole: the ring's merge rule."""
    q, k, v = rand_qkv(29, 29, 2, 2, 16, torch.float32, device)
    out, lse = attn.attention_forward(q, k, v, causal=True)
    o_a, l_a = attn.attention_forward(q, k[:13], v[:13], causal=True, q_start=0, k_start=0)
    o_b, l_b = attn.attention_forward(q, k[13:], v[13:], causal=True, q_start=0, k_start=13)
    l_m = torch.logaddexp(l_a, l_b)
    w_a = torch.exp(l_a - l_m).nan_to_num(0.0).T[..., None]
    w_b = torch.exp(l_b - l_m).nan_to_num(0.0).T[..., None]
    assert rel(l_m, lse) < 1e-6 and rel(w_a * o_a + w_b * o_b, out) < 1e-5


def test_backward_with_global_delta(device):
    q, k, v = rand_qkv(25, 25, 2, 1, 16, torch.float32, device)
    out, lse = attn.attention_forward(q, k, v)
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1).T.contiguous()
    for a, b in zip(attn.attention_backward(dout, q, k, v, out, lse), attn.attention_backward(dout, q, k, v, out, lse, delta=delta)):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_strided_inputs(dtype, device):
    """The public function on views of a fused qkv projection (non-contiguous heads), gradients via autograd."""
    t, hq, hkv, d = 31, 4, 2, 16
    qkv = torch.randn(t, hq + 2 * hkv, d, device=device).to(dtype).requires_grad_()
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    out, lse = sk.flash_attention(q, k, v, causal=True, backend="triton")
    assert not lse.requires_grad
    dout = torch.randn_like(out)
    out.backward(dout)
    qkv64 = qkv.detach().double().requires_grad_()
    out_r, _ = ref.attention_forward(qkv64[:, :hq], qkv64[:, hq:hq + hkv], qkv64[:, hq + hkv:], causal=True)
    out_r.backward(dout.double())
    fwd_bound, bwd_bound = BOUNDS[dtype]
    assert rel(out, out_r) < fwd_bound and rel(qkv.grad, qkv64.grad) < bwd_bound


@pytest.mark.parametrize("tune", [True, False])
def test_gpu_launch_paths_rectangular_tiles(tune, monkeypatch, device):
    """The GPU launch path, run here under the interpreter: tiles from the table (two per kernel, so the tuner
    measures and caches, or one, so it does not), rectangular tiles to catch BLOCK_M / BLOCK_N mix-ups."""
    tiles = {"fwd": [(32, 16, 4, 2), (16, 32, 4, 2)], "dq": [(32, 16, 4, 2)], "dkdv": [(16, 32, 4, 2), (32, 16, 4, 2)]}
    monkeypatch.setattr(attn, "_tiles_for", lambda kind, *a: tiles[kind] if tune else tiles[kind][:1])
    monkeypatch.setattr(attn, "_device_arch", lambda dev: 90)
    monkeypatch.setattr(attn, "_TUNED", {})
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    timings = iter(range(100, 0, -1))  # each measurement faster than the one before: the last tile tried wins
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), next(timings))[1])
    check(*rand_qkv(45, 45, 4, 2, 32, torch.float32, device), causal=True)
    seg = preference_segments(20, 11, 14, device)
    check(*rand_qkv(45, 45, 2, 1, 16, torch.float32, device), causal=True, segment_ids=seg)
    chosen = {key[0]: tile for key, tile in attn._TUNED.items()}
    assert chosen == {kind: ts[-1] if tune else ts[0] for kind, ts in tiles.items()}


def test_tile_choice_is_cached_per_size_bucket():
    """A key is measured once (small calls included); another size bucket is measured again."""
    calls = []
    bench = lambda fn: (fn(), len(calls))[1]  # noqa: E731
    run = calls.append
    attn._TUNED.pop(("test", 1), None), attn._TUNED.pop(("test", 2), None)
    assert attn.choose_tile(("test", 1), ["a", "b", "c"], run, bench) == "a" and calls == ["a", "b", "c"]
    assert attn.choose_tile(("test", 1), ["a", "b", "c"], run, bench) == "a" and len(calls) == 3
    attn.choose_tile(("test", 2), ["a", "b"], run, bench)
    assert len(calls) == 5


def test_reference_backend_matches(device):
    q, k, v = rand_qkv(17, 17, 2, 2, 16, torch.float32, device)
    o1, l1 = sk.flash_attention(q, k, v, backend="triton")
    o2, l2 = sk.flash_attention(q, k, v, backend="reference")
    assert rel(o1, o2) < 1e-5 and rel(l1, l2) < 1e-5


def test_causal_block_skipping_reads_no_future_key(device):
    """Keys past the last query's causal bound are never loaded: NaN there cannot reach any output."""
    q, k, v = rand_qkv(21, 50, 2, 1, 16, torch.float32, device)
    k[21:] = float("nan")
    v[21:] = float("nan")
    out, lse = attn.attention_forward(q, k, v, causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv = attn.attention_backward(dout, q, k, v, out, lse, causal=True)
    q64, k64, v64 = q.double(), k[:21].double(), v[:21].double()
    out_r, lse_r = ref.attention_forward(q64, k64, v64, causal=True)
    dq_r, dk_r, dv_r = ref.attention_backward(dout.double(), q64, k64, v64, out_r, lse_r, causal=True)
    assert rel(out, out_r) < 1e-5 and rel(lse, lse_r) < 1e-5
    assert rel(dq, dq_r) < 1e-4 and rel(dk[:21], dk_r) < 1e-4 and rel(dv[:21], dv_r) < 1e-4


def test_packed_block_skipping_reads_only_own_sequences(device):
    """A query block lying in one sequence loads no key of the sequences before it (any BLOCK_M dividing 128)."""
    first = 2 * 128 + 3  # sequence 0 ends inside a block; blocks from 384 on hold sequence 1 only
    t = first + 128 + 5
    cu = torch.tensor([0, first, t], dtype=torch.int32, device=device)
    q, k, v = rand_qkv(t, t, 1, 1, 16, torch.float32, device)
    k[:first] = float("nan")
    v[:first] = float("nan")
    out, _ = attn.attention_forward(q, k, v, causal=False, cu_seqlens=cu)
    clean = 3 * 128
    out_r, _ = ref.attention_forward(q[first:].double(), k[first:].double(), v[first:].double(), causal=False)
    assert rel(out[clean:], out_r[clean - first:]) < 1e-5


def test_bad_inputs_name_the_argument(device):
    q, k, v = rand_qkv(8, 8, 3, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attn.attention_forward(q, k, v)
    q, k, v = rand_qkv(8, 8, 2, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn.attention_forward(q, k, v, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens needs q and k"):
        attn.attention_forward(q, k, v, q_start=3, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        attn.attention_forward(q, k, v, segment_ids=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim 320"):
        attn.attention_forward(*rand_qkv(8, 8, 2, 2, 320, torch.float32, device))
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        attn.attention_forward(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="one device"):
        attn.attention_forward(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="backend"):
        sk.flash_attention(q, k, v, backend="cudnn")


def test_bad_inputs_named_on_every_backend(device, monkeypatch):
    """The plain-torch fallback names bad shapes too, and cu_seqlens over different q / k tokens is refused
    before dispatch (flash-attn's varlen call would silently apply q's boundaries to k)."""
    q, k, v = rand_qkv(8, 8, 2, 2, 16, torch.float32, device)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"\[T, H, D\]"):
            sk.flash_attention(q[0], k, v, backend=backend)
        with pytest.raises(ValueError, match="k and v must be"):
            sk.flash_attention(q, k, v[:, :, :8], backend=backend)
    out, lse = ref.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        ref.attention_backward(out, q, k, v, out, lse[:, :4])
    monkeypatch.setattr(attn, "_flash_attn_fits", lambda *args: True)
    monkeypatch.setattr(attn, "_flash_attn_varlen", lambda *args: pytest.fail("flash-attn was called"))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    for tk, q_start in ((6, 0), (8, 2)):
        with pytest.raises(ValueError, match="cu_seqlens needs q and k"):
            sk.flash_attention(q, k[:tk], v[:tk], causal=False, cu_seqlens=cu, q_start=q_start, backend="flash_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16bit(d, dtype):
    seg = preference_segments(700, 150, 173, "cuda")
    cu = torch.tensor([0, 301, 1023], dtype=torch.int32, device="cuda")
    for kw in (dict(causal=True), dict(causal=False), dict(causal=True, segment_ids=seg), dict(causal=True, cu_seqlens=cu)):
        check(*rand_qkv(1023, 1023, 8, 2, d, dtype, "cuda"), **kw)
    check(*rand_qkv(300, 333, 8, 1, d, dtype, "cuda"), causal=True, q_start=500, k_start=400)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """Element offsets past 2**31: 66000 tokens x 256 heads x 128 = 2.16e9 query elements (4.3 GB in bf16)."""
    t, d = 66000, 128
    q = torch.randn(t, 256, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(37, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = attn.attention_forward(q, k, v, causal=False)
    dout = torch.randn_like(out)
    dq, dk, dv = attn.attention_backward(dout, q, k, v, out, lse, causal=False)
    tail = slice(t - 50, t)
    out_r, lse_r = ref.attention_forward(q[tail].float(), k.float(), v.float(), causal=False)
    dq_r, _, _ = ref.attention_backward(dout[tail].float(), q[tail].float(), k.float(), v.float(), out_r, lse_r, causal=False)
    assert rel(out[tail], out_r) < 2e-2 and rel(lse[:, tail], lse_r) < 1e-3 and rel(dq[tail], dq_r) < 5e-2


@pytest.mark.gpu
def test_gpu_flash_attn_backend_matches_ours():
    pytest.importorskip("flash_attn")
    cu = torch.tensor([0, 300, 1000], dtype=torch.int32, device="cuda")
    q, k, v = (t.requires_grad_() for t in rand_qkv(1000, 1000, 8, 2, 128, torch.bfloat16, "cuda"))
    outs = {}
    for backend in ("flash_attn", "triton"):
        out, lse = sk.flash_attention(q, k, v, cu_seqlens=cu, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        outs[backend] = (out, lse, dq, dk, dv)
    for a, b in zip(outs["flash_attn"], outs["triton"]):
        assert rel(a, b) < 2e-2


@pytest.mark.parametrize("splits", [2, 4])
def test_gqa_group_split_over_programs(splits, monkeypatch, device):
    """dK/dV with the query-head group split over a grid dimension (partial sums per split), packed + segments."""
    monkeypatch.setattr(attn, "GQA_SPLITS", splits)
    seg = preference_segments(19, 7, 9, device)
    check(*rand_qkv(35, 35, 4, 1, 16, torch.float32, device), causal=True, segment_ids=seg)
