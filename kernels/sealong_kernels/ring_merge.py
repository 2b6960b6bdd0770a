"""Merge of partial attention results in float32, in place: the per-step combine of ring attention.

Two partials over disjoint key sets, out [T, H, D] with lse [H, T] (natural log), combine as

    m = max(lse_a, lse_b),  w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    out = (w_a out_a + w_b out_b) / (w_a + w_b),   lse = m + log(w_a + w_b)

(the weights are <= 1 and their sum is in [1, 2]: no overflow, the stable form of the pairwise merge). A row
where both are -inf (no key seen yet) stays out = 0, lse = -inf. Twin: `reference.merge_attention_partials`.

On CUDA one Triton program per (block of rows, head) reads the accumulator, the partial and both LSEs once
and writes the accumulator once (3 passes over [T, H, D] instead of the ~8 of the eager version below);
elsewhere the same math runs as torch ops.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(Out, Lse, OutB, LseB, T, stride_ot, stride_oh, stride_bt, stride_bh, stride_lh, stride_lbh,
                  HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    tile_ok = row_ok[:, None] & (cols[None, :] < HEAD_DIM)
    lse_a = tl.load(Lse + h * stride_lh + rows, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(LseB + h * stride_lbh + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    # weights relative to the larger lse; rows empty on both sides get weights 0 and keep lse = -inf
    m = tl.maximum(lse_a, lse_b)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    total = w_a + w_b
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    o_ptr = Out + rows[:, None] * stride_ot + h * stride_oh + cols[None, :]
    b_ptr = OutB + rows[:, None] * stride_bt + h * stride_bh + cols[None, :]
    o_a = tl.load(o_ptr, mask=tile_ok, other=0.0)
    o_b = tl.load(b_ptr, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(o_ptr, (o_a * (w_a * inv)[:, None] + o_b * (w_b * inv)[:, None]), mask=tile_ok)
    tl.store(Lse + h * stride_lh + rows, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))),
             mask=row_ok)


def _merge_triton(out, lse, out_b, lse_b):
    t, h, d = out.shape
    if t == 0:
        return
    if out.stride(2) != 1 or out_b.stride(2) != 1 or lse.stride(1) != 1 or lse_b.stride(1) != 1:
        raise ValueError("merge needs the last dimension of out, out_b and lse, lse_b contiguous")
    block_t = 16 if d > 64 else 32
    _merge_kernel[(triton.cdiv(t, block_t), h)](
        out, lse, out_b, lse_b, t, out.stride(0), out.stride(1), out_b.stride(0), out_b.stride(1),
        lse.stride(0), lse_b.stride(0), HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=4)


def _merge_torch(out, lse, out_b, lse_b):
    lse_b = lse_b.to(lse.dtype)
    m = torch.maximum(lse, lse_b)
    empty = torch.isinf(m)  # lse never reaches +inf: inf here means both are -inf
    m_safe = m.masked_fill(empty, 0.0)
    w_a, w_b = torch.exp(lse - m_safe), torch.exp(lse_b - m_safe)
    total = w_a + w_b
    inv = torch.where(empty, 0.0, 1.0 / total.masked_fill(empty, 1.0))
    out.mul_((w_a * inv).transpose(0, 1).unsqueeze(-1)).add_(out_b.to(out.dtype) * (w_b * inv).transpose(0, 1).unsqueeze(-1))
    lse.copy_(torch.where(empty, float("-inf"), m_safe + torch.log(total.masked_fill(empty, 1.0))))


def merge_partials_(out, lse, out_b, lse_b, *, use_triton=None):
    """Merge a partial (out_b [T, H, D], lse_b [H, T]) into the accumulators (out, lse), in place; returns them.

    out and lse are the float32 (or float64) accumulators; out_b may be 16-bit. use_triton: None = on CUDA
    float32 accumulators (the interpreter can be forced with True on CPU tensors).
    """
    if out.shape != out_b.shape or lse.shape != lse_b.shape or tuple(lse.shape) != (out.shape[1], out.shape[0]):
        raise ValueError(f"merge needs out, out_b [T, H, D] and lse, lse_b [H, T]: got {tuple(out.shape)}, "
                         f"{tuple(out_b.shape)}, {tuple(lse.shape)}, {tuple(lse_b.shape)}")
    if use_triton is None:
        use_triton = out.is_cuda and out.dtype == torch.float32 and lse.dtype == torch.float32
    (_merge_triton if use_triton else _merge_torch)(out, lse, out_b, lse_b)
    return out, lse
