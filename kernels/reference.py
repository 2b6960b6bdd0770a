"""Plain-torch twins of every kernel in sealong_kernels: the test oracle and the CPU fallback.

Each function here computes exactly what its kernel computes, in whatever dtype it is given (tests pass
float64), with no tiling, chunking or fusion, so that it can be read as the specification.
"""

import torch


# ---------------------------------------------------------------------------------------------------------
# Attention (twin of kernels/attention.py): raw forward / backward ops with the exact visibility rule.
# ---------------------------------------------------------------------------------------------------------


def attention_mask(
    tq, tk, *, causal=True, q_start=0, k_start=0, cu_seqlens=None, segment_ids=None, k_segment_ids=None, device=None
):
    """Boolean [Tq, Tk]: True where query i may see key j.

    Key j is visible from query i iff all of:
      * not causal, or q_start + i >= k_start + j                (causal by global position)
      * i and j lie in the same packed sequence of cu_seqlens    (only when q and k are the same tokens)
      * kseg[j] == 0 or kseg[j] == qseg[i]                       (segment 0 = shared prompt, seen by all)
    where qseg = segment_ids [Tq] and kseg = k_segment_ids [Tk] (defaults to segment_ids).
    """
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        visible &= (q_start + i) >= (k_start + j)
    if cu_seqlens is not None:
        if tq != tk or q_start != k_start:
            raise ValueError(f"cu_seqlens needs q and k to be the same tokens (Tq={tq}, Tk={tk}, q_start={q_start}, k_start={k_start})")
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        if cu.ndim != 1 or int(cu[0]) != 0 or int(cu[-1]) != tq or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, start at 0 and end at T={tq}, got {cu.tolist()}")
        seq = torch.bucketize(torch.arange(tq, device=device), cu[1:], right=True)  # [T] sequence index
        visible &= seq[:, None] == seq[None, :]
    if segment_ids is not None or k_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("k_segment_ids needs segment_ids for the queries")
        qseg = segment_ids.to(device=device, dtype=torch.int64)
        kseg = qseg if k_segment_ids is None else k_segment_ids.to(device=device, dtype=torch.int64)
        if qseg.shape != (tq,) or kseg.shape != (tk,):
            raise ValueError(f"segment_ids must be [Tq]={tq} and k_segment_ids [Tk]={tk}, got {tuple(qseg.shape)} and {tuple(kseg.shape)}")
        visible &= (kseg[None, :] == 0) | (kseg[None, :] == qseg[:, None])
    return visible


def _attention_scores(q, k, softmax_scale, mask):
    """Masked scaled scores [Hkv, G, Tq, Tk] in the compute dtype (float64 stays float64, else float32)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(ct).reshape(tq, hkv, hq // hkv, d)  # query head h uses kv head h // G
    s = torch.einsum("qhgd,khd->hgqk", qg, k.to(ct)) * softmax_scale
    return s.masked_fill(~mask, float("-inf"))


def attention_forward(
    q, k, v, *, causal=True, softmax_scale=None, q_start=0, k_start=0, cu_seqlens=None, segment_ids=None, k_segment_ids=None
):
    """out, lse = softmax(q k^T * scale, masked) v, logsumexp of the masked scaled scores.

    q [Tq, Hq, D], k, v [Tk, Hkv, D] with Hq % Hkv == 0 (query head h uses kv head h // (Hq // Hkv)).
    Returns out [Tq, Hq, D] in q's dtype and lse [Hq, Tq] (natural log; float32, float64 for float64 inputs).
    A query row that sees no key gets out = 0 and lse = -inf. Visibility: see `attention_mask`.
    """
    tq, hq, d = q.shape
    tk = k.shape[0]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    mask = attention_mask(tq, tk, causal=causal, q_start=q_start, k_start=k_start, cu_seqlens=cu_seqlens,
                          segment_ids=segment_ids, k_segment_ids=k_segment_ids, device=q.device)
    s = _attention_scores(q, k, scale, mask)  # [Hkv, G, Tq, Tk]
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # empty rows: exp(-inf) = 0
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(s.dtype)).reshape(tq, hq, d)
    return out.to(q.dtype), lse.reshape(hq, tq)


def attention_backward(
    dout, q, k, v, out, lse, *, delta=None, causal=True, softmax_scale=None, q_start=0, k_start=0,
    cu_seqlens=None, segment_ids=None, k_segment_ids=None
):
    """dq, dk, dv of attention from the (possibly global, merged) out and lse; no renormalization.

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q,
    with delta = rowsum(dO * O) [Hq, Tq] computed from dout and out when not given. dk, dv sum over the
    query heads sharing a kv head. All gradients float32 (float64 for float64 inputs).
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    mask = attention_mask(tq, tk, causal=causal, q_start=q_start, k_start=k_start, cu_seqlens=cu_seqlens,
                          segment_ids=segment_ids, k_segment_ids=k_segment_ids, device=q.device)
    s = _attention_scores(q, k, scale, mask)  # [Hkv, G, Tq, Tk]
    ct = s.dtype
    lse = lse.to(ct).reshape(hkv, g, tq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    do = dout.to(ct).reshape(tq, hkv, g, d)
    if delta is None:
        delta = (dout.to(ct) * out.to(ct)).sum(-1).transpose(0, 1)  # [Hq, Tq]
    delta = delta.to(ct).reshape(hkv, g, tq)
    dv = torch.einsum("hgqk,qhgd->khd", p, do)
    dp = torch.einsum("qhgd,khd->hgqk", do, v.to(ct))
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("hgqk,khd->qhgd", ds, k.to(ct)).reshape(tq, hq, d) * scale
    dk = torch.einsum("hgqk,qhgd->khd", ds, q.to(ct).reshape(tq, hkv, g, d)) * scale
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# MBR scoring (twins of sealong_kernels.mbr_scores / select_pairs; owner: kernels/mbr.py)
# ----------------------------------------------------------------------------------------------------


def mbr_scores_from_similarity(sim, mask=None, include_self=False):
    """Mean similarity of each sample to the other valid samples of its row.

    sim [B, N, N] (any utility: cosine, ROUGE-L, answer agreement), mask [B, N] bool (None = all valid).
    score[b, i] = sum_{j valid, j != i} sim[b, i, j] / (n_valid - 1)       (include_self=False, the paper)
    score[b, i] = sum_{j valid} sim[b, i, j] / n_valid                       (include_self=True, the authors' code)
    Invalid samples get -inf. With include_self=False a valid sample with no valid peer gets 0.0.
    Computed in float64 for float64 input, else float32.
    """
    b, n, _ = sim.shape
    ct = torch.promote_types(sim.dtype, torch.float32)
    valid = torch.ones(b, n, dtype=torch.bool, device=sim.device) if mask is None else mask.to(torch.bool)
    pair = valid[:, :, None] & valid[:, None, :]
    if not include_self:
        pair = pair & ~torch.eye(n, dtype=torch.bool, device=sim.device)
    total = torch.where(pair, sim.to(ct), torch.zeros((), dtype=ct, device=sim.device)).sum(-1)
    count = pair.sum(-1)
    scores = torch.where(count > 0, total / count.clamp(min=1).to(ct), torch.zeros((), dtype=ct, device=sim.device))
    return scores.masked_fill(~valid, float("-inf"))


def mbr_scores(emb, mask=None, normalize=True, include_self=False, eps=1e-12):
    """MBR scores of N samples per row: emb [B, N, D] -> scores [B, N] (float64 for float64 input, else float32).

    With normalize=True each embedding is divided by max(||e||, eps) (torch.nn.functional.normalize), so the
    similarity is the cosine; a zero vector has similarity 0 to everything. Then
    `mbr_scores_from_similarity(E @ E^T, mask, include_self)`: the [B, N, N] matrix is materialized here.
    """
    ct = torch.promote_types(emb.dtype, torch.float32)
    e = emb.to(ct)
    if normalize:
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=eps)
    return mbr_scores_from_similarity(e @ e.transpose(1, 2), mask, include_self)


def select_pairs(scores, generator=None, chosen_mask=None):
    """Pick (chosen, rejected) per row from scores [B, N] (invalid samples are -inf) -> two int64 [B] tensors.

    chosen: the argmax over valid samples (first index among ties); with chosen_mask [B, N] bool, the argmax
    over valid samples where chosen_mask is true, when the row has any (sealong uses it so that an output
    cut off at the token limit is never chosen while a finished one exists), else over all valid samples.
    rejected: the authors' "random from the lower half": among the valid samples other than the chosen one,
    sorted by score ascending (ties: higher index first), the first n_valid // 2 form the lower half (for
    n_valid = 5: the 2 lowest); one of them is drawn uniformly with one torch.rand value per row from
    `generator` (drawn on the CPU, so results do not depend on the device). When chosen is the argmax this is
    exactly the bottom n_valid // 2 of all valid samples.
    Rows with one valid sample: chosen = that sample, rejected = -1. Rows with none: both -1.
    """
    b, n = scores.shape
    dev = scores.device
    valid = scores > float("-inf")
    n_valid = valid.sum(-1)
    pool = valid if chosen_mask is None else valid & chosen_mask.to(device=dev, dtype=torch.bool)
    pool = torch.where(pool.any(-1, keepdim=True), pool, valid)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=dev)
    chosen = torch.where(pool, scores, neg_inf).argmax(-1)
    chosen = torch.where(n_valid > 0, chosen, torch.full_like(chosen, -1))

    is_chosen = torch.arange(n, device=dev)[None, :] == chosen[:, None]
    key = torch.where(valid & ~is_chosen, scores, torch.tensor(float("inf"), dtype=scores.dtype, device=dev))
    # stable ascending sort of the reversed row puts higher indices first among ties
    order = (n - 1) - torch.sort(key.flip(-1), dim=-1, stable=True).indices
    half = n_valid // 2
    u = torch.rand(b, generator=generator, dtype=torch.float64).to(dev)
    pick = torch.minimum((u * half).long(), (half - 1).clamp(min=0))
    rejected = order.gather(1, pick[:, None])[:, 0]
    rejected = torch.where(n_valid >= 2, rejected, torch.full_like(rejected, -1))
    return chosen.long(), rejected.long()
