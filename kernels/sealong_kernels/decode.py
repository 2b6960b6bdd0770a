"""Shared-prefix decode attention: the N decode queries of a prompt against its one prefix KV cache
(`prefix_decode_attention`), and the whole attention of a decode step, prefix + each sample's own suffix + merge,
in one kernel (`cascade_decode_attention`, at the end of this file; the sampler's Triton path).

Math. Prompt b owns the decode queries q[cu_q[b]:cu_q[b+1]] (one token per sample, N_b samples) and the
prefix keys/values k, v[cu_prefix[b]:cu_prefix[b+1]] (P_b tokens, stored once). No mask: every sample sees
the whole prefix. For query row i of prompt b and query head h (kv head g = h // G, G = Hq // Hkv)

    s_ij = scale * q_ih . k_jg,   lse_ih = log sum_j exp(s_ij),   out_ih = sum_j exp(s_ij - lse_ih) v_jg

The caller merges (out, lse) with the attention over each sample's own suffix by log-sum-exp
(`sealong_kernels.reference.merge_attention_partials`), which is exact.

Why it is fast (Hydragen / FlashInfer cascade): for one (prompt, kv head) the N_b samples x G query heads
form one [N_b * G, D] block of queries, so the prefix is read from memory once per kv head and multiplied
as one matrix product, instead of once per sample. Long prefixes are split over programs (split-K, as in
flash-decoding) so that a single prompt with few kv heads still fills the GPU; the splits' partial
(out, lse) are merged in float32 by a second small kernel (flash-decoding's stage 2, FlashInfer's merge_state):

    lse = log sum_s exp(lse_s),     out = sum_s exp(lse_s - lse) out_s

one program per (block of query rows, query head) reads the S partials once and writes out (in q's dtype) and
lse; a split that saw no key has lse_s = -inf and weight 0, a row with no key at all gets out 0, lse -inf.
With a single split the first kernel writes out and lse directly (no partial buffers).

Layout: grid (row tiles x prompts x kv heads, splits), the first dimension folded so that the second stays
far below CUDA's 65535 limit on grid dimensions 2 and 3 (`launch_grid`; many prompts of a GQA model would
overflow a (row tiles, prompts x kv heads, splits) grid). Each program owns BLOCK_M rows r of its
(prompt, kv head) (sample r // G, head g * G + r % G) and loops over its split's keys in BLOCK_N tiles with
the online softmax in base 2; it writes its partial out (float32) and lse (natural log).
"""


import torch
import triton
import triton.language as tl

from . import reference
from .runtime import interpreting, triton_available

LOG2E = 1.4426950408889634


@triton.jit
def _prefix_key_tile(q, K, V, keys, k_ok, g, d, d_ok, stride_kt, stride_kh, stride_vt, stride_vh, scale_log2,
                     IEEE: tl.constexpr):
    """One tile of prefix keys for kv head g: (base-2 logits s = scale_log2 * q k^T, -inf where ~k_ok, and the
    tile's values v [BLOCK_N, BLOCK_D]); keys are int64 token rows. Shared by the prefix and cascade kernels."""
    kt = tl.load(K + keys[None, :] * stride_kt + g * stride_kh + d[:, None],
                 mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(V + keys[:, None] * stride_vt + g * stride_vh + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return tl.where(k_ok[None, :], s * scale_log2, float("-inf")), v


@triton.jit
def _prefix_decode_kernel(
    Q, K, V, OUT, LSE, CuQ, CuP,
    stride_qm, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_os, stride_om, stride_oh, stride_ls, stride_lh, stride_lm,
    n_kv_heads, row_tiles, keys_per_split, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)  # folded: ((prompt * n_kv_heads + kv head) * row_tiles + row tile)
    pid_m = pid % row_tiles
    b = (pid // row_tiles) // n_kv_heads
    g = (pid // row_tiles) % n_kv_heads
    split = tl.program_id(1)
    # token counts and loop bounds in int32 (packed caches hold < 2**31 tokens), pointer offsets in int64
    q_lo = tl.load(CuQ + b)
    n_rows = (tl.load(CuQ + b + 1) - q_lo) * G
    if pid_m * BLOCK_M >= n_rows:  # a row tile past this prompt's rows (another prompt has more samples)
        return
    p_hi = tl.load(CuP + b + 1)
    k_lo = tl.load(CuP + b) + split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, p_hi)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    sample = (q_lo + rows // G).to(tl.int64)  # [BLOCK_M] query token
    head = (g * G + rows % G).to(tl.int64)  # [BLOCK_M] query head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + sample[:, None] * stride_qm + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < k_hi
        keys = keys.to(tl.int64)
        s, v = _prefix_key_tile(q, K, V, keys, k_ok, g, d, d_ok, stride_kt, stride_kh, stride_vt, stride_vh,
                                scale_log2, IEEE)
        # update running max and normalizer (every tile has at least one valid key, so m_new is finite)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0  # this split saw no key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    split = split.to(tl.int64)
    tl.store(OUT + split * stride_os + sample[:, None] * stride_om + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split * stride_ls + head * stride_lh + sample * stride_lm, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(PartOut, PartLse, Out, Lse, Rows, M, n_splits, n_slots,
                         stride_ps, stride_pm, stride_ph, stride_ls, stride_lh, stride_om, stride_oh, stride_oh2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr):
    """out[m, h] = sum_s exp(lse_s - lse) part_out[s, m, h], lse = log sum_s exp(lse_s) for BLOCK_M rows m of
    head h: pass 1 the max of the S lse values, pass 2 the weighted sum (weights <= 1: no overflow).
    HAS_ROWS (the cascade decode): partial row m is written to out row Rows[m], skipped where Rows[m] >= n_slots."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    row_ok = rows < M
    d = tl.arange(0, BLOCK_D)
    dest = rows
    if HAS_ROWS:
        dest = tl.load(Rows + rows, mask=row_ok, other=n_slots).to(tl.int64)
    dest_ok = row_ok & (dest < n_slots) if HAS_ROWS else row_ok
    tile_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        lse_s = tl.load(PartLse + s * stride_ls + h * stride_lh + rows, mask=row_ok, other=float("-inf"))
        m_max = tl.maximum(m_max, lse_s)
    empty = m_max == float("-inf")  # no split saw a key
    m_safe = tl.where(empty, 0.0, m_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        w = tl.exp(tl.load(PartLse + s * stride_ls + h * stride_lh + rows, mask=row_ok, other=float("-inf")) - m_safe)
        o = tl.load(PartOut + s * stride_ps + rows[:, None] * stride_pm + h * stride_ph + d[None, :], mask=tile_ok,
                    other=0.0)
        total += w
        acc += w[:, None] * o
    out = acc / tl.where(empty, 1.0, total)[:, None]
    tl.store(Out + dest[:, None] * stride_om + h * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=dest_ok[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(Lse + h * stride_oh2 + dest, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))),
             mask=dest_ok)


def merge_block_m(head_dim):
    """Rows per program of the split merge: a [BLOCK_M, BLOCK_D] float32 tile of about 2048 elements."""
    return max(16, min(64, 2048 // max(16, triton.next_power_of_2(head_dim))))


def merge_splits(part_out, part_lse, out, lse, rows=None):
    """Merge S split-K partials part_out [S, M, Hq, D] float32, part_lse [S, Hq, M] into out [M, Hq, D] (any float
    dtype) and lse [Hq, M] float32, in one launch (grid (row blocks, Hq)). rows [M] (int64): partial row m goes to
    out / lse row rows[m] instead, rows[m] >= out.shape[0] dropped (the cascade decode's slot indirection)."""
    s, m, hq, d = part_out.shape
    block_m = merge_block_m(d)
    _merge_splits_kernel[(triton.cdiv(m, block_m), hq)](
        part_out, part_lse, out, lse, part_lse if rows is None else rows, m, s, out.shape[0],
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_ROWS=rows is not None,
        num_warps=4)
    return out, lse


def _check(q, k, v, cu_q, cu_prefix):
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [M, Hq, D] and k, v [P, Hkv, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) with equal head_dim")
    for name, t in (("cu_q", cu_q), ("cu_prefix", cu_prefix)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32 tensor on {q.device}, got {type(t).__name__}")
        if t.dtype != torch.int32 or t.device != q.device:
            raise TypeError(f"{name} must be int32 on q's device {q.device} (the kernel reads it as int32 there), "
                            f"got {t.dtype} on {t.device}: pass {name}.to(device=q.device, dtype=torch.int32)")
    if cu_q.ndim != 1 or cu_q.shape != cu_prefix.shape:
        raise ValueError(f"cu_q and cu_prefix must both be [B+1], got {tuple(cu_q.shape)} and {tuple(cu_prefix.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _tile_config(rows_max, head_dim, elem=2):
    """(BLOCK_M, BLOCK_N, num_warps) of the prefix and cascade kernels; conservative for GPUs this was not tuned on.

    Tiles compile without register spills for sm_80 and sm_90 (bench/compile_cases_kernels.py, checked by
    tests/kernels/test_compile_cases_kernels.py, Triton 3.6 and 3.9): 16-bit inputs BLOCK_M up to 128 (64 for
    head dim 256), 8 warps from a 4096-element [BLOCK_M, BLOCK_D] tile on (4 warps spill a 32 x 128 tile on sm_80
    under Triton 3.6), 32 keys a tile from a 16384-element one (128 x 128 with 64 keys spills 16 B on sm_80
    under Triton 3.6 when the output is 16-bit); float32 inputs (elem = 4) 16 x 16 tiles, since their IEEE dots
    run on FMA units and hold the operands in registers."""
    if interpreting():
        return 16, 16, 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    if elem >= 4:
        return 16, 16, 4
    block_m = min(128 if head_dim <= 128 else 64, max(16, triton.next_power_of_2(rows_max)))
    block_n = 64 if head_dim <= 128 and block_m * block_d < 16384 else 32
    return block_m, block_n, 4 if block_m * block_d < 4096 else 8


def _split_config(p_max, n_programs_2d, block_n, num_splits=None):
    """(splits, keys_per_split): enough key splits per (prompt, kv head) for about two programs per SM on an H100
    (132 SMs; one split under the interpreter), at least 8 key tiles each; keys_per_split a multiple of block_n."""
    target = 1 if interpreting() else 264
    splits = num_splits or max(1, min(triton.cdiv(target, n_programs_2d), triton.cdiv(p_max, 8 * block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(max(p_max, 1), splits), block_n) * block_n
    return triton.cdiv(max(p_max, 1), keys_per_split), keys_per_split


def _launch_config(rows_max, head_dim, p_max, n_programs_2d, num_splits=None, elem=2):
    """(BLOCK_M, BLOCK_N, num_warps, splits, keys_per_split) of the prefix kernel: `_tile_config` + `_split_config`."""
    block_m, block_n, warps = _tile_config(rows_max, head_dim, elem)
    return (block_m, block_n, warps) + _split_config(p_max, n_programs_2d, block_n, num_splits)


MAX_GRID_X, MAX_GRID_YZ = 2**31 - 1, 65535  # CUDA's limits on grid dimension 1 and dimensions 2, 3


def launch_grid(row_tiles, n_prompts, n_kv_heads, splits):
    """The decode kernel's grid: (row tiles x prompts x kv heads, splits), the first dimension folded so that
    only the number of key splits (at most a few hundred) lands in a dimension limited to 65535."""
    programs = row_tiles * n_prompts * n_kv_heads
    if programs > MAX_GRID_X or splits > MAX_GRID_YZ:
        raise ValueError(f"decode grid too large: {programs} programs x {splits} key splits (CUDA allows "
                         f"{MAX_GRID_X} x {MAX_GRID_YZ}); split the prompts over several calls")
    return programs, splits


def prefix_decode_attention(q, k, v, cu_q, cu_prefix, softmax_scale=None, *, max_rows=None, max_prefix=None, num_splits=None):
    """Decode queries of several prompts against each prompt's shared prefix cache -> (out, lse).

    q [M, Hq, D]: one token per sample, samples grouped by prompt (rows cu_q[b]:cu_q[b+1] are prompt b's;
    cu_q[-1] = M). k, v [P_total, Hkv, D]: the prompts' prefix caches packed (rows cu_prefix[b]:cu_prefix[b+1]).
    cu_q, cu_prefix [B+1] int32 on q's device (TypeError otherwise). Hq % Hkv == 0, query head h reads kv head
    h // (Hq // Hkv). Returns out [M, Hq, D] in q's dtype and lse [Hq, M] float32 (natural log; -inf for an
    empty prefix). max_rows / max_prefix (max N_b and max P_b) avoid a device sync when the caller knows them
    (without them cu_q[-1] = M is checked too); num_splits overrides the number of key splits per
    (prompt, kv head) (default: enough programs to fill the GPU).
    Runs the Triton kernel on CUDA tensors or under TRITON_INTERPRET=1, else the reference.
    """
    _check(q, k, v, cu_q, cu_prefix)
    if not triton_available(q):
        return reference.prefix_decode_attention(q, k, v, cu_q, cu_prefix, softmax_scale)
    m, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n_prompts = cu_q.shape[0] - 1
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    if n_prompts and (max_rows is None or max_prefix is None):  # one host sync for both
        rows_max, prefix_max, last = torch.stack([(cu_q[1:] - cu_q[:-1]).max(), (cu_prefix[1:] - cu_prefix[:-1]).max(),
                                                  cu_q[-1]]).tolist()
        if last != m:
            raise ValueError(f"cu_q[-1] = {last} must equal the number of query rows M = {m}")
        max_rows = rows_max if max_rows is None else max_rows
        max_prefix = prefix_max if max_prefix is None else max_prefix
    if m == 0 or n_prompts == 0 or not max_prefix:
        return (torch.zeros(m, hq, d, dtype=q.dtype, device=q.device),
                torch.full((hq, m), float("-inf"), dtype=torch.float32, device=q.device))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_m, block_n, warps, splits, per_split = _launch_config(max_rows * g, d, max_prefix, n_prompts * hkv, num_splits,
                                                                q.element_size())
    row_tiles = triton.cdiv(max_rows * g, block_m)
    out = torch.empty(m, hq, d, dtype=q.dtype, device=q.device)  # every row is written (cu_q covers 0..M)
    lse = torch.empty(hq, m, dtype=torch.float32, device=q.device)
    if splits == 1:  # the kernel writes the result itself
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty(splits, m, hq, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, hq, m, dtype=torch.float32, device=q.device)
    _prefix_decode_kernel[launch_grid(row_tiles, n_prompts, hkv, splits)](
        q, k, v, part_out, part_lse, cu_q, cu_prefix,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        hkv, row_tiles, per_split, scale * LOG2E,
        G=g, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=warps,
    )
    if splits > 1:
        merge_splits(part_out, part_lse, out, lse)
    return out, lse


# ------------------------------------------------------------------------------------------------------------------
# Cascade decode: prefix + suffix + merge of one decode step in one launch
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _cascade_decode_kernel(
    Q, K, V, KS, VS, KNew, VNew, OUT, LSE, Rows, Write, CuQ, CuP,
    stride_qm, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kss, stride_kst, stride_ksh, stride_vss, stride_vst, stride_vsh,
    stride_knm, stride_knh, stride_vnm, stride_vnh,
    stride_os, stride_om, stride_oh, stride_ls, stride_lh, stride_lm,
    n_slots, n_kv_heads, row_tiles, keys_per_split, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPT: tl.constexpr, SUFFIX_N: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)  # folded: ((prompt * n_kv_heads + kv head) * row_tiles + row tile), as the prefix kernel
    pid_m = pid % row_tiles
    b = (pid // row_tiles) // n_kv_heads
    g = (pid // row_tiles) % n_kv_heads
    split = tl.program_id(1)
    q_lo = tl.load(CuQ + b)
    n_samples = tl.load(CuQ + b + 1) - q_lo
    if pid_m * BLOCK_M >= n_samples * G:  # early exit: a row tile past this prompt's rows
        return
    p_lo = tl.load(CuP + b)
    n_prefix = tl.load(CuP + b + 1) - p_lo
    # this split's share of the virtual keys [0, n_prefix + suffix keys of the tile); the last split takes the rest
    v_lo = split * keys_per_split
    v_hi = tl.where(split == tl.num_programs(1) - 1, 2147483647, v_lo + keys_per_split)

    # the tile's query rows: row r is sample r // G (slot Rows[q_lo + r // G]), query head g * G + r % G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    sample = rows // G
    slot = tl.load(Rows + q_lo + sample, mask=rows < n_samples * G, other=n_slots)
    row_ok = (rows < n_samples * G) & (slot < n_slots)  # slot n_slots: a sample not decoding (dropped)
    slot = slot.to(tl.int64)
    head = (g * G + rows % G).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + slot[:, None] * stride_qm + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1. the shared prefix: keys p_lo + [v_lo, v_hi) clipped to the prompt, one [BLOCK_M, D] x [D, BLOCK_N] product
    for start in range(tl.minimum(v_lo, n_prefix), tl.minimum(v_hi, n_prefix), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < tl.minimum(v_hi, n_prefix)
        keys = (p_lo + keys).to(tl.int64)
        s, v = _prefix_key_tile(q, K, V, keys, k_ok, g, d, d_ok, stride_kt, stride_kh, stride_vt, stride_vh,
                                scale_log2, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees every prefix key of the tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 2. the suffixes of the tile's samples t = 0..SPT-1 (sample n0 + t) without this step's token, packed one
    # after the other: packed key u belongs to the sample t with end_(t-1) <= u < end_t, at suffix position
    # u - end_(t-1) (end = prefix sums of the lengths write_t; a sample not decoding or not in the tile: 0)
    n0 = (pid_m * BLOCK_M) // G
    t = tl.arange(0, SPT)
    t_ok = (n0 + t < n_samples) & ((n0 + t) * G < (pid_m + 1) * BLOCK_M)  # a sample with a row in this tile
    t_slot = tl.load(Rows + q_lo + n0 + t, mask=t_ok, other=n_slots)
    t_ok = t_ok & (t_slot < n_slots)
    t_write = tl.load(Write + t_slot, mask=t_ok, other=-1).to(tl.int32)  # this step's suffix row (-1: no suffix)
    t_ok = t_ok & (t_write >= 0)
    t_end = tl.cumsum(tl.where(t_ok, t_write, 0), 0)
    u_lo = tl.maximum(v_lo - n_prefix, 0)
    u_hi = tl.minimum(v_hi - n_prefix, tl.max(t_end, 0))
    sample_t = sample - n0  # [BLOCK_M] the row's sample within the tile
    for u0 in range(u_lo, u_hi, SUFFIX_N):
        u = u0 + tl.arange(0, SUFFIX_N)
        u_ok = u < u_hi
        before = t_end[None, :] <= u[:, None]  # [SUFFIX_N, SPT]: samples wholly before key u
        owner = tl.sum(before.to(tl.int32), 1)
        pos = u - tl.max(tl.where(before, t_end[None, :], 0), 1)
        k_slot = tl.load(Rows + q_lo + n0 + owner, mask=u_ok, other=0).to(tl.int64)  # a gather of L1-cached rows
        k_row = k_slot * stride_kss + pos.to(tl.int64) * stride_kst
        v_row = k_slot * stride_vss + pos.to(tl.int64) * stride_vst
        kt = tl.load(KS + k_row[None, :] + g * stride_ksh + d[:, None], mask=u_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(VS + v_row[:, None] + g * stride_vsh + d[None, :], mask=u_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        visible = (sample_t[:, None] == owner[None, :]) & u_ok[None, :]  # block diagonal: a row sees its own keys
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # -inf for a row with no key yet
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 3. this step's token of each sample (one key column per tile sample, block diagonal), by the last split,
    # which also writes it into the suffix cache at row write_t (a row no program of this launch reads)
    if split == tl.num_programs(1) - 1:
        kn = tl.load(KNew + t_slot[None, :].to(tl.int64) * stride_knm + g * stride_knh + d[:, None],
                     mask=t_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, SPT]
        vn = tl.load(VNew + t_slot[:, None].to(tl.int64) * stride_vnm + g * stride_vnh + d[None, :],
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [SPT, BLOCK_D]
        k_row = t_slot.to(tl.int64) * stride_kss + t_write.to(tl.int64) * stride_kst
        v_row = t_slot.to(tl.int64) * stride_vss + t_write.to(tl.int64) * stride_vst
        tl.store(KS + k_row[None, :] + g * stride_ksh + d[:, None], kn, mask=t_ok[None, :] & d_ok[:, None])
        tl.store(VS + v_row[:, None] + g * stride_vsh + d[None, :], vn, mask=t_ok[:, None] & d_ok[None, :])
        if IEEE:
            s = tl.dot(q, kn, input_precision="ieee")
        else:
            s = tl.dot(q, kn)
        s = tl.where((sample_t[:, None] == t[None, :]) & t_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vn, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vn.dtype), vn)
        m_i = m_new

    empty = l_i == 0.0  # this split saw no key of the row: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    if PARTIAL:  # split-K partials by row position q_lo + sample (unique), merged by _merge_splits_kernel
        dest = (q_lo + sample).to(tl.int64)
    else:  # the result itself, by slot
        dest = slot
    split = split.to(tl.int64)
    tl.store(OUT + split * stride_os + dest[:, None] * stride_om + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split * stride_ls + head * stride_lh + dest * stride_lm, lse, mask=row_ok)


def cascade_tile_config(rows_max, head_dim, elem=2):
    """(BLOCK_M, BLOCK_N, num_warps) of the cascade kernel: at most 32 rows (16 at head dim 256); 64 keys a tile
    below a 2048-element [BLOCK_M, BLOCK_D] tile, 32 from there; `_tile_config`'s warps.

    The suffix loop's gathered key tiles and the new-token product need registers the prefix kernel does not:
    under Triton 3.9 the 64- and 128-row tiles spill on sm_80 at head dim 128 (124-600 B per thread) and G = 1 at
    128 rows spills on both archs. Under Triton 3.6, 64 keys spill 8-28 B at 32 x 64, 16 x 128 and 32 x 128,
    where 32 keys compile clean, and 32 keys spill 16 B at 16 x 64, where 64 compile clean. Every tile this
    returns compiles with 0 spills for sm_80 and sm_90 under Triton 3.6 and 3.9 (bench/compile_cases_kernels.py
    `cascade_cases`). A prompt with more than 32 rows (N_b x G) gets several row tiles, each reading the prefix
    (adjacent programs in the folded grid: L2 serves the repeats)."""
    block_m, block_n, _ = _tile_config(rows_max, head_dim, elem)
    if interpreting() or elem >= 4:
        return block_m, block_n, 1 if interpreting() else 4
    block_m = min(block_m, 32 if head_dim <= 128 else 16)
    tile = block_m * max(16, triton.next_power_of_2(head_dim))
    return block_m, 64 if tile < 2048 else 32, 4 if tile < 4096 else 8


def cascade_compiles_clean(dtype) -> bool:
    """Whether the cascade kernel has a spill-free tile for `dtype` on a GPU: 16-bit inputs yes (every tile of
    `cascade_tile_config`, head dims 64 / 128 / 256, sm_80 and sm_90); float32 no (its IEEE products hold the
    operands in registers: 16 x 16 tiles spill 8-52 B at head dim 64, 472-480 B at 128 under Triton 3.9), so the
    sampler keeps its torch composition for float32 on a GPU. Under the interpreter every dtype runs."""
    return interpreting() or dtype in (torch.float16, torch.bfloat16)


def samples_per_tile(block_m, g):
    """SPT: a power of two >= 16 (a product's smallest width) and >= the samples a tile of block_m rows (G rows
    per sample) can touch (one more when G does not divide block_m: a tile may start inside a sample)."""
    return max(16, triton.next_power_of_2(block_m // g if block_m % g == 0 else (block_m + g - 2) // g + 1))


def cascade_decode_attention(q, k_new, v_new, k_prefix, v_prefix, k_suffix, v_suffix, rows, write, cu_q, cu_prefix,
                             softmax_scale=None, *, max_rows, max_prefix, span, num_splits=None):
    """One decode step's attention for every slot: its prompt's shared prefix and its own suffix, in one launch.

    Math. Slot s (a sample of prompt b, query q_s [Hq, D]) attends, without a mask, to the keys of its prompt's
    prefix k_prefix[cu_prefix[b]:cu_prefix[b+1]] followed by its own suffix k_suffix[s, :write[s] + 1], whose last
    row is this step's key k_new[s] (written into the cache by this launch). For query head h (kv head
    g = h // G), over that concatenated key list j

        s_j = scale * q_sh . k_jg,   lse_sh = log sum_j exp(s_j),   out_sh = sum_j exp(s_j - lse_sh) v_jg

    computed as one online softmax (base 2, float32) that runs first over the prefix and then over the suffix, so
    prefix attention, suffix attention and their log-sum-exp merge happen in registers.

    Cascade (FlashInfer's cascade attention, Hydragen): one program owns BLOCK_M rows of one (prompt, kv head),
    row r being sample r // G and head g * G + r % G, so the prompt's N_b samples x G heads multiply the prefix
    as one [BLOCK_M, D] x [D, BLOCK_N] product (the prefix read once per kv head and row tile for all its
    samples, as `prefix_decode_attention`; BLOCK_M <= 32 here, see `cascade_tile_config`). The suffixes of the
    tile's samples are packed one after another into the key dimension (the sample owning packed key u is found
    from the prefix sums of their lengths) and multiplied the same way, masked block-diagonally so that a row
    sees its own sample's keys only: every suffix key is read once, at a product of BLOCK_M rows of which G are
    useful (at <= 32 rows that is about 32 flops per byte read: memory bound). Row tiles past a prompt's rows
    exit at once; a sample with write = -1 (no suffix) or not decoding (rows[i] = S) sees no suffix key (a row
    not decoding is dropped).

    The new token: the suffix loop packs each sample's write[s] cached keys (positions 0 .. write[s] - 1); this
    step's key and value are one more block-diagonal product of the tile with one column per sample, read from
    k_new / v_new (not the cache) by the last split, which also stores them into k_suffix / v_suffix[s, write[s]]
    (the only cache rows this launch writes, which no program of it reads), so no scatter runs outside the kernel
    and nothing can be read before it is written.

    Splits: when the grid would otherwise have too few programs (long prefixes, few prompts or kv heads), the
    keys of each (prompt, kv head, row tile), prefix then packed suffixes, are split into ranges of
    keys_per_split over programs (split-K, flash-decoding); the last split takes every key past the others, so
    the bounds max_prefix and span only balance the work, never cut it. Each split writes float32 partials
    (out, lse) by row position and `_merge_splits_kernel` (HAS_ROWS) merges them into the slots' rows: 2
    launches. With one split (the interpreter, or enough programs) the kernel writes out and lse itself: 1 launch.

    Inputs: q [S, Hq, D], k_new, v_new [S, Hkv, D] (this step's token of every slot); k_prefix, v_prefix
    [P_total, Hkv, D] with cu_prefix [B+1] int32; k_suffix, v_suffix [S, L, Hkv, D]; rows [sum N_b] int64 (prompt
    b's samples rows[cu_q[b]:cu_q[b+1]], slot numbers, S = not decoding) with cu_q [B+1] int32; write [S] int64
    (the slot's suffix row this step, its length - 1; -1: no suffix key and nothing written, prefix only).
    max_rows = max N_b, max_prefix >= max P_b, span >= max(write) + 1 (host ints: no sync, fixed for a CUDA
    graph). Returns out [S, Hq, D] in q's dtype and lse
    [Hq, S] float32; rows of slots not in `rows` (idle slots) are left unwritten (torch.empty: garbage that stays
    in the idle slot's row). Runs the Triton kernel on CUDA tensors or under TRITON_INTERPRET=1, else the
    reference (`sealong_kernels.reference.cascade_decode_attention`).
    """
    _check(q, k_prefix, v_prefix, cu_q, cu_prefix)
    if not triton_available(q):
        return reference.cascade_decode_attention(q, k_new, v_new, k_prefix, v_prefix, k_suffix, v_suffix, rows, write,
                                                  cu_q, cu_prefix, softmax_scale)
    s_slots, hq, d = q.shape
    hkv = k_prefix.shape[1]
    g = hq // hkv
    if k_suffix.ndim != 4 or k_suffix.shape[0] != s_slots or k_suffix.shape[2:] != k_prefix.shape[1:]:
        raise ValueError(f"k_suffix must be [S={s_slots}, L, Hkv, D] = [S, L, {hkv}, {d}], got {tuple(k_suffix.shape)}")
    if k_new.shape != (s_slots, hkv, d) or v_new.shape != k_new.shape or v_suffix.shape != k_suffix.shape:
        raise ValueError(f"k_new, v_new must be [S, Hkv, D] = {(s_slots, hkv, d)} and v_suffix as k_suffix, got "
                         f"{tuple(k_new.shape)}, {tuple(v_new.shape)}, {tuple(v_suffix.shape)}")
    n_prompts = cu_q.shape[0] - 1
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(s_slots, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(hq, s_slots, dtype=torch.float32, device=q.device)
    if n_prompts == 0 or rows.shape[0] == 0 or max_rows == 0:
        return out, lse
    q, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new))
    for t in (k_prefix, v_prefix, k_suffix, v_suffix):
        if t.stride(-1) != 1:
            raise ValueError("the prefix and suffix caches must have a contiguous last dimension (they are written in place)")
    block_m, block_n, warps = cascade_tile_config(max_rows * g, d, q.element_size())
    spt = samples_per_tile(block_m, g)
    suffix_keys = min(spt, max_rows, triton.cdiv(block_m, g) + 1) * max(span, 0)  # per tile, at most
    splits, per_split = _split_config(max_prefix + suffix_keys, n_prompts * hkv, block_n, num_splits)
    row_tiles = triton.cdiv(max_rows * g, block_m)
    m = rows.shape[0]
    if splits == 1:
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty(splits, m, hq, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, hq, m, dtype=torch.float32, device=q.device)
    _cascade_decode_kernel[launch_grid(row_tiles, n_prompts, hkv, splits)](
        q, k_prefix, v_prefix, k_suffix, v_suffix, k_new, v_new, part_out, part_lse, rows, write, cu_q, cu_prefix,
        q.stride(0), q.stride(1), k_prefix.stride(0), k_prefix.stride(1), v_prefix.stride(0), v_prefix.stride(1),
        k_suffix.stride(0), k_suffix.stride(1), k_suffix.stride(2), v_suffix.stride(0), v_suffix.stride(1), v_suffix.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        s_slots, hkv, row_tiles, per_split, scale * LOG2E,
        G=g, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n, SPT=spt,
        SUFFIX_N=block_n, PARTIAL=splits > 1, IEEE=q.dtype == torch.float32, num_warps=warps,
    )
    if splits > 1:
        merge_splits(part_out, part_lse, out, lse, rows=rows)
    return out, lse
