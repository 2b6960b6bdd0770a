"""CPU attention through torch's fused SDPA (`torch.nn.functional.scaled_dot_product_attention`), no [T, T] mask.

The model's attention contract (sealong/model/llama.py) over packed tokens, and the sampler's prefill and decode
attention, for devices without the Triton kernels. Every call goes to SDPA with 4-D [1, H, T, D] inputs (3-D
inputs send torch 2.13's CPU dispatch to the unfused math path) and GQA without repeating K/V:

    one sequence             one causal SDPA (`is_causal`)
    cu_seqlens               one causal SDPA per packed sequence (block-diagonal pieces)
    segment_ids              per run of equal segment ids: its queries against the earlier keys it may see
                             (segment 0 or its own) and itself causally: `causal_block_sdpa`
    prefill chunk            the chunk's queries against the cache so far: `causal_block_sdpa`
    decode                   `prefix_decode_sdpa`: each prompt's sample rows against its prefix, with the
                             log-sum-exp the sampler merges with the suffix part

`causal_block_sdpa` is causal SDPA when the queries are all the keys; when they are the last Lq of Lk keys it
passes SDPA the [Lq, Lk] lower-right causal mask of that block (an answer block over its prompt, a prefill
chunk over the cache): the only mask ever built, the block's own size, never the stream's [T, T].
"""

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, scale, causal=False, mask=None):
    """q [Lq, Hq, D], k, v [Lk, Hkv, D] -> [Lq, Hq, D] through fused SDPA (4-D inputs, GQA without repeats)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def causal_block_sdpa(q, k, v, scale=None):
    """Queries q [Lq, Hq, D] at the last Lq positions of the keys k, v [Lk, Hkv, D] (Lq <= Lk), causal: query i
    sees keys 0 .. Lk - Lq + i. Square: `is_causal`; else the block's [Lq, Lk] lower-right causal mask."""
    lq, lk = q.shape[0], k.shape[0]
    if lq > lk:
        raise ValueError(f"causal_block_sdpa: {lq} queries but only {lk} keys (queries are the last keys)")
    if lq == lk:
        return _sdpa(q, k, v, scale, causal=True)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    return _sdpa(q, k, v, scale, mask=mask)


def segment_runs(segment_ids):
    """[(start, end, segment)] of the maximal runs of equal ids, in stream order (one host copy)."""
    values, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(end - n, end, s) for end, n, s in zip(ends, counts.tolist(), values.tolist())]


def _segment_attention(q, k, v, segment_ids, scale):
    """The segment rule (key j visible from query i iff j <= i and kseg[j] in {0, qseg[i]}) run by run: a run of
    segment s sees the earlier tokens of segments 0 and s in full and itself causally, so its keys are those
    earlier tokens (gathered once per run) followed by the run, and the run is the block's last queries."""
    runs = segment_runs(segment_ids)
    if len(runs) == 1:
        return _sdpa(q, k, v, scale, causal=True)
    out, seen = [], {}  # seen: segment -> index tensor of its tokens so far
    for start, end, s in runs:
        earlier = [seen[x] for x in ((0,) if s == 0 else (0, s)) if x in seen]
        if earlier:
            idx = torch.cat(earlier + [torch.arange(start, end, device=q.device)])
            out.append(causal_block_sdpa(q[start:end], k[idx], v[idx], scale))
        else:
            out.append(_sdpa(q[start:end], k[start:end], v[start:end], scale, causal=True))
        here = torch.arange(start, end, device=q.device)
        seen[s] = torch.cat([seen[s], here]) if s in seen else here
    return torch.cat(out)


def sdpa_attention(q, k, v, *, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    """The model's attention callable on the CPU: differentiable, the visibility rule of
    `sealong.model.llama.visibility_mask` (causal, same packed sequence, segment rule) without building it."""
    if cu_seqlens is None:
        if segment_ids is None:
            return _sdpa(q, k, v, softmax_scale, causal=True)
        return _segment_attention(q, k, v, segment_ids, softmax_scale)
    cu = getattr(cu_seqlens, "cu_seqlens", cu_seqlens).tolist()  # a sealong_kernels VarlenPlan or the tensor
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        if segment_ids is None:
            out.append(_sdpa(q[a:b], k[a:b], v[a:b], softmax_scale, causal=True))
        else:
            out.append(_segment_attention(q[a:b], k[a:b], v[a:b], segment_ids[a:b], softmax_scale))
    return torch.cat(out) if out else q.new_zeros(q.shape)


@torch.no_grad()
def prefix_decode_sdpa(q, k, v, cu_q, cu_prefix, softmax_scale=None, **unused):
    """The CPU twin of sealong_kernels.prefix_decode_attention: rows cu_q[b]:cu_q[b+1] of q [M, Hq, D] against
    all of k, v[cu_prefix[b]:cu_prefix[b+1]] -> (out [M, Hq, D], lse [Hq, M] float32; float64 for float64).

    One prompt's rows form one matrix product per kv head ([G x rows, D] @ [D, P]), the K/V prefix read once for
    all its samples; scores, log-sum-exp and softmax in float32 (float64 stays float64), exp in place."""
    return prefix_rows(q, k, v, cu_q.tolist(), cu_prefix.tolist(), softmax_scale)


def prefix_rows(q, k, v, cq, cp, softmax_scale=None):
    """prefix_decode_sdpa on host offsets cq, cp (lists): one prompt covering every row writes no scratch."""
    m, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    whole = len(cq) == 2 and cq[0] == 0 and cq[1] == m and cp[1] > cp[0]
    if not whole:
        out = torch.zeros(m, hq, d, dtype=q.dtype, device=q.device)
        lse = torch.full((hq, m), float("-inf"), dtype=ct, device=q.device)
    for b in range(len(cq) - 1):
        q0, q1, p0, p1 = cq[b], cq[b + 1], cp[b], cp[b + 1]
        n = q1 - q0
        if n == 0 or p1 == p0:
            continue
        qg = q[q0:q1].to(ct).reshape(n, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n * g, d)
        s = torch.matmul(qg, k[p0:p1].to(ct).permute(1, 2, 0)).mul_(scale)  # [Hkv, n G, P]
        lse_b = torch.logsumexp(s, dim=-1)  # [Hkv, n G]
        p = s.sub_(lse_b[..., None]).exp_()
        o = torch.matmul(p, v[p0:p1].to(ct).transpose(0, 1)).reshape(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, hq, d)
        lse_b = lse_b.reshape(hkv, n, g).permute(0, 2, 1).reshape(hq, n)
        if whole:
            return o.to(q.dtype), lse_b
        out[q0:q1], lse[:, q0:q1] = o.to(q.dtype), lse_b
    return out, lse
