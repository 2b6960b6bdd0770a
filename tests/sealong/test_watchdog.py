"""A silent hang becomes a named failure: a rank that sleeps in step 2 makes the job fail within dist_timeout,
with the stuck rank named (sealong.train.watchdog), instead of waiting for the backend's 30 minutes."""

import time

import pytest
from gloo_harness import RankError, run_distributed
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import train
from sealong.train.watchdog import check_timeout

SLEEP = 600  # the stuck rank's nap: far longer than dist_timeout (20 s: ranks may start seconds apart on a busy machine)


def _train_with_a_stuck_rank(rank, world_size, model, data, out):
    cfg = make_config(dict(model=model, data=data, output_dir=out, batch_pairs=2, lr=1e-3, lora_r=2, lora_alpha=4,
                           dtype="float32", progress=False, gradient_checkpointing=False,
                           epochs=3, dist_timeout=20)).validate()

    def hook(step, record):
        if rank == 1 and step == 1:
            time.sleep(SLEEP)  # alive but stuck: step 2 never starts (with FSDP its forward would wait in an all-gather)

    return train(cfg, setup("cpu"), on_step=hook)


def test_a_stuck_rank_fails_the_job_within_the_timeout_and_is_named(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=2)
    started = time.monotonic()
    with pytest.raises(RankError) as err:
        run_distributed(_train_with_a_stuck_rank, 2, args=(model, data, str(tmp_path / "out")), timeout=SLEEP - 60)
    message = str(err.value)
    assert "rank 0 of 2 failed" in message
    assert "StuckRankError: step 2: rank(s) 1 did not reach the step's first collective within dist_timeout=20 s" in message
    assert time.monotonic() - started < SLEEP / 2  # failed on the watchdog, not after the nap


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_dist_timeout_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="dist_timeout must be a finite number of seconds > 0"):
        check_timeout(bad)
