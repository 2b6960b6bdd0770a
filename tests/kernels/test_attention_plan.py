"""One varlen plan per batch: built (and validated) once, then no layer call reads anything on the host.

The no-sync checks patch the host-reading tensor methods (item, tolist, __bool__, nonzero) to raise while a
forward and backward runs on a plan built beforehand.
"""

import contextlib

import pytest
import torch

import sealong_kernels as sk
from sealong_kernels import attention as attn
from sealong_kernels import reference as ref

HOST_READS = ("item", "tolist", "__bool__", "nonzero")


@contextlib.contextmanager
def no_host_reads():
    """Any tensor -> host read inside the block raises (a host sync on CUDA)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside the layer")
        return raise_

    for name in HOST_READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def test_no_host_reads_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), no_host_reads():
        bool(torch.ones(1) > 0)


def test_plan_validates_once_and_rejects_bad_boundaries(device):
    with pytest.raises(ValueError, match="non-decreasing"):
        attn.varlen_plan(torch.tensor([0, 5, 3, 9]), 9, device=device)
    with pytest.raises(ValueError, match="end at T=9"):
        attn.varlen_plan(torch.tensor([0, 5, 8]), 9, device=device)
    plan = attn.varlen_plan(torch.tensor([0, 2, 2, 7, 9]), 9, device=device)
    assert plan.max_seqlen == 5 and plan.seq_idx.tolist() == [0, 0, 2, 2, 2, 2, 2, 3, 3]
    assert attn.varlen_plan(plan, 9) is plan


def test_forward_backward_on_a_plan_reads_nothing_on_the_host(device):
    t, hq, hkv, d = 29, 2, 1, 16
    torch.manual_seed(0)
    q = torch.randn(t, hq, d, device=device, requires_grad=True)
    k = torch.randn(t, hkv, d, device=device, requires_grad=True)
    v = torch.randn(t, hkv, d, device=device, requires_grad=True)
    cu = torch.tensor([0, 11, 29], dtype=torch.int32, device=device)
    seg = torch.tensor([0] * 5 + [1] * 3 + [2] * 3 + [0] * 12 + [1] * 4 + [2] * 2, dtype=torch.int32, device=device)
    plan = attn.varlen_plan(cu, t, device=device)
    dout = torch.randn(t, hq, d, device=device)
    with no_host_reads():
        out, lse = sk.flash_attention(q, k, v, cu_seqlens=plan, segment_ids=seg, backend="triton")
        out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_r, lse_r = ref.attention_forward(q64, k64, v64, cu_seqlens=cu, segment_ids=seg)
    out_r.backward(dout.double())
    assert rel(out, out_r) < 1e-5 and rel(lse[lse.isfinite()], lse_r[lse_r.isfinite()]) < 1e-5
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        assert rel(x.grad, x64.grad) < 1e-4


def _layers(seg, plan, device, layers=3, t=21):
    """`layers` attention calls of one batch (forward + backward) through the custom ops: -> outputs."""
    torch.manual_seed(1)
    outs = []
    for _ in range(layers):
        q, k, v = (torch.randn(t, 2, 16, device=device, requires_grad=True) for _ in range(3))
        out, _ = sk.flash_attention(q, k, v, cu_seqlens=plan, segment_ids=seg, backend="triton")
        out.sum().backward()
        outs.append((q, k, v, out))
    return outs


@pytest.mark.parametrize("with_plan", [True, False])
def test_one_block_plan_per_batch_through_the_custom_ops(with_plan, device):
    """3 layers' forward and backward on one batch build the block lists once (the custom ops rebuild a
    VarlenPlan from its tensors in every call; the lists ride on the batch's seq_idx / segment tensor)."""
    from sealong_kernels import attention_plan

    t = 21
    seg = torch.tensor([0] * 6 + [1] * 5 + [2] * 4 + [0] * 3 + [1] * 2 + [2], dtype=torch.int32, device=device)
    plan = attn.varlen_plan(torch.tensor([0, 15, t], dtype=torch.int32, device=device), t) if with_plan else None
    before = attention_plan.BUILDS[0]
    _layers(seg, plan, device)
    assert attention_plan.BUILDS[0] - before == 1
    _layers(seg.clone(), plan, device, layers=1)   # the next batch (a new tensor): one more
    assert attention_plan.BUILDS[0] - before == 2


def test_refilled_segment_buffer_gets_a_new_plan(device):
    """A preallocated segment buffer refilled in place (collate buffers, CUDA-graph static inputs) bumps its
    content version: the next call builds a new plan and sees the new visibility (keyed by data pointer, it
    reused the old plan and let rejected queries see the chosen answer)."""
    from sealong_kernels import attention_plan

    t = 21
    seg = torch.zeros(t, dtype=torch.int32, device=device)               # batch 1: all prompt (causal only)
    _layers(seg, None, device, layers=1)
    before = attention_plan.BUILDS[0]
    seg.copy_(torch.tensor([0] * 4 + [1] * 8 + [2] * 9, dtype=torch.int32))  # batch 2, same buffer
    (q, k, v, out), = _layers(seg, None, device, layers=1)
    assert attention_plan.BUILDS[0] - before == 1
    want, _ = ref.attention_forward(q.double(), k.double(), v.double(), segment_ids=seg)
    assert rel(out, want) < 1e-5
