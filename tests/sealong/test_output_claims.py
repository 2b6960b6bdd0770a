"""One writer per output and outputs checked before any work (sealong.lock): a second run into an output in use
is refused naming the holder's pid (sample, score, train), a dead holder's lock is taken over, an unwritable
output fails before a model is read, and a full disk says what was kept."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny_checkpoint import build_checkpoint, one_thread  # noqa: F401 (autouse fixture)
from train_fixtures import tiny_setup

import sealong.model
from sealong import pipeline
from sealong.evaluate import report
from sealong.jsonl import append_jsonl, read_jsonl
from sealong.lock import OutputError, OutputLock, claim_output, lock_path
from sealong.sample import sampler
from sealong.score import mbr
from sealong.config.parser import resolve
from sealong.train.config import make_config
from sealong.train.distributed import setup
from sealong.train.loop import train

HOLD = textwrap.dedent("""
    import sys, time
    from sealong.lock import OutputLock
    OutputLock(sys.argv[1], directory=sys.argv[2] == "dir").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(path, directory=False):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "dir" if directory else "file"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "samples.jsonl"
    proc = _holder(out)
    try:
        with pytest.raises(OutputError, match=rf"samples\.jsonl is in use by another run \(pid {proc.pid}"):
            OutputLock(str(out)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, holding the dead pid
        proc.wait()
    assert open(lock_path(str(out))).read().strip() == str(proc.pid)
    with OutputLock(str(out)) as lock:
        assert lock.took_over == str(proc.pid)
        assert open(lock_path(str(out))).read().strip() == str(os.getpid())
    assert not os.path.exists(lock_path(str(out)))  # released: the lock file is gone


def _sample_args(ckpt, tmp_path, output):
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "context": "paris is a city", "question": "where is paris ?"}) + "\n" for i in range(2)))
    return resolve("sample", ["--model", ckpt, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(output),
                                      "--num-samples", "2", "--max-new-tokens", "3", "--dtype", "float32", "--device", "cpu"]).cfg


def test_second_sample_run_is_refused(tmp_path):
    ckpt = build_checkpoint(tmp_path / "model")
    out = tmp_path / "samples.jsonl"
    with claim_output(str(out)):  # the first run, still going
        with pytest.raises(OutputError, match=rf"--output .*samples\.jsonl is in use by another run \(pid {os.getpid()}"):
            sampler.run(_sample_args(ckpt, tmp_path, out))
    assert not out.exists()
    assert sampler.run(_sample_args(ckpt, tmp_path, out)) == 0
    assert [r["id"] for r in read_jsonl(str(out))] == ["q0", "q1"]


def test_second_score_run_is_refused(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "a", "outputs": ["x y", "x z", "w"]}) + "\n")
    out, pairs = tmp_path / "scores.jsonl", tmp_path / "pairs.jsonl"
    cfg = mbr.ScoreConfig(utility="rouge")
    for busy in (out, pairs):
        with claim_output(str(busy)):
            with pytest.raises(OutputError, match=rf"{busy.name} is in use by another run \(pid {os.getpid()}"):
                mbr.score_file(str(samples), str(out), cfg, pairs=str(pairs), log=None)
    assert not out.exists() and not pairs.exists()


def _train_config(tmp_path, output_dir):
    model, data = tiny_setup(str(tmp_path), n_pairs=2)
    return make_config(dict(model=model, data=data, output_dir=str(output_dir), batch_pairs=2, lr=1e-3, lora_r=2,
                            lora_alpha=4, dtype="float32", progress=False)).validate()


def test_second_train_run_is_refused(tmp_path):
    cfg = _train_config(tmp_path, tmp_path / "train")
    proc = _holder(tmp_path / "train", directory=True)
    try:
        with pytest.raises(OutputError, match=rf"output_dir .*train is in use by another run \(pid {proc.pid}"):
            train(cfg, setup("cpu"))
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(tmp_path / "train" / "metrics.jsonl")
    assert train(cfg, setup("cpu"))["steps"] == 1


@pytest.fixture
def no_work(monkeypatch):
    """Any model load (sampling or training) fails the test: the output must be checked before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output was checked")
    monkeypatch.setattr(sealong.model, "load_model", forbidden)
    monkeypatch.setattr(sealong.model, "load_tokenizer", forbidden)


def test_unwritable_outputs_fail_before_any_work(tmp_path, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("a file, so nothing can be created under it")
    bad = blocker / "sub"
    with pytest.raises(OutputError, match=r"--output .*file/sub/samples\.jsonl is not writable"):
        sampler.run(_sample_args("no-model-needed", tmp_path, bad / "samples.jsonl"))
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "a", "outputs": ["x", "y"]}) + "\n")
    with pytest.raises(OutputError, match=r"--pairs .*file/sub/pairs\.jsonl is not writable"):
        mbr.score_file(str(samples), str(tmp_path / "scores.jsonl"), mbr.ScoreConfig(utility="rouge"),
                       pairs=str(bad / "pairs.jsonl"), log=None)
    cfg = _train_config(tmp_path, bad / "train")
    with pytest.raises(OutputError, match=r"output_dir .*file/sub/train is not writable"):
        train(cfg, setup("cpu"))
    with pytest.raises(OutputError, match=r"--out-dir .*file/sub/eval is not writable"):
        report.run(report_args(samples, bad / "eval"))
    with pytest.raises(OutputError, match=r"--run-dir .*file/sub/run is not writable"):
        pipeline.run(pipeline_args(bad / "run"))


def report_args(sampled, out_dir):
    return resolve("eval", ["--sampled", str(sampled), "--out-dir", str(out_dir), "--no-mbr", "--no-plot"]).cfg


def pipeline_args(run_dir):
    return resolve("pipeline", ["--run-dir", str(run_dir)]).cfg


def test_full_disk_says_what_was_kept():
    with pytest.raises(OutputError, match=r"/dev/full: No space left on device; every complete record written "
                                          r"before is kept"):
        append_jsonl("/dev/full", [{"id": "a"}])


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from sealong.train import checkpoint as ckpt

    model, data = tiny_setup(str(tmp_path), n_pairs=4)
    cfg = make_config(dict(model=model, data=data, output_dir=str(tmp_path / "train"), batch_pairs=2, lr=1e-3,
                           lora_r=2, lora_alpha=4, dtype="float32", progress=False,
                           save_every=1)).validate()
    real_save, calls = ckpt.torch.save, []

    def save(obj, path):
        calls.append(path)
        if "step_000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(OutputError, match=r"saving checkpoint .*step_000002: No space left on device; nothing of it "
                                          r"was published; the newest complete checkpoint .*step_000001 is kept"):
        train(cfg, setup("cpu"))
    assert sorted(os.listdir(tmp_path / "train" / "checkpoints")) == ["step_000001"]
