"""Plain-torch twins of every kernel in sealong_kernels: the test oracle and the CPU fallback.

Each function here computes exactly what its kernel computes, in whatever dtype it is given (tests pass
float64), with no tiling, chunking or fusion, so that it can be read as the specification.
"""

import torch


# ---------------------------------------------------------------------------------------------------------
# Attention (twin of kernels/sealong_kernels/attention.py): raw forward / backward ops with the exact visibility rule.
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
        cu = getattr(cu_seqlens, "cu_seqlens", cu_seqlens)  # a VarlenPlan (sealong_kernels.attention) or the tensor
        cu = cu.to(device=device, dtype=torch.int64)
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


def _check_attention_shapes(q, k, v):
    """Clear errors for shapes the einsums below would reject with an opaque message (or broadcast)."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be [T, H, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must be [Tk, Hkv, D={q.shape[2]}], got k {tuple(k.shape)}, v {tuple(v.shape)}")


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
    q, k, v, *, causal=True, softmax_scale=None, q_start=0, k_start=0, cu_seqlens=None, segment_ids=None, k_segment_ids=None,
    out_dtype=None, accumulate=None,
):
    """out, lse = softmax(q k^T * scale, masked) v, logsumexp of the masked scaled scores.

    q [Tq, Hq, D], k, v [Tk, Hkv, D] with Hq % Hkv == 0 (query head h uses kv head h // (Hq // Hkv)).
    Returns out [Tq, Hq, D] in q's dtype and lse [Hq, Tq] (natural log; float32, float64 for float64 inputs).
    A query row that sees no key gets out = 0 and lse = -inf. Visibility: see `attention_mask`.
    accumulate: (out, lse) accumulators over other keys (float32 / float64, views allowed): this call's result is
    merged into them in place (`merge_attention_partials`) and they are returned (the contract of the Triton op,
    which merges in its epilogue).
    """
    if accumulate is not None:
        acc_out, acc_lse = accumulate
        o, l = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, q_start=q_start, k_start=k_start,
                                 cu_seqlens=cu_seqlens, segment_ids=segment_ids, k_segment_ids=k_segment_ids,
                                 out_dtype=acc_out.dtype)
        merged, lse = merge_attention_partials(acc_out, acc_lse, o, l.to(acc_lse.dtype))
        acc_out.copy_(merged)
        acc_lse.copy_(lse)
        return acc_out, acc_lse
    _check_attention_shapes(q, k, v)
    tq, hq, d = q.shape
    tk = k.shape[0]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    mask = attention_mask(tq, tk, causal=causal, q_start=q_start, k_start=k_start, cu_seqlens=cu_seqlens,
                          segment_ids=segment_ids, k_segment_ids=k_segment_ids, device=q.device)
    s = _attention_scores(q, k, scale, mask)  # [Hkv, G, Tq, Tk]
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # empty rows: exp(-inf) = 0
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(s.dtype)).reshape(tq, hq, d)
    return out.to(out_dtype or q.dtype), lse.reshape(hq, tq)


def attention_backward(
    dout, q, k, v, out, lse, *, delta=None, causal=True, softmax_scale=None, q_start=0, k_start=0,
    cu_seqlens=None, segment_ids=None, k_segment_ids=None, accumulate=None
):
    """dq, dk, dv of attention from the (possibly global, merged) out and lse; no renormalization.

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q,
    with delta = rowsum(dO * O) [Hq, Tq] computed from dout and out when not given. dk, dv sum over the
    query heads sharing a kv head. All gradients float32 (float64 for float64 inputs).
    accumulate: (dq, dk, dv) gradients that this call's are added to in place, and returned; (dq, None, None)
    computes only dq, (None, dk, dv) only dk and dv (the Triton op launches one kernel each).
    """
    if accumulate is not None:
        check_backward_parts(accumulate)
        grads = _attention_grads(dout, q, k, v, out, lse, delta, causal, softmax_scale, q_start, k_start, cu_seqlens,
                                 segment_ids, k_segment_ids, accumulate[0] is not None, accumulate[1] is not None)
        for acc, g in zip(accumulate, grads):
            if acc is not None:
                acc.add_(g)
        return tuple(accumulate)
    return _attention_grads(dout, q, k, v, out, lse, delta, causal, softmax_scale, q_start, k_start, cu_seqlens,
                            segment_ids, k_segment_ids, True, True)


def check_backward_parts(accumulate):
    """A backward's accumulators name its parts: (dq, dk, dv), (dq, None, None) or (None, dk, dv)."""
    if len(accumulate) != 3 or (accumulate[1] is None) != (accumulate[2] is None) or all(t is None for t in accumulate):
        raise ValueError("backward accumulate must be (dq, dk, dv), (dq, None, None) or (None, dk, dv), got "
                         f"{['None' if t is None else 'tensor' for t in accumulate]}")


def _attention_grads(dout, q, k, v, out, lse, delta, causal, softmax_scale, q_start, k_start, cu_seqlens, segment_ids,
                     k_segment_ids, want_dq, want_dkv):
    """attention_backward's gradients; the parts not wanted are None (not computed)."""
    _check_attention_shapes(q, k, v)
    tq, hq, d = q.shape
    if dout.shape != q.shape or tuple(lse.shape) != (hq, tq):
        raise ValueError(f"dout must be {tuple(q.shape)} and lse [Hq, Tq]={(hq, tq)}, got {tuple(dout.shape)}, {tuple(lse.shape)}")
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
    dv = torch.einsum("hgqk,qhgd->khd", p, do) if want_dkv else None
    dp = torch.einsum("qhgd,khd->hgqk", do, v.to(ct))
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("hgqk,khd->qhgd", ds, k.to(ct)).reshape(tq, hq, d) * scale if want_dq else None
    dk = torch.einsum("hgqk,qhgd->khd", ds, q.to(ct).reshape(tq, hkv, g, d)) * scale if want_dkv else None
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# MBR scoring (twins of sealong_kernels.mbr_scores / select_pairs; owner: kernels/sealong_kernels/mbr.py)
# ----------------------------------------------------------------------------------------------------


def mbr_scores_from_similarity(sim, mask=None, include_self=False, weights=None):
    """Mean similarity of each sample to the other valid samples of its row, optionally weighted per peer.

    sim [B, N, N] (any utility: cosine, ROUGE-L, answer agreement), mask [B, N] bool (None = all valid),
    weights [B, N] >= 0 (None = all 1). With P_i = {j valid, j != i} (include_self=False, the paper) or
    {j valid} (include_self=True, the authors' code):
        score[b, i] = sum_{j in P_i} sim[b, i, j] / |P_i|                              (weights=None)
        score[b, i] = sum_{j in P_i} w[b, j] sim[b, i, j] / sum_{j in P_i} w[b, j]     (weighted: peers count by w_j)
    Invalid samples get -inf; a valid sample whose peers have no weight (none valid, or all w_j = 0) gets 0.0.
    Weights of ones give the unweighted scores exactly. Computed in float64 for float64 input, else float32.
    """
    b, n, _ = sim.shape
    ct = torch.promote_types(sim.dtype, torch.float32)
    zero = torch.zeros((), dtype=ct, device=sim.device)
    valid = torch.ones(b, n, dtype=torch.bool, device=sim.device) if mask is None else mask.to(torch.bool)
    pair = valid[:, :, None] & valid[:, None, :]
    if not include_self:
        pair = pair & ~torch.eye(n, dtype=torch.bool, device=sim.device)
    if weights is None:
        total = torch.where(pair, sim.to(ct), zero).sum(-1)
        count = pair.sum(-1)
        scores = torch.where(count > 0, total / count.clamp(min=1).to(ct), zero)
    else:
        w = torch.where(pair, weights.to(ct)[:, None, :], zero)  # w[b, i, j] = w_j for j in P_i
        total, count = (w * sim.to(ct)).sum(-1), w.sum(-1)
        scores = torch.where(count > 0, total / torch.where(count > 0, count, torch.ones((), dtype=ct)), zero)
    return scores.masked_fill(~valid, float("-inf"))


def mbr_scores(emb, mask=None, normalize=True, include_self=False, eps=1e-12, weights=None):
    """MBR scores of N samples per row: emb [B, N, D] -> scores [B, N] (float64 for float64 input, else float32).

    With normalize=True each embedding is divided by max(||e||, eps) (torch.nn.functional.normalize), so the
    similarity is the cosine; a zero vector has similarity 0 to everything. Then
    `mbr_scores_from_similarity(E @ E^T, mask, include_self, weights)`: the [B, N, N] matrix is materialized here.
    """
    ct = torch.promote_types(emb.dtype, torch.float32)
    e = emb.to(ct)
    if normalize:
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=eps)
    return mbr_scores_from_similarity(e @ e.transpose(1, 2), mask, include_self, weights)


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
    Rows with one valid sample: chosen = that sample, rejected = -1. Rows with none (or N = 0): both -1.
    """
    b, n = scores.shape
    dev = scores.device
    if n == 0:
        none = torch.full((b,), -1, dtype=torch.long, device=dev)
        return none, none.clone()
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


# ---------------------------------------------------------------------------------------------------------
# Sequence parallelism (twins of kernels/sealong_kernels/ring.py building blocks; owner: ring.py / ulysses.py)
# The reference for ring / Ulysses / hybrid attention itself is attention_forward on the whole sequence.
# ---------------------------------------------------------------------------------------------------------


def merge_attention_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partial attention results over disjoint key sets: out [T, H, D], lse [H, T].

    lse = log(e^lse_a + e^lse_b), out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b; a row that saw no key
    in either part (lse = -inf) stays out = 0, lse = -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    wa = torch.exp(lse_a - finite).transpose(0, 1)[..., None]
    wb = torch.exp(lse_b - finite).transpose(0, 1)[..., None]
    return wa * out_a + wb * out_b, lse


def zigzag_index(seq_len, world, rank):
    """Global positions held by `rank` in the zigzag layout: chunks rank and 2*world-1-rank of 2*world."""
    c = seq_len // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


# ---------------------------------------------------------------------------------------------------------
# Fused linear ORPO / SFT loss (twin of kernels/sealong_kernels/orpo.py). Three readable steps that the kernel shares:
#   1. preference_entries: which (hidden row, target token, sequence) triples carry a loss, from the layout;
#   2. sequence_logp_sums: per-sequence sums of log softmax(hidden @ W.T + b)[target] (here: full logits);
#   3. orpo_objective: the nonlinear ORPO / SFT objective of those sums, and TRL-named metrics.
# Sequences are numbered 2p (chosen response of pair p) and 2p + 1 (rejected response of pair p).
# ---------------------------------------------------------------------------------------------------------

LOGP_MAX = -1e-30  # per-sequence mean logp is clamped to at most this before log1mexp (logp = 0 -> finite)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable: log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) otherwise.

    Each branch only ever sees inputs from its own domain, so neither produces inf/NaN gradients that
    torch.where would multiply by zero (0 * inf = NaN)."""
    near_zero = x > -0.6931471805599453
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def preference_entries(labels, *, mode="orpo", sequence_ids=None, segment_ids=None, hidden_index=None,
                       num_pairs=None, ignore_index=-100):
    """The loss entries of a batch: (rows [M], targets [M], seq [M], num_pairs), all int64 but num_pairs.

    Entry m predicts token targets[m] from row rows[m] of hidden.reshape(-1, H); it belongs to sequence
    seq[m] = 2 * pair + (1 if rejected else 0). Only labels != ignore_index make entries.

    classic layout (labels 2-D): ORPO `labels [2B, T]`, rows 0..B-1 chosen, rows B..2B-1 rejected, row b
        pairs with row B + b; SFT `labels [B, T]`, every row a (chosen) sequence.
    packed layout (labels 1-D, [M]): `sequence_ids [M]` = pair index 0..P-1 of each entry; ORPO also needs
        `segment_ids [M]`: 1 = chosen response, 2 = rejected response (0 = prompt: must be unlabeled);
        SFT takes segment_ids optionally (then only segment 1 counts). `hidden_index [M]` optionally maps
        entry m to hidden row hidden_index[m] (default m): the shared-prompt packing needs it because the
        last prompt token predicts the first token of both answers (see orpo.shared_prompt_targets).
    """
    if mode not in ("orpo", "sft"):
        raise ValueError(f"mode must be 'orpo' or 'sft', got {mode!r}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    dev = labels.device
    if labels.dim() == 2:
        if sequence_ids is not None or segment_ids is not None or hidden_index is not None:
            raise ValueError("sequence_ids / segment_ids / hidden_index belong to the packed layout (1-D labels); "
                             "the classic layout (2-D labels) takes none")
        n_rows, t = labels.shape
        if mode == "orpo" and n_rows % 2:
            raise ValueError(f"labels: the classic ORPO layout needs 2B rows (B chosen then B rejected), got {n_rows}")
        pairs = n_rows // 2 if mode == "orpo" else n_rows
        rows = (labels.reshape(-1) != ignore_index).nonzero()[:, 0]
        row_of = rows // t
        seq = 2 * (row_of % pairs) + (row_of >= pairs).long() if mode == "orpo" else 2 * row_of
        targets = labels.reshape(-1)[rows].long()
        return rows, targets, seq, num_pairs if num_pairs is not None else pairs
    if labels.dim() != 1:
        raise ValueError(f"labels must be [2B, T] (classic) or [M] (packed), got shape {tuple(labels.shape)}")
    m = labels.shape[0]
    if sequence_ids is None:
        raise ValueError("sequence_ids is required with packed (1-D) labels: the pair index of every entry")
    for name, t in (("sequence_ids", sequence_ids), ("segment_ids", segment_ids), ("hidden_index", hidden_index)):
        if t is not None and tuple(t.shape) != (m,):
            raise ValueError(f"{name} must have the shape of labels ({m},), got {tuple(t.shape)}")
    if segment_ids is None and mode == "orpo":
        raise ValueError("segment_ids is required in ORPO mode with packed labels (1 = chosen, 2 = rejected)")
    valid = labels != ignore_index
    if segment_ids is not None:
        bad = valid & ~((segment_ids == 1) | (segment_ids == 2) if mode == "orpo" else (segment_ids == 1))
        if mode == "sft":
            valid = valid & (segment_ids == 1)
        elif bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"segment_ids[{i}] = {int(segment_ids[i])} carries label {int(labels[i])}: "
                             "only chosen (1) and rejected (2) tokens may have labels")
    entries = valid.nonzero()[:, 0]
    seq_of = sequence_ids[entries].long()
    if seq_of.numel() and int(seq_of.min()) < 0:
        raise ValueError("sequence_ids must be >= 0 on labeled entries")
    if num_pairs is None:
        num_pairs = int(seq_of.max()) + 1 if seq_of.numel() else 0
    elif seq_of.numel() and int(seq_of.max()) >= num_pairs:
        raise ValueError(f"sequence_ids has pair {int(seq_of.max())} >= num_pairs = {num_pairs}")
    rejected = (segment_ids[entries] == 2).long() if segment_ids is not None else torch.zeros_like(seq_of)
    rows = hidden_index[entries].long() if hidden_index is not None else entries
    return rows.to(dev), labels[entries].long(), 2 * seq_of + rejected, num_pairs


def check_empty_sequences(counts, mode="orpo", skip_empty=False):
    """Pairs kept by the objective: bool [P]. Raises a clear error on an empty response unless skip_empty."""
    n = counts.reshape(-1, 2)
    keep = n[:, 0] > 0
    if mode == "orpo":
        keep = keep & (n[:, 1] > 0)
    if not skip_empty and not bool(keep.all()):
        p = int((~keep).nonzero()[0, 0])
        which = "chosen" if int(n[p, 0]) == 0 else "rejected"
        raise ValueError(f"pair {p}: the {which} response has no label tokens (all labels are ignore_index); "
                         "fix the data or pass skip_empty=True to skip such pairs (they are counted in "
                         "metrics['skipped_pairs'])")
    return keep


def kept_pairs(counts, mode="orpo", skip_empty=False):
    """The kept pairs of host-side counts [2P] (a CPU tensor or a list) as an int64 index (CPU): the `keep`
    argument of orpo_objective, computed once where the batch is built (raises on an empty response like
    check_empty_sequences unless skip_empty)."""
    keep = check_empty_sequences(torch.as_tensor(counts).cpu(), mode, skip_empty)
    return keep.nonzero()[:, 0]


def check_pair_weights(pair_weights, num_pairs):
    """None, or pair_weights checked: a floating tensor [num_pairs], every weight finite and >= 0 (ValueError naming
    `pair_weights` otherwise)."""
    if pair_weights is None:
        return None
    if not isinstance(pair_weights, torch.Tensor) or not pair_weights.is_floating_point():
        raise ValueError(f"pair_weights must be a floating-point tensor [P], got "
                         f"{pair_weights.dtype if isinstance(pair_weights, torch.Tensor) else type(pair_weights).__name__}")
    if tuple(pair_weights.shape) != (num_pairs,):
        raise ValueError(f"pair_weights must have one weight per pair, shape ({num_pairs},), got {tuple(pair_weights.shape)}")
    bad = ~torch.isfinite(pair_weights) | (pair_weights < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"pair_weights must be finite and >= 0, got pair_weights[{i}] = {float(pair_weights[i])}")
    return pair_weights


def orpo_objective(logp_sum, counts, *, mode="orpo", beta=0.1, nll_weight=1.0, skip_empty=False, logit_means=None,
                   nll_reduction="token", pair_weights=None, keep=None, nll_extra=None):
    """ORPO / SFT loss and TRL-named metrics from per-sequence log-prob sums.

    logp_sum [2P] (differentiable), counts [2P]: sums and numbers of label tokens of the chosen (2p) and
    rejected (2p + 1) response of every pair. With c, r the mean logps of a kept pair's responses
    (clamped to <= LOGP_MAX):
        nll      = -(sum of chosen logp sums) / (number of chosen label tokens)     nll_reduction="token":
                                                                                    token mean, batch-wide
        nll      = -mean_pairs(chosen logp sum / its label tokens)                  nll_reduction="sequence":
                   (XTuner's ORPO, what the SEALONG authors trained with: one pair per micro-step, each
                   chosen response's token mean, averaged over pairs; long answers weigh no more)
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        loss     = nll_weight * nll - mean_pairs(beta * logsigmoid(log_odds))        (ORPO)
        loss     = nll_weight * nll                                                  (SFT)
    Pairs with an empty response raise, or with skip_empty=True are left out of every term and counted in
    metrics['skipped_pairs']. If no pair is left the loss is 0 (with zero gradients), never NaN.
    pair_weights [P] (optional, finite, >= 0): pair i's terms are multiplied by w_i, the means stay over the
    COUNT of kept pairs (and the chosen tokens), so the objective stays a sum of per-pair terms, exact under
    micro-batching and data / sequence parallelism (the shares of sealong/train/loss.py apply unchanged):
        nll      = -sum_i w_i S_c,i / sum_i n_c,i                                   ("token")
        nll      = -(1/P) sum_i w_i S_c,i / n_c,i                                   ("sequence")
        odds     = -beta (1/P) sum_i w_i logsigmoid(log_odds_i)
    Self-Consistency Preference Optimization (Prasad et al. 2024, arXiv 2411.04109) weights each pair's loss
    by its vote margin this way. None skips the multiply (weights of ones give the same floats). The metrics
    stay unweighted (TRL's names and definitions).
    nll_extra (optional): (sums [P], counts [P]) of more tokens the NLL term covers besides the chosen answer's
    (TRL's ORPOTrainer: the prompt's tokens after the first); S_c,i and n_c,i above then become S_c,i + S_x,i and
    n_c,i + n_x,i in the NLL only (the odds ratio and logps/chosen keep the answer's mean).
    logit_means [2P] (optional, `sequence_logit_means`): per sequence, the sum over its label tokens of the
    vocabulary-mean logit; gives TRL's logits/chosen (logits/rejected) = the mean logit over every vocabulary
    entry of every chosen (rejected) label token of the kept pairs, i.e. logits[loss_mask].mean() as TRL's
    DPOTrainer computes it (its ORPOTrainer averages over every position, prompt and padding included, which
    a loss over label tokens never sees).
    keep (optional): the kept pairs as an int64 index on logp_sum's device, from `kept_pairs` where the batch
    was built; the counts and pair_weights are then taken as validated (no check here, so no host
    synchronization: the fused loss evaluates this objective inside its forward).
    """
    if nll_reduction not in ("token", "sequence"):
        raise ValueError(f"nll_reduction: expected 'token' or 'sequence', got {nll_reduction!r}")
    if keep is None:
        keep = check_empty_sequences(counts, mode, skip_empty)
        w = check_pair_weights(pair_weights, counts.numel() // 2)
    else:
        w = pair_weights
    sums = logp_sum.reshape(-1, 2)
    n = counts.reshape(-1, 2).to(sums.dtype)
    w_k = None if w is None else w.to(device=sums.device, dtype=sums.dtype)[keep]
    weighted = (lambda x: x) if w is None else (lambda x: w_k * x)  # noqa: E731 (None: no multiply at all)
    sums_k, n_k = sums[keep], n[keep]
    skipped = (sums.shape[0] - keep.numel()) if keep.dtype != torch.bool else (~keep).sum()
    metrics = {"skipped_pairs": torch.as_tensor(skipped).float()}
    if sums_k.shape[0] == 0:
        loss = logp_sum.sum() * 0
        metrics["nll_loss"] = loss.detach().float()
        return loss, metrics
    chosen = sums_k[:, 0] / n_k[:, 0]
    nll_s, nll_n = sums_k[:, 0], n_k[:, 0]
    if nll_extra is not None:
        nll_s = nll_s + nll_extra[0].reshape(-1).to(sums.dtype)[keep]
        nll_n = nll_n + torch.as_tensor(nll_extra[1], device=n.device).reshape(-1).to(n.dtype)[keep]
    nll_of = (lambda f: -f(nll_s / nll_n).mean()) if nll_reduction == "sequence" else (  # noqa: E731
        lambda f: -f(nll_s).sum() / nll_n.sum())
    nll = nll_of(lambda x: x)
    loss = nll_weight * (nll if w is None else nll_of(weighted))
    metrics["nll_loss"] = nll.detach().float()
    metrics["logps/chosen"] = chosen.detach().mean().float()
    if logit_means is not None:
        z = logit_means.detach().reshape(-1, 2)[keep].to(n_k.dtype)
        metrics["logits/chosen"] = (z[:, 0].sum() / n_k[:, 0].sum()).float()
        if mode == "orpo":
            metrics["logits/rejected"] = (z[:, 1].sum() / n_k[:, 1].sum()).float()
    if mode == "sft":
        return loss, metrics
    rejected = sums_k[:, 1] / n_k[:, 1]
    c, r = chosen.clamp(max=LOGP_MAX), rejected.clamp(max=LOGP_MAX)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = torch.nn.functional.logsigmoid(log_odds)
    loss = loss - beta * weighted(ratio).mean()
    with torch.no_grad():
        metrics.update({
            "rewards/chosen": (beta * chosen).mean().float(),
            "rewards/rejected": (beta * rejected).mean().float(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (beta * (chosen - rejected)).mean().float(),
            "logps/rejected": rejected.mean().float(),
            "log_odds_ratio": ratio.mean().float(),
            "log_odds_chosen": log_odds.mean().float(),
        })
    return loss, metrics


def global_sum(local, group=None):
    """Sum of `local` over a process group with the identity as gradient (straight through): every rank then
    computes the same objective, and each rank's gradient is exact for its own shard of the tokens."""
    if group is None:
        return local
    import torch.distributed as dist

    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())


def logits_rows(logits, targets, lse=None, write_grad=False, scale=None):
    """Twin of orpo.logits_rows (the per-chunk row kernel) on a [C, V] chunk: returns (lse [C], target_logit [C],
    logit_sum [C]) float32 (target_logit and logit_sum = sum_v z_v are None when lse is given); with write_grad
    the chunk is overwritten in place with G = onehot(target) - softmax(z), d logp / d z, times scale [C]."""
    z = logits.float()
    target_logit = logit_sum = None
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
        target_logit = z.gather(1, targets[:, None].long())[:, 0]
        logit_sum = z.sum(-1)
    if write_grad:
        g = -(z - lse[:, None]).exp()
        g.scatter_add_(1, targets[:, None].long(), torch.ones_like(g[:, :1]))
        logits.copy_(g if scale is None else g * scale[:, None])
    return lse, target_logit, logit_sum


def sequence_logp_sums(hidden, weight, rows, targets, seq, num_seqs, bias=None):
    """Per-sequence sums of log softmax(hidden[rows] @ weight.T + bias)[targets] -> [num_seqs], full logits."""
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)


def sequence_logit_means(hidden, weight, rows, seq, num_seqs, bias=None):
    """Per-sequence sums over entries of the vocabulary-mean logit, mean_v (hidden[rows] @ weight.T + b)[v]
    -> [num_seqs] (for TRL's logits/chosen and logits/rejected metrics), full logits."""
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    z = logits.detach().mean(-1)
    return torch.zeros(num_seqs, dtype=z.dtype, device=z.device).index_add(0, seq, z)


def fused_linear_orpo_loss(hidden, weight, labels, *, bias=None, beta=0.1, nll_weight=1.0, mode="orpo",
                           sequence_ids=None, segment_ids=None, hidden_index=None, num_pairs=None,
                           skip_empty=False, ignore_index=-100, group=None, nll_reduction="token", pair_weights=None,
                           **kernel_options):
    """Twin of sealong_kernels.fused_linear_orpo_loss computed from the full [M, V] logits (same arguments;
    chunk_size / chunk_bytes / strategy are accepted and ignored). Returns (loss, metrics)."""
    rows, targets, seq, pairs = preference_entries(labels, mode=mode, sequence_ids=sequence_ids,
                                                   segment_ids=segment_ids, hidden_index=hidden_index,
                                                   num_pairs=num_pairs, ignore_index=ignore_index)
    if group is not None:
        import torch.distributed as dist

        p = torch.tensor([pairs], device=labels.device)
        dist.all_reduce(p, op=dist.ReduceOp.MAX, group=group)
        pairs = int(p)
    counts = global_sum(torch.bincount(seq, minlength=2 * pairs), group)
    check_empty_sequences(counts, mode, skip_empty)
    sums = global_sum(sequence_logp_sums(hidden, weight, rows, targets, seq, 2 * pairs, bias), group)
    logit_means = global_sum(sequence_logit_means(hidden, weight, rows, seq, 2 * pairs, bias), group)
    return orpo_objective(sums, counts, mode=mode, beta=beta, nll_weight=nll_weight, skip_empty=skip_empty,
                          logit_means=logit_means, nll_reduction=nll_reduction, pair_weights=pair_weights)


# ---------------------------------------------------------------------------------------------------------
# Shared-prefix decode attention (twin of kernels/sealong_kernels/decode.py; owner: the sampler, sealong/sample/sampler.py)
# ---------------------------------------------------------------------------------------------------------


def prefix_decode_attention(q, k, v, cu_q, cu_prefix, softmax_scale=None):
    """Decode queries against each prompt's shared prefix cache, no mask -> (out [M, Hq, D], lse [Hq, M]).

    Rows cu_q[b]:cu_q[b+1] of q [M, Hq, D] (one token per sample of prompt b) attend to all of
    k, v[cu_prefix[b]:cu_prefix[b+1]] ([P_total, Hkv, D] packed). An empty prefix gives out 0, lse -inf.
    """
    m, hq, d = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((hq, m), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    for b in range(cu_q.shape[0] - 1):
        q0, q1, p0, p1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_prefix[b]), int(cu_prefix[b + 1])
        out[q0:q1], lse[:, q0:q1] = attention_forward(q[q0:q1], k[p0:p1], v[p0:p1], causal=False, softmax_scale=softmax_scale)
    return out, lse


def cascade_decode_attention(q, k_new, v_new, k_prefix, v_prefix, k_suffix, v_suffix, rows, write, cu_q, cu_prefix,
                             softmax_scale=None):
    """One decode step's attention: each decoding slot's query against its prompt's prefix and its own suffix.

    q, k_new, v_new [S, Hq|Hkv, D]: this step's token of every slot. rows [sum N_b]: prompt b's samples are
    rows[cu_q[b]:cu_q[b+1]] (slot numbers; S = a sample not decoding); the prefix of prompt b is
    k_prefix, v_prefix[cu_prefix[b]:cu_prefix[b+1]]; slot s's suffix is k_suffix, v_suffix[s, :write[s] + 1]
    ([S, L, Hkv, D]). First writes k_new[s], v_new[s] at suffix row write[s] of every decoding slot (write[s] = -1:
    none, the slot has no suffix key), then each such slot attends (no mask) over its prefix and suffix keys
    concatenated. Returns out [S, Hq, D] (q's dtype)
    and lse [Hq, S] (float32; float64 for float64); a slot not in `rows` gets out 0, lse -inf.
    """
    s_slots, hq, _ = q.shape
    rows_h, cu_q_h, cu_p_h = rows.tolist(), cu_q.tolist(), cu_prefix.tolist()
    live = [(b, r) for b in range(len(cu_q_h) - 1) for r in rows_h[cu_q_h[b]:cu_q_h[b + 1]] if r < s_slots]
    for _, r in live:
        if int(write[r]) >= 0:
            k_suffix[r, int(write[r])], v_suffix[r, int(write[r])] = k_new[r], v_new[r]
    out = torch.zeros_like(q)
    lse = torch.full((hq, s_slots), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                     device=q.device)
    for b, r in live:
        n, (p0, p1) = int(write[r]) + 1, cu_p_h[b : b + 2]
        keys, values = torch.cat([k_prefix[p0:p1], k_suffix[r, :n]]), torch.cat([v_prefix[p0:p1], v_suffix[r, :n]])
        o, l_ = attention_forward(q[r : r + 1], keys, values, causal=False, softmax_scale=softmax_scale)
        out[r], lse[:, r] = o[0], l_[:, 0]
    return out, lse
