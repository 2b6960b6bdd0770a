"""The test harness itself: the gloo process runner and the interpreter switch."""

import os

import pytest
import torch
import torch.distributed as dist

from gloo_harness import RankError, run_distributed


def _all_reduce_rank(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    gathered = [torch.zeros(2) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank), float(world_size)]))
    return t.item(), torch.stack(gathered)


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


@pytest.mark.parametrize("world_size", [2, 3])
def test_run_distributed_collects_each_rank(world_size):
    results = run_distributed(_all_reduce_rank, world_size, args=(10,))
    expected_sum = sum(r + 10 for r in range(world_size))
    assert [r[0] for r in results] == [float(expected_sum)] * world_size
    for value, gathered in results:
        assert torch.equal(gathered[:, 0], torch.arange(world_size, dtype=torch.float32))


def test_run_distributed_raises_the_rank_error():
    with pytest.raises(RankError, match="(?s)rank 1 of 2 failed.*deliberate failure on rank 1"):
        run_distributed(_fails_on_rank_one, 2, timeout=60)


def test_triton_interpreter_is_on_without_cuda():
    if torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET", "0") in ("0", "")
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1"
