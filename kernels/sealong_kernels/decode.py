"""Shared-prefix decode attention: the N decode queries of a prompt against its one prefix KV cache.

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
        kt = tl.load(K + keys[None, :] * stride_kt + g * stride_kh + d[:, None],
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(V + keys[:, None] * stride_vt + g * stride_vh + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(k_ok[None, :], s * scale_log2, float("-inf"))  # base-2 logits
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
def _merge_splits_kernel(PartOut, PartLse, Out, Lse, M, n_splits,
                         stride_ps, stride_pm, stride_ph, stride_ls, stride_lh, stride_om, stride_oh, stride_oh2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m, h] = sum_s exp(lse_s - lse) part_out[s, m, h], lse = log sum_s exp(lse_s) for BLOCK_M rows m of
    head h: pass 1 the max of the S lse values, pass 2 the weighted sum (weights <= 1: no overflow)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    row_ok = rows < M
    d = tl.arange(0, BLOCK_D)
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
    tl.store(Out + rows[:, None] * stride_om + h * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + h * stride_oh2 + rows, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))),
             mask=row_ok)


def merge_block_m(head_dim):
    """Rows per program of the split merge: a [BLOCK_M, BLOCK_D] float32 tile of about 2048 elements."""
    return max(16, min(64, 2048 // max(16, triton.next_power_of_2(head_dim))))


def merge_splits(part_out, part_lse, out, lse):
    """Merge S split-K partials part_out [S, M, Hq, D] float32, part_lse [S, Hq, M] into out [M, Hq, D] (any float
    dtype) and lse [Hq, M] float32, in one launch (grid (row blocks, Hq))."""
    s, m, hq, d = part_out.shape
    block_m = merge_block_m(d)
    _merge_splits_kernel[(triton.cdiv(m, block_m), hq)](
        part_out, part_lse, out, lse, m, s,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)
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


def _launch_config(rows_max, head_dim, p_max, n_programs_2d, num_splits=None, elem=2):
    """(BLOCK_M, BLOCK_N, num_warps, splits, keys_per_split); conservative for GPUs this was not tuned on.

    Tiles compile without register spills for sm_80 and sm_90 (bench/compile_cases_kernels.py, checked by
    tests/kernels/test_compile_cases_kernels.py, Triton 3.6 and 3.9): 16-bit inputs BLOCK_M up to 128 (64 for
    head dim 256), 8 warps from a 4096-element [BLOCK_M, BLOCK_D] tile on (4 warps spill a 32 x 128 tile on sm_80
    under Triton 3.6); float32 inputs (elem = 4) 16 x 16 tiles, since their IEEE dots run on FMA units and hold
    the operands in registers."""
    if interpreting():
        block_m, block_n, warps, target = 16, 16, 1, 1
    else:
        block_d = max(16, triton.next_power_of_2(head_dim))
        if elem >= 4:
            block_m, block_n, warps = 16, 16, 4
        else:
            block_m = min(128 if head_dim <= 128 else 64, max(16, triton.next_power_of_2(rows_max)))
            block_n = 64 if head_dim <= 128 else 32
            warps = 4 if block_m * block_d < 4096 else 8
        target = 264  # about two programs per SM on an H100 (132 SMs)
    splits = num_splits or max(1, min(triton.cdiv(target, n_programs_2d), triton.cdiv(p_max, 8 * block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(max(p_max, 1), splits), block_n) * block_n
    splits = triton.cdiv(max(p_max, 1), keys_per_split)
    return block_m, block_n, warps, splits, keys_per_split


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
