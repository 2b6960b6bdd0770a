"""Ring attention over torch.distributed: each rank holds a shard of the sequence, K/V shards travel round.

Layouts (W ranks, sequence of T tokens):

    zigzag (default): 2W chunks of T/(2W) tokens; rank r holds chunks r and 2W-1-r, in that order.
                      Causal work is balanced: every step after the first costs each rank the same.
        W=2:  chunks  0 1 2 3   ->  rank 0: [0, 3]   rank 1: [1, 2]
    plain:            rank r holds tokens [r T/W, (r+1) T/W); the last ranks do most of the causal work.

At step s rank r holds the K/V shard of rank (r - s) mod W. It sends that shard on to rank r+1 and receives
the next one from rank r-1 (batched isend/irecv started before the step's compute, so the transfer overlaps
it), and attends its queries to the shard's keys: the causal mask is applied by global position, so only the
visible chunk pairs are computed (`step_blocks`). Each block is merged into the float32 accumulators (out, lse)
in place by the forward op itself (`accumulate=`: the Triton kernel's epilogue reads the accumulator rows and
writes them back merged, no partial tensors and no separate merge kernel), by the stable pairwise rule
(ring_merge.py): out <- (w out + w_b out_b) / (w + w_b) with weights exp(lse - max) <= 1, lse <-
logaddexp(lse, lse_b); rows that have seen no key yet (lse = -inf) stay out = 0, lse = -inf, never NaN.

Backward uses the final (merged) out and lse and delta = rowsum(dO * O), so no block renormalizes. dQ
accumulates locally in float32; dK/dV of a shard accumulate in a float32 buffer that travels round the ring
with the shard and arrives back at its owner after W - 1 sends (below). The backward op adds each block's
gradients into those buffers in its epilogues (`accumulate=`), so a step allocates nothing per block.

No transfer waits alone. A rank's own shard is its step 0, and its backward is split in two: the dQ part runs
at step 0 while the first K/V transfer is in flight, the dK/dV part after the last step, while the buffer that
carries every other rank's part of that shard's gradient makes its final hop home (the own part and the arrived
buffer are then added). A shard's dK/dV buffer is therefore first filled by the next rank (step 1) and sent W - 1
times, not W: the transfer that ran alone at the end of the backward now overlaps the own shard's dK/dV kernel.

Segment ids (the preference packing: 0 = prompt, seen by all; 1 = chosen; 2 = rejected) are all-gathered
once per call (T/W int32 per rank), so the block of every step knows its keys' segments.
Packed sequences (cu_seqlens) are not supported across ranks; a single-process call (group=None) accepts them.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import attention, reference, ring_merge

merge_partials_ = ring_merge.merge_partials_  # re-exported: the standalone merge of two partials

LAYOUTS = ("zigzag", "plain")


# ---------------------------------------------------------------------------------------------------------
# Building blocks (also used by bench/ to simulate a W-step ring on one device)
# ---------------------------------------------------------------------------------------------------------


def attention_ops(device, backend="auto"):
    """The raw (forward, backward) attention ops for tensors on `device`.

    backend "auto": the Triton kernel (sealong_kernels.attention) on CUDA, the plain-torch twin elsewhere;
    "triton": the Triton kernel anywhere (on a CPU only under TRITON_INTERPRET=1); "reference": the twin.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or (backend == "auto" and torch.device(device).type != "cuda"):
        return reference.attention_forward, reference.attention_backward
    return attention.attention_forward, attention.attention_backward


def shard_ranges(seq_len, world, rank, layout="zigzag"):
    """The global [start, end) token ranges that rank `rank` of `world` holds, in its local order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a group of {world}")
    parts = 2 * world if layout == "zigzag" else world
    if seq_len % parts != 0 or seq_len < parts:
        raise ValueError(
            f"a {layout} layout over {world} ranks splits the sequence into {parts} equal chunks: "
            f"sequence length {seq_len} is not a positive multiple of {parts} (pad it)")
    c = seq_len // parts
    if layout == "plain":
        return [(rank * c, (rank + 1) * c)]
    return [(rank * c, (rank + 1) * c), ((parts - 1 - rank) * c, (parts - rank) * c)]


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step: local query rows [q_lo, q_hi) against local key rows [k_lo, k_hi).

    causal=False means every key of the block is visible (by position); causal=True applies the mask with
    the global positions q_start, k_start of the first query and key.
    """

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool
    q_start: int = 0
    k_start: int = 0


def step_blocks(q_ranges, k_ranges, causal=True):
    """The blocks to compute for local queries at global `q_ranges` against keys at global `k_ranges`.

    The diagonal step (q_ranges == k_ranges) is one causal call. Otherwise chunk pairs whose keys all lie after
    the queries are skipped; pairs whose keys all lie before are
    computed without a mask; the others with the causal mask by global position. Unmasked blocks that
    share their keys (or queries) and are adjacent are coalesced into one call.
    """
    if causal and list(q_ranges) == list(k_ranges):
        # the diagonal step (a rank's own shard): local order follows global position, so one causal call with
        # q_start = k_start covers it, instead of a causal call per chunk and an unmasked one between them
        t = sum(e - s for s, e in q_ranges)
        return [Block(0, t, 0, t, causal=True, q_start=q_ranges[0][0], k_start=q_ranges[0][0])] if t else []
    blocks, q_off = [], 0
    for qs, qe in q_ranges:
        k_off = 0
        for ks, ke in k_ranges:
            rows, cols = (q_off, q_off + qe - qs), (k_off, k_off + ke - ks)
            if qe > qs and ke > ks:
                if not causal or ke - 1 <= qs:
                    blocks.append(Block(*rows, *cols, causal=False))
                elif ks <= qe - 1:
                    blocks.append(Block(*rows, *cols, causal=True, q_start=qs, k_start=ks))
            k_off += ke - ks
        q_off += qe - qs
    return _coalesce(blocks)


def _coalesce(blocks):
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(blocks):
            for j, b in enumerate(blocks):
                if i == j or a.causal or b.causal:
                    continue
                if (a.k_lo, a.k_hi) == (b.k_lo, b.k_hi) and a.q_hi == b.q_lo:
                    new = Block(a.q_lo, b.q_hi, a.k_lo, a.k_hi, causal=False)
                elif (a.q_lo, a.q_hi) == (b.q_lo, b.q_hi) and a.k_hi == b.k_lo:
                    new = Block(a.q_lo, a.q_hi, a.k_lo, b.k_hi, causal=False)
                else:
                    continue
                blocks = [x for n, x in enumerate(blocks) if n not in (i, j)] + [new]
                merged = True
                break
            if merged:
                break
    return sorted(blocks, key=lambda b: (b.q_lo, b.k_lo))


def ring_schedule(seq_len, world, rank, layout="zigzag", causal=True):
    """Blocks of every step for `rank`: schedule[s] lists the Blocks against the K/V of rank (rank - s) % world."""
    q_ranges = shard_ranges(seq_len, world, rank, layout)
    return [step_blocks(q_ranges, shard_ranges(seq_len, world, (rank - s) % world, layout), causal)
            for s in range(world)]


def step_plans(blocks, forward_op, q_seg=None, k_seg=None):
    """The BlockPlan of every block of one ring step (`attention.block_plan`), or None where the ops are not
    the Triton kernel's or there are no segments (nothing to plan): built once per step in the forward and
    passed to every call of the step, forward and backward, so no call builds or looks up block lists."""
    if q_seg is None or forward_op is not attention.attention_forward:
        return None
    return [attention.block_plan(b.q_hi - b.q_lo, b.k_hi - b.k_lo, causal=b.causal, q_start=b.q_start,
                                 k_start=b.k_start, segment_ids=q_seg[b.q_lo:b.q_hi], k_segment_ids=k_seg[b.k_lo:b.k_hi])
            for b in blocks]


def _plan_kw(plans, i):
    return {} if plans is None else {"block_plan": plans[i]}


def attend_step(q, k, v, out, lse, blocks, forward_op, *, softmax_scale, q_seg=None, k_seg=None, plans=None):
    """Run one ring step's blocks of q against (k, v), each merged into the accumulators (out, lse) in place by the
    forward op (`accumulate=`: views of the block's rows, no partial tensors). plans: the step's block plans
    (`step_plans`) or None."""
    for i, b in enumerate(blocks):
        forward_op(
            q[b.q_lo:b.q_hi], k[b.k_lo:b.k_hi], v[b.k_lo:b.k_hi], causal=b.causal, softmax_scale=softmax_scale,
            q_start=b.q_start, k_start=b.k_start, accumulate=(out[b.q_lo:b.q_hi], lse[:, b.q_lo:b.q_hi]),
            segment_ids=None if q_seg is None else q_seg[b.q_lo:b.q_hi],
            k_segment_ids=None if k_seg is None else k_seg[b.k_lo:b.k_hi], **_plan_kw(plans, i))
    return out, lse


def attend_step_backward(dout, q, k, v, out, lse, delta, dq, dkv, blocks, backward_op, *, softmax_scale,
                         q_seg=None, k_seg=None, row_cache=None, plans=None):
    """Add one ring step's gradients in place: dq [T, Hq, D] and dkv [2, Tk, Hkv, D] (dK, dV), float32; the
    backward op adds each block's into their views (`accumulate=`), so no gradient tensor is allocated per block.
    dq None or dkv None: only the other part is computed (the ring splits its own shard's backward in two).

    out, lse and delta = rowsum(dout * out) [Hq, T] are the final (merged) ones of the local queries.
    row_cache: a dict kept over the steps of one backward: the contiguous lse / delta of each query range are
    copied once (a zigzag schedule has at most three ranges), not once per block. plans: the step's block
    plans from its forward (`step_plans`) or None.
    """
    row_cache = {} if row_cache is None else row_cache
    for i, b in enumerate(blocks):
        rows, cols = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
        if (b.q_lo, b.q_hi) not in row_cache:
            row_cache[b.q_lo, b.q_hi] = (lse[:, rows].contiguous(), delta[:, rows].contiguous())
        lse_b, delta_b = row_cache[b.q_lo, b.q_hi]
        backward_op(
            dout[rows], q[rows], k[cols], v[cols], out[rows], lse_b,
            delta=delta_b, causal=b.causal, softmax_scale=softmax_scale,
            q_start=b.q_start, k_start=b.k_start,
            accumulate=(None if dq is None else dq[rows], *((None, None) if dkv is None else (dkv[0, cols], dkv[1, cols]))),
            segment_ids=None if q_seg is None else q_seg[rows],
            k_segment_ids=None if k_seg is None else k_seg[cols], **_plan_kw(plans, i))
    return dq, dkv


def simulate_ring(q, k, v, world, *, causal=True, layout="zigzag", softmax_scale=None, segment_ids=None, dout=None,
                  backend="auto"):
    """Run on one device, one rank after another, the per-step blocks and merges of a `world`-rank ring.

    q [T, Hq, D], k, v [T, Hkv, D], segment_ids [T] are whole sequences (global order). Returns (out, lse)
    in global order, plus (dq, dk, dv) float32 when dout is given. For benchmarks (the total work of all
    ranks against one monolithic call) and for checking the schedule without processes.
    """
    fwd, bwd = attention_ops(q.device, backend)
    seq_len = q.shape[0]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index = [torch.cat([torch.arange(a, b) for a, b in shard_ranges(seq_len, world, r, layout)]).to(q.device)
             for r in range(world)]
    acc = _acc_dtype(q)
    shards = [(q[i], k[i], v[i], None if segment_ids is None else segment_ids[i]) for i in index]
    results, plans = [], {}
    for r in range(world):
        out = torch.zeros(shards[r][0].shape, dtype=acc, device=q.device)
        lse = torch.full((q.shape[1], out.shape[0]), float("-inf"), dtype=acc, device=q.device)
        for s, blocks in enumerate(ring_schedule(seq_len, world, r, layout, causal)):
            _, ks, vs, kseg = shards[(r - s) % world]
            plans[r, s] = step_plans(blocks, fwd, shards[r][3], kseg)
            attend_step(shards[r][0], ks, vs, out, lse, blocks, fwd, softmax_scale=scale, q_seg=shards[r][3], k_seg=kseg,
                        plans=plans[r, s])
        results.append((out.to(q.dtype), lse))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], seq_len, dtype=acc, device=q.device)
    for i, (o, l) in zip(index, results):
        out[i], lse[:, i] = o, l
    if dout is None:
        return out, lse
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros((2, *k.shape), dtype=acc, device=q.device)
    for r in range(world):
        i = index[r]
        delta = (dout[i].to(acc) * out[i].to(acc)).sum(-1).transpose(0, 1).contiguous()
        dq_r = torch.zeros(i.numel(), *q.shape[1:], dtype=acc, device=q.device)
        for s, blocks in enumerate(ring_schedule(seq_len, world, r, layout, causal)):
            src = index[(r - s) % world]
            dkv_src = torch.zeros((2, src.numel(), *k.shape[1:]), dtype=acc, device=q.device)
            _, ks, vs, kseg = shards[(r - s) % world]
            attend_step_backward(dout[i], q[i], ks, vs, out[i], lse[:, i], delta, dq_r, dkv_src, blocks, bwd,
                                 softmax_scale=scale, q_seg=shards[r][3], k_seg=kseg, plans=plans[r, s])
            dkv[:, src] += dkv_src
        dq[i] = dq_r
    return out, lse, dq, dkv[0], dkv[1]


# ---------------------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------------------


class _Ring:
    """Rank, size and neighbours (as global ranks) of a ring group; group None is a ring of one."""

    def __init__(self, group):
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if group is not None:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def start(self, sends=(), recvs=()):
        """Post isends to the next rank and irecvs from the previous one, in list order; returns the works."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recvs]
        return dist.batch_isend_irecv(ops) if ops else []

    def all_gather(self, x):
        if self.group is None:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts


def _wait(works):
    for w in works:
        w.wait()


def _check_inputs(q, k, v, ring, segment_ids, layout):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must be [T, Hkv, D] with q's T and D: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and q.shape[0] % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks: local length {q.shape[0]} is odd")
    if segment_ids is not None and tuple(segment_ids.shape) != (q.shape[0],):
        raise ValueError(f"segment_ids must be [T_local]={q.shape[0]}, got {tuple(segment_ids.shape)}")
    check_same_shapes(ring.group, q, k, segment_ids, what="ring")


def check_same_shapes(group, q, k, segment_ids, what):
    """Raise on every rank unless all ranks of `group` hold the same (T_local, Hq, D, Hkv, has_segments).

    Buffers that travel are sized from the local shapes, so a mismatch would hang or garble. The check reads
    the gathered shapes on the host (a device sync), so it runs once per group and shape.
    """
    local = (*q.shape, k.shape[1], int(segment_ids is not None))
    if group is None or (id(group), local) in _CHECKED_SHAPES:
        return
    header = torch.tensor(local, dtype=torch.int64, device=q.device)
    parts = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, header, group=group)
    shapes = [tuple(h.tolist()) for h in parts]
    if len(set(shapes)) != 1:
        raise ValueError(f"every rank of the {what} group must hold the same shard shape "
                         f"(T_local, Hq, D, Hkv, has_segments): got {shapes}")
    _CHECKED_SHAPES.add((id(group), local))


_CHECKED_SHAPES = set()  # (group, local shape) pairs already verified on every rank of the group


# ---------------------------------------------------------------------------------------------------------
# Forward and backward passes
# ---------------------------------------------------------------------------------------------------------


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ring_forward(q, k, v, ring, causal, scale, q_seg, k_segs, layout, cu_seqlens, backend, plans=None, given=None):
    """(out, lse); plans: a list that receives every step's block plans (`step_plans`) for the backward;
    given: every step's plans built by the caller (a RingPlan's), used instead of building them."""
    fwd, _ = attention_ops(q.device, backend)
    if cu_seqlens is not None:  # single process only: one call over the whole sequence
        o, l = fwd(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens, segment_ids=q_seg)
        return o, l if l.dtype == torch.float64 else l.float()
    t_local = q.shape[0]
    seq_len = t_local * ring.world
    out = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
    lse = torch.full((q.shape[1], t_local), float("-inf"), dtype=out.dtype, device=q.device)
    schedule = ring_schedule(seq_len, ring.world, ring.rank, layout, causal)
    kv = torch.stack([k, v])  # one buffer travels: [2, T_local, Hkv, D]
    spare = torch.empty_like(kv) if ring.world > 1 else None  # double buffer: the step's K/V and the next one's
    for s in range(ring.world):
        works, nxt = [], None
        if s < ring.world - 1:
            nxt = spare  # free: what it held was sent in the previous step, whose send has completed
            works = ring.start(sends=[kv], recvs=[nxt])
        src = (ring.rank - s) % ring.world
        k_seg = None if k_segs is None else k_segs[src]
        # once per step, for its forward and backward (or once per batch, by the caller: `ring_plan`)
        step = given[s] if given is not None else step_plans(schedule[s], fwd, q_seg, k_seg)
        if plans is not None:
            plans.append(step)
        attend_step(q, kv[0], kv[1], out, lse, schedule[s], fwd, softmax_scale=scale, q_seg=q_seg, k_seg=k_seg,
                    plans=step)
        _wait(works)
        kv, spare = nxt, kv
    return out.to(q.dtype), lse if lse.dtype == torch.float64 else lse.float()


def _ring_backward(dout, q, k, v, out, lse, ring, causal, scale, q_seg, k_segs, layout, cu_seqlens, backend,
                   plans=None):
    """(dq, dk, dv) of the local shards. Step 0 (the rank's own K/V shard) runs only its dQ part while the first
    K/V transfer is in flight; steps 1 .. W-1 add dQ and the visiting shard's dK/dV, whose float32 buffer travels
    on with the shard; the own shard's dK/dV is computed last, while the buffer of every other rank's part of it
    makes its final hop home, and the two are added."""
    _, bwd = attention_ops(q.device, backend)
    acc = _acc_dtype(q)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(0, 1).contiguous()  # [Hq, T_local], from the final out
    if cu_seqlens is not None:
        return bwd(dout, q, k, v, out, lse, delta=delta, causal=causal, softmax_scale=scale,
                   cu_seqlens=cu_seqlens, segment_ids=q_seg)
    schedule = ring_schedule(q.shape[0] * ring.world, ring.world, ring.rank, layout, causal)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    row_cache = {}

    def step(s, kv, dq_, dkv_):
        src = (ring.rank - s) % ring.world
        attend_step_backward(dout, q, kv[0], kv[1], out, lse, delta, dq_, dkv_, schedule[s], bwd, softmax_scale=scale,
                             q_seg=q_seg, k_seg=None if k_segs is None else k_segs[src], row_cache=row_cache,
                             plans=None if not plans else plans[s])

    if ring.world == 1:
        dkv = torch.zeros((2, *k.shape), dtype=acc, device=q.device)
        step(0, (k, v), dq, dkv)
        return dq, dkv[0], dkv[1]
    kv = torch.stack([k, v])  # the visiting K/V shard: [2, T_local, Hkv, D]
    # every buffer of the loop allocated once, whatever the number of steps: the K/V double buffer (a step
    # computes with one while the next shard arrives in the other), the dK/dV double buffer (a step adds into one
    # while the other, the previous step's, is in flight) and the dK/dV receive buffer
    kv_spare = torch.empty_like(kv)
    dkv_bufs = [torch.empty((2, *k.shape), dtype=acc, device=q.device) for _ in range(2)]
    dkv_in = torch.empty_like(dkv_bufs[0])
    sent = None  # the dK/dV buffer of the previous step's shard, sent on at the start of this step
    for s in range(ring.world):
        # One symmetric batch per step (every rank sends to the next, receives from the previous), so that
        # NCCL groups match across ranks: the previous step's dK/dV buffer and the K/V shard for step s+1 out,
        # their counterparts from the previous rank in, in the same order. Step 1's shard has no buffer from
        # the previous rank (its owner adds its own part last), so dK/dV travel from step 2 on.
        sends, recvs, nxt = [], [], None
        if s >= 2:
            sends.append(sent)
            recvs.append(dkv_in)
        if s < ring.world - 1:
            nxt = kv_spare
            sends.append(kv)
            recvs.append(nxt)
        works = ring.start(sends=sends, recvs=recvs)
        if s == 0:
            step(0, kv, dq, None)  # the own shard's dQ now, its dK/dV last
        else:
            dkv = dkv_bufs[s % 2]  # not `sent`, which is in flight
            dkv.zero_()
            step(s, kv, dq, dkv)
        _wait(works)
        if s >= 2:
            dkv += dkv_in  # the previous ranks' part for this shard
        if s >= 1:
            sent = dkv
        if nxt is not None:
            kv, kv_spare = nxt, kv
    # the buffer of rank+1's shard goes home while the one of ours arrives; meanwhile our own part of our shard
    works = ring.start(sends=[sent], recvs=[dkv_in])
    own = dkv_bufs[ring.world % 2]  # free: not `sent`, and its own send (step W-1's) has completed
    own.zero_()
    step(0, (k, v), None, own)
    _wait(works)
    own += dkv_in
    return dq, own[0], own[1]


class RingAttentionFunction(torch.autograd.Function):
    """Differentiable ring attention on local shards (q, k, v); returns (out, lse) with lse non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, softmax_scale, segment_ids, layout, cu_seqlens, backend, plan=None):
        ring = _Ring(group)
        if ring.world == 1 and layout in LAYOUTS:  # one shard: both layouts are the natural order
            layout = "plain"
        if plan is not None:
            if plan.key != (q.shape[0], ring.world, ring.rank, layout, bool(causal)) or cu_seqlens is not None:
                raise ValueError(f"ring plan built for (T_local, world, rank, layout, causal) = {plan.key}, this call is "
                                 f"{(q.shape[0], ring.world, ring.rank, layout, bool(causal))}"
                                 + (" with cu_seqlens" if cu_seqlens is not None else ""))
            segment_ids = plan.q_seg
        _check_inputs(q, k, v, ring, segment_ids, layout)
        if cu_seqlens is not None and ring.world > 1:
            raise ValueError(f"cu_seqlens (packed sequences) cannot be split over a ring of {ring.world} ranks; "
                             "use one sequence per ring or Ulysses (which sees whole sequences)")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        if plan is not None:  # the batch's segments, gathered and planned once for every layer
            q_seg, k_segs, ctx.plans = plan.q_seg, plan.k_segs, plan.steps
        else:
            q_seg = None if segment_ids is None else segment_ids.to(torch.int32).contiguous()
            k_segs = None if q_seg is None else torch.stack(ring.all_gather(q_seg))  # [W, T_local]
            ctx.plans = []  # every step's block plans, built once in the forward, reused by the backward
        out, lse = _ring_forward(q, k, v, ring, causal, scale, q_seg, k_segs, layout, cu_seqlens, backend,
                                 None if plan is not None else ctx.plans, plan.steps if plan is not None else None)
        ctx.save_for_backward(q, k, v, out, lse, q_seg, k_segs)
        ctx.setup = (ring, causal, scale, layout, backend, cu_seqlens)  # cu_seqlens: a tensor or a VarlenPlan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_seg, k_segs = ctx.saved_tensors
        ring, causal, scale, layout, backend, cu_seqlens = ctx.setup
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ring, causal, scale, q_seg, k_segs,
                                    layout, cu_seqlens, backend, ctx.plans)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


@dataclass(frozen=True)
class RingPlan:
    """A batch's ring attention plan, the same for every layer: this rank's segment ids q_seg [T_local] int32,
    every rank's k_segs [W, T_local] (gathered once, not per layer), and every step's block plans (`step_plans`,
    None where there is nothing to plan); key (T_local, world, rank, layout, causal)."""
    q_seg: torch.Tensor
    k_segs: torch.Tensor
    steps: list
    key: tuple


def ring_plan(segment_ids, group, *, causal=True, layout="zigzag", backend="auto"):
    """The RingPlan of a batch's local segment ids [T_local] (a collective over `group`: every rank calls it),
    for `ring_attention(..., plan=...)` in every layer: one segment gather and one build per block of every
    step per batch, instead of per layer call."""
    ring = _Ring(group)
    if ring.world == 1 and layout in LAYOUTS:
        layout = "plain"
    q_seg = segment_ids.to(torch.int32).contiguous()
    k_segs = torch.stack(ring.all_gather(q_seg))
    fwd, _ = attention_ops(q_seg.device, backend)
    t_local = q_seg.shape[0]
    schedule = ring_schedule(t_local * ring.world, ring.world, ring.rank, layout, causal)
    steps = [step_plans(schedule[s], fwd, q_seg, k_segs[(ring.rank - s) % ring.world]) for s in range(ring.world)]
    return RingPlan(q_seg, k_segs, steps, (t_local, ring.world, ring.rank, layout, bool(causal)))


def ring_attention(q, k, v, group, causal=True, *, softmax_scale=None, segment_ids=None, layout="zigzag",
                   cu_seqlens=None, backend="auto", plan=None):
    """Attention over a sequence sharded across the ranks of `group`; each rank passes its own shard.

    q [T_local, Hq, D], k, v [T_local, Hkv, D] (Hq % Hkv == 0; query head h uses kv head h // (Hq // Hkv)),
    segment_ids [T_local] int (0 = prompt, visible to all; other ids see only their own segment and 0).
    The shard is this rank's part of the global sequence in `layout` ("zigzag": chunks r and 2W-1-r of 2W;
    "plain": chunk r of W); see `shard_ranges` and sealong.train.parallel for the sharding helpers.
    Returns out [T_local, Hq, D] in q's dtype (differentiable in q, k, v) and lse [Hq, T_local] float32
    (natural log, no gradient), equal to attention over the whole sequence restricted to this shard's rows.
    group: the ring's process group (`torch.distributed.group.WORLD` for all ranks); None computes on this
    process alone (no communication; then cu_seqlens [S+1] for packed sequences is allowed).
    backend: see `attention_ops`. plan: the batch's RingPlan (`ring_plan`, built once per batch and passed to
    every layer; its segments replace segment_ids), or None: each call gathers the segments and plans its steps.
    """
    return RingAttentionFunction.apply(q, k, v, group, causal, softmax_scale, segment_ids, layout, cu_seqlens, backend,
                                       plan)
