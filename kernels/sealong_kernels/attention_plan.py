"""Plans of the attention kernels: the packed-sequence layout of a batch and the block classes of a call.

`VarlenPlan` is built once per batch by the caller (validated with one host sync, or trusted when the caller
built the boundaries itself) and passed to every layer in place of cu_seqlens.

`block_lists` classifies every (query block, key block) pair of a call, on the device with fixed-size torch ops
(no host sync), in the spirit of FlexAttention's BlockMask with full and partial blocks:

    empty    no query of the block sees a key of the block          -> never visited
    full     every query of the block sees every key of the block   -> visited without building the mask
    partial  anything else                                          -> visited with the mask

from per-block summaries: the global positions of the first and last token (causal), the first and last packed
sequence (sequence ids are sorted), the smallest and largest segment id. With segment rule "key seen iff its
segment is 0 or the query's": a pair is empty when causal puts every key after every query, or their sequence
ranges are disjoint, or the key block has no segment 0 in its range and its segment range misses the query
block's; it is full when causal puts every key at or before every query, both blocks lie in one and the same
sequence, the key block is all segment 0 or both blocks are all one same segment, and neither block is cut by
the end of the tokens. So a rejected answer's query block (all segment 2) never visits a key block of the
chosen answer (all segment 1), and a prompt x prompt block below the diagonal runs unmasked.

The lists are packed in one int32 tensor per orientation (rows = query blocks for the forward and dQ, rows = key
blocks for dK/dV):  [count_full (R), count_partial (R), full (R x C), partial (R x C)], each row's blocks in
increasing order in its first count entries. Block sizes are the plan's (PLAN_M x PLAN_N); a kernel tile
divides them and a tile inside a plan block inherits its class (full and empty hold for every part of a block).
The lists are cached on the batch's own tensor (its plan's seq_idx, else its segment ids) under the content
versions of every input (`content_version`), so all layers and the backward share one build, through the
custom ops too, and a buffer refilled in place gets a new plan.
"""

import weakref
from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class VarlenPlan:
    """The packed-sequence layout of one batch, built once by the caller and passed to every layer's attention
    (forward and backward) in place of cu_seqlens: no layer validates, rebuilds seq_idx or reads a length on the
    host again.

    cu_seqlens [S + 1] int32 (validated: starts at 0, non-decreasing, ends at total), seq_idx [total] int32 (the
    sequence of every token), max_seqlen (a Python int when the builder read it, for flash-attn's varlen call).
    The block lists of the calls made with this plan ride on seq_idx (see `block_lists`).
    """

    cu_seqlens: torch.Tensor
    seq_idx: torch.Tensor
    total: int
    max_seqlen: int | None = None


def varlen_plan(cu_seqlens, total, *, device=None, validate=True):
    """Build a VarlenPlan from cu_seqlens [S + 1] for `total` tokens.

    validate=True checks the boundaries and reads the longest sequence in one host sync (once per batch);
    validate=False trusts boundaries the caller built itself (no host sync at all, max_seqlen None).
    """
    if isinstance(cu_seqlens, VarlenPlan):
        return cu_seqlens
    total = int(total)
    cu = torch.as_tensor(cu_seqlens).to(device=device, dtype=torch.int32).contiguous()
    if cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1D tensor of at least 2 boundaries, got shape {tuple(cu.shape)}")
    lengths = cu[1:] - cu[:-1]
    max_seqlen = None
    if validate:
        bad = (cu[0] != 0) | (cu[-1] != total) | (lengths < 0).any()
        bad, max_seqlen = torch.stack([bad.to(torch.int64), lengths.max().to(torch.int64)]).tolist()  # one sync
        if bad:
            raise ValueError(f"cu_seqlens must be non-decreasing, start at 0 and end at T={total}, got {cu.tolist()}")
    seq_idx = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device, dtype=torch.int32),
                                      lengths.to(torch.int64), output_size=total)  # sequence index of every token
    return VarlenPlan(cu, seq_idx, total, max_seqlen)


def _block_ends(x, block):
    """(first, last, min, max) of x [T] per block of `block` tokens (the last block may be short)."""
    t = x.numel()
    nb = -(-t // block)
    padded = torch.cat([x, x[-1:].expand(nb * block - t)]).reshape(nb, block)
    return padded[:, 0], padded[:, -1], padded.amin(1), padded.amax(1)


def _summaries(t, block, start, seq, seg, device):
    """Per-block summary of T tokens: positions (first, last), sequence (first, last), segment (min, max), whole."""
    idx = torch.arange(t, device=device, dtype=torch.int64)
    pos_first, pos_last, _, _ = _block_ends(idx + start, block)
    whole = (pos_last - pos_first) == block - 1
    seq_first, seq_last = _block_ends(seq.to(torch.int64), block)[:2] if seq is not None else (None, None)
    seg_min, seg_max = _block_ends(seg.to(torch.int64), block)[2:] if seg is not None else (None, None)
    return pos_first, pos_last, seq_first, seq_last, seg_min, seg_max, whole


def block_classes(tq, tk, plan_m, plan_n, *, causal=True, q_start=0, k_start=0, seq_idx=None, qseg=None, kseg=None,
                  device=None):
    """Class (EMPTY, PARTIAL, FULL) of every (query block, key block) pair: int8 [ceil(Tq/PLAN_M), ceil(Tk/PLAN_N)].

    seq_idx [T] (q and k the same tokens) and qseg [Tq] / kseg [Tk] as the kernels take them; None = not used.
    """
    q = _summaries(tq, plan_m, q_start, seq_idx, qseg, device)
    k = _summaries(tk, plan_n, k_start, seq_idx, kseg, device)
    (qp0, qp1, qs0, qs1, qg0, qg1, qw), (kp0, kp1, ks0, ks1, kg0, kg1, kw) = q, k
    col = lambda x: x[:, None]  # noqa: E731  query blocks down, key blocks across
    row = lambda x: x[None, :]  # noqa: E731
    some = torch.ones(qp0.numel(), kp0.numel(), dtype=torch.bool, device=device)
    every = col(qw) & row(kw)
    if causal:
        some = some & (col(qp1) >= row(kp0))
        every = every & (col(qp0) >= row(kp1))
    if seq_idx is not None:
        some = some & (col(qs1) >= row(ks0)) & (col(qs0) <= row(ks1))
        every = every & (col(qs0) == col(qs1)) & (col(qs1) == row(ks0)) & (row(ks0) == row(ks1))
    if qseg is not None:
        zero_in_k = (kg0 <= 0) & (kg1 >= 0)
        some = some & (row(zero_in_k) | ((col(qg1) >= row(kg0)) & (col(qg0) <= row(kg1))))
        k_uniform = kg0 == kg1
        every = every & ((row(k_uniform & (kg0 == 0)))
                         | (row(k_uniform) & (col(qg0) == col(qg1)) & (col(qg0) == row(kg0))))
    return torch.where(every & some, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def pack_lists(classes):
    """[count_full (R), count_partial (R), full (R x C), partial (R x C)] int32 of a [R, C] class matrix: each row's
    full / partial column indices in increasing order first."""
    r, c = classes.shape
    cols = torch.arange(c, device=classes.device, dtype=torch.int64).expand(r, c)
    out = [(classes == FULL).sum(1), (classes == PARTIAL).sum(1)]
    for cls in (FULL, PARTIAL):
        # stable sort by "not this class" puts the class's columns first, in increasing order
        order = torch.sort((classes != cls).to(torch.int8), dim=1, stable=True).indices
        out.append(torch.gather(cols, 1, order).reshape(-1))
    return torch.cat([x.to(torch.int32).reshape(-1) for x in out])


BUILDS = [0]  # block-list builds since import (tests count them per training step)


@dataclass(frozen=True)
class BlockPlan:
    """The block lists of one attention geometry, built once per batch by the caller (`attention.block_plan`)
    and passed to every layer's forward and backward (`flash_attention(..., block_plan=...)`): no layer
    classifies blocks or consults a cache. rows / cols: `block_lists`' packed lists by query / key blocks;
    key: the call it was built for (Tq, Tk, PLAN_M, PLAN_N, causal, q_start, k_start, has sequences, has
    segments); a call with another geometry refuses it."""

    rows: torch.Tensor
    cols: torch.Tensor
    key: tuple


def content_version(*tensors):
    """The content versions (`Tensor._version`, bumped by every in-place write: copy_, fill_, a collective into
    the buffer) of the tensors a plan is computed from, or None where one has none (inference tensors): no cache
    then. A buffer refilled in place gets a new version, hence a new plan; no data pointer is ever a key."""
    try:
        return tuple(-1 if t is None else int(t._version) for t in tensors)
    except RuntimeError:
        return None


def block_lists(tq, tk, plan_m, plan_n, *, causal, q_start, k_start, seq_idx, qseg, kseg, cache=None, device=None,
                version=None, companions=()):
    """(rows, cols): the packed lists of `block_classes` by query blocks (forward, dQ) and by key blocks (dK/dV).

    cache: a dict carried by one of the batch's own tensors (the owner), keyed by the call's shape and flags and
    `version` (content_version of every tensor the classes read); `companions`, the other tensors read, must
    be the very objects of the cached entry (weak references, never data pointers). No cache without a version."""
    key = (tq, tk, plan_m, plan_n, bool(causal), int(q_start), int(k_start), seq_idx is not None,
           qseg is not None, version)
    if version is None:
        cache = None
    if cache is not None and key in cache:
        refs, lists = cache[key]
        if len(refs) == len(companions) and all(r() is t for r, t in zip(refs, companions)):
            return lists
    BUILDS[0] += 1
    classes = block_classes(tq, tk, plan_m, plan_n, causal=causal, q_start=q_start, k_start=k_start,
                            seq_idx=seq_idx, qseg=qseg, kseg=kseg, device=device)
    lists = (pack_lists(classes), pack_lists(classes.T.contiguous()))
    if cache is not None:
        cache[key] = (tuple(weakref.ref(t) for t in companions), lists)
    return lists


def block_counts(classes, qseg=None, kseg=None, plan_m=None, plan_n=None):
    """Counts of a class matrix: pairs, visited (full + partial), masked (partial), empty; with segments also the
    visited pairs of an all-rejected (2) query block and an all-chosen (1) key block."""
    counts = dict(pairs=classes.numel(), visited=int((classes != EMPTY).sum()), masked=int((classes == PARTIAL).sum()),
                  full=int((classes == FULL).sum()), empty=int((classes == EMPTY).sum()))
    if qseg is not None:
        _, _, qg0, qg1 = _block_ends(qseg.to(torch.int64), plan_m)
        _, _, kg0, kg1 = _block_ends(kseg.to(torch.int64), plan_n)
        rejected_q = (qg0 == 2) & (qg1 == 2)
        chosen_k = (kg0 == 1) & (kg1 == 1)
        counts["chosen_blocks_visited_by_rejected_queries"] = int(((classes != EMPTY) & rejected_q[:, None]
                                                                   & chosen_k[None, :]).sum())
    return counts


def dense_block_classes(tq, tk, plan_m, plan_n, *, causal=True, q_start=0, k_start=0, seq_idx=None, qseg=None,
                        kseg=None, rows_per_chunk=1024):
    """The ideal classes from the token-level visibility rule (the twin `block_classes` is checked against):
    EMPTY where no (query, key) pair of the two blocks is visible, FULL where all are, else PARTIAL. Computed a
    chunk of query rows at a time ([chunk, Tk] booleans), so a 32K-token call fits in memory."""
    nq, nk = -(-tq // plan_m), -(-tk // plan_n)
    rows_per_chunk = max(plan_m, rows_per_chunk // plan_m * plan_m)
    kj = torch.arange(tk, dtype=torch.int64) + k_start
    pad_k = nk * plan_n - tk
    out = []
    for a in range(0, tq, rows_per_chunk):
        b = min(a + rows_per_chunk, tq)
        qi = torch.arange(a, b, dtype=torch.int64)
        vis = torch.ones(b - a, tk, dtype=torch.bool)
        if causal:
            vis &= (qi[:, None] + q_start) >= kj[None, :]
        if seq_idx is not None:
            vis &= seq_idx[a:b, None] == seq_idx[None, :]
        if qseg is not None:
            vis &= (kseg[None, :] == 0) | (kseg[None, :] == qseg[a:b, None])
        # pad to whole blocks: padded keys / rows count as neither visible (any) nor invisible (all)
        anyv = torch.nn.functional.pad(vis, (0, pad_k), value=False)
        allv = torch.nn.functional.pad(vis, (0, pad_k), value=True)
        rows = -(-(b - a) // plan_m)
        pad_q = rows * plan_m - (b - a)
        anyv = torch.nn.functional.pad(anyv, (0, 0, 0, pad_q), value=False).reshape(rows, plan_m, nk, plan_n)
        allv = torch.nn.functional.pad(allv, (0, 0, 0, pad_q), value=True).reshape(rows, plan_m, nk, plan_n)
        some, every = anyv.any(3).any(1), allv.all(3).all(1)
        out.append(torch.where(every & some, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8))
    return torch.cat(out)[:nq]
