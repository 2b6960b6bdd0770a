"""Memory of the fused ORPO loss, provable on the CPU: record every tensor created during forward and backward
with a TorchDispatchMode and check that none has T x V elements (T = loss tokens > chunk) or more; the
float64 reference, recorded the same way, does (the recorder can fail)."""

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


@pytest.mark.parametrize("strategy,train_head", [("deferred", False), ("deferred", True), ("recompute", True)])
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
    # nothing beyond one logits chunk, the deferred per-sequence accumulators [2, V, H], hidden-sized buffers
    assert nbytes <= f32 * max(chunk * v, 2 * v * h, 2 * t * h), (nbytes, op)
    nbytes_ref, _ = record(ref.fused_linear_orpo_loss, hidden, weight, bias, labels)
    assert nbytes_ref >= tokens * v * f32


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
