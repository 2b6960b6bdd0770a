"""Fused linear ORPO / SFT loss: the LM head, log-softmax and ORPO objective without the [tokens x vocab] logits.

Math. Loss entry m predicts token y_m from hidden row h_m and belongs to sequence s_m (2p = chosen response
of pair p, 2p + 1 = rejected). With z_m = W h_m + b [V] and lse_m = logsumexp(z_m):

    logp_m = z_m[y_m] - lse_m,        L_s = sum_{m in s} logp_m           (per-sequence sums, [2P])
    loss   = orpo_objective(L, counts)                                    (reference.orpo_objective)

The objective is nonlinear in L (per-sequence means, log1mexp, logsigmoid), so a token's gradient needs its
sequence's total, known only after the whole sequence is seen. But dloss/dlogp_m = g_{s_m} := dloss/dL_{s_m}
is the same for every token of a sequence, and dlogp_m/dz_m = onehot(y_m) - softmax(z_m) =: G_m, hence

    dhidden_m = g_{s_m} * (G_m @ W)         dW = sum_s g_s * sum_{m in s} G_m^T h_m        db = sum_s g_s * sum G_m

The fused op is `sequence_logp_sums` (an autograd Function with output L [2P]); the objective runs in plain
torch autograd on those 2P numbers and hands the Function g = dloss/dL. Two strategies for the token work:

* "deferred" (gradients in the forward, scaled later): each chunk computes its logits, the LSE, then G in
  place of the logits, U_m = G_m @ W (kept, float32 [M, H]) and, if W needs a gradient, the per-sequence
  float32 sums A_s = sum G_m^T h_m [2P, V, H] (and [2P, V] for the bias). Backward only scales: g_s * U_m,
  sum_s g_s A_s. FLOPs: 4·M·H·V with a frozen LM head (the LoRA case), 6·M·H·V with a trained one, at the
  price of 2P float32 [V, H] accumulators: so "auto" picks it only when those fit in `deferred_budget`.
* "recompute" (two passes): the forward computes only LSE and logp (2·M·H·V, keeps lse [M]); the backward
  recomputes each chunk's logits, writes G in place and accumulates dhidden and one float32 dW (4 or 6·M·H·V).

Either way at most one [chunk, V] logits tensor exists at a time (chunks run over loss entries, not pairs, so a
single 32K-token pair is fine), the LSE is float32, and the weight gradient accumulates in float32 whatever
the input dtype (each chunk's product G^T h comes from one matmul in the input dtype, float32 inside
cuBLAS, rounded once to that dtype before it is added to the float32 accumulator; G itself is stored in
the logits' dtype). Prompt / padding tokens (label -100) cost nothing: only labeled entries are gathered.

Sequence parallelism: pass `group` (the sequence-parallel process group) and each rank gives its own shard
of every sequence's tokens (same pair numbering on every rank). L and the token counts are all-reduced inside
the forward with an identity gradient, so every rank returns the same (global) loss and metrics and computes
the exact gradient through its own tokens: the sum over the group of the parameter gradients is the gradient
of that loss. Reduce parameter gradients with SUM over the sequence-parallel group (or divide the loss by
the group size before backward if the gradient reduction averages), never average the losses.
"""


import torch
import triton
import triton.language as tl

from . import reference
from .runtime import triton_available
from .reference import check_empty_sequences, global_sum, orpo_objective, preference_entries


# ---------------------------------------------------------------------------------------------------------
# Triton: per-row work on one chunk of logits [C, V]
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_rows_kernel(logits_ptr, stride_row, targets_ptr, lse_ptr, target_logit_ptr, C, V,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE_LSE: tl.constexpr,
                        WRITE_GRAD: tl.constexpr):
    """One program per BLOCK_R rows of z = logits[row, :V] (BLOCK_R = 1 on a GPU).

    COMPUTE_LSE: lse[row] = log sum_v exp(z_v) by an online max / rescaled sum in float32, and
                 target_logit[row] = z[targets[row]]; otherwise lse[row] is read (saved by the forward).
    WRITE_GRAD:  overwrite the row in place with G = onehot(target) - exp(z - lse)  (d logp / d z).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < C
    base = logits_ptr + rows[:, None] * stride_row                       # [BLOCK_R, 1] row pointers
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    if COMPUTE_LSE:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            # update the running max and the normalizer rescaled to it (finite: every row has a column >= 0)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(row_ok, m_new, 0.0)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        lse = tl.where(row_ok, m + tl.log(tl.where(row_ok, s, 1.0)), 0.0)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(target_logit_ptr + rows, tl.load(logits_ptr + rows * stride_row + target, mask=row_ok).to(tl.float32),
                 mask=row_ok)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            g = (cols[None, :] == target[:, None]).to(tl.float32) - tl.exp(z - lse[:, None])
            tl.store(base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=ok)


def logits_rows(logits, targets, lse=None, write_grad=False, rows_per_program=None):
    """Launch the row kernel on a [C, V] chunk (unit column stride). Returns (lse [C], target_logit [C])
    float32 (target_logit is None when lse is given); with write_grad the chunk holds G afterwards.
    rows_per_program: 1 on a GPU (a row of a 128K vocabulary is plenty of work), 16 under the interpreter."""
    c, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (c,)
    if not triton_available(logits):
        return reference.logits_rows(logits, targets, lse, write_grad)  # CPU without the interpreter
    compute = lse is None
    if compute:
        lse = torch.empty(c, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(c, dtype=torch.float32, device=logits.device)
    else:
        target_logit = lse  # unused by the kernel
    if c:
        block_r = rows_per_program or (1 if logits.is_cuda else 16)
        block_v = min(triton.next_power_of_2(v), 4096 if logits.is_cuda else 1024)
        _logits_rows_kernel[(triton.cdiv(c, block_r),)](
            logits, logits.stride(0), targets, lse, target_logit, c, v, BLOCK_R=block_r, BLOCK_V=block_v,
            COMPUTE_LSE=compute, WRITE_GRAD=write_grad, num_warps=8 if logits.is_cuda else 1)
    return lse, (target_logit if compute else None)


# ---------------------------------------------------------------------------------------------------------
# Chunk helpers (torch matmuls around the kernel)
# ---------------------------------------------------------------------------------------------------------

WEIGHT_GRAD_BLOCK = 16384  # vocabulary rows per weight-gradient matmul: bounds its temporary to [16384, H]


def default_chunk_size(vocab, dtype, budget_bytes=512 * 2**20):
    """Rows per chunk: the largest power of two whose [rows, V] logits fit in budget_bytes (16 to 8192);
    2048 for V = 128256 in bfloat16."""
    rows = budget_bytes // (vocab * torch.empty((), dtype=dtype).element_size())
    return int(min(8192, max(16, 1 << max(rows, 1).bit_length() - 1)))


def _chunk_logits(hidden2d, weight, bias, rows):
    h = hidden2d.index_select(0, rows)
    logits = h @ weight.T
    if bias is not None:
        logits += bias
    return h, logits


def _sequence_spans(seq):
    """(sequence, start, end) of the runs of equal ids in seq (a chunk's entries, sorted by sequence)."""
    change = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    change[1:] = seq[1:] != seq[:-1]
    starts = change.nonzero()[:, 0].tolist()
    ids = seq[change].tolist()
    return [(s, a, b) for s, a, b in zip(ids, starts, starts[1:] + [seq.shape[0]])]


def _accumulate_param_grads(grad, h, seq, acc_w, acc_b, scale=None):
    """acc_w[s] += scale[s] * G_s^T h_s and acc_b[s] += scale[s] * sum G_s over each sequence s of the chunk, in
    float32 (acc_w / acc_b indexed by sequence when scale is None, else single accumulators)."""
    if acc_w is None and acc_b is None:
        return
    for s, a, b in _sequence_spans(seq):
        f = 1.0 if scale is None else scale[s]
        dst_w = acc_w if scale is not None else (acc_w[s] if acc_w is not None else None)
        dst_b = acc_b if scale is not None else (acc_b[s] if acc_b is not None else None)
        if dst_w is not None:
            for v0 in range(0, grad.shape[1], WEIGHT_GRAD_BLOCK):
                g = grad[a:b, v0:v0 + WEIGHT_GRAD_BLOCK]
                dst_w[v0:v0 + g.shape[1]].add_((g.T @ h[a:b]).float(), alpha=f)
        if dst_b is not None:  # column sums as a [1, n] x [n, V] product: no float32 copy of the chunk
            ones = torch.ones(1, b - a, dtype=grad.dtype, device=grad.device)
            dst_b.add_((ones @ grad[a:b])[0].float(), alpha=f)


# ---------------------------------------------------------------------------------------------------------
# The autograd Function: per-sequence log-prob sums
# ---------------------------------------------------------------------------------------------------------


class _SequenceLogpSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, targets, seq, num_seqs, chunk, strategy, group):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        deferred = strategy == "deferred" and (need_h or need_w or need_b)
        m, v, hdim = rows.shape[0], weight.shape[0], weight.shape[1]
        dev = hidden2d.device
        logp = torch.empty(m, dtype=torch.float32, device=dev)
        lse_all = None if deferred else torch.empty(m, dtype=torch.float32, device=dev)
        u = torch.empty(m, hdim, dtype=torch.float32, device=dev) if deferred and need_h else None
        acc_w = torch.zeros(num_seqs, v, hdim, dtype=torch.float32, device=dev) if deferred and need_w else None
        acc_b = torch.zeros(num_seqs, v, dtype=torch.float32, device=dev) if deferred and need_b else None
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            h, logits = _chunk_logits(hidden2d, weight, bias, rows[a:b])
            lse, target_logit = logits_rows(logits, targets[a:b], write_grad=deferred)
            logp[a:b] = target_logit - lse
            if not deferred:
                lse_all[a:b] = lse
                continue
            if u is not None:
                u[a:b] = logits @ weight  # logits now hold G = onehot - softmax
            _accumulate_param_grads(logits, h, seq[a:b], acc_w, acc_b)
            del h, logits
        sums = torch.zeros(num_seqs, dtype=torch.float32, device=dev).index_add_(0, seq, logp)
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        ctx.deferred, ctx.chunk = deferred, chunk
        ctx.save_for_backward(hidden2d, weight, bias, rows, targets, seq, lse_all, u, acc_w, acc_b)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        hidden2d, weight, bias, rows, targets, seq, lse_all, u, acc_w, acc_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_sums.float()
        gh = torch.zeros_like(hidden2d) if need_h else None
        if ctx.deferred:
            # deferred per-sequence scaling of the gradients computed in the forward
            for a in range(0, rows.shape[0] if need_h else 0, ctx.chunk):  # chunked: no [M, H] temporaries
                b = min(a + ctx.chunk, rows.shape[0])
                gh.index_add_(0, rows[a:b], (u[a:b] * g[seq[a:b]][:, None]).to(hidden2d.dtype))
            gw = torch.einsum("s,svh->vh", g, acc_w).to(weight.dtype) if need_w else None
            gb = (g @ acc_b).to(bias.dtype) if need_b else None
            return gh, gw, gb, None, None, None, None, None, None, None
        # two passes: recompute every chunk's logits, G in place, one float32 accumulator per parameter
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        g_list = g.tolist()
        for a in range(0, rows.shape[0], ctx.chunk):
            b = min(a + ctx.chunk, rows.shape[0])
            h, logits = _chunk_logits(hidden2d, weight, bias, rows[a:b])
            logits_rows(logits, targets[a:b], lse=lse_all[a:b], write_grad=True)
            if need_h:
                gh.index_add_(0, rows[a:b], ((logits @ weight).float() * g[seq[a:b]][:, None]).to(gh.dtype))
            _accumulate_param_grads(logits, h, seq[a:b], gw32, gb32, scale=g_list)
            del h, logits
        gw = gw32.to(weight.dtype) if need_w else None
        gb = gb32.to(bias.dtype) if need_b else None
        return gh, gw, gb, None, None, None, None, None, None, None


def sequence_logp_sums(hidden, weight, rows, targets, seq, num_seqs, bias=None, *, chunk_size=None,
                       strategy="auto", group=None, deferred_budget=2**30):
    """Per-sequence sums of log softmax(hidden[rows] @ weight.T + bias)[targets] -> float32 [num_seqs].

    hidden [..., H] (any leading shape, flattened), weight [V, H], bias [V] or None, rows / targets / seq [M]
    int64: entry m reads row rows[m] of the flattened hidden, predicts targets[m], adds to sum seq[m].
    Differentiable in hidden, weight and bias (see the module docstring for strategies and `group`)."""
    if strategy not in ("auto", "deferred", "recompute"):
        raise ValueError(f"strategy must be 'auto', 'deferred' or 'recompute', got {strategy!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    v = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"labels must be in [0, {v}) or ignore_index; "
                         f"got {int(targets.min())}..{int(targets.max())}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if rows.numel() and (int(rows.max()) >= hidden2d.shape[0] or int(rows.min()) < 0):
        bad = int(rows.max()) if int(rows.max()) >= hidden2d.shape[0] else int(rows.min())
        raise ValueError(f"hidden_index points at row {bad} of a hidden with {hidden2d.shape[0]} rows")
    chunk = int(chunk_size or default_chunk_size(v, hidden.dtype))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not torch.is_grad_enabled():
        strategy = "recompute"  # no backward will come: the forward computes the LSE only
    elif strategy == "auto":
        trains_head = weight.requires_grad or (bias is not None and bias.requires_grad)
        accumulators = num_seqs * v * weight.shape[1] * 4
        strategy = "deferred" if not trains_head or accumulators <= deferred_budget else "recompute"
    # entries sorted by sequence: a chunk then spans few sequences (one weight-gradient product per sequence)
    order = torch.argsort(seq, stable=True)
    return _SequenceLogpSums.apply(hidden2d, weight, bias, rows[order], targets[order], seq[order], num_seqs, chunk,
                                   strategy, group)


def fused_linear_orpo_loss(hidden, weight, labels, *, bias=None, beta=0.1, nll_weight=1.0, mode="orpo",
                           sequence_ids=None, segment_ids=None, hidden_index=None, num_pairs=None,
                           skip_empty=False, ignore_index=-100, chunk_size=None, strategy="auto", group=None,
                           nll_reduction="token"):
    """ORPO (or SFT) loss of an LM head on final hidden states, never materializing the [tokens, V] logits.

    hidden: classic `[2B, T, H]` (B chosen rows, then the B rejected rows, row b pairs with row B + b; SFT:
        `[B, T, H]`), or packed `[N, H]`. weight `[V, H]` (lm_head.weight), bias `[V]` or None.
    labels: `labels[t]` is the token predicted from hidden[t] (the caller shifts once); ignore_index = no loss.
        classic `[2B, T]`; packed `[M]` with `sequence_ids [M]` (pair index 0..P-1), `segment_ids [M]`
        (1 = chosen, 2 = rejected) and optionally `hidden_index [M]` (entry -> hidden row; default identity;
        see `shared_prompt_targets` for prompt + chosen + rejected packed in one sequence).
    Semantics (reference.orpo_objective): per-sequence logp = mean log-prob over its label tokens;
        nll = token mean over all chosen label tokens (nll_reduction="token"), or the mean over pairs of each
        chosen response's token mean (nll_reduction="sequence", XTuner's and the SEALONG authors'); log_odds = (c - r) - (log1mexp(c) - log1mexp(r));
        loss = nll_weight * nll - mean_pairs(beta * logsigmoid(log_odds)); SFT: loss = nll_weight * nll.
    A response with no label tokens raises ValueError, or with skip_empty=True its pair is skipped and counted.
    chunk_size: loss entries per chunk (default: [chunk, V] logits of about 512 MiB); strategy: "auto",
        "deferred" or "recompute" (module docstring); group: sequence-parallel process group (module docstring).
    Returns (loss, metrics): metrics float tensors named like TRL's (rewards/chosen, rewards/rejected,
        rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, nll_loss, log_odds_ratio,
        log_odds_chosen) plus skipped_pairs.

    Example:
        loss, metrics = fused_linear_orpo_loss(hidden, model.lm_head.weight, labels, beta=0.1)
        loss.backward()
    """
    if labels.dim() == 2 and tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be labels' shape {tuple(labels.shape)} plus H (classic)")
    if labels.dim() == 1 and (hidden.dim() != 2 or (hidden_index is None and hidden.shape[0] != labels.shape[0])):
        raise ValueError(f"packed layout: hidden must be [N, H] with N = len(labels) = {labels.shape[0]} unless "
                         f"hidden_index maps entries to rows; got hidden {tuple(hidden.shape)}")
    rows, targets, seq, pairs = preference_entries(labels.to(hidden.device), mode=mode, sequence_ids=sequence_ids,
                                                   segment_ids=segment_ids, hidden_index=hidden_index,
                                                   num_pairs=num_pairs, ignore_index=ignore_index)
    if group is not None:
        p = torch.tensor([pairs], device=hidden.device)
        torch.distributed.all_reduce(p, op=torch.distributed.ReduceOp.MAX, group=group)
        pairs = int(p)
    counts = global_sum(torch.bincount(seq, minlength=2 * pairs), group)
    check_empty_sequences(counts, mode, skip_empty)
    sums = sequence_logp_sums(hidden, weight, rows, targets, seq, 2 * pairs, bias, chunk_size=chunk_size,
                              strategy=strategy, group=group)
    return orpo_objective(sums, counts, mode=mode, beta=beta, nll_weight=nll_weight, skip_empty=skip_empty,
                          nll_reduction=nll_reduction)


def shared_prompt_targets(input_ids, segment_ids, sequence_ids=None):
    """Loss entries of the shared-prompt preference packing: each packed sequence holds
    prompt (segment 0) + chosen (1) + rejected (2) tokens; the chosen and the rejected answer both start
    from the prompt's last token. input_ids, segment_ids, sequence_ids: [N] per packed token (sequence_ids:
    pair index 0..P-1, default all 0; each sequence's prompt comes first).

    Returns (hidden_index, labels, loss_sequence_ids, loss_segment_ids), each [M], M = number of response
    tokens: response token t is predicted from the previous token of its own segment, or from the last
    prompt token for the first token of an answer. Pass them to fused_linear_orpo_loss as hidden_index=...,
    labels=..., sequence_ids=..., segment_ids=... with the model's packed hidden [N, H].
    """
    n = input_ids.shape[0]
    if tuple(segment_ids.shape) != (n,):
        raise ValueError(f"segment_ids must be [{n}] like input_ids, got {tuple(segment_ids.shape)}")
    if sequence_ids is None:
        sequence_ids = torch.zeros_like(input_ids)
    elif tuple(sequence_ids.shape) != (n,):
        raise ValueError(f"sequence_ids must be [{n}] like input_ids, got {tuple(sequence_ids.shape)}")
    idx = torch.arange(n, device=input_ids.device)
    last_prompt = torch.cummax(torch.where(segment_ids == 0, idx, torch.full_like(idx, -1)), 0).values
    prev = (idx - 1).clamp(min=0)
    continues = (idx > 0) & (segment_ids[prev] == segment_ids) & (sequence_ids[prev] == sequence_ids)
    pred = torch.where(continues, prev, last_prompt)
    response = (segment_ids > 0).nonzero()[:, 0]
    pred = pred[response]
    lost = (pred < 0) | (sequence_ids[pred.clamp(min=0)] != sequence_ids[response])
    if bool(lost.any()):
        t = int(response[lost.nonzero()[0, 0]])
        raise ValueError(f"segment_ids: response token {t} has no prompt (segment 0) before it in its sequence")
    return pred, input_ids[response], sequence_ids[response], segment_ids[response]


def local_targets(local_index, hidden_index, *per_entry):
    """The loss entries a sequence-parallel rank owns: those whose hidden row is one of its local tokens.

    local_index [N_local]: global token index of each local hidden row (from the sharding helper);
    hidden_index [M] and every tensor in per_entry [M] (labels, sequence ids, segment ids): the global
    entries (e.g. from shared_prompt_targets). Returns (local hidden_index into the local rows, *per_entry
    restricted to the owned entries), ready for fused_linear_orpo_loss(..., group=sp_group)."""
    for i, t in enumerate(per_entry):
        if t.shape[:1] != hidden_index.shape[:1]:
            raise ValueError(f"per_entry[{i}] has {t.shape[0]} entries, hidden_index has {hidden_index.shape[0]}")
    size = int(max(int(hidden_index.max()) if hidden_index.numel() else -1,
                   int(local_index.max()) if local_index.numel() else -1)) + 1
    where = torch.full((size,), -1, dtype=torch.long, device=hidden_index.device)
    where[local_index.long()] = torch.arange(local_index.shape[0], device=hidden_index.device)
    row = where[hidden_index.long()]
    mine = row >= 0
    return (row[mine], *(t[mine] for t in per_entry))


__all__ = ["fused_linear_orpo_loss", "sequence_logp_sums", "shared_prompt_targets", "local_targets", "logits_rows"]
