"""Fused linear ORPO / SFT loss: the LM head, log-softmax and ORPO objective without the [tokens x vocab] logits.

Math. Loss entry m predicts token y_m from hidden row h_m and belongs to sequence s_m (2p = chosen response
of pair p, 2p + 1 = rejected). With z_m = W h_m + b [V] and lse_m = logsumexp(z_m):

    logp_m = z_m[y_m] - lse_m,        L_s = sum_{m in s} logp_m           (per-sequence sums, [2P])
    loss   = orpo_objective(L, counts[, pair weights w])                  (reference.orpo_objective)

The objective is nonlinear in L (per-sequence means, log1mexp, logsigmoid), so a token's gradient needs its
sequence's total, known only after the whole sequence is seen. But dloss/dlogp_m = g_{s_m} := dloss/dL_{s_m}
is the same for every token of a sequence, and dlogp_m/dz_m = onehot(y_m) - softmax(z_m) =: G_m, hence with
the scaled gradient rows D_m = g_{s_m} G_m of a chunk of C entries (D [C, V], Hc [C, H] its hidden rows)

    dhidden[chunk] = D @ W            dW += D^T @ Hc            db += sum_m D_m

one product each for the whole chunk, whatever sequences it spans (Liger-Kernel's fused linear cross-entropy
and Apple's Cut Cross-Entropy do the same for plain cross-entropy). The fused op is `sequence_logp_sums` (an
autograd Function with output L [2P]); the objective runs in plain torch autograd on those 2P numbers and hands
the Function g = dloss/dL. Two strategies for the token work:

* "recompute" (two passes, any head): the forward computes each chunk's logits, then the row kernel gives
  LSE, logp and the logit row sums (2·M·H·V FLOPs, keeps lse [M]). The backward recomputes each chunk's
  logits, the row kernel overwrites them in place with D = g_s (onehot - softmax), then one product gives
  the chunk's hidden gradient and one `addmm` accumulates D^T Hc into the float32 weight gradient
  (4 or 6·M·H·V FLOPs in the backward).
* "deferred" (frozen LM head only, the LoRA case): the forward writes G in place and keeps U_m = G_m @ W
  (float32 [M, H]); the backward only scales, dhidden_m = g_{s_m} U_m: 4·M·H·V FLOPs in all. g is unknown in
  the forward, so a trained head (whose gradient sums g_s G^T h over sequences) always runs "recompute".

`fused_linear_orpo_loss` with strategy "auto" (= "onepass") runs neither: `orpo_onepass` evaluates the objective
inside its Function, with chunks aligned to pairs, and computes each chunk's gradients in its forward (3
products per chunk with a trained head, 2 frozen, no host sync in the loss). The two strategies below remain
for `sequence_logp_sums` (the per-sequence sums alone, as the training loop uses them) and for a trained head
under sequence parallelism over several pairs.

Products per chunk (counted by tests/kernels/test_orpo_memory.py under a TorchDispatchMode): forward 1
(logits; the bias is fused into `addmm`), deferred forward 2 (logits, G @ W); recompute backward 1 + [dhidden]
+ [dW], i.e. at most 3. The weight gradient accumulates in float32 whatever the input dtype: float32 inputs
`addmm_` into it, 16-bit inputs on CUDA use `addmm(..., out_dtype=torch.float32, out=acc)` (cuBLAS computes in
float32 and adds to the float32 accumulator, no rounding to 16 bits in between); 16-bit inputs on the CPU
(interpreter tests only) multiply in their dtype and add. No host synchronization inside the chunk loop.

Chunk size (`default_chunk_size`): about M·H/V rows, so that a chunk's logits [C, V] are about as large as the
hidden states [M, H] (Liger's rule), rounded up to a power of two, at least 1024 rows (every chunk reads all
of W and the float32 dW accumulator: fewer, larger products stay compute-bound) and capped by `chunk_bytes`
(default 512 MiB of logits): at M = 33K, H = 4096, V = 128256 bfloat16, 2048 rows (525 MB of logits), 17 chunks.

Either way at most one [chunk, V] logits tensor exists at a time (chunks run over loss entries, not pairs, so a
single 32K-token pair is fine) and the LSE is float32. Prompt / padding tokens (label -100) cost nothing: only
labeled entries are gathered. The forward also returns, for TRL's `logits/chosen` and `logits/rejected`
metrics, each sequence's sum over its entries of the vocabulary-mean logit, mean_v z_m[v] (from the same row
pass, never more than one chunk of logits).

Sequence parallelism: pass `group` (the sequence-parallel process group) and each rank gives its own shard
of every sequence's tokens (same pair numbering on every rank). L and the token counts are all-reduced inside
the forward with an identity gradient, so every rank returns the same (global) loss and metrics and computes
the exact gradient through its own tokens: the sum over the group of the parameter gradients is the gradient
of that loss. Reduce parameter gradients with SUM over the sequence-parallel group (or divide the loss by
the group size before backward if the gradient reduction averages), never average the losses.
"""


import torch
import triton

from . import reference
from .reference import check_empty_sequences, global_sum, orpo_objective, preference_entries


from .orpo_rows import (_FLOAT32_ADDMM, _accumulate_product, _chunk_logits, _logits_rows_kernel,  # noqa: F401
                        logits_rows, mm_float32 as _mm_float32, row_launch_config)


CHUNK_BYTES = 512 * 2**20  # default cap on one chunk's logits
MIN_CHUNK_ROWS = 1024  # matmul floor: every chunk reads all of W (and, trained, the float32 dW accumulator)


def default_chunk_size(entries, hidden_size, vocab, dtype, chunk_bytes=None):
    """Rows per chunk: about entries * H / V (a chunk's logits about as large as the hidden states, Liger's rule)
    rounded up to a power of two, but at least MIN_CHUNK_ROWS, then capped by the largest power of two of rows
    whose logits fit in chunk_bytes (default CHUNK_BYTES) and by the entries.

    The floor: each chunk's products read the whole [V, H] weight, and the weight-gradient addmm reads and writes
    the float32 accumulator: 2·C·V·H FLOPs against 2·V·H (logits, D @ W) and 8·V·H (dW) bytes, i.e. C and C / 4
    FLOPs per byte, above an H100 / H200's ~200-300 FLOP/byte from C ~ 1024 rows on. Fewer chunks never cost
    memory beyond chunk_bytes. M = 33792, H = 4096, V = 128256 bfloat16: 2048 rows (525 MB of logits, 17
    chunks); M = 2048 (two 1K answers): 1024 rows; float32 or chunk_bytes = 256 MiB: 1024 rows."""
    budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    elem = torch.empty((), dtype=dtype).element_size()
    cap = max(1, budget // (vocab * elem))
    cap = 1 << (cap.bit_length() - 1)  # a power of two too
    want = triton.next_power_of_2(max(1, triton.cdiv(entries, max(1, triton.cdiv(vocab, hidden_size)))))
    return int(max(1, min(max(want, MIN_CHUNK_ROWS), cap, max(entries, 1))))


# ---------------------------------------------------------------------------------------------------------
# The autograd Function: per-sequence log-prob sums (and, non-differentiable, the vocabulary-mean logit sums)
# ---------------------------------------------------------------------------------------------------------


class _SequenceLogpSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, targets, seq, num_seqs, chunk, strategy, group):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        deferred = strategy == "deferred" and need_h and not (need_w or need_b)
        m, hdim = rows.shape[0], weight.shape[1]
        dev = hidden2d.device
        logp = torch.empty(m, dtype=torch.float32, device=dev)
        zsum = torch.empty(m, dtype=torch.float32, device=dev)
        lse_all = None if deferred else torch.empty(m, dtype=torch.float32, device=dev)
        u = torch.empty(m, hdim, dtype=torch.float32, device=dev) if deferred else None
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            _, logits = _chunk_logits(hidden2d, weight, bias, rows[a:b])
            lse, target_logit, zsum[a:b] = logits_rows(logits, targets[a:b], write_grad=deferred)
            logp[a:b] = target_logit - lse
            if deferred:
                u[a:b] = _mm_float32(logits, weight)  # logits now hold G = onehot - softmax; U float32
            else:
                lse_all[a:b] = lse
            del logits
        sums = torch.zeros(num_seqs, dtype=torch.float32, device=dev).index_add_(0, seq, logp)
        logit_means = torch.zeros(num_seqs, dtype=torch.float32, device=dev).index_add_(0, seq, zsum / weight.shape[0])
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
            torch.distributed.all_reduce(logit_means, group=group)
        ctx.deferred, ctx.chunk = deferred, chunk
        ctx.save_for_backward(hidden2d, weight, bias, rows, targets, seq, lse_all, u)
        ctx.mark_non_differentiable(logit_means)
        return sums, logit_means

    @staticmethod
    def backward(ctx, grad_sums, _grad_logit_means):
        hidden2d, weight, bias, rows, targets, seq, lse_all, u = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_sums.float()
        m = rows.shape[0]
        gh = torch.zeros_like(hidden2d) if need_h else None
        none = (None,) * 7
        if ctx.deferred:  # frozen head: scale the forward's G @ W per sequence, chunk by chunk (no [M, H] temporary)
            for a in range(0, m, ctx.chunk):
                b = min(a + ctx.chunk, m)
                gh.index_add_(0, rows[a:b], (u[a:b] * g[seq[a:b]][:, None]).to(hidden2d.dtype))
            return gh, None, None, *none
        # two passes: recompute each chunk's logits, D = g_s G in place, one product per gradient
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for a in range(0, m, ctx.chunk):
            b = min(a + ctx.chunk, m)
            h, logits = _chunk_logits(hidden2d, weight, bias, rows[a:b])
            logits_rows(logits, targets[a:b], lse=lse_all[a:b], write_grad=True, scale=g[seq[a:b]])
            if need_h:
                gh.index_add_(0, rows[a:b], logits @ weight)
            if need_w:
                _accumulate_product(gw32, logits.T, h)
            if need_b:
                gb32 += logits.sum(0, dtype=torch.float32)
            del h, logits
        gw = gw32.to(weight.dtype) if need_w else None
        gb = gb32.to(bias.dtype) if need_b else None
        return gh, gw, gb, *none


def sequence_logp_sums(hidden, weight, rows, targets, seq, num_seqs, bias=None, *, chunk_size=None, chunk_bytes=None,
                       strategy="auto", group=None, return_logit_means=False, checked=False):
    """Per-sequence sums of log softmax(hidden[rows] @ weight.T + bias)[targets] -> float32 [num_seqs].

    hidden [..., H] (any leading shape, flattened), weight [V, H], bias [V] or None, rows / targets / seq [M]
    int64: entry m reads row rows[m] of the flattened hidden, predicts targets[m], adds to sum seq[m].
    Differentiable in hidden, weight and bias (see the module docstring for strategies and `group`).
    chunk_size: entries per chunk (default `default_chunk_size`, about M·H/V, at most chunk_bytes of logits).
    return_logit_means=True also returns float32 [num_seqs]: per sequence, the sum over its entries of the
    vocabulary-mean logit (not differentiable; TRL's logits/chosen and logits/rejected metrics).
    checked=True: the caller checked targets and rows where it built them (on the host); the device-side checks,
    host synchronizations, are skipped."""
    _check_head(hidden, weight, bias, strategy)
    v = weight.shape[0]
    if not checked and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= v):
        raise ValueError(f"labels must be in [0, {v}) or ignore_index; "
                         f"got {int(targets.min())}..{int(targets.max())}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if not checked and rows.numel() and (int(rows.max()) >= hidden2d.shape[0] or int(rows.min()) < 0):
        bad = int(rows.max()) if int(rows.max()) >= hidden2d.shape[0] else int(rows.min())
        raise ValueError(f"hidden_index points at row {bad} of a hidden with {hidden2d.shape[0]} rows")
    chunk = _chunk_rows(rows.shape[0], weight, hidden.dtype, chunk_size, chunk_bytes)
    if not torch.is_grad_enabled():
        strategy = "recompute"  # no backward will come: the forward computes the LSE only
    elif strategy in ("auto", "onepass"):
        trains_head = weight.requires_grad or (bias is not None and bias.requires_grad)
        strategy = "recompute" if trains_head else "deferred"
    sums, logit_means = _SequenceLogpSums.apply(hidden2d, weight, bias, rows, targets, seq, num_seqs, chunk, strategy,
                                                group)
    return (sums, logit_means) if return_logit_means else sums


def _chunk_rows(entries, weight, dtype, chunk_size, chunk_bytes):
    if chunk_bytes is not None and int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    chunk = int(chunk_size or default_chunk_size(entries, weight.shape[1], weight.shape[0], dtype, chunk_bytes))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk


def _check_head(hidden, weight, bias, strategy):
    if strategy not in ("auto", "onepass", "deferred", "recompute"):
        raise ValueError(f"strategy must be 'auto', 'onepass', 'deferred' or 'recompute', got {strategy!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))


def fused_linear_orpo_loss(hidden, weight, labels, *, bias=None, beta=0.1, nll_weight=1.0, mode="orpo",
                           sequence_ids=None, segment_ids=None, hidden_index=None, num_pairs=None,
                           skip_empty=False, ignore_index=-100, chunk_size=None, chunk_bytes=None, strategy="auto",
                           group=None, nll_reduction="token", pair_weights=None):
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
    pair_weights: optional float tensor [P] (finite, >= 0; else ValueError): pair i's NLL and odds-ratio terms
        are multiplied by w_i, the means stay over the pair count (token: the chosen-token count), e.g.
        odds term -beta (1/P) sum_i w_i logsigmoid(log_odds_i): linear per pair, so exact over micro-steps and
        ranks (Self-Consistency Preference Optimization, arXiv 2411.04109, weights pairs by their vote margin;
        reference.orpo_objective has every formula). Only the 2P-number objective changes, not the kernel:
        g_s = dloss/dL_s carries the weight. None (or all ones) is today's loss; metrics stay unweighted.
    A response with no label tokens raises ValueError, or with skip_empty=True its pair is skipped and counted.
    chunk_size: loss entries per chunk (default about M·H/V, see `default_chunk_size`); chunk_bytes: cap on one
        chunk's logits in bytes (default 512 MiB); strategy: "auto", "deferred" (frozen head) or "recompute"
        (module docstring); group: sequence-parallel process group (module docstring).
    Returns (loss, metrics): metrics float tensors named like TRL's (rewards/chosen, rewards/rejected,
        rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected,
        nll_loss, log_odds_ratio, log_odds_chosen) plus skipped_pairs.

    Example:
        loss, metrics = fused_linear_orpo_loss(hidden, model.lm_head.weight, labels, beta=0.1)
        loss.backward()
    """
    if labels.dim() == 2 and tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be labels' shape {tuple(labels.shape)} plus H (classic)")
    if labels.dim() == 1 and (hidden.dim() != 2 or (hidden_index is None and hidden.shape[0] != labels.shape[0])):
        raise ValueError(f"packed layout: hidden must be [N, H] with N = len(labels) = {labels.shape[0]} unless "
                         f"hidden_index maps entries to rows; got hidden {tuple(hidden.shape)}")
    _check_head(hidden, weight, bias, strategy)
    if strategy in ("auto", "onepass") and torch.is_grad_enabled():
        return _onepass(hidden, weight, labels, bias, beta, nll_weight, mode, sequence_ids, segment_ids, hidden_index,
                        num_pairs, skip_empty, ignore_index, chunk_size, chunk_bytes, group, nll_reduction,
                        pair_weights)
    rows, targets, seq, pairs = preference_entries(labels.to(hidden.device), mode=mode, sequence_ids=sequence_ids,
                                                   segment_ids=segment_ids, hidden_index=hidden_index,
                                                   num_pairs=num_pairs, ignore_index=ignore_index)
    if group is not None:
        p = torch.tensor([pairs], device=hidden.device)
        torch.distributed.all_reduce(p, op=torch.distributed.ReduceOp.MAX, group=group)
        pairs = int(p)
    counts = global_sum(torch.bincount(seq, minlength=2 * pairs), group)
    check_empty_sequences(counts, mode, skip_empty)
    reference.check_pair_weights(pair_weights, pairs)  # before the token work
    sums, logit_means = sequence_logp_sums(hidden, weight, rows, targets, seq, 2 * pairs, bias, chunk_size=chunk_size,
                                           chunk_bytes=chunk_bytes, strategy=strategy, group=group,
                                           return_logit_means=True)
    return orpo_objective(sums, counts, mode=mode, beta=beta, nll_weight=nll_weight, skip_empty=skip_empty,
                          logit_means=logit_means, nll_reduction=nll_reduction, pair_weights=pair_weights)


def _onepass(hidden, weight, labels, bias, beta, nll_weight, mode, sequence_ids, segment_ids, hidden_index, num_pairs,
             skip_empty, ignore_index, chunk_size, chunk_bytes, group, nll_reduction, pair_weights):
    """fused_linear_orpo_loss by the one-pass Function (orpo_onepass): `loss_batch` then `loss_from_batch`."""
    batch = loss_batch(hidden, weight, labels, bias=bias, mode=mode, sequence_ids=sequence_ids,
                       segment_ids=segment_ids, hidden_index=hidden_index, num_pairs=num_pairs, skip_empty=skip_empty,
                       ignore_index=ignore_index, group=group, pair_weights=pair_weights)
    if batch is None:  # a trained head under sequence parallelism over several pairs: the two-pass path
        return fused_linear_orpo_loss(hidden, weight, labels, bias=bias, beta=beta, nll_weight=nll_weight, mode=mode,
                                      sequence_ids=sequence_ids, segment_ids=segment_ids, hidden_index=hidden_index,
                                      num_pairs=num_pairs, skip_empty=skip_empty, ignore_index=ignore_index,
                                      chunk_size=chunk_size, chunk_bytes=chunk_bytes, strategy="recompute",
                                      group=group, nll_reduction=nll_reduction, pair_weights=pair_weights)
    return loss_from_batch(hidden, weight, batch, bias=bias, beta=beta, nll_weight=nll_weight,
                           nll_reduction=nll_reduction, chunk_size=chunk_size, chunk_bytes=chunk_bytes, group=group)


def loss_batch(hidden, weight, labels, *, bias=None, mode="orpo", sequence_ids=None, segment_ids=None,
               hidden_index=None, num_pairs=None, skip_empty=False, ignore_index=-100, group=None, pair_weights=None):
    """The loss entries of a batch, sorted, counted and checked once (orpo_onepass.LossBatch), for
    `loss_from_batch`. Build it where the labels are still on the host and the loss syncs nothing; labels on
    the device are waited for here, once. Returns None where the one-pass path does not apply (a trained
    head under sequence parallelism over several pairs). Arguments as fused_linear_orpo_loss."""
    from .orpo_onepass import LossBatch, trains_head_under_group

    place = lambda t: None if t is None else t.to(labels.device)  # noqa: E731
    rows, targets, seq, pairs = preference_entries(labels, mode=mode, sequence_ids=place(sequence_ids),
                                                   segment_ids=place(segment_ids), hidden_index=place(hidden_index),
                                                   num_pairs=num_pairs, ignore_index=ignore_index)
    if group is not None:
        p = torch.tensor([pairs], device=hidden.device)
        torch.distributed.all_reduce(p, op=torch.distributed.ReduceOp.MAX, group=group)
        pairs = int(p)
    if trains_head_under_group(weight, bias, group, pairs):
        return None
    return LossBatch.from_entries(rows, targets, seq, pairs, hidden.device, mode=mode, skip_empty=skip_empty,
                                  group=group, vocab=weight.shape[0], hidden_rows=hidden.numel() // hidden.shape[-1],
                                  pair_weights=pair_weights)


def loss_from_batch(hidden, weight, batch, *, bias=None, beta=0.1, nll_weight=1.0, nll_reduction="token",
                    chunk_size=None, chunk_bytes=None, group=None):
    """(loss, metrics) of a `loss_batch` by the one-pass Function: 3 products per chunk (2 with a frozen head),
    no host synchronization in the forward or the backward (tests/kernels/test_orpo_memory.py counts both)."""
    from . import orpo_onepass

    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    chunk = _chunk_rows(batch.rows.shape[0], weight, hidden.dtype, chunk_size, chunk_bytes)
    options = dict(mode=batch.mode, skip_empty=batch.skip_empty, nll_reduction=nll_reduction,
                   pair_weights=batch.pair_weights, keep=batch.keep)

    def objective(sums):
        return orpo_objective(sums, batch.counts_dev, beta=beta, nll_weight=nll_weight, **options)[0]

    loss, sums, zsums = orpo_onepass.onepass_loss(hidden2d, weight, bias, batch, objective, chunk, group)
    with torch.no_grad():
        _, metrics = orpo_objective(sums, batch.counts_dev, beta=beta, nll_weight=nll_weight,
                                    logit_means=zsums / weight.shape[0], **options)
    return loss, metrics


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


__all__ = ["fused_linear_orpo_loss", "loss_batch", "loss_from_batch", "sequence_logp_sums", "shared_prompt_targets", "local_targets", "logits_rows"]
