"""A silent hang becomes a named failure (sealong.train.watchdog): a rank stuck anywhere in a step (before the first
collective, in FSDP's forward all-gathers or backward reduce-scatters, at the optimizer step, in a checkpoint save;
FSDP and replicate) makes the job fail within dist_timeout plus a bounded slack, with the stuck rank, the step and
its phase named, no process left behind, and the newest complete checkpoint resumable.

The torchrun cases run tests/sealong/stuck_rank.py, which puts rank 1 to sleep for 600 s in one phase of step 2."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from gloo_harness import run_distributed
from train_fixtures import tiny_setup, one_thread  # noqa: F401 (autouse fixture)

import torch.distributed as dist

from sealong.train import checkpoint as ckpt
from sealong.train.watchdog import KEY, Heartbeat, check_timeout

HERE = os.path.dirname(os.path.abspath(__file__))
SLEEP = 600  # the stuck rank's nap: far longer than dist_timeout
TIMEOUT = 8  # dist_timeout of the torchrun cases (ranks may start seconds apart on a busy machine)
SLACK = 30  # seconds the job may take to stop after dist_timeout


# ---------------------------------------------------------------------------------------------------------
# The diagnosis, on a store written by hand (no processes)
# ---------------------------------------------------------------------------------------------------------


def _heartbeat_over(store, rank, world):
    beat = Heartbeat(10)  # one process: no store, no thread
    beat.store, beat.rank, beat.world = store, rank, world
    return beat


def _beat(store, rank, step, phase, waiting, age=0.0, since=4.0):
    now = time.time()
    store.set(KEY.format(rank), json.dumps({"step": step, "phase": phase, "since": now - since, "time": now - age,
                                            "waiting": waiting, "where": "x.py:1 in f"}))


TIMED_OUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation")


def test_the_ranks_not_waiting_in_a_collective_are_named_with_step_and_phase():
    store = dist.HashStore()
    _beat(store, 1, 2, "forward", waiting=True)  # waits in the same all-gather: not stuck
    _beat(store, 2, 2, "optimizer step", waiting=False)  # stuck in its optimizer step
    _beat(store, 3, 1, "checkpoint save", waiting=False, age=30.0)  # its heartbeat stopped: dead or frozen
    beat = _heartbeat_over(store, 0, 5)  # rank 4 never published one
    beat.mark(2, "forward", "the forward all-gather")
    message = str(beat.diagnose(TIMED_OUT))
    assert message.startswith("step 2: rank(s) 2, 3, 4 did not reach the forward all-gather within dist_timeout=10 s (")
    assert "rank 2: in step 2's optimizer step for 4.0 s, at x.py:1 in f" in message
    assert "rank 3: dead or frozen, no heartbeat for 30 s (last: in step 1's checkpoint save)" in message
    assert "rank 4: no heartbeat (never started)" in message
    assert "rank 1" not in message
    assert message.endswith("(rank 0 reporting: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                            "10000ms for recv operation)")


def test_no_diagnosis_without_a_timeout_or_a_stuck_peer():
    store = dist.HashStore()
    _beat(store, 0, 0, "start-up", waiting=False)
    beat = _heartbeat_over(store, 1, 2)
    assert beat.diagnose(ValueError("step 2: loss nan")) is None  # a rank's own error: nobody else to blame
    assert "start-up: rank(s) 0 did not reach the first collective" in str(beat.diagnose(TIMED_OUT))
    _beat(store, 0, 0, "start-up", waiting=True)
    assert beat.diagnose(TIMED_OUT) is None  # every peer waits too: the backend's own error stands
    assert Heartbeat(10).diagnose(TIMED_OUT) is None  # one process


def _waiting_is_seen(rank, world_size):
    """Rank 0 waits in an all-reduce while rank 1, late, reads rank 0's heartbeat; then rank 0 sleeps in its own
    code while rank 1 reads it again."""
    import torch

    beat = Heartbeat(30, every=0.1)
    beat.mark(1, "metrics all-reduce", "the metrics all-reduce")
    try:
        if rank == 1:
            time.sleep(2.0)
            in_collective = beat.peers()[0]
        dist.all_reduce(torch.ones(1))
        if rank == 0:
            time.sleep(1.5)  # busy, as far as the heartbeat can tell
        else:
            time.sleep(0.5)
            return in_collective, beat.peers()[0]
    finally:
        dist.barrier()
        beat.close()


@pytest.mark.slow
def test_the_heartbeat_tells_a_rank_waiting_in_a_collective_from_one_that_is_not():
    in_collective, busy = run_distributed(_waiting_is_seen, 2, timeout=120)[1]
    assert in_collective["waiting"] and in_collective["phase"] == "metrics all-reduce", in_collective
    assert "distributed_c10d.py" in in_collective["where"] or "c10d_logger.py" in in_collective["where"]
    assert not busy["waiting"] and busy["where"].startswith("test_watchdog.py:"), busy
    assert busy["time"] > in_collective["time"] and busy["step"] == in_collective["step"] == 1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_dist_timeout_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="dist_timeout must be a finite number of seconds > 0"):
        check_timeout(bad)


# ---------------------------------------------------------------------------------------------------------
# Every phase, under torchrun (tests/sealong/stuck_rank.py)
# ---------------------------------------------------------------------------------------------------------


def _run(tmp_path, phase, data_parallel, out, resume=False, backend_timeout=None):
    model, data = str(tmp_path / "model"), str(tmp_path / "pairs.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "stuck_rank.py"), phase, "--model", model, "--data", data, "--output_dir", str(out),
           "--max_steps", "3", "--save_every", "1", "--batch_pairs", "2", "--lora_r", "2", "--lora_alpha", "4",
           "--dtype", "float32", "--device", "cpu", "--progress", "false", "--gradient_checkpointing", "false",
           "--dist_timeout", str(TIMEOUT), "--data_parallel", data_parallel, "--resume", str(resume).lower()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if backend_timeout:
        env["SEALONG_TEST_BACKEND_TIMEOUT"] = str(backend_timeout)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SLEEP - 60)
    return done, time.time()


def _alive_with(text):
    """Pids of live processes whose command line holds `text` (the run's unique output_dir)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        with open(f"/proc/{name}/stat") as s:
                            if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                                found.append(int(name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


CASES = {  # (phase of stuck_rank.py, data_parallel, backend timeout): what rank 0 waits in, and rank 1's phase
    ("start-up", "fsdp", None): ("start-up", "the first collective", "in start-up"),
    ("forward", "fsdp", None): ("step 2", "the forward all-gather", "in step 2's forward"),
    ("backward", "fsdp", None): ("step 2", "the backward's all-gathers / reduce-scatters", "in step 2's backward"),
    ("optimizer", "fsdp", None): ("step 2", "the metrics all-reduce", "in step 2's optimizer step"),
    ("save", "fsdp", None): ("step 2", "the checkpoint save's collectives", "in step 2's checkpoint save"),
    ("forward", "replicate", None): ("step 2", "the gradient all-reduce", "in step 2's forward"),
    ("save", "replicate", None): ("step 2", "the checkpoint save's collectives", "in step 2's checkpoint save"),
    # the backend waits 600 s: the side thread reports after dist_timeout + grace (5 s) and ends rank 0
    ("backward", "fsdp", SLEEP): ("step 2", "the backward's all-gathers / reduce-scatters", "in step 2's backward"),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase,data_parallel,backend_timeout", list(CASES))
def test_a_rank_stuck_in_any_phase_is_named_and_the_job_stops_cleanly(tmp_path, phase, data_parallel,
                                                                      backend_timeout):
    tiny_setup(str(tmp_path), n_pairs=4)
    out = tmp_path / f"out-{phase}-{data_parallel}"
    done, ended = _run(tmp_path, phase, data_parallel, out, backend_timeout=backend_timeout)
    assert done.returncode != 0, done.stderr[-3000:]
    step, waits_in, at = CASES[phase, data_parallel, backend_timeout]
    assert (f"StuckRankError: {step}: rank(s) 1 did not reach {waits_in} within dist_timeout={TIMEOUT} s "
            f"(rank 1: {at} for ") in done.stderr, done.stderr[-3000:]
    asleep = float(re.search(r"stuck_rank: rank 1 falls asleep in .* at ([\d.]+)", done.stderr).group(1))
    assert ended - asleep < TIMEOUT + SLACK, ended - asleep  # named and stopped, not after the 600 s nap
    assert _alive_with(str(out)) == []  # torchrun stopped the sleeping rank: nothing left behind
    newest = ckpt.latest_checkpoint(str(out))
    assert (newest is None) if phase == "start-up" else newest.endswith("step_000001"), newest
    if phase == "save" and data_parallel == "fsdp":  # the torn save of step 2 is never taken for a checkpoint; the run resumes from step 1
        resumed, _ = _run(tmp_path, "none", data_parallel, out, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resume: " + os.path.join(str(out), "checkpoints", "step_000001") + " (step 1 of 3)" in resumed.stderr
        assert ckpt.latest_checkpoint(str(out)).endswith("step_000003")
