"""The Triton flash attention as `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces a layer that
calls `sealong_kernels.flash_attention` without a graph break: the compiler sees two opaque ops with fake
(shape-only) implementations and an autograd rule, never the launch code.

    sealong::flash_attention_fwd(q, k, v, ...) -> (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] float32)
    sealong::flash_attention_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv) float32

A varlen plan travels as its two tensors (cu_seqlens, seq_idx): the ops rebuild it without validating (the caller
built and validated it once per batch), so neither op reads anything on the host.
"""

from typing import Optional

import torch

from .attention import attention_backward, attention_forward
from .attention_plan import VarlenPlan

Tensor = torch.Tensor


def _plan(q, cu_seqlens, seq_idx):
    return None if cu_seqlens is None else VarlenPlan(cu_seqlens, seq_idx, q.shape[0])


@torch.library.custom_op("sealong::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: Optional[float], q_start: int,
                        k_start: int, cu_seqlens: Optional[Tensor], seq_idx: Optional[Tensor],
                        segment_ids: Optional[Tensor], k_segment_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, q_start=q_start, k_start=k_start,
                             cu_seqlens=_plan(q, cu_seqlens, seq_idx), segment_ids=segment_ids,
                             k_segment_ids=k_segment_ids)


@flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids, k_segment_ids):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("sealong::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                        softmax_scale: Optional[float], q_start: int, k_start: int, cu_seqlens: Optional[Tensor],
                        seq_idx: Optional[Tensor], segment_ids: Optional[Tensor],
                        k_segment_ids: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, q_start=q_start,
                              k_start=k_start, cu_seqlens=_plan(q, cu_seqlens, seq_idx), segment_ids=segment_ids,
                              k_segment_ids=k_segment_ids)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids,
      k_segment_ids):
    f32 = dict(dtype=torch.float32)
    return q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32), v.new_empty(v.shape, **f32)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, q_start, k_start, cu_seqlens, seq_idx, segment_ids, k_segment_ids = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, seq_idx, segment_ids, k_segment_ids)
    ctx.args = (causal, softmax_scale, q_start, k_start)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seq_idx, segment_ids, k_segment_ids = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args, cu_seqlens, seq_idx,
                                     segment_ids, k_segment_ids)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_op(q, k, v, causal, softmax_scale, q_start, k_start, plan, segment_ids, k_segment_ids):
    """(out, lse) through the custom ops; lse carries no gradient."""
    cu, seq_idx = (None, None) if plan is None else (plan.cu_seqlens, plan.seq_idx)
    out, lse = flash_attention_fwd(q, k, v, bool(causal), None if softmax_scale is None else float(softmax_scale),
                                   int(q_start), int(k_start), cu, seq_idx, segment_ids, k_segment_ids)
    return out, lse.detach()
