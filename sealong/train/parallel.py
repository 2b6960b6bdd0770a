"""Device mesh for data x sequence parallelism, sequence sharding of the inputs, and the model's attention.

Ranks are laid out as  rank = dp_rank * sp + sp_rank,  sp_rank = ring_rank * ulysses + ulysses_rank,
so a Ulysses group (all-to-all every layer) is made of neighbouring ranks, on one node when it fits, and
the ring (point-to-point, overlapped with compute) spans nodes.

    dims = ParallelDims.from_world(world_size=8, sp=4, ulysses=2)      # dp 2, sp 4 = ulysses 2 x ring 2
    mesh = build_mesh(dims)                                             # after dist.init_process_group
    batch = shard_batch({"input_ids": ids, "labels": labels, "segment_ids": seg}, dims, mesh.sp_rank)
    hidden = model(batch["input_ids"], batch["position_ids"], attention=attention_for(mesh),
                   segment_ids=batch["segment_ids"])

Sharding happens where data is loaded, not in the model: every token-level tensor (token ids, position ids,
labels, segment ids) is cut with the same index (`shard_index`), and the position ids keep their global
values so RoPE sees the true positions. Labels must already be shifted (labels[t] is predicted from token t)
before sharding: a shard does not hold its neighbour's next token. The loss is summed over the tokens of all
dp x sp ranks and divided by their global count (the group `mesh.group("dp_sp")`).
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sealong_kernels.ring import LAYOUTS, ring_attention, ring_plan
from sealong_kernels.ulysses import hybrid_attention, hybrid_plan, kv_replication, sequence_index

AXES = ("dp", "sp", "ulysses", "ring", "dp_sp")


@dataclass
class ParallelDims:
    """Parallel degrees; `validate(world_size)` checks them without any process group."""

    dp: int = 1  # data-parallel degree: replicas that train on different examples, gradients averaged
    sp: int = 1  # sequence-parallel degree: ranks that share one sequence; sp = ulysses * ring
    ulysses: int = 1  # Ulysses degree inside sp: all-to-all heads <-> sequence; must divide the query heads
    ring: int = 1  # ring degree inside sp: K/V shards travel round these ranks (point-to-point)
    layout: str = "zigzag"  # token order over the ring: "zigzag" (balanced causal work) or "plain"

    @classmethod
    def from_world(cls, world_size, sp=1, ulysses=1, layout="zigzag"):
        """dp = world_size / sp and ring = sp / ulysses, validated."""
        for name, val in (("world_size", world_size), ("sp", sp), ("ulysses", ulysses)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if world_size % sp:
            raise ValueError(f"sequence-parallel degree sp={sp} must divide the world size {world_size}")
        if sp % ulysses:
            raise ValueError(f"Ulysses degree {ulysses} must divide the sequence-parallel degree sp={sp}")
        return cls(dp=world_size // sp, sp=sp, ulysses=ulysses, ring=sp // ulysses, layout=layout).validate(world_size)

    def validate(self, world_size):
        """Raise ValueError naming the sizes unless dp * sp == world_size and sp == ulysses * ring; returns self."""
        for name in ("dp", "sp", "ulysses", "ring"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"ParallelDims.{name} must be a positive integer, got {val!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ParallelDims.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.ulysses * self.ring != self.sp:
            raise ValueError(f"sp={self.sp} must equal ulysses x ring = {self.ulysses} x {self.ring}")
        if self.dp * self.sp != world_size:
            raise ValueError(f"dp x sp = {self.dp} x {self.sp} = {self.dp * self.sp} must equal the world size {world_size}")
        return self

    @property
    def seq_multiple(self):
        """Every sequence length must be a multiple of this to be sharded (zigzag rings cut 2 ring chunks)."""
        return self.ulysses * self.ring * (2 if self.layout == "zigzag" and self.ring > 1 else 1)

    def check_model(self, num_q_heads, num_kv_heads):
        """Raise unless the Ulysses degree can split these heads (K/V replicated only as far as needed)."""
        kv_replication(num_q_heads, num_kv_heads, self.ulysses)

    def check_sequence(self, seq_len):
        if seq_len < self.seq_multiple or seq_len % self.seq_multiple:
            raise ValueError(
                f"sequence length {seq_len} cannot be split over sp={self.sp} (ulysses {self.ulysses} x ring "
                f"{self.ring}, {self.layout}): it must be a positive multiple of {self.seq_multiple}; pad it "
                f"to {padded_length(max(seq_len, 1), self)}")


def padded_length(seq_len, dims):
    """The smallest length >= seq_len that `dims` can shard."""
    m = dims.seq_multiple
    return -(-seq_len // m) * m


# ---------------------------------------------------------------------------------------------------------
# Sharding (no process group needed)
# ---------------------------------------------------------------------------------------------------------


def shard_index(seq_len, dims, sp_rank):
    """Global token positions [seq_len / sp] held by sequence-parallel rank `sp_rank`, in local order."""
    dims.check_sequence(seq_len)
    return sequence_index(seq_len, dims.ring, dims.ulysses, sp_rank, dims.layout)


def shard_sequence(x, dims, sp_rank, dim=0):
    """This rank's shard of a token-level tensor (token ids, position ids, labels, segment ids, hidden states)."""
    return x.index_select(dim, shard_index(x.shape[dim], dims, sp_rank).to(x.device))


def shard_batch(batch, dims, sp_rank, dim=0):
    """Shard every tensor of a dict of token-level tensors of one length; adds global `position_ids` when absent.

    Packed batches keep their own position_ids (restarting at each sequence); they are sharded as they are.
    """
    lengths = {k: v.shape[dim] for k, v in batch.items() if torch.is_tensor(v)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"token-level tensors must share one length along dim {dim}: {lengths}")
    seq_len = next(iter(lengths.values()))
    out = dict(batch)
    if "position_ids" not in out:
        device = next(v for v in batch.values() if torch.is_tensor(v)).device
        out["position_ids"] = torch.arange(seq_len, device=device)
    idx = shard_index(seq_len, dims, sp_rank)
    return {k: v.index_select(dim, idx.to(v.device)) if torch.is_tensor(v) else v for k, v in out.items()}


def unshard_sequence(shards, dims, dim=0):
    """Inverse of shard_sequence: the shards of sp ranks 0..sp-1 -> the whole sequence."""
    if len(shards) != dims.sp:
        raise ValueError(f"expected {dims.sp} shards (one per sequence-parallel rank), got {len(shards)}")
    local = shards[0].shape[dim]
    seq_len = local * dims.sp
    idx = torch.cat([shard_index(seq_len, dims, r) for r in range(dims.sp)]).to(shards[0].device)
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(seq_len, device=idx.device)
    return torch.cat(list(shards), dim).index_select(dim, inverse)


def pad_sequence(x, length, value, dim=0):
    """x padded along `dim` to `length` with `value` (token ids: pad id; labels: -100; segment ids: a new id)."""
    extra = length - x.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad a sequence of {x.shape[dim]} tokens down to {length}")
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim)


# ---------------------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ParallelMesh:
    """This rank's coordinates and process groups; `group(axis)` for axis in AXES."""

    dims: ParallelDims
    rank: int
    dp_rank: int
    sp_rank: int
    ulysses_rank: int
    ring_rank: int
    groups: dict = field(default_factory=dict, repr=False)

    def group(self, axis):
        if axis not in self.groups:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return self.groups[axis]


def mesh_ranks(dims):
    """The global ranks of every group per axis (lists of lists), from the layout in the module docstring."""
    dp, sp, u, r = dims.dp, dims.sp, dims.ulysses, dims.ring
    return {
        "dp": [[d * sp + s for d in range(dp)] for s in range(sp)],
        "sp": [[d * sp + s for s in range(sp)] for d in range(dp)],
        "ulysses": [[d * sp + ri * u + ui for ui in range(u)] for d in range(dp) for ri in range(r)],
        "ring": [[d * sp + ri * u + ui for ri in range(r)] for d in range(dp) for ui in range(u)],
    }


def build_mesh(dims, backend=None):
    """Create the dp, sp, ulysses and ring groups (NCCL or gloo: the default group's backend unless given).

    Every rank must call this with the same dims (group creation is collective). "dp_sp", over which loss
    and gradients are reduced, is the whole world.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialized process group (torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims.validate(world)
    groups = {"dp_sp": dist.group.WORLD}
    for axis, ranks in mesh_ranks(dims).items():
        groups[axis], _ = dist.new_subgroups_by_enumeration(ranks, backend=backend)
    sp_rank = rank % dims.sp
    return ParallelMesh(dims, rank, rank // dims.sp, sp_rank, sp_rank % dims.ulysses, sp_rank // dims.ulysses, groups)


def gather_sequence(x, mesh, dim=0):
    """All-gather a sharded token-level tensor over the sp group and restore the global order (evaluation, tests)."""
    parts = [torch.empty_like(x) for _ in range(mesh.dims.sp)]
    dist.all_gather(parts, x.contiguous(), group=mesh.group("sp"))
    return unshard_sequence(parts, mesh.dims, dim)


def attention_for(mesh, backend="auto"):
    """The model-facing causal attention callable for this mesh, or None (the model's default) when sp == 1.

    attention(q [T_local, Hq, D], k, v [T_local, Hkv, D], *, cu_seqlens=None, segment_ids=None,
    softmax_scale=None) -> out [T_local, Hq, D], on the local shards (already rotated with global positions).
    Ring only (ulysses 1): ring attention; Ulysses only (ring 1): Ulysses (cu_seqlens = global boundaries);
    both: the hybrid. Packed sequences (cu_seqlens) across a ring raise an error; use segment ids there.
    """
    dims = mesh.dims
    if dims.sp == 1:
        return None
    ulysses_group = mesh.group("ulysses")
    ring_group = mesh.group("ring") if dims.ring > 1 else None

    def attention(q, k, v, *, cu_seqlens=None, segment_ids=None, softmax_scale=None, block_plan=None):
        if dims.ulysses == 1:
            out, _ = ring_attention(q, k, v, ring_group, True, softmax_scale=softmax_scale, segment_ids=segment_ids,
                                    layout=dims.layout, cu_seqlens=cu_seqlens, backend=backend, plan=block_plan)
            return out
        return hybrid_attention(q, k, v, ulysses_group, ring_group, True, softmax_scale=softmax_scale,
                                segment_ids=segment_ids, layout=dims.layout, cu_seqlens=cu_seqlens, backend=backend,
                                plan=block_plan)

    def plan_blocks(t, device, *, cu_seqlens=None, segment_ids=None):
        """The batch's plan, once per model forward (the model passes it to every layer): segments gathered
        and every ring step's block lists built once, not per layer. None without segments."""
        if segment_ids is None or cu_seqlens is not None:
            return None
        if dims.ulysses == 1:
            return ring_plan(segment_ids, ring_group, causal=True, layout=dims.layout, backend=backend)
        return hybrid_plan(segment_ids, ulysses_group, ring_group, causal=True, layout=dims.layout, backend=backend)

    attention.plan_blocks = plan_blocks
    return attention
