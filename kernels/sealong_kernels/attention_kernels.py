"""The `@triton.jit` kernels of the flash attention (layer 1 of `sealong_kernels.attention`, which holds the
math, the launch wrappers, the autograd Function and the public `flash_attention`).

In reading order: the visibility rule and the key / query ranges a block can see (shared by all kernels),
the forward (online softmax over key blocks, exp2 inside, LSE stored in natural log), the backward
preprocess (delta = rowsum(dO * O)), dK/dV (one program per key block and kv head, looping over the query
heads of its group, no atomics) and dQ (one program per query block and query head). Pointer offsets are
int64 (token index x stride); token counts and loop bounds int32.

Every key / query loop is software-pipelined by Triton (num_stages copies in flight). The loops over a block
plan's list load step i + 1's block start one iteration ahead (`_listed_start`), so their tile loads depend only
on loop-carried values and get the same multi-buffering as the range loops. The forward does not issue block
j + 1's QK^T before block j's softmax: written that way (the product of the next block carried through the loop),
Triton 3.9 waits on that wgmma right after issuing it (`warp_group_dot_wait {pendings = 0}`) and the loop drops to
2 buffers with a wait-all, so the rotation costs pipelining and overlaps nothing; FA3-style overlap needs warp
specialization (`tl.range(..., warp_specialize=True)`, which Triton's fused-attention tutorial turns on for
Blackwell only); not tried here.
"""

import triton
import triton.language as tl


@triton.jit
def _visible(qi, kj, q_ok, k_ok, q_start, k_start, qseq, kseq, qseg, kseg,
             CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr):
    """The visibility rule, elementwise on broadcastable query / key index tensors (any orientation)."""
    ok = q_ok & k_ok
    if CAUSAL:  # causal by global position
        ok = ok & (q_start + qi >= k_start + kj)
    if HAS_SEQ:  # same packed sequence
        ok = ok & (qseq == kseq)
    if HAS_SEG:  # segment 0 (shared prompt) is seen by all, otherwise only the own segment
        ok = ok & ((kseg == 0) | (kseg == qseg))
    return ok


@triton.jit
def _rows_see_keys(offs_m, m_ok, qseq, qseg, offs_n, n_ok, SeqIdx, KSeg, q_start, k_start,
                   CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] visibility of a key block from a block of query rows (loads the keys' ids)."""
    kseq = tl.load(SeqIdx + offs_n, mask=n_ok, other=-2) if HAS_SEQ else 0
    kseg = tl.load(KSeg + offs_n, mask=n_ok, other=-2) if HAS_SEG else 0
    return _visible(offs_m[:, None], offs_n[None, :], m_ok[:, None], n_ok[None, :], q_start, k_start,
                    qseq[:, None] if HAS_SEQ else 0, kseq[None, :] if HAS_SEQ else 0,
                    qseg[:, None] if HAS_SEG else 0, kseg[None, :] if HAS_SEG else 0, CAUSAL, HAS_SEQ, HAS_SEG)


@triton.jit
def _key_range(start_m, Tq, Tk, q_start, k_start, SeqIdx, CuSeqlens, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr):
    """Keys of the query block [start_m, start_m + BLOCK_M): [lo, hi) can be visible (block skipping);
    [lo, mid) are whole key blocks that every query of the block sees (computed without a mask)."""
    last_m = tl.minimum(start_m + BLOCK_M, Tq) - 1
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + Tk
    full = hi
    if CAUSAL:  # skip key blocks entirely above the diagonal
        hi = tl.minimum(hi, q_start + last_m + 1 - k_start)
        full = tl.minimum(full, q_start + start_m + 1 - k_start)  # keys the block's first query sees
    if HAS_SEQ:  # only the sequences of this query block (q and k are the same tokens)
        lo = tl.maximum(lo, tl.load(CuSeqlens + tl.load(SeqIdx + start_m)))
        hi = tl.minimum(hi, tl.load(CuSeqlens + tl.load(SeqIdx + last_m) + 1))
    mid = lo + (tl.maximum(full - lo, 0) // BLOCK_N) * BLOCK_N
    if HAS_SEQ:  # sequence boundaries inside blocks: mask everything
        mid = lo
    if HAS_SEG:
        mid = lo
    return lo, mid, hi


@triton.jit
def _query_range(start_n, Tq, Tk, q_start, k_start, SeqIdx, CuSeqlens, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr):
    """Queries of the key block [start_n, start_n + BLOCK_N): [lo, hi) can see some of its keys;
    [lo, mid) need the mask (the diagonal), [mid, hi) see every key of the block."""
    last_n = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + Tq
    mid = lo
    if CAUSAL:  # queries before the block's first key (by global position) see none of it
        lo = tl.maximum(lo, k_start + start_n - q_start)
        first_full = k_start + last_n - q_start  # the first query that sees the block's last key
        mid = tl.minimum(lo + tl.cdiv(tl.maximum(first_full - lo, 0), BLOCK_M) * BLOCK_M, hi)
    if HAS_SEQ:
        lo = tl.maximum(lo, tl.load(CuSeqlens + tl.load(SeqIdx + start_n)))
        hi = tl.minimum(hi, tl.load(CuSeqlens + tl.load(SeqIdx + last_n) + 1))
        mid = hi
    if HAS_SEG:
        mid = hi
    return lo, mid, hi


@triton.jit
def _attn_fwd_block(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                    offs_d, d_ok, start_n, lo, hi, q_start, k_start, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                    HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax step over the key block at start_n; MASKED=False only for whole blocks every query sees."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    k_mask = d_ok[:, None]
    v_mask = d_ok[None, :]
    if MASKED:
        n_ok = (offs_n >= lo) & (offs_n < hi)  # never loads a key outside the visible range
        k_mask = k_mask & n_ok[None, :]
        v_mask = v_mask & n_ok[:, None]
    kT = tl.load(Kh + offs_n64[None, :] * stride_kt + offs_d[:, None], mask=k_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # scores in log2 units
    if MASKED:
        ok = _rows_see_keys(offs_m, m_ok, qseq, qseg, offs_n, n_ok, SeqIdx, KSeg, q_start, k_start,
                            CAUSAL, HAS_SEQ, HAS_SEG)
        s = tl.where(ok, s, float("-inf"))
    # update running max and normalizer (a row with no visible key so far keeps m = -inf, p = 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(Vh + offs_n64[:, None] * stride_vt + offs_d[None, :], mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                    offs_d, d_ok, lo, hi, q_start, k_start, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                    HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks of [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                        stride_vt, offs_d, d_ok, start_n, lo, hi, q_start, k_start, qk_scale,
                                        BLOCK_N, MASKED, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _listed_start(Idx, i, n, PLAN: tl.constexpr, BLOCK: tl.constexpr):
    """First token of step i of a listed loop (plan block Idx[i // (PLAN // BLOCK)], its (i % ...)-th sub-block);
    0 past the end (i >= n), so a loop can load step i + 1's start one iteration ahead: the tile loads of each
    step then depend only on loop-carried values and Triton's pipeliner multi-buffers them (an index loaded
    inside the iteration that uses it leaves the loop at 2 buffers with a wait-all at its top)."""
    per: tl.constexpr = PLAN // BLOCK
    blk = tl.load(Idx + i // per, mask=i < n, other=0)
    return blk * PLAN + (i % per) * BLOCK


@triton.jit
def _attn_fwd_listed(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                     offs_d, d_ok, Idx, count, lo, hi, q_start, k_start, qk_scale,
                     PLAN_N: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the plan's key blocks Idx[0:count] (each PLAN_N keys, BLOCK_N at a time)."""
    n = count * (PLAN_N // BLOCK_N)  # one flat loop, not an unrolled one per plan block
    start_n = _listed_start(Idx, 0, n, PLAN_N, BLOCK_N)
    for i in range(n):
        start_next = _listed_start(Idx, i + 1, n, PLAN_N, BLOCK_N)  # one iteration ahead: the loop pipelines
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg,
                                        stride_kt, stride_vt, offs_d, d_ok, start_n, lo, hi, q_start,
                                        k_start, qk_scale, BLOCK_N, MASKED, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        start_n = start_next
    return acc, l_i, m_i


@triton.jit
def _plan_row(Blocks, row, n_rows, n_cols):
    """(full list, its count, partial list, its count) of plan row `row` in a packed list tensor."""
    n_full = tl.load(Blocks + row)
    n_part = tl.load(Blocks + n_rows + row)
    full = Blocks + 2 * n_rows + row * n_cols
    part = Blocks + 2 * n_rows + n_rows * n_cols + row * n_cols
    return full, n_full, part, n_part


@triton.jit
def _add_into(Ptr, rows, row_ok, tile, w_old, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              SCALE_OLD: tl.constexpr):
    """Ptr[r, :HEAD_DIM] <- w_old[r] * Ptr[r, :HEAD_DIM] + tile[r, :] (SCALE_OLD=False: w_old = 1) for the tile's
    rows at offsets rows [R, 1] (int64), float32: the epilogue of the accumulating (ACCUMULATE) kernels.

    Done in four column quarters one after the other (a barrier between them keeps the compiler from hoisting
    every load to the top): the old values of one quarter live beside the tile, not a second whole tile, which
    spilled the kernels already near the register limit (forward at head dim 128 on sm_80, dQ at 256 on sm_90).
    Quarter (i, j) holds columns i BLOCK_D / 2 + j BLOCK_D / 4 + [0, BLOCK_D / 4)."""
    R: tl.constexpr = tile.shape[0]
    Q: tl.constexpr = BLOCK_D // 4
    lo, hi = tl.split(tl.permute(tl.reshape(tile, [R, 2, 2, Q]), (0, 3, 2, 1)))  # split on i: [R, Q, 2] each
    offs = tl.arange(0, Q)
    for i in tl.static_range(2):
        pair = tl.split(lo if i == 0 else hi)  # split on j
        for j in tl.static_range(2):
            cols = i * (BLOCK_D // 2) + j * Q + offs
            ptr = Ptr + rows + cols[None, :]
            mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
            old = tl.load(ptr, mask=mask, other=0.0)
            if SCALE_OLD:
                old = old * w_old[:, None]
            tl.store(ptr, old + pair[j], mask=mask)
            tl.debug_barrier()


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, SeqIdx, CuSeqlens, QSeg, KSeg, Blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    Tq, Tk, q_start, k_start, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PLAN: tl.constexpr = False, PLAN_M: tl.constexpr = 128, PLAN_N: tl.constexpr = 128,
    ACCUMULATE: tl.constexpr = False,
):
    """One query block of one query head: O = softmax(S) V with an online softmax over key blocks (the key range
    it can see, or with HAS_PLAN the full and partial key blocks of its plan row). Lse row h starts at
    Lse + h * stride_lh (Tq for a fresh [Hq, Tq] tensor).

    ACCUMULATE (a ring step's block): (Out, Lse) already hold a float32 partial (o_a, lse_a) over other keys, and
    the epilogue merges this block's keys into it in place instead of storing a fresh partial. With the tile's
    running max m and sums l = sum_j 2^(s_j - m), acc = sum_j 2^(s_j - m) v_j (log2 units, s = S log2 e) and
    a = lse_a log2 e:

        M = max(a, m),  w_a = 2^(a - M),  w_b = 2^(m - M)
        o = (w_a o_a + w_b acc) / (w_a + w_b l),   lse = (M + log2(w_a + w_b l)) ln 2

    (the weights are <= 1: no overflow). It is the pairwise merge of `ring_merge` with the tile's own
    normalization folded in: o_b = acc / l, lse_b = (m + log2 l) ln 2. A row empty on both sides (M = -inf)
    stays o = 0, lse = -inf; a row empty only in this block (l = 0) keeps (o_a, lse_a). Each program owns its
    rows of one head, so the read-modify-write has no race."""
    pid = tl.program_id(0)
    if CAUSAL:  # the heaviest query blocks (last rows) first, so the tail of the grid is short work
        pid = tl.num_programs(0) - 1 - pid
    start_m = pid * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    hk = h // group  # GQA: kv head, K/V never repeated in memory
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m.to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qseq = tl.load(SeqIdx + offs_m, mask=m_ok, other=-1) if HAS_SEQ else 0
    qseg = tl.load(QSeg + offs_m, mask=m_ok, other=-1) if HAS_SEG else 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of S * log2(e)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running normalizer
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    Kh, Vh = K + hk * stride_kh, V + hk * stride_vh
    lo, mid, hi = _key_range(start_m, Tq, Tk, q_start, k_start, SeqIdx, CuSeqlens, BLOCK_M, BLOCK_N,
                             CAUSAL, HAS_SEQ, HAS_SEG)  # with a plan: the bounds of the masked blocks' loads
    if HAS_PLAN:
        full, n_full, part, n_part = _plan_row(Blocks, start_m // PLAN_M, tl.cdiv(Tq, PLAN_M), tl.cdiv(Tk, PLAN_N))
        acc, l_i, m_i = _attn_fwd_listed(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                         stride_vt, offs_d, d_ok, full, n_full, lo, hi, q_start, k_start, qk_scale,
                                         PLAN_N, BLOCK_N, False, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        acc, l_i, m_i = _attn_fwd_listed(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                         stride_vt, offs_d, d_ok, part, n_part, lo, hi, q_start, k_start, qk_scale,
                                         PLAN_N, BLOCK_N, True, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    else:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                        stride_vt, offs_d, d_ok, lo, mid, q_start, k_start, qk_scale,
                                        BLOCK_N, False, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                        stride_vt, offs_d, d_ok, mid, hi, q_start, k_start, qk_scale,
                                        BLOCK_N, True, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)

    lse_ptr = Lse + h * stride_lh + offs_m
    if ACCUMULATE:  # merge into the accumulator's (o_a, lse_a), see the docstring
        lse_a = tl.load(lse_ptr, mask=m_ok, other=float("-inf")) * 1.4426950408889634
        m_all = tl.maximum(lse_a, m_i)
        empty = m_all == float("-inf")
        m_all = tl.where(empty, 0.0, m_all)
        w_a = tl.exp2(lse_a - m_all)
        w_b = tl.exp2(m_i - m_all)
        total = w_a + w_b * l_i
        inv = 1.0 / tl.where(empty, 1.0, total)
        lse = tl.where(empty, float("-inf"), (m_all + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
        _add_into(Out, offs_m.to(tl.int64)[:, None] * stride_ot + h * stride_oh, m_ok, acc * (w_b * inv)[:, None],
                  w_a * inv, HEAD_DIM, BLOCK_D, True)
        tl.store(lse_ptr, lse, mask=m_ok)
    else:  # normalize; empty rows: out 0, lse -inf. LSE back to natural log.
        seen = l_i > 0.0
        acc = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(Out, DOut, Delta, stride_ot, stride_oh, stride_dt, stride_dh, T,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward preprocess: delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + rows * stride_dt + h * stride_dh + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + h * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_block(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx, QSeg,
                         stride_qt, stride_dot, offs_d, d_ok, start_m, lo, hi, q_start, k_start, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                         HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block from the query block at start_m of one query head (rows = keys)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = (offs_m >= lo) & (offs_m < hi)  # rows outside load as q = dO = 0, lse = +inf: P = 0, add nothing
    offs_m64 = offs_m.to(tl.int64)
    qT = tl.load(Qh + offs_m64[None, :] * stride_qt + offs_d[:, None],
                 mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_M]
    do = tl.load(DOh + offs_m64[:, None] * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(Lse_h + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: P = 0
    delta = tl.load(Delta_h + offs_m, mask=m_ok, other=0.0)
    # P^T from the saved (global) lse: no renormalization
    pT = tl.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])
    if MASKED:
        qseq = tl.load(SeqIdx + offs_m, mask=m_ok, other=-1) if HAS_SEQ else 0
        qseg = tl.load(QSeg + offs_m, mask=m_ok, other=-1) if HAS_SEG else 0
        ok = _visible(offs_m[None, :], offs_n[:, None], m_ok[None, :], n_ok[:, None], q_start, k_start,
                      qseq[None, :] if HAS_SEQ else 0, kseq[:, None] if HAS_SEQ else 0,
                      qseg[None, :] if HAS_SEG else 0, kseg[:, None] if HAS_SEG else 0, CAUSAL, HAS_SEQ, HAS_SEG)
        pT = tl.where(ok, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    # dS^T = P^T * (dP^T - delta), dP^T = V dO^T
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx, QSeg,
                         stride_qt, stride_dot, offs_d, d_ok, lo, hi, q_start, k_start, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                         HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_block(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx, QSeg,
                                      stride_qt, stride_dot, offs_d, d_ok, start_m, lo, hi, q_start, k_start, qk_scale,
                                      BLOCK_M, MASKED, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_listed(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx, QSeg,
                          stride_qt, stride_dot, offs_d, d_ok, Idx, count, lo, hi, q_start, k_start, qk_scale,
                          PLAN_M: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over the plan's query blocks Idx[0:count] (PLAN_M rows, BLOCK_M at a time)."""
    n = count * (PLAN_M // BLOCK_M)  # one flat loop, not an unrolled one per plan block
    start_m = _listed_start(Idx, 0, n, PLAN_M, BLOCK_M)
    for i in range(n):
        start_next = _listed_start(Idx, i + 1, n, PLAN_M, BLOCK_M)  # one iteration ahead: the loop pipelines
        dk, dv = _attn_bwd_dkdv_block(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx,
                                      QSeg, stride_qt, stride_dot, offs_d, d_ok, start_m, lo, hi,
                                      q_start, k_start, qk_scale, BLOCK_M, MASKED, CAUSAL, HAS_SEQ, HAS_SEG,
                                      PRECISION)
        start_m = start_next
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, SeqIdx, CuSeqlens, QSeg, KSeg, Blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dks, stride_dvs,
    Tq, Tk, q_start, k_start, group, group_per, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PLAN: tl.constexpr = False, PLAN_M: tl.constexpr = 128, PLAN_N: tl.constexpr = 128,
    ACCUMULATE: tl.constexpr = False,
):
    """One key block of one kv head: dK, dV summed over the group's query heads (or this split's group_per of
    them) and visible query blocks (the query range that can see it, or with HAS_PLAN the full and partial query
    blocks of its plan column). ACCUMULATE: DK, DV hold float32 gradients (a ring step's), and the tile is added to
    them in place (DK += dK, DV += dV; one split only: each program owns its key rows).

    Works in the transposed orientation (rows = keys): P^T = exp2(K Q^T * scale * log2e - lse * log2e).
    """
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)  # the group's query heads split over programs: partial dK / dV per split
    g_lo = split * group_per
    DK += split.to(tl.int64) * stride_dks
    DV += split.to(tl.int64) * stride_dvs
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    offs_n64 = offs_n.to(tl.int64)
    k = tl.load(K + offs_n64[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n64[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    kseq = tl.load(SeqIdx + offs_n, mask=n_ok, other=-2) if HAS_SEQ else 0
    kseg = tl.load(KSeg + offs_n, mask=n_ok, other=-2) if HAS_SEG else 0
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid, hi = _query_range(start_n, Tq, Tk, q_start, k_start, SeqIdx, CuSeqlens, BLOCK_M, BLOCK_N,
                               CAUSAL, HAS_SEQ, HAS_SEG)  # with a plan: the bounds of the query loads
    if HAS_PLAN:
        full, n_full, part, n_part = _plan_row(Blocks, start_n // PLAN_N, tl.cdiv(Tk, PLAN_N), tl.cdiv(Tq, PLAN_M))
        for g in range(g_lo, g_lo + group_per):  # this program's query heads of the kv head's group
            h = hk * group + g
            Qh, DOh, Lse_h, Delta_h = Q + h * stride_qh, DOut + h * stride_doh, Lse + h * Tq, Delta + h * Tq
            dk, dv = _attn_bwd_dkdv_listed(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx,
                                           QSeg, stride_qt, stride_dot, offs_d, d_ok, full, n_full, lo, hi, q_start,
                                           k_start, qk_scale, PLAN_M, BLOCK_M, False, CAUSAL, HAS_SEQ, HAS_SEG,
                                           PRECISION)
            dk, dv = _attn_bwd_dkdv_listed(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx,
                                           QSeg, stride_qt, stride_dot, offs_d, d_ok, part, n_part, lo, hi, q_start,
                                           k_start, qk_scale, PLAN_M, BLOCK_M, True, CAUSAL, HAS_SEQ, HAS_SEG,
                                           PRECISION)
    else:
        for g in range(g_lo, g_lo + group_per):  # this program's query heads of the kv head's group
            h = hk * group + g
            Qh, DOh, Lse_h, Delta_h = Q + h * stride_qh, DOut + h * stride_doh, Lse + h * Tq, Delta + h * Tq
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx,
                                          QSeg, stride_qt, stride_dot, offs_d, d_ok, lo, mid, q_start, k_start,
                                          qk_scale, BLOCK_M, True, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, offs_n, n_ok, kseq, kseg, Qh, DOh, Lse_h, Delta_h, SeqIdx,
                                          QSeg, stride_qt, stride_dot, offs_d, d_ok, mid, hi, q_start, k_start,
                                          qk_scale, BLOCK_M, False, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)

    if ACCUMULATE:
        _add_into(DK, offs_n64[:, None] * stride_dkt + hk * stride_dkh, n_ok, dk * sm_scale, 1.0, HEAD_DIM, BLOCK_D,
                  False)
        _add_into(DV, offs_n64[:, None] * stride_dvt + hk * stride_dvh, n_ok, dv, 1.0, HEAD_DIM, BLOCK_D, False)
    else:
        tl.store(DK + offs_n64[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :], dk * sm_scale, mask=kv_mask)
        tl.store(DV + offs_n64[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _attn_bwd_dq_block(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                       offs_d, d_ok, start_n, lo, hi, q_start, k_start, qk_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                       HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block from the key block at start_n; MASKED=False only for whole visible blocks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    kv_mask = d_ok[:, None]
    if MASKED:
        n_ok = (offs_n >= lo) & (offs_n < hi)  # never loads a key outside the visible range
        kv_mask = kv_mask & n_ok[None, :]
    kT = tl.load(Kh + offs_n64[None, :] * stride_kt + offs_d[:, None], mask=kv_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    vT = tl.load(Vh + offs_n64[None, :] * stride_vt + offs_d[:, None], mask=kv_mask, other=0.0)
    p = tl.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        ok = _rows_see_keys(offs_m, m_ok, qseq, qseg, offs_n, n_ok, SeqIdx, KSeg, q_start, k_start,
                            CAUSAL, HAS_SEQ, HAS_SEG)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                       offs_d, d_ok, lo, hi, q_start, k_start, qk_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                       HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks of [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        dq = _attn_bwd_dq_block(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                stride_vt, offs_d, d_ok, start_n, lo, hi, q_start, k_start, qk_scale,
                                BLOCK_N, MASKED, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_listed(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt, stride_vt,
                        offs_d, d_ok, Idx, count, lo, hi, q_start, k_start, qk_scale,
                        PLAN_N: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the plan's key blocks Idx[0:count]."""
    n = count * (PLAN_N // BLOCK_N)  # one flat loop, not an unrolled one per plan block
    start_n = _listed_start(Idx, 0, n, PLAN_N, BLOCK_N)
    for i in range(n):
        start_next = _listed_start(Idx, i + 1, n, PLAN_N, BLOCK_N)  # one iteration ahead: the loop pipelines
        dq = _attn_bwd_dq_block(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                stride_vt, offs_d, d_ok, start_n, lo, hi, q_start, k_start, qk_scale,
                                BLOCK_N, MASKED, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        start_n = start_next
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, SeqIdx, CuSeqlens, QSeg, KSeg, Blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    Tq, Tk, q_start, k_start, group, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PLAN: tl.constexpr = False, PLAN_M: tl.constexpr = 128, PLAN_N: tl.constexpr = 128,
    ACCUMULATE: tl.constexpr = False,
):
    """One query block of one query head: dQ = scale * sum over visible key blocks of dS K (ACCUMULATE: DQ holds
    float32 gradients, DQ += dQ in place; the program owns its rows of its head)."""
    pid = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first
        pid = tl.num_programs(0) - 1 - pid
    start_m = pid * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    offs_m64 = offs_m.to(tl.int64)
    q = tl.load(Q + offs_m64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DOut + offs_m64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(Lse + h * Tq + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: P = 0
    delta = tl.load(Delta + h * Tq + offs_m, mask=m_ok, other=0.0)
    qseq = tl.load(SeqIdx + offs_m, mask=m_ok, other=-1) if HAS_SEQ else 0
    qseg = tl.load(QSeg + offs_m, mask=m_ok, other=-1) if HAS_SEG else 0
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    Kh, Vh = K + hk * stride_kh, V + hk * stride_vh
    lo, mid, hi = _key_range(start_m, Tq, Tk, q_start, k_start, SeqIdx, CuSeqlens, BLOCK_M, BLOCK_N,
                             CAUSAL, HAS_SEQ, HAS_SEG)  # with a plan: the bounds of the masked blocks' loads
    if HAS_PLAN:
        full, n_full, part, n_part = _plan_row(Blocks, start_m // PLAN_M, tl.cdiv(Tq, PLAN_M), tl.cdiv(Tk, PLAN_N))
        dq = _attn_bwd_dq_listed(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                 stride_vt, offs_d, d_ok, full, n_full, lo, hi, q_start, k_start, qk_scale,
                                 PLAN_N, BLOCK_N, False, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        dq = _attn_bwd_dq_listed(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                 stride_vt, offs_d, d_ok, part, n_part, lo, hi, q_start, k_start, qk_scale,
                                 PLAN_N, BLOCK_N, True, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    else:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                stride_vt, offs_d, d_ok, lo, mid, q_start, k_start, qk_scale,
                                BLOCK_N, False, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, offs_m, m_ok, qseq, qseg, Kh, Vh, SeqIdx, KSeg, stride_kt,
                                stride_vt, offs_d, d_ok, mid, hi, q_start, k_start, qk_scale,
                                BLOCK_N, True, CAUSAL, HAS_SEQ, HAS_SEG, PRECISION)
    if ACCUMULATE:
        _add_into(DQ, offs_m64[:, None] * stride_dqt + h * stride_dqh, m_ok, dq * sm_scale, 1.0, HEAD_DIM, BLOCK_D,
                  False)
    else:
        tl.store(DQ + offs_m64[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq * sm_scale, mask=q_mask)
