"""Memory and matmul work of the fused ORPO loss, provable on the CPU with a TorchDispatchMode:

* every tensor created during forward and backward: none has T x V elements (T = loss tokens > chunk) or
  more; the float64 reference, recorded the same way, does (the recorder can fail);
* every product (aten mm / addmm / addmm_): 3 per chunk with a trained head, 2 with a frozen one, all in the
  forward (one pass, chunks aligned to pairs), and the bytes they move;
* every host synchronization (bench/op_counts.py: scalar reads, data-dependent sizes, boolean masks): none in
  the loss forward and backward, only where the batch is built."""

import pytest
import torch
from size_recorder import SizeRecorder

import sealong_kernels as sk
from sealong_kernels import reference as ref


def record(loss_fn, hidden, weight, bias, labels):
    with SizeRecorder() as rec:
        loss, _ = loss_fn(hidden, weight, labels, bias=bias)
        loss.backward()
    return rec.largest


@pytest.mark.parametrize("strategy,train_head", [("deferred", False), ("auto", True), ("recompute", True)])
def test_no_tensor_has_tokens_times_vocab_elements(strategy, train_head):
    t, h, v, chunk = 100, 16, 257, 32
    hidden = torch.randn(2, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=train_head)
    bias = torch.randn(v, requires_grad=train_head)
    labels = torch.randint(0, v, (2, t))                     # every token labeled: 2T loss tokens
    tokens = int((labels != -100).sum())
    assert tokens > chunk

    def ours(*a, **k):
        return sk.fused_linear_orpo_loss(*a, chunk_size=chunk, strategy=strategy, **k)

    f32 = 4  # bytes per element: everything here is float32
    nbytes, op = record(ours, hidden, weight, bias, labels)
    assert nbytes < tokens * v * f32, (nbytes, op)
    # nothing beyond one logits chunk, the float32 weight gradient [V, H] and hidden-sized buffers
    assert nbytes <= f32 * max(chunk * v, v * h, 2 * t * h), (nbytes, op)
    nbytes_ref, _ = record(ref.fused_linear_orpo_loss, hidden, weight, bias, labels)
    assert nbytes_ref >= tokens * v * f32


bench_orpo = pytest.importorskip("bench.bench_orpo")
count_products = bench_orpo.count_products


def logits_products(rec, v=257):
    return [p for p in rec.products if p[2][1:] == (v,)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pairs", [3, 15])
def test_three_products_per_chunk_trained_head(bias, pairs):
    """Trained head, one pass: per chunk logits (bias fused into addmm), D @ W and D^T Hc into the float32
    weight gradient, all in the forward; the backward only scales (no product). 3 pairs of 30 interleaved
    entries: each pair in pieces (2 per pair, one per answer); 15 pairs of 6: two whole pairs per chunk."""
    m, h, v, chunk = 90, 16, 257, 16
    rec = count_products("auto", True, chunk, m, h, v, bias, pairs=pairs)
    chunks = len(logits_products(rec))
    assert chunks == (6 if pairs == 3 else 8), rec.products
    fwd = [p for p in rec.products if p[0] == "forward"]
    assert len(fwd) == 3 * chunks and rec.count("products", "backward") == 0, rec.products
    dw = [p for p in fwd if p[2] == (v, h)]
    assert len(dw) == chunks and {p[1] for p in dw} == {"aten.addmm_.default"}   # in place, float32 accumulator
    assert {p[1] for p in logits_products(rec)} == {"aten.addmm.default" if bias else "aten.mm.default"}
    # bytes of a full chunk's products: logits (read Hc, W, [b], write C x V), D @ W (read D, W, write C x H),
    # addmm_ (read D, Hc, the accumulator, write it): all float32 here; whole-pair chunks hold 12 entries
    c = 15 if pairs == 3 else 12
    f32 = 4
    want = f32 * ((c * h + v * h + bias * v + c * v) + (c * v + v * h + c * h) + (c * v + c * h + 2 * v * h))
    assert sum(p[3] for p in fwd[:3]) == want


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("pairs", [3, 15])
def test_no_host_sync_in_the_loss(train_head, pairs):
    """0 host synchronizations (scalar reads, data-dependent sizes, boolean masks) in the loss forward and
    backward; the entries are sorted, counted and checked once, where the batch is built."""
    rec = count_products("auto", train_head, 16, pairs=pairs)
    assert rec.count("syncs", "forward") == 0 and rec.count("syncs", "backward") == 0, rec.syncs
    assert rec.count("syncs", "build") > 0  # the counter sees the batch building's syncs (it can fail)
    # the two-pass strategies synchronize inside the loss call (their checks): the count can fail there
    assert count_products("recompute", True, 16, pairs=pairs).count("syncs", "forward") > 0


def test_frozen_head_two_products_per_chunk():
    """Frozen head: logits and D @ W (U in float32 for pieces of a long pair) per chunk, no dW, none in the
    backward; the two-pass "deferred" strategy has the same 2 (its U = G @ W) for comparison."""
    for pairs in (3, 15):
        rec = count_products("auto", False, 16, pairs=pairs)
        chunks = len(logits_products(rec))
        assert [p[0] for p in rec.products] == ["forward"] * (2 * chunks), rec.products
    m, chunk = 90, 16
    rec = count_products("deferred", False, chunk, m)
    assert [p[0] for p in rec.products] == ["forward"] * (2 * -(-m // chunk)), rec.products


def test_recompute_strategy_still_counts_four():
    """The two-pass "recompute" strategy (kept for a trained head under sequence parallelism over several
    pairs): forward 1, backward 3 per chunk."""
    m, chunk = 90, 16
    rec = count_products("recompute", True, chunk, m)
    chunks = -(-m // chunk)
    assert rec.count("products", "forward") == chunks and rec.count("products", "backward") == 3 * chunks


@pytest.mark.gpu
def test_gpu_peak_memory_stays_far_below_the_logits():
    """On a GPU: peak bytes above the inputs for 16K loss tokens, V = 32000, bfloat16, chunk 1024 stay within the
    deferred buffers (float32 [M, H]), the hidden gradient and two logits chunks: far below [M, V] logits."""
    m, h, v, chunk = 16384, 1024, 32000, 1024
    hidden = torch.randn(2, m // 2, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    labels = torch.randint(0, v, (2, m // 2), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = sk.fused_linear_orpo_loss(hidden, weight, labels, chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    budget = m * h * 4 + m * h * 2 + 2 * chunk * v * 2 + 32 * 2**20
    assert peak <= budget, (peak, budget)
    assert peak < m * v * 2 / 2
