"""ParallelDims validation and sequence shard / unshard round trips, without any process group."""

import pytest
import torch

from sealong.train.parallel import (
    ParallelDims, mesh_ranks, pad_sequence, padded_length, shard_batch, shard_index, shard_sequence, unshard_sequence,
)
from sealong_kernels import reference

DIMS = [  # (world, sp, ulysses, layout)
    (1, 1, 1, "zigzag"), (2, 2, 1, "zigzag"), (3, 3, 1, "plain"), (4, 4, 2, "zigzag"), (8, 4, 4, "zigzag"),
    (6, 6, 3, "zigzag"), (8, 8, 2, "plain"),
]


def test_from_world_derives_dp_and_ring():
    dims = ParallelDims.from_world(8, sp=4, ulysses=2)
    assert (dims.dp, dims.sp, dims.ulysses, dims.ring) == (2, 4, 2, 2)
    assert dims.seq_multiple == 8  # 2 ring ranks x 2 zigzag chunks x 2 Ulysses pieces
    assert ParallelDims.from_world(4, sp=4, ulysses=4).seq_multiple == 4
    assert ParallelDims(dp=2).validate(2) is not None


@pytest.mark.parametrize("kwargs, world, message", [
    (dict(dp=2, sp=2, ring=2), 8, r"dp x sp = 2 x 2 = 4 must equal the world size 8"),
    (dict(sp=4, ulysses=2, ring=1), 4, r"sp=4 must equal ulysses x ring = 2 x 1"),
    (dict(dp=0), 1, r"ParallelDims.dp must be a positive integer, got 0"),
    (dict(sp=2.0, ring=2), 2, r"ParallelDims.sp must be a positive integer, got 2.0"),
    (dict(layout="stripe"), 1, r"layout must be one of"),
])
def test_validate_names_the_sizes(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs).validate(world)


def test_from_world_errors():
    with pytest.raises(ValueError, match="sp=3 must divide the world size 8"):
        ParallelDims.from_world(8, sp=3)
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide the sequence-parallel degree sp=4"):
        ParallelDims.from_world(4, sp=4, ulysses=3)


def test_check_model_heads():
    ParallelDims.from_world(16, sp=16, ulysses=16).check_model(32, 8)  # kv heads replicated twice
    with pytest.raises(ValueError, match=r"Ulysses degree 3 must divide the number of query heads \(32\)"):
        ParallelDims.from_world(3, sp=3, ulysses=3).check_model(32, 8)


@pytest.mark.parametrize("world, sp, ulysses, layout", DIMS)
def test_shards_partition_the_sequence_and_round_trip(world, sp, ulysses, layout):
    dims = ParallelDims.from_world(world, sp=sp, ulysses=ulysses, layout=layout)
    seq_len = dims.seq_multiple * 3
    x = torch.randn(seq_len, 5)
    shards = [shard_sequence(x, dims, r) for r in range(sp)]
    assert all(s.shape == (seq_len // sp, 5) for s in shards)
    idx = torch.cat([shard_index(seq_len, dims, r) for r in range(sp)])
    assert torch.equal(idx.sort().values, torch.arange(seq_len))  # every token exactly once
    assert torch.equal(unshard_sequence(shards, dims), x)
    # also along another dimension (e.g. [B, T, H] hidden states)
    y = torch.randn(2, seq_len, 3)
    assert torch.equal(unshard_sequence([shard_sequence(y, dims, r, dim=1) for r in range(sp)], dims, dim=1), y)


def test_zigzag_shards_match_the_reference_order():
    dims = ParallelDims.from_world(8, sp=8, ulysses=2)  # ring 4, zigzag: 8 chunks
    seq_len = 32
    for ring_rank in range(4):
        ring_shard = reference.zigzag_index(seq_len, 4, ring_rank)
        pieces = torch.cat([shard_index(seq_len, dims, ring_rank * 2 + u) for u in range(2)])
        assert torch.equal(pieces, ring_shard)  # the Ulysses pieces rebuild the ring shard in order
    assert shard_index(32, ParallelDims.from_world(4, sp=4, ulysses=4), 1).tolist() == list(range(8, 16))


def test_shard_batch_keeps_global_positions_and_shifted_labels():
    dims = ParallelDims.from_world(2, sp=2)
    seq_len = 12
    ids = torch.arange(100, 100 + seq_len)
    labels = torch.cat([ids[1:], torch.tensor([-100])])  # shifted once, before sharding
    seg = torch.tensor([0] * 6 + [1] * 3 + [2] * 3, dtype=torch.int32)
    for r in range(2):
        shard = shard_batch({"input_ids": ids, "labels": labels, "segment_ids": seg, "name": "x"}, dims, r)
        pos = shard["position_ids"]
        assert torch.equal(shard["input_ids"], ids[pos]) and torch.equal(shard["labels"], labels[pos])
        assert torch.equal(shard["segment_ids"], seg[pos]) and shard["name"] == "x"
        assert pos.tolist() == ([0, 1, 2, 9, 10, 11] if r == 0 else [3, 4, 5, 6, 7, 8])
    packed_pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7])  # packed batches keep their own positions
    shard = shard_batch({"input_ids": ids, "position_ids": packed_pos}, dims, 1)
    assert shard["position_ids"].tolist() == [3, 0, 1, 2, 3, 4]


def test_bad_lengths_name_the_sizes_and_padding_fixes_them():
    dims = ParallelDims.from_world(4, sp=4, ulysses=2)
    with pytest.raises(ValueError, match=r"sequence length 13 cannot be split over sp=4 .* multiple of 8; pad it to 16"):
        shard_index(13, dims, 0)
    with pytest.raises(ValueError, match="sequence length 4 cannot be split"):
        shard_index(4, dims, 0)
    with pytest.raises(ValueError, match="share one length"):
        shard_batch({"input_ids": torch.zeros(16), "labels": torch.zeros(15)}, dims, 0)
    x = torch.arange(13)
    padded = pad_sequence(x, padded_length(13, dims), -100)
    assert padded.tolist() == list(range(13)) + [-100] * 3
    assert shard_sequence(padded, dims, 3).shape == (4,)
    with pytest.raises(ValueError, match="expected 4 shards"):
        unshard_sequence([x], dims)


def test_mesh_ranks_layout():
    ranks = mesh_ranks(ParallelDims.from_world(8, sp=4, ulysses=2))
    assert ranks["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ranks["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ranks["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours: all-to-all stays on a node
    assert ranks["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_mesh_needs_a_process_group_and_sp1_keeps_the_model_default():
    from sealong.train.parallel import ParallelMesh, attention_for, build_mesh

    with pytest.raises(RuntimeError, match="initialized process group"):
        build_mesh(ParallelDims())
    assert attention_for(ParallelMesh(ParallelDims(), 0, 0, 0, 0, 0)) is None
