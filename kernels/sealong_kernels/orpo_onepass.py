"""One-pass fused ORPO / SFT loss: every chunk's hidden and weight gradients computed in its forward.

The two-pass strategies of `orpo.py` return the per-sequence sums L [2P] and wait for g = dloss/dL in the
backward, so a trained head recomputes each chunk's logits there (4 products per chunk). Here the objective
runs inside the autograd Function (Liger-Kernel's chunked loss does the same): the objective is a sum of
per-pair terms over batch denominators known in advance (reference.orpo_objective), so a pair's g is known
as soon as its own tokens are seen. Chunks are aligned to pairs:

* "whole" chunk: consecutive whole pairs (entries sorted by sequence, chosen then rejected, pair by pair)
  that fit in `chunk` rows. Forward: logits (product 1), the row kernel's LSE pass, L of those pairs, their
  g (autograd on the 2P-number objective), the row kernel writes D = g_s (onehot - softmax) in place, then
  dhidden rows = D @ W (product 2) and dW += D^T Hc (product 3, float32 accumulator), db += sum D.
* "piece" of a pair longer than a chunk (a 32K pair): pieces never straddle its chosen / rejected boundary.
  Forward: logits (1), G = onehot - softmax unscaled, U = G @ W (2, float32 rows), A_s += G^T Hc (3, float32,
  one [V, H] accumulator per open sequence: two). After the pair's last piece g is known: dhidden rows =
  g_s U, dW += g_c A_c + g_r A_r (elementwise, no product).

Products per chunk: 3 with a trained head, 2 with a frozen head (no dW), whatever the sequence lengths. The
backward only multiplies the saved gradients by the loss's grad_output (1, a loss scale, a share).
U and the accumulators are float32: on CUDA `mm(..., out_dtype=torch.float32)` / `addmm(..., out_dtype=...)`
(cuBLAS adds into float32, no 16-bit rounding in between); elsewhere 16-bit factors are upcast first.

Host synchronizations: none in the forward or the backward. Everything data-dependent (the entries, their
counts per sequence, which pairs are kept, label and weight checks) is decided once where the batch is built
(`LossBatch.build`, host side); the chunk plan comes from the host counts.

Sequence parallel (`group`): a pair's L is known only after the all-reduce at the end of the forward, so
every pair is handled as "pieces" (U [M, H] float32; with a trained head two [V, H] accumulators per
sequence, so a trained head under sequence parallelism takes one pair per call; more fall back to the
two-pass "recompute" path of orpo.py).

Memory beyond the two-pass path: dhidden [N, H] (the input dtype; each entry's float32 contribution rounded
once) and the weight gradient (the weight's dtype) are held from the loss forward to its backward; a long
pair adds U (float32 [its entries, H]) and, with a trained head, two float32 [V, H] accumulators while open.
"""

from dataclasses import dataclass

import torch

from . import reference
from .orpo_rows import _accumulate_product, _chunk_logits, logits_rows, mm_float32


@dataclass
class Chunk:
    start: int        # entries [start, end) of the sorted entries
    end: int
    pair0: int        # pairs [pair0, pair1) it holds (whole) or belongs to (piece)
    pair1: int
    piece: bool       # part of one sequence of a pair handled by accumulators
    closes: bool      # its pairs' g can be computed after it


def plan_chunks(local_counts, chunk, all_pieces=False):
    """Host-side chunk plan over entries sorted by sequence: whole pairs packed greedily into chunks of at most
    `chunk` entries; a pair of more than `chunk` entries (or every pair when all_pieces) split into pieces of
    at most `chunk` entries inside each of its sequences. Returns [Chunk]."""
    counts = [int(c) for c in local_counts]
    pairs = len(counts) // 2
    off = [0]
    for c in counts:
        off.append(off[-1] + c)
    plan, p = [], 0
    while p < pairs:
        n = counts[2 * p] + counts[2 * p + 1]
        if all_pieces or n > chunk:
            pieces = [(a, min(a + chunk, off[s + 1])) for s in (2 * p, 2 * p + 1) for a in range(off[s], off[s + 1], chunk)]
            for i, (a, b) in enumerate(pieces):
                plan.append(Chunk(a, b, p, p + 1, True, i == len(pieces) - 1 and not all_pieces))
            p += 1
            continue
        q, total = p, 0
        while q < pairs and counts[2 * q] + counts[2 * q + 1] <= chunk and total + counts[2 * q] + counts[2 * q + 1] <= chunk:
            total += counts[2 * q] + counts[2 * q + 1]
            q += 1
        plan.append(Chunk(off[2 * p], off[2 * q], p, q, False, True))
        p = q
    return plan


@dataclass
class LossBatch:
    """A batch's loss entries, sorted by sequence, and everything the loss needs decided on the host.

    rows, targets, seq [M] int64 on the compute device; counts [2P] (global label tokens, host list and device
    tensor), local_counts [2P] (this rank's, host list: the chunk plan), keep (int64 index of kept pairs, device),
    pairs; pair_weights validated (device) or None."""
    rows: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    counts: list
    counts_dev: torch.Tensor
    local_counts: list
    keep: torch.Tensor
    pairs: int
    mode: str = "orpo"
    skip_empty: bool = False
    pair_weights: torch.Tensor = None

    @classmethod
    def from_entries(cls, rows, targets, seq, pairs, device, *, mode="orpo", skip_empty=False, group=None,
                     vocab=None, hidden_rows=None, pair_weights=None):
        """Sort the entries by sequence, count them per sequence and check them (host synchronizations
        allowed here, once per batch: where the labels live on the device they are waited for)."""
        order = torch.argsort(seq, stable=True)
        rows, targets, seq = rows[order], targets[order], seq[order]
        local = torch.bincount(seq, minlength=2 * pairs).cpu()
        counts = local.clone()
        if group is not None:
            total = local.to(device, copy=True)  # never the host counts themselves (CPU: same tensor)
            torch.distributed.all_reduce(total, group=group)
            counts = total.cpu()
        keep = reference.kept_pairs(counts, mode, skip_empty)
        if targets.numel() and vocab is not None:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"labels must be in [0, {vocab}) or ignore_index; got {lo}..{hi}")
        if rows.numel() and hidden_rows is not None:
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= hidden_rows:
                raise ValueError(f"hidden_index points at row {hi if hi >= hidden_rows else lo} of a hidden with "
                                 f"{hidden_rows} rows")
        w = reference.check_pair_weights(pair_weights, pairs)
        return cls(rows.to(device), targets.to(device), seq.to(device), counts.tolist(), counts.to(device),
                   local.tolist(), keep.to(device), pairs, mode, skip_empty, None if w is None else w.to(device))


class _OnePassLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, batch, objective, chunk, group):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev, (v, hdim) = hidden2d.device, weight.shape
        rows, targets, seq = batch.rows, batch.targets, batch.seq
        n_seq = 2 * batch.pairs
        plan = plan_chunks(batch.local_counts, chunk, all_pieces=group is not None)
        sums = torch.zeros(n_seq, dtype=torch.float32, device=dev)
        zsums = torch.zeros(n_seq, dtype=torch.float32, device=dev)
        # the objective's input: L where known, else a finite placeholder (mean log-prob -1); separable per pair
        work = -batch.counts_dev.float()
        gh = torch.zeros_like(hidden2d) if need_h else None  # each row's float32 contribution rounded once
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        gb32 = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        pieces = [c for c in plan if c.piece]
        span = max([sum(batch.local_counts[2 * c.pair0:2 * c.pair1]) for c in pieces] + [0])
        if group is not None:
            span = rows.shape[0]
        u = torch.empty(span, hdim, dtype=torch.float32, device=dev) if need_h and pieces else None
        slots = (n_seq if group is not None else 2) if pieces else 0
        acc_w = [torch.zeros(weight.shape, dtype=torch.float32, device=dev) for _ in range(slots)] if need_w else []
        acc_b = [torch.zeros(v, dtype=torch.float32, device=dev) for _ in range(slots)] if need_b else []
        open_from = None  # first entry of the open pieces (u is indexed from there)

        def grads_of(lo, hi):
            work[lo:hi] = sums[lo:hi]
            with torch.enable_grad():
                x = work.detach().requires_grad_()
                (g,) = torch.autograd.grad(objective(x), x, allow_unused=True)
            return torch.zeros_like(work) if g is None else g

        def fold(lo_seq, hi_seq, a0, b0, g):
            if need_h:
                gh.index_add_(0, rows[a0:b0], (u[:b0 - a0] * g[seq[a0:b0]][:, None]).to(gh.dtype))
            for k, s in enumerate(range(lo_seq, hi_seq)):
                if acc_w:
                    gw32.addcmul_(acc_w[k], g[s])
                    acc_w[k].zero_()
                if acc_b:
                    gb32.addcmul_(acc_b[k], g[s])
                    acc_b[k].zero_()

        for c in plan:
            a, b = c.start, c.end
            if b > a:
                h, logits = _chunk_logits(hidden2d, weight, bias, rows[a:b])
                lse, target_logit, zsum = logits_rows(logits, targets[a:b], write_grad=c.piece)
                sums.index_add_(0, seq[a:b], target_logit - lse)
                zsums.index_add_(0, seq[a:b], zsum)
                if c.piece:  # logits hold G = onehot - softmax: U rows and the open sequence's accumulators
                    if open_from is None:
                        open_from = a
                    if need_h:
                        u[a - open_from:b - open_from] = mm_float32(logits, weight)
                    s = _sequence_of(batch.local_counts, a)  # a piece lies inside one sequence
                    k = s - 2 * c.pair0 if group is None else s
                    if need_w:
                        _accumulate_product(acc_w[k], logits.T, h)
                    if need_b:
                        acc_b[k] += logits.sum(0, dtype=torch.float32)
                else:
                    g = grads_of(2 * c.pair0, 2 * c.pair1)
                    logits_rows(logits, targets[a:b], lse=lse, write_grad=True, scale=g[seq[a:b]])
                    if need_h:
                        gh.index_add_(0, rows[a:b], mm_float32(logits, weight).to(gh.dtype))
                    if need_w:
                        _accumulate_product(gw32, logits.T, h)
                    if need_b:
                        gb32 += logits.sum(0, dtype=torch.float32)
                del h, logits
            if c.piece and c.closes:
                a0 = sum(batch.local_counts[:2 * c.pair0])
                fold(2 * c.pair0, 2 * c.pair1, a0, b, grads_of(2 * c.pair0, 2 * c.pair1))
                open_from = None
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
            torch.distributed.all_reduce(zsums, group=group)
            if pieces:
                fold(0, n_seq, 0, rows.shape[0], grads_of(0, n_seq))
        work.copy_(sums)
        loss = objective(work).detach()
        ctx.save_for_backward(gh,
                              gw32.to(weight.dtype) if need_w else None, gb32.to(bias.dtype) if need_b else None)
        ctx.mark_non_differentiable(sums, zsums)
        return loss, sums, zsums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_zsums):
        gh, gw, gb = ctx.saved_tensors
        def scale(t):  # the float32 grad_output, never rounded to the gradient's dtype
            if t is None:
                return None
            return t * grad_loss if t.dtype in (torch.float32, torch.float64) else (t.float() * grad_loss).to(t.dtype)
        return scale(gh), scale(gw), scale(gb), None, None, None, None


def _sequence_of(local_counts, entry):
    """The sequence that sorted entry `entry` belongs to (host counts)."""
    total = 0
    for s, c in enumerate(local_counts):
        total += c
        if entry < total:
            return s
    raise IndexError(entry)


def onepass_loss(hidden2d, weight, bias, batch, objective, chunk, group=None):
    """(loss, per-sequence log-prob sums [2P], per-sequence logit sums [2P]) of `objective` (a function of the
    sums [2P] returning the scalar loss, separable per pair) over `batch` (a LossBatch): gradients of hidden,
    weight and bias computed in the forward, 3 products per chunk (2 with a frozen head), no host sync."""
    return _OnePassLoss.apply(hidden2d, weight, bias, batch, objective, chunk, group)


def trains_head_under_group(weight, bias, group, pairs):
    """True where the one-pass path would need 2 [V, H] accumulators per sequence of several pairs (a trained
    head under sequence parallelism): the caller takes the two-pass path there."""
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    return group is not None and trained and pairs > 1


__all__ = ["LossBatch", "onepass_loss", "plan_chunks", "mm_float32"]
