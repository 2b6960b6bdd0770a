"""The training loop's view of the rank mesh (data parallel x sequence parallel), over `sealong.train.parallel`.

Ranks are laid out by `sealong.train.parallel` (rank = dp_rank * sp + sp_rank, sp_rank = ring_rank * ulysses +
ulysses_rank). A row of tokens is padded to a multiple of `dims.seq_multiple` (padding at the end is
invisible to the real tokens under the causal mask) and each sp rank keeps the tokens `shard_index` assigns
it, with their global position ids, labels, sequence and segment ids: the model sees global positions for
RoPE, and the loss sums each sequence's log-probs over the sp group.
"""

from dataclasses import dataclass

from . import parallel

from .pairs import Row, pad_row


@dataclass
class TrainMesh:
    dims: parallel.ParallelDims
    dp_rank: int = 0
    sp_rank: int = 0
    sp_group: object = None    # process group of this rank's sequence-parallel block (None: sp = 1)
    attention: object = None   # attention callable for the model (None: the model's default)

    @property
    def dp(self):
        return self.dims.dp

    @property
    def sp(self):
        return self.dims.sp

    @classmethod
    def build(cls, cfg, info):
        """The mesh of cfg.sp / cfg.ulysses over the world of `info` (collective: every rank calls it)."""
        dims = parallel.ParallelDims.from_world(info.world_size, sp=cfg.sp, ulysses=cfg.ulysses, layout=cfg.ring_layout)
        if info.world_size == 1:
            return cls(dims)
        mesh = parallel.build_mesh(dims)
        sp_group = mesh.group("sp") if dims.sp > 1 else None
        return cls(dims, mesh.dp_rank, mesh.sp_rank, sp_group, parallel.attention_for(mesh))

    def shard_row(self, row):
        """This rank's tokens of a row (the whole row when sp = 1), padded so that it splits evenly."""
        if self.sp == 1:
            return row
        row = pad_row(row, self.dims.seq_multiple)
        index = parallel.shard_index(row.input_ids.numel(), self.dims, self.sp_rank)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Row(pick(row.input_ids), pick(row.position_ids), pick(row.labels), pick(row.seq_index),
                   pick(row.segment_ids))
