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
