"""Minimum Bayes Risk scores of N sampled outputs per question, from their embeddings, in one pass of a kernel.

Math (normalize=True). Let e_1..e_N be the embeddings of one row, v_j the validity mask, n = sum_j v_j and
u_j = v_j * e_j / max(||e_j||, eps) (F.normalize; invalid samples contribute nothing). The paper's score is

    s_i = 1/(n-1) * sum_{j valid, j != i} cos(e_i, e_j) = (u_i . S - u_i . u_i) / (n - 1),   S = sum_j u_j

so the [N, N] similarity matrix is never needed: the kernel computes S and the N dot products u_i . S with
O(N·D) work instead of O(N²·D). With include_self=True (the authors' code) s_i = u_i . S / n. With
normalize=False u_j = v_j * e_j (plain dot products). Invalid samples get -inf; a valid sample without any
valid peer gets 0.0; a zero vector gets similarity 0 to everything (never NaN).

Peer weights (weights=c, c_j >= 0 finite, e.g. each sample's self-certainty): S = sum_j c_j u_j, C = sum_j c_j
(valid j) and

    s_i = sum_{j valid, j != i} c_j cos(e_i, e_j) / sum_{j valid, j != i} c_j = (u_i . S - c_i u_i . u_i) / (C - c_i)

(include_self: u_i . S / C), still O(N·D); 0.0 where the denominator is 0. c = 1 is the unweighted score:
exactly in the reference, to float32 rounding in this kernel (its weighted variant walks D in smaller blocks).

Error: every product and sum is in float32. u_i . S <= ||S|| <= n, so rounding leaves an absolute error of
a few float32 ulps of n in the numerator, i.e. a few 1e-7 in s_i after dividing by n - 1 (the subtraction
of u_i . u_i ~ 1 costs at most a factor n/(n-1) <= 2). Weighted, the numerator's error is a few ulps of C and
the quotient's a few ulps times C / (C - c_i): small unless one sample carries most of the weight. The tests
bound both against float64.

Kernel: one program per row b. Pass 1 walks D in blocks of BLOCK_D and accumulates the N squared norms;
pass 2 walks D again, backwards, forms the block of S and adds each u_i's share of u_i . S and u_i . u_i.
The row is read twice from global memory; the second read hits L2 while the row is small (N·D·bytes, e.g.
64-128 KB for N=32, D=1024), and walking backwards re-reads the most recently loaded blocks first. No
tl.dot (so bfloat16 is right under the interpreter too) and no [B, N, N] buffer.

Dispatch of `mbr_scores(..., backend="auto")`: CUDA tensors use the CUDA C++ kernel of `sealong_kernels._C`
(unweighted only: with weights, always Triton) when it is built (same math, see csrc/mbr.cu) and runs on this GPU, else this Triton kernel (an extension
built for other architectures fails its first launch: one warning, then Triton for the rest of the process); CPU tensors use the plain-torch
reference (`sealong_kernels.reference.mbr_scores`). backend="triton" on CPU tensors runs the Triton kernel
under TRITON_INTERPRET=1 (how the CPU tests exercise it).
"""


import warnings

import torch
import triton
import triton.language as tl

from . import reference
from .runtime import triton_available

MAX_N = 512  # BLOCK_N = 1024 spills registers on sm_90


@triton.jit
def _mbr_scores_kernel(
    E, M, W, OUT,
    N, D,
    stride_eb, stride_en, stride_ed, stride_mb, stride_mn, stride_wb, stride_wn, stride_ob,
    eps,
    HAS_MASK: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NORMALIZE: tl.constexpr, INCLUDE_SELF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    valid = offs_n < N
    if HAS_MASK:
        m = tl.load(M + b * stride_mb + offs_n.to(tl.int64) * stride_mn, mask=valid, other=0)
        valid = valid & (m != 0)
    if HAS_WEIGHTS:  # peer weights c_j (0 for invalid samples)
        c = tl.load(W + b * stride_wb + offs_n.to(tl.int64) * stride_wn, mask=valid, other=0.0).to(tl.float32)
    rows = E + b * stride_eb + offs_n.to(tl.int64)[:, None] * stride_en  # [BLOCK_N, 1] pointers

    # pass 1: squared norms -> per-sample weight w_j = v_j / max(||e_j||, eps)
    if NORMALIZE:
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(rows + offs_d.to(tl.int64)[None, :] * stride_ed,
                        mask=valid[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        w = tl.where(valid, 1.0 / tl.maximum(tl.sqrt(sq), eps), 0.0)
    else:
        w = tl.where(valid, 1.0, 0.0)

    # pass 2: S = sum_j u_j block by block; dot_i = u_i . S, self_i = u_i . u_i. Walks D backwards: the
    # blocks pass 1 read last are the likeliest to still be in cache.
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    self_sim = tl.zeros([BLOCK_N], dtype=tl.float32)
    num_blocks = tl.cdiv(D, BLOCK_D)
    for k in range(0, num_blocks):
        offs_d = (num_blocks - 1 - k) * BLOCK_D + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d.to(tl.int64)[None, :] * stride_ed,
                    mask=valid[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        u = x * w[:, None]
        if HAS_WEIGHTS:
            s = tl.sum(u * c[:, None], axis=0)  # [BLOCK_D] block of S = sum_j c_j u_j
        else:
            s = tl.sum(u, axis=0)  # [BLOCK_D] block of S
        dot += tl.sum(u * s[None, :], axis=1)
        self_sim += tl.sum(u * u, axis=1)

    # mean over the other valid samples (or over all valid ones with INCLUDE_SELF), weighted by c_j
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    if HAS_WEIGHTS:
        total = tl.sum(c, axis=0)
        if INCLUDE_SELF:
            num = dot
            den = tl.zeros([BLOCK_N], dtype=tl.float32) + total
        else:
            num = dot - c * self_sim
            den = total - c
        score = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    elif INCLUDE_SELF:
        score = dot / tl.maximum(n_valid, 1).to(tl.float32)
    else:
        score = (dot - self_sim) / tl.maximum(n_valid - 1, 1).to(tl.float32)
        score = tl.where(n_valid >= 2, score, 0.0)
    score = tl.where(valid, score, float("-inf"))
    tl.store(OUT + b * stride_ob + offs_n, score, mask=offs_n < N)


def _block_sizes(n, d, weighted=False):
    """BLOCK_N covers the whole row; BLOCK_D keeps the tile near 4096 elements and num_warps gives each thread
    at most 16 of them: about 128 registers on sm_90 and no spills up to N = 512 (checked by
    tests/kernels/test_mbr_cuda_build.py with cuobjdump), so two or more programs fit on an SM. The weighted
    kernel holds one more [BLOCK_N] vector and tile: half the BLOCK_D (at least 8), else N = 512 spills on sm_80,
    and num_warps from the halved tile (the unhalved one's 8 warps spill 4 B at N = 16, D = 4096 on sm_90 under
    Triton 3.9's ptxas options; tests/kernels/test_compile_cases_kernels.py, both Tritons)."""
    block_n = max(16, triton.next_power_of_2(n))
    block_d = max(16, min(256, 4096 // block_n, triton.next_power_of_2(d)))
    if weighted:
        block_d = max(8, block_d // 2)
    num_warps = max(4, min(16, block_n * block_d // 512))
    return block_n, block_d, num_warps


def mbr_scores_triton(emb, mask=None, normalize=True, include_self=False, eps=1e-12, weights=None):
    """Launch the Triton kernel (one launch, grid (B,)); arguments already checked by `mbr_scores`."""
    b, n, d = emb.shape
    out = torch.empty(b, n, dtype=torch.float32, device=emb.device)
    if b == 0:
        return out
    m = mask if mask is not None else out  # dummy pointer when HAS_MASK is false
    w = weights.to(torch.float32) if weights is not None else out  # likewise for HAS_WEIGHTS
    block_n, block_d, num_warps = _block_sizes(n, d, weights is not None)
    _mbr_scores_kernel[(b,)](
        emb, m, w, out, n, d,
        emb.stride(0), emb.stride(1), emb.stride(2),
        m.stride(0) if mask is not None else 0, m.stride(1) if mask is not None else 0,
        w.stride(0) if weights is not None else 0, w.stride(1) if weights is not None else 0, out.stride(0),
        eps,
        HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, NORMALIZE=normalize, INCLUDE_SELF=include_self,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_extension():
    """The compiled `sealong_kernels._C` module, or None when it was not built (see csrc/ and cuda_build.py)."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def mbr_scores_cuda(emb, mask=None, normalize=True, include_self=False, eps=1e-12):
    """Launch the CUDA C++ kernel of `sealong_kernels._C` on the current stream (raw pointers, no torch C++ API)."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("backend='cuda' needs the compiled extension sealong_kernels._C "
                           "(build it with `python -m sealong_kernels.cuda_build`)")
    b, n, d = emb.shape
    out = torch.empty(b, n, dtype=torch.float32, device=emb.device)
    if b == 0 or n == 0:  # nothing to score (the extension rejects N = 0; the Triton and torch paths return [B, 0])
        return out
    mask_u8 = None if mask is None else mask.to(torch.uint8).contiguous()
    with torch.cuda.device(emb.device):
        stream = torch.cuda.current_stream(emb.device).cuda_stream
        ext.mbr_scores(
            emb.data_ptr(), 0 if mask_u8 is None else mask_u8.data_ptr(), out.data_ptr(),
            b, n, d, emb.stride(0), emb.stride(1), emb.stride(2), _DTYPE_CODES[emb.dtype],
            bool(normalize), bool(include_self), float(eps), stream,
        )
    return out


_EXTENSION_USABLE = [True]  # cleared when the extension failed to launch on this process's GPU


def _cuda_or_triton(emb, mask, normalize, include_self, eps, weights=None):
    """backend='auto' on CUDA tensors: the CUDA extension when built and it runs on this GPU, else Triton. A
    launch failure (e.g. "no kernel image is available for execution on the device": built for other
    architectures, see cuda_build.arch_list) warns once and switches this process to Triton."""
    if weights is None and _EXTENSION_USABLE[0] and cuda_extension() is not None:  # the extension has no weights
        try:
            return mbr_scores_cuda(emb, mask, normalize, include_self, eps)
        except RuntimeError as err:
            _EXTENSION_USABLE[0] = False
            warnings.warn(f"sealong_kernels._C cannot run on this GPU ({str(err).splitlines()[0]}); using the Triton "
                          "MBR kernel (rebuild with TORCH_CUDA_ARCH_LIST including this GPU)", RuntimeWarning,
                          stacklevel=3)
    return mbr_scores_triton(emb, mask, normalize, include_self, eps, weights)


def _check(emb, mask, weights=None):
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
        raise ValueError(f"emb must be a [B, N, D] tensor, got {getattr(emb, 'shape', type(emb))}")
    if emb.dtype not in _DTYPE_CODES:
        raise ValueError(f"emb must be float32, float16 or bfloat16, got {emb.dtype}")
    b, n, d = emb.shape
    if n > MAX_N:
        raise ValueError(f"emb has N={n} samples per row; at most {MAX_N} are supported")
    if d == 0:
        raise ValueError("emb has D=0: embeddings need at least one dimension")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be a [B, N] = [{b}, {n}] tensor, got {getattr(mask, 'shape', type(mask))}")
        if mask.device != emb.device:
            raise ValueError(f"mask is on {mask.device} but emb is on {emb.device}")
        mask = mask.to(torch.bool)
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (b, n) or not weights.is_floating_point():
            raise ValueError(f"weights must be a floating [B, N] = [{b}, {n}] tensor, got "
                             f"{getattr(weights, 'shape', type(weights))}")
        if weights.device != emb.device:
            raise ValueError(f"weights is on {weights.device} but emb is on {emb.device}")
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("weights must be finite and >= 0")
    return mask


def mbr_scores(emb, mask=None, normalize=True, *, include_self=False, eps=1e-12, backend="auto", weights=None):
    """MBR score of every sample: its mean similarity to the other valid samples of its row.

    emb [B, N, D] float32/float16/bfloat16 (N <= 512, any B and D), mask [B, N] bool (None = all valid; an
    empty or failed output is invalid) -> scores [B, N] float32 on emb's device.
        scores[b, i] = mean_{j valid, j != i} cos(emb[b, i], emb[b, j])     (dot products if normalize=False)
    Invalid samples: -inf. A valid sample with no valid peer: 0.0. include_self=True reproduces the authors'
    code (row mean of E @ E^T including the self-similarity 1: same ranking, different values).
    weights [B, N] finite >= 0 (None: all 1) weight the peers (e.g. by their self-certainty):
        scores[b, i] = sum_{j valid, j != i} w_j cos(e_i, e_j) / sum_{j valid, j != i} w_j
    a valid sample whose peers weigh 0 in all gets 0.0; weights of ones give the unweighted scores (exactly
    on the reference backend, to float32 rounding on Triton; pass None for bit-exact unweighted scores).
    backend: "auto" (CUDA C++ extension if built and it runs on this GPU, else Triton, for CUDA tensors;
    plain torch on CPU),
    "cuda", "triton" (on CPU only under TRITON_INTERPRET=1) or "reference".

    >>> emb = torch.randn(4, 32, 384, device="cuda")
    >>> scores = mbr_scores(emb)                      # [4, 32]
    >>> chosen, rejected = select_pairs(scores, torch.Generator().manual_seed(0))
    """
    mask = _check(emb, mask, weights)
    if backend == "auto":
        if emb.is_cuda:
            return _cuda_or_triton(emb, mask, normalize, include_self, eps, weights)
        backend = "reference"
    if backend == "reference":
        return reference.mbr_scores(emb, mask, normalize, include_self, eps, weights).to(torch.float32)
    if backend == "triton":
        if not triton_available(emb):
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (use backend='reference')")
        return mbr_scores_triton(emb, mask, normalize, include_self, eps, weights)
    if backend == "cuda":
        if not emb.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors")
        if weights is not None:
            raise ValueError("weights: the CUDA C++ kernel has none; use backend='auto' or 'triton' (the Triton kernel)")
        return mbr_scores_cuda(emb, mask, normalize, include_self, eps)
    raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'reference', got {backend!r}")


def select_pairs(scores, generator=None, *, chosen_mask=None):
    """(chosen [B], rejected [B]) int64 from scores [B, N] (-inf = invalid): chosen = argmax, rejected = a
    uniformly random valid sample of the lower half by score, reproducible with `generator` (a CPU
    torch.Generator). Lower half: the n_valid // 2 lowest-scoring valid samples other than the chosen one
    (n_valid = 5 -> the 2 lowest), as in the authors' code. chosen_mask [B, N] restricts the chosen to
    flagged samples when a row has any. Rows with one valid sample: (that sample, -1); with none: (-1, -1).
    Plain torch on any device; the rule is spelled out in `sealong_kernels.reference.select_pairs`.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating [B, N] tensor, got {getattr(scores, 'shape', type(scores))}")
    if torch.isnan(scores).any():
        raise ValueError("scores contains NaN; mark invalid samples with -inf")
    if chosen_mask is not None and tuple(chosen_mask.shape) != tuple(scores.shape):
        raise ValueError(f"chosen_mask must have the shape of scores {tuple(scores.shape)}, got {tuple(chosen_mask.shape)}")
    return reference.select_pairs(scores, generator, chosen_mask)
