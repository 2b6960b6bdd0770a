"""Memory and matmul work of the fused ORPO loss, provable on the CPU with a TorchDispatchMode:

* every tensor created during forward and backward: none has T x V elements (T = loss tokens > chunk) or
  more; the float64 reference, recorded the same way, does (the recorder can fail);
* every product (aten mm / addmm / addmm_): one weight-gradient product per chunk, at most three products
  per chunk in the backward, and the bytes they move; no host synchronization (aten._local_scalar_dense,
  what .item() / .tolist() / int() dispatch) that grows with the number of chunks."""

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


@pytest.mark.parametrize("bias", [True, False])
def test_one_weight_gradient_product_per_chunk(bias):
    """Trained head (two passes): forward 1 product per chunk (logits, bias fused into addmm); backward 3 (logits,
    D @ W, D^T Hc added into the float32 weight gradient), whatever number of sequences a chunk spans."""
    m, h, v, chunk = 90, 16, 257, 16
    chunks = -(-m // chunk)
    rec = count_products("auto", True, chunk, m, h, v, bias)
    fwd = [p for p in rec.products if p[0] == "forward"]
    bwd = [p for p in rec.products if p[0] == "backward"]
    assert len(fwd) == chunks and len(bwd) == 3 * chunks, rec.products
    dw = [p for p in bwd if p[2] == (v, h)]
    assert len(dw) == chunks and {p[1] for p in dw} == {"aten.addmm_.default"}   # in place, float32 accumulator
    assert {p[1] for p in fwd} == {"aten.addmm.default" if bias else "aten.mm.default"}
    # bytes of the backward's products per full chunk: logits (read Hc, W, [b], write C x V), D @ W (read D, W,
    # write C x H), addmm_ (read D, Hc, the accumulator, write it): all float32 here
    f32 = 4
    want = f32 * ((chunk * h + v * h + bias * v + chunk * v) + (chunk * v + v * h + chunk * h)
                  + (chunk * v + chunk * h + 2 * v * h))
    assert sum(p[3] for p in bwd[:3]) == want
    # host synchronizations: as many with 6 chunks as with 1 (input checks only, none per chunk)
    one = count_products("auto", True, m, m, h, v, bias)
    assert len(rec.syncs) == len(one.syncs) and "backward" not in rec.syncs, (rec.syncs, one.syncs)


def test_frozen_head_deferred_products():
    """Frozen head ("auto" = deferred): forward 2 products per chunk (logits, G @ W), backward none."""
    m, chunk = 90, 16
    rec = count_products("auto", False, chunk, m)
    assert [p[0] for p in rec.products] == ["forward"] * (2 * -(-m // chunk)), rec.products


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
