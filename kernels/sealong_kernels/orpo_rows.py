"""The fused loss's per-row work on one chunk of logits [C, V] (a Triton kernel: LSE, target logit, logit row
sum, and in place the gradient rows g (onehot - softmax)) and the chunk products with float32 results, shared by
the two-pass Function (orpo.py) and the one-pass one (orpo_onepass.py). The math is in orpo.py's docstring."""

import warnings

import torch
import triton
import triton.language as tl

from . import reference
from .runtime import triton_available


# ---------------------------------------------------------------------------------------------------------
# Triton: per-row work on one chunk of logits [C, V]
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_rows_kernel(logits_ptr, stride_row, targets_ptr, lse_ptr, target_logit_ptr, zsum_ptr, scale_ptr, C, V,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE_LSE: tl.constexpr,
                        WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One program per BLOCK_R rows of z = logits[row, :V] (BLOCK_R = 1 on a GPU).

    COMPUTE_LSE: lse[row] = log sum_v exp(z_v) by an online max / rescaled sum in float32,
                 target_logit[row] = z[targets[row]] and zsum[row] = sum_v z_v; otherwise lse[row] is read
                 (saved by the forward).
    WRITE_GRAD:  overwrite the row in place with G = onehot(target) - exp(z - lse)  (d logp / d z), times
                 scale[row] when HAS_SCALE (the backward's g of the row's sequence).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < C
    base = logits_ptr + rows[:, None] * stride_row                       # [BLOCK_R, 1] row pointers
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    if COMPUTE_LSE:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        zs = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            # update the running max and the normalizer rescaled to it (finite: every row has a column >= 0)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(row_ok, m_new, 0.0)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            zs += tl.sum(tl.where(ok, z, 0.0), axis=1)
            m = m_new
        lse = tl.where(row_ok, m + tl.log(tl.where(row_ok, s, 1.0)), 0.0)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(zsum_ptr + rows, zs, mask=row_ok)
        tl.store(target_logit_ptr + rows, tl.load(logits_ptr + rows * stride_row + target, mask=row_ok).to(tl.float32),
                 mask=row_ok)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    if WRITE_GRAD:
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        else:
            scale = tl.full([BLOCK_R], 1.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            g = ((cols[None, :] == target[:, None]).to(tl.float32) - tl.exp(z - lse[:, None])) * scale[:, None]
            tl.store(base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=ok)


def row_launch_config(v, on_gpu):
    """(BLOCK_R, BLOCK_V, num_warps) of the row kernel: one row per program, 4096-column blocks, 8 warps on a
    GPU (a row of a 128K vocabulary is plenty of work); 16 rows, 1024 columns, 1 warp under the interpreter."""
    if on_gpu:
        return 1, min(triton.next_power_of_2(v), 4096), 8
    return 16, min(triton.next_power_of_2(v), 1024), 1


def logits_rows(logits, targets, lse=None, write_grad=False, scale=None, rows_per_program=None):
    """Launch the row kernel on a [C, V] chunk (unit column stride). Returns (lse [C], target_logit [C],
    logit_sum [C]) float32 (target_logit and logit_sum are None when lse is given); with write_grad the chunk
    holds G afterwards, times scale [C] (float32) when given. rows_per_program overrides BLOCK_R."""
    c, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (c,)
    if not triton_available(logits):
        return reference.logits_rows(logits, targets, lse, write_grad, scale)  # CPU without the interpreter
    compute = lse is None
    if compute:
        lse = torch.empty(c, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(c, dtype=torch.float32, device=logits.device)
        zsum = torch.empty(c, dtype=torch.float32, device=logits.device)
    else:
        target_logit = zsum = lse  # unused by the kernel
    if c:
        block_r, block_v, warps = row_launch_config(v, logits.is_cuda)
        block_r = rows_per_program or block_r
        _logits_rows_kernel[(triton.cdiv(c, block_r),)](
            logits, logits.stride(0), targets, lse, target_logit, zsum, scale if scale is not None else lse, c, v,
            BLOCK_R=block_r, BLOCK_V=block_v, COMPUTE_LSE=compute, WRITE_GRAD=write_grad, HAS_SCALE=scale is not None,
            num_warps=warps)
    return lse, (target_logit if compute else None), (zsum if compute else None)


# ---------------------------------------------------------------------------------------------------------
# Chunk helpers (torch matmuls around the kernel)
# ---------------------------------------------------------------------------------------------------------



def _chunk_logits(hidden2d, weight, bias, rows):
    """(hidden rows [C, H], logits [C, V]): one product, the bias fused into it."""
    h = hidden2d.index_select(0, rows)
    logits = torch.addmm(bias, h, weight.T) if bias is not None else h @ weight.T
    return h, logits




_FLOAT32_ADDMM = [True]  # torch's CUDA addmm takes a float32 accumulator with 16-bit factors (cleared if not)


def _accumulate_product(acc, a, b):
    """acc += a @ b with acc float32 and a, b in the input dtype: one product. float32 / float64 inputs:
    addmm_; 16-bit inputs on CUDA: cuBLAS with a float32 output added to the accumulator (out_dtype); 16-bit
    inputs elsewhere (the CPU interpreter tests), or a torch whose addmm wants the accumulator in the inputs'
    dtype (said once): the product in the input dtype, then an add."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FLOAT32_ADDMM[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as err:
            _FLOAT32_ADDMM[0] = False
            warnings.warn(f"sealong_kernels.orpo: addmm into a float32 accumulator failed ({str(err).splitlines()[0]}); "
                          "the weight gradient now adds a 16-bit product per chunk", stacklevel=2)
    acc.add_(a @ b)


def mm_float32(a, b):
    """a @ b with a float32 result: cuBLAS computing into float32 (out_dtype) for 16-bit CUDA inputs, the
    plain product for float32 / float64, an upcast product for 16-bit inputs elsewhere (CPU tests)."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()
