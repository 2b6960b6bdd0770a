"""The training loop's view of the rank mesh: data parallel x sequence parallel (Ulysses x ring).

Ranks are laid out as rank = dp_rank * sp + sp_rank (a sequence-parallel group is a block of consecutive
ranks, one node's GPUs first), and sp_rank = ring_rank * ulysses + ulysses_rank. A row of tokens is padded
to a multiple of 2 sp and each sp rank keeps the tokens `sealong_kernels.sequence_index` assigns it (the
zigzag ring layout split into consecutive Ulysses pieces), with their global position ids, labels,
sequence and segment ids: the model sees global positions for RoPE, and the loss is reduced over the group.
"""

from dataclasses import dataclass
from functools import partial

import torch.distributed as dist

import sealong_kernels as sk

from .pairs import Row


@dataclass
class TrainMesh:
    dp: int
    sp: int
    ulysses: int
    dp_rank: int
    sp_rank: int
    sp_group: object = None        # process group of this rank's sequence-parallel block (None: sp = 1)
    attention: object = None       # attention callable for the model (None: the model's default)
    layout: str = "zigzag"

    @property
    def ring(self):
        return self.sp // self.ulysses

    @property
    def pad_multiple(self):
        """Rows are padded to a multiple of this so that every sp rank gets the same number of tokens."""
        return 2 * self.sp if self.sp > 1 else 1

    @classmethod
    def build(cls, cfg, info):
        world, rank = info.world_size, info.rank
        if world % cfg.sp:
            raise ValueError(f"world size {world} is not divisible by sp={cfg.sp}")
        dp, sp, ulysses = world // cfg.sp, cfg.sp, cfg.ulysses
        ring = sp // ulysses
        mesh = cls(dp, sp, ulysses, rank // sp, rank % sp, layout=cfg.ring_layout)
        if sp == 1:
            return mesh
        # every rank creates every group, in the same order (torch.distributed requires it)
        for d in range(dp):
            group = dist.new_group(list(range(d * sp, (d + 1) * sp)))
            if d == mesh.dp_rank:
                mesh.sp_group = group
        uly_group = ring_group = None
        for d in range(dp):
            for r in range(ring):  # Ulysses groups: consecutive sp ranks of one ring position
                group = dist.new_group([d * sp + r * ulysses + u for u in range(ulysses)]) if ulysses > 1 and ring > 1 else None
                if d == mesh.dp_rank and r == mesh.sp_rank // ulysses:
                    uly_group = group
            for u in range(ulysses):  # ring groups: the same Ulysses rank at every ring position
                group = dist.new_group([d * sp + r * ulysses + u for r in range(ring)]) if ulysses > 1 and ring > 1 else None
                if d == mesh.dp_rank and u == mesh.sp_rank % ulysses:
                    ring_group = group
        if ulysses == sp:
            mesh.attention = partial(_ulysses, group=mesh.sp_group)
        elif ulysses == 1:
            mesh.attention = partial(_ring, group=mesh.sp_group, layout=mesh.layout)
        else:
            mesh.attention = partial(_hybrid, ulysses_group=uly_group, ring_group=ring_group, layout=mesh.layout)
        return mesh

    def shard_row(self, row):
        """This rank's tokens of a padded row (all of it when sp = 1), global positions kept."""
        if self.sp == 1:
            return row
        index = sk.sequence_index(row.input_ids.numel(), self.ring, self.ulysses, self.sp_rank, self.layout)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Row(pick(row.input_ids), pick(row.position_ids), pick(row.labels), pick(row.seq_index),
                   pick(row.segment_ids))


def _ring(q, k, v, *, group, layout, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    if cu_seqlens is not None:
        raise ValueError("sequence-parallel rows hold one sequence each: cu_seqlens is not supported")
    out, _ = sk.ring_attention(q, k, v, group, True, softmax_scale=softmax_scale, segment_ids=segment_ids, layout=layout)
    return out


def _ulysses(q, k, v, *, group, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    return sk.ulysses_attention(q, k, v, group, True, softmax_scale=softmax_scale, segment_ids=segment_ids,
                                cu_seqlens=cu_seqlens)


def _hybrid(q, k, v, *, ulysses_group, ring_group, layout, cu_seqlens=None, segment_ids=None, softmax_scale=None):
    if cu_seqlens is not None:
        raise ValueError("sequence-parallel rows hold one sequence each: cu_seqlens is not supported")
    return sk.hybrid_attention(q, k, v, ulysses_group, ring_group, True, softmax_scale=softmax_scale,
                               segment_ids=segment_ids, layout=layout)

