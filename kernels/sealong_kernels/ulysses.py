"""Ulysses (DeepSpeed-Ulysses) and hybrid Ulysses x ring sequence parallelism over torch.distributed.

Ulysses over P ranks: each rank holds T/P consecutive tokens of every head. One all-to-all turns that into
all T tokens of H/P heads; attention runs on whole sequences per head; a second all-to-all turns the output
back. Each link carries 4 T h / P elements per layer forward (q, k, v, out; h = hidden size); q, k and v
travel in one all-to-all (one collective launch instead of three), and so do their gradients.

    tokens x heads   before          after seq -> heads
    rank 0: t0 t1 | h0 h1 h2 h3      rank 0: t0 t1 t2 t3 | h0 h1
    rank 1: t2 t3 | h0 h1 h2 h3      rank 1: t0 t1 t2 t3 | h2 h3

GQA when the degree P exceeds the number of K/V heads Hkv: each K/V head is replicated r = P / gcd(P, Hkv)
times (the smallest r with Hkv r divisible by P), just before the all-to-all, so each rank receives the
Hkv r / P K/V heads its Hq / P query heads read (r divides Hq / Hkv whenever P divides Hq). Nothing is repeated
up to Hq heads: with Hq=32, Hkv=8, P=16, r = 2 and each rank gets 2 query heads and 1 K/V head. The
gradients of the replicas are summed back (autograd of repeat_interleave).

Hybrid over U x R ranks (Ulysses degree U inside ring degree R, two process groups): the sequence is first
laid out over the R ring ranks (zigzag by default), then each ring shard is split into U consecutive pieces
over the Ulysses group. The all-to-all in the Ulysses group rebuilds the ring shard for H/U heads, ring
attention runs over the ring group on it, and the reverse all-to-all restores the pieces. `sequence_index`
gives the global token positions held by each rank (sealong.train.parallel shards data with it).
"""

import math

import torch
import torch.distributed as dist

from .ring import check_same_shapes, ring_attention, shard_ranges


def kv_replication(num_q_heads, num_kv_heads, degree):
    """How many times each K/V head is replicated for a Ulysses degree; raises when heads cannot be split."""
    if num_q_heads % degree != 0:
        raise ValueError(f"Ulysses degree {degree} must divide the number of query heads ({num_q_heads})")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k/v heads ({num_kv_heads})")
    # r always divides the group size G = Hq / Hkv: with g = gcd(P, Hkv), P = r g and Hkv = g h with
    # gcd(r, h) = 1, and P | G Hkv gives r | G h, so r | G. Each replica then serves G / r query heads.
    return degree // math.gcd(degree, num_kv_heads)


def sequence_index(seq_len, ring, ulysses, sp_rank, layout="zigzag"):
    """Global positions [T / (ring ulysses)] int64 held by sequence-parallel rank `sp_rank`, in local order.

    sp_rank = ring_rank * ulysses + ulysses_rank: the ring shard of ring_rank (see ring.shard_ranges) split
    into `ulysses` consecutive pieces. ring=1 gives Ulysses' contiguous shards; ulysses=1 the ring layout.
    """
    if ring < 1 or ulysses < 1 or not 0 <= sp_rank < ring * ulysses:
        raise ValueError(f"sp_rank {sp_rank} is outside ring {ring} x ulysses {ulysses}")
    ranges = shard_ranges(seq_len, ring, sp_rank // ulysses, layout if ring > 1 else "plain")
    shard = torch.cat([torch.arange(a, b) for a, b in ranges])
    if shard.numel() % ulysses != 0:
        raise ValueError(f"a ring shard of {shard.numel()} tokens cannot be split over Ulysses degree {ulysses} "
                         f"(sequence length {seq_len} must be a multiple of {ulysses * ring * (2 if layout == 'zigzag' and ring > 1 else 1)})")
    n = shard.numel() // ulysses
    u = sp_rank % ulysses
    return shard[u * n:(u + 1) * n]


def _to_heads(tensors, group):
    """Sequence shards -> head shards, one all-to-all for all: [T_local, H_i, D] -> [P T_local, H_i / P, D]."""
    p = dist.get_world_size(group)
    t, d = tensors[0].shape[0], tensors[0].shape[2]
    widths = [x.shape[1] // p for x in tensors]
    send = torch.cat([x.reshape(t, p, w, d) for x, w in zip(tensors, widths)], dim=2)
    send = send.transpose(0, 1).contiguous()  # [P, T_local, sum H_i / P, D]: head chunk j to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: the tokens of rank i
    return recv.reshape(p * t, sum(widths), d).split(widths, dim=1)


def _to_sequence(tensors, group):
    """Head shards -> sequence shards (the inverse): [P T_local, H_i / P, D] -> [T_local, H_i, D]."""
    p = dist.get_world_size(group)
    widths = [x.shape[1] for x in tensors]
    x = tensors[0]
    send = torch.cat(tensors, dim=1).reshape(p, x.shape[0] // p, sum(widths), x.shape[2]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: the head chunk i of this rank's tokens
    recv = recv.transpose(0, 1)  # [T_local, P, sum H_i / P, D]
    return tuple(y.reshape(y.shape[0], -1, y.shape[-1]) for y in recv.split(widths, dim=2))


class _ToHeads(torch.autograd.Function):
    """q, k, v from sequence shards to head shards in one collective; their gradients back in one."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        ctx.group = group
        return _to_heads([q, k, v], group)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return (*_to_sequence([dq.contiguous(), dk.contiguous(), dv.contiguous()], ctx.group), None)


class _ToSequence(torch.autograd.Function):
    """The attention output from head shards back to sequence shards; its gradient the other way."""

    @staticmethod
    def forward(ctx, out, group):
        ctx.group = group
        return _to_sequence([out], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return _to_heads([grad.contiguous()], ctx.group)[0], None


def _gather_segments(segment_ids, group):
    if segment_ids is None:
        return None
    seg = segment_ids.to(torch.int32).contiguous()
    parts = [torch.empty_like(seg) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, seg, group=group)
    return torch.cat(parts)


def hybrid_plan(segment_ids, ulysses_group, ring_group, *, causal=True, layout="zigzag", backend="auto"):
    """The batch's plan for `hybrid_attention(..., plan=...)` in every layer (collectives over both groups:
    every rank calls it): the segment ids gathered over the Ulysses group once, and the ring plan of the
    gathered segments (`ring.ring_plan`: every step's block plans), instead of once per layer call."""
    from .ring import ring_plan

    return ring_plan(_gather_segments(segment_ids, ulysses_group), ring_group, causal=causal, layout=layout,
                     backend=backend)


def hybrid_attention(q, k, v, ulysses_group, ring_group, causal=True, *, softmax_scale=None, segment_ids=None,
                     layout="zigzag", cu_seqlens=None, backend="auto", plan=None):
    """Attention with Ulysses all-to-all inside `ulysses_group` and ring attention over `ring_group`.

    q [T_local, Hq, D], k, v [T_local, Hkv, D], segment_ids [T_local]: this rank's tokens, laid out as
    `sequence_index(T, ring, ulysses, sp_rank, layout)`. ring_group None is plain Ulysses (then `cu_seqlens`,
    the global packed-sequence boundaries [S+1], is allowed). Returns out [T_local, Hq, D] in q's dtype,
    differentiable in q, k, v. See the module docstring for the GQA replication rule. plan: the batch's
    `hybrid_plan` (built once per batch; its gathered segments replace segment_ids' gather), or None.
    """
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"q must be [T, Hq, D] and k, v [T, Hkv, D]: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    p = dist.get_world_size(ulysses_group)
    r = kv_replication(q.shape[1], k.shape[1], p)
    check_same_shapes(ulysses_group, q, k, segment_ids, what="Ulysses")
    if r > 1:  # replica j of head i sits at i * r + j, so query heads keep reading head h // (Hq / Hkv)
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qh, kh, vh = _ToHeads.apply(q, k, v, ulysses_group)
    seg = None if plan is not None else _gather_segments(segment_ids, ulysses_group)
    out, _ = ring_attention(qh, kh, vh, ring_group, causal, softmax_scale=softmax_scale, segment_ids=seg,
                            layout=layout, cu_seqlens=cu_seqlens, backend=backend, plan=plan)
    return _ToSequence.apply(out, ulysses_group)


def ulysses_attention(q, k, v, group, causal=True, *, softmax_scale=None, segment_ids=None, cu_seqlens=None,
                      backend="auto"):
    """Ulysses attention: rank r of `group` (P ranks) holds tokens [r T/P, (r+1) T/P) of q, k, v, segment_ids.

    q [T/P, Hq, D], k, v [T/P, Hkv, D]; Hq divisible by P; cu_seqlens [S+1] are global boundaries.
    Returns out [T/P, Hq, D], differentiable in q, k, v. K/V heads are replicated only as far as P needs.
    """
    return hybrid_attention(q, k, v, group, None, causal, softmax_scale=softmax_scale, segment_ids=segment_ids,
                            cu_seqlens=cu_seqlens, backend=backend)


def communication_bytes(seq_len, num_q_heads, num_kv_heads, head_dim, *, ulysses=1, ring=1, dtype_bytes=2,
                        grad_acc_bytes=4):
    """Bytes one rank sends per attention layer for Ulysses x ring sequence parallelism (either may be 1).

    Ulysses (degree U, t = T / (U R) local tokens, r = K/V replication): each all-to-all keeps 1/U of its
    buffer, so forward sends (U-1)/U t (2 Hq + 2 Hkv r) D bytes (q, k, v in; out back); backward the same
    (dout in; dq, dk, dv back). Ring (degree R, on the T/R-token ring shard with Hkv r / U K/V heads): one
    K/V shard 2 (T/R)(Hkv r / U) D per step, R-1 steps forward; backward R-1 K/V sends plus R-1 dK/dV sends
    in float32 (grad_acc_bytes; the own shard's part is added at home, see ring.py). The segment-id gathers
    (T/(U R) int32) are left out.
    """
    r = kv_replication(num_q_heads, num_kv_heads, ulysses)
    t = seq_len // (ulysses * ring)
    a2a = (ulysses - 1) / ulysses * t * (2 * num_q_heads + 2 * num_kv_heads * r) * head_dim * dtype_bytes
    kv_elems = 2 * (seq_len // ring) * (num_kv_heads * r // ulysses) * head_dim
    step = kv_elems * dtype_bytes if ring > 1 else 0
    ring_bwd = (ring - 1) * (step + kv_elems * grad_acc_bytes)
    return dict(ulysses_fwd=a2a, ulysses_bwd=a2a, ring_step_fwd=step, ring_steps=ring - 1,
                ring_fwd=(ring - 1) * step, ring_bwd=ring_bwd, fwd=a2a + (ring - 1) * step, bwd=a2a + ring_bwd)
