"""No trainer outlives its launcher (sealong.launch): killing `sealong train` (SIGKILL, SIGTERM, SIGINT) or torchrun
itself (SIGKILL) leaves no torchrun or worker process behind within 10 seconds."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_fixtures import tiny_setup

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = "import sys; from sealong.launch import run_job; sys.exit(run_job(sys.argv[1:]))"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


def _children(pid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _wait_for(condition, seconds, what, poll=0.2):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _kill_and_check(launcher, victim, sig, workers):
    tree = _descendants(launcher.pid)
    assert set(workers) <= set(tree) and len(tree) >= 3, tree  # torchrun and its two workers
    os.kill(victim, sig)
    try:
        _wait_for(lambda: not any(_alive(p) for p in tree), 10, f"{tree} to exit after {signal.Signals(sig).name}")
    finally:
        for p in tree:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        launcher.kill()
        launcher.wait()


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("victim,sig", [("launcher", signal.SIGKILL), ("launcher", signal.SIGTERM),
                                        ("launcher", signal.SIGINT), ("torchrun", signal.SIGKILL)])
def test_killing_the_launcher_or_torchrun_leaves_no_worker(tmp_path, victim, sig):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "launch_worker.py"), str(tmp_path)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / f"rank{r}.pid" for r in range(2)]
    _wait_for(lambda: all(p.exists() for p in pid_files), 180, "both workers to start")
    workers = [int(p.read_text()) for p in pid_files]
    target = launcher.pid if victim == "launcher" else _children(launcher.pid)[0]
    _kill_and_check(launcher, target, sig, workers)


def test_killing_sealong_train_mid_training_leaves_no_trainer(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    out = tmp_path / "train"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sealong.cli", "train", "--nproc-per-node", "2", "--model", model, "--data", data,
         "--output_dir", str(out), "--epochs", "100000", "--batch_pairs", "2", "--lora_r", "2", "--lora_alpha", "4",
         "--dtype", "float32", "--device", "cpu", "--progress", "false",
         "--gradient_checkpointing", "false"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0 or launcher.poll() is not None, 300,
              "training steps")
    assert launcher.poll() is None, "sealong train stopped by itself"
    workers = [p for p in _descendants(launcher.pid) if "sealong.train" in open(f"/proc/{p}/cmdline").read()]
    _kill_and_check(launcher, launcher.pid, signal.SIGKILL, workers)
    size = metrics.stat().st_size
    time.sleep(1)
    assert metrics.stat().st_size == size  # nobody trains on
