"""Stopping the stages from outside: SIGKILL of `sealong sample / score --nproc-per-node 2` leaves no torchrun or
worker behind within 10 seconds (the process-group launcher of `sealong train`, sealong.launch); Ctrl-C (SIGINT)
mid-sampling and mid-training prints one line (what was kept, that the same command resumes), exits 130, leaves
no lock, and the same command then finishes with the output of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_launch import _alive, _descendants, _kill_and_check, _wait_for
from test_mbr_stage import SAMPLES
from test_sampler import write_prompts
from tiny_checkpoint import build_checkpoint
from train_fixtures import one_thread, tiny_setup  # noqa: F401 (autouse fixture)

from sealong.config.parser import resolve
from sealong.sample import sampler as S
from sealong.train import checkpoint as ckpt
from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import train

pytestmark = pytest.mark.slow


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().split("\0")
    except FileNotFoundError:
        return []


def _workers(launcher, module):
    """The torchrun workers (`python -u -m MODULE ...`) under `launcher`, not torchrun itself."""
    return [p for p in _descendants(launcher.pid) if module in _cmdline(p) and "sealong.launch" not in _cmdline(p)
            and "torch.distributed.run" not in _cmdline(p)]


def _sealong(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "sealong.cli", *argv], env=_env(), **kw)


def _sample_flags(ckpt_dir, tmp_path, out, n_new="48"):
    return ["--model", ckpt_dir, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(out), "--num-samples",
            "3", "--max-new-tokens", n_new, "--dtype", "float32", "--device", "cpu", "--batch-prompts", "2"]


@pytest.mark.parametrize("stage", ["sample", "score"])
def test_sigkill_of_data_parallel_stage_leaves_no_process(tmp_path, stage):
    if stage == "sample":
        write_prompts(tmp_path / "prompts.jsonl", n=6)
        argv = _sample_flags(build_checkpoint(tmp_path / "tiny"), tmp_path, tmp_path / "samples.jsonl")
        module = "sealong.sampler"
    else:
        (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
        argv = ["--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "scores.jsonl"), "--utility",
                "answer", "--device", "cpu"]
        module = "sealong.score"
    launcher = _sealong(stage, *argv, "--nproc-per-node", "2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(_workers(launcher, module)) == 2 or launcher.poll() is not None, 300, "both workers")
    assert launcher.poll() is None, f"sealong {stage} stopped by itself"
    _kill_and_check(launcher, launcher.pid, signal.SIGKILL, _workers(launcher, module))  # none alive within 10 s


def _interrupt(proc, ready, what, freeze=None):
    """SIGINT to `proc` once `ready()`; returns (exit code, stderr lines).

    `freeze(proc)` names processes (the data-parallel workers) that are stopped (SIGSTOP) the moment `ready()`
    holds and continued (SIGCONT) a second after the SIGINT, once the launcher has forwarded it: the interrupt
    then lands mid-run however fast the machine is (a fast CI machine finished 4 prompts per rank within one
    0.2 s poll)."""
    _wait_for(lambda: ready() or proc.poll() is not None, 300, what, poll=0.005)
    frozen = freeze(proc) if freeze is not None else []
    assert freeze is None or len(frozen) == 2 or proc.poll() is not None, frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    assert proc.poll() is None, f"finished before the interrupt: {proc.stderr.read()[-2000:]}"
    tree = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    if frozen:
        time.sleep(1.0)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    err = proc.communicate(timeout=120)[1]
    _wait_for(lambda: not any(_alive(p) for p in tree), 10, "the job's processes to exit")
    return proc.returncode, err.splitlines()


def _one_line(lines, prog):
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), "\n".join(lines[-40:])
    said = [line for line in lines if "interrupted" in line]
    assert len(said) == 1 and lines[-1] == said[0] and said[0].startswith(f"{prog}: interrupted: "), lines[-10:]
    assert said[0].endswith("resumes") or said[0].endswith("resumes from it"), said[0]
    return said[0]


N_PROMPTS = 16  # 8 per rank; the workers are frozen at the first record (see _interrupt)


def test_ctrl_c_mid_data_parallel_sampling_then_the_same_command_resumes(tmp_path):
    ckpt_dir = build_checkpoint(tmp_path / "tiny")
    with open(tmp_path / "prompts.jsonl", "w") as f:  # write_prompts' contexts grow past the tiny model's 256 positions
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "context": "passage 1 : paris is a city " * (i % 8 + 1),
                                "question": "where is paris ?", "answers": ["paris"]}) + "\n")
    out = tmp_path / "samples.jsonl"
    argv = ["sample", *_sample_flags(ckpt_dir, tmp_path, out), "--nproc-per-node", "2"]
    proc = _sealong(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = [tmp_path / f"samples.jsonl.shard-0000{r}" for r in range(2)]
    rc, lines = _interrupt(proc, lambda: any(s.exists() and s.read_text().count("\n") >= 1 for s in shards),
                           "a first record", freeze=lambda p: _workers(p, "sealong.sampler"))
    assert rc == 130
    line = _one_line(lines, "sealong sample")
    kept = int(line.split("interrupted: ")[1].split(" of ")[0])
    assert 1 <= kept < N_PROMPTS and f" of {N_PROMPTS} prompts' samples kept" in line
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lock")]  # released on the way out
    done = subprocess.run([sys.executable, "-m", "sealong.cli", *argv], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{N_PROMPTS} prompts in {tmp_path / 'prompts.jsonl'}, {kept} already in {out}" in done.stderr
    one = tmp_path / "one.jsonl"  # an uninterrupted one-process run (the same slots: byte-identical)
    assert S.run(resolve("sample", _sample_flags(ckpt_dir, tmp_path, one)).cfg) == 0
    assert out.read_bytes() == one.read_bytes()


TRAIN = dict(batch_pairs=2, lr=3e-3, lora_r=4, lora_alpha=8, dtype="float32", progress=False, save_every=1, epochs=12,
             gradient_checkpointing=False, resume=True)


def test_ctrl_c_mid_training_then_the_same_command_resumes(tmp_path):
    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    out = tmp_path / "train"
    flags = [t for k, v in TRAIN.items() for t in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    argv = ["train", "--nproc-per-node", "1", "--model", model, "--data", data, "--output_dir", str(out),
            "--device", "cpu", *flags]
    proc = _sealong(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc, lines = _interrupt(proc, lambda: len(ckpt.list_checkpoints(str(out))) >= 2, "two checkpoints")
    assert rc == 130
    line = _one_line(lines, "sealong train")
    kept = ckpt.latest_checkpoint(str(out))
    assert kept is not None and f"checkpoint {kept} kept; the same command resumes from it" in line
    assert not os.path.exists(out / ".lock")
    assert not kept.endswith("step_000024")  # stopped before the end (24 steps)
    done = subprocess.run([sys.executable, "-m", "sealong.cli", *argv], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume: {kept}" in done.stderr
    full = train(make_config(dict(TRAIN, model=model, data=data, output_dir=str(tmp_path / "full"))).validate(),
                 setup("cpu"))
    assert full["steps"] == 24
    want = load_file(os.path.join(full["checkpoint"], "adapter", "adapter_model.safetensors"))
    got = load_file(os.path.join(ckpt.latest_checkpoint(str(out)), "adapter", "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
