"""The offline demo end to end (`sealong pipeline`, smaller than its defaults to fit CI), stopped mid-training and
resumed: killed (SIGKILL of the process group) or interrupted as a terminal's Ctrl-C does (SIGINT to the foreground
process group: the pipeline and its torchrun job), which must print one line, exit 130, leave no process and no
lock behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

FLAGS = ["--tiny-warmup-steps", "12", "--num-examples", "16", "--num-eval", "6", "--num-samples", "4",
         "--eval-samples", "4", "--max-new-tokens", "16"]


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")  # the two stops run side by side: one torch thread each


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _one_interrupt_line(log):
    lines = log.splitlines()
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), log[-4000:]
    said = [line for line in lines if "interrupted:" in line]
    assert len(said) == 1 and said[0].startswith("sealong pipeline: interrupted: "), log[-3000:]
    assert said[0].endswith("the same command resumes") and lines[-1] == said[0], log[-3000:]


@pytest.mark.slow
def test_pipeline_end_to_end_stopped_during_training_then_resumed(tmp_path):
    """Both stops, side by side (each pipeline keeps about one core busy; separate folders and process groups);
    a failed check in either is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "SIGKILL").mkdir()
    (tmp_path / "SIGINT").mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(_stop_then_resume, tmp_path / stop, stop) for stop in ("SIGKILL", "SIGINT")]
        for run in runs:
            run.result()


def _stop_then_resume(tmp_path, stop):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sealong.cli", "pipeline", "--run-dir", str(run_dir), *FLAGS]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ONE_THREAD)
    deadline = time.monotonic() + 400
    try:  # stop the whole process group (the pipeline and its torchrun job) once training has started
        while not (run_dir / "train").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, getattr(signal, stop))
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    if stop == "SIGINT":
        assert proc.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
        _one_interrupt_line((tmp_path / "first.log").read_text())
        gone = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < gone:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "a process of the interrupted pipeline is still running after 10 s"
        assert not [str(p) for p in run_dir.rglob("*.lock")]  # released on the way out
    assert not (run_dir / "summary.md").exists() and not (run_dir / "train" / "DONE").exists()
    base_weights = run_dir / "base_model" / "model.safetensors"
    base_stamp = base_weights.stat().st_mtime_ns
    before = (run_dir / "before" / "eval.json").read_text()
    samples = _lines(run_dir / "samples.jsonl")
    assert len(samples) == 16

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # finished steps were not redone
    assert "base model: " in out.stderr and "exists" in out.stderr  # the log (stderr)
    assert base_weights.stat().st_mtime_ns == base_stamp
    assert (run_dir / "before" / "eval.json").read_text() == before
    assert _lines(run_dir / "samples.jsonl") == samples
    # every stage's output is complete
    pairs = [json.loads(x) for x in _lines(run_dir / "pairs.jsonl")]
    scores = [json.loads(x) for x in _lines(run_dir / "scores.jsonl")]
    assert len(scores) == 16 and len({s["id"] for s in scores}) == 16
    assert pairs and all(p["chosen_text"] and "context" in p for p in pairs)
    assert not any("answers" in p or "answer" in p for p in pairs)  # the method never sees a label
    ckpt = (run_dir / "train" / "DONE").read_text().strip()
    assert os.path.isfile(os.path.join(ckpt, "adapter", "adapter_config.json"))
    assert (run_dir / "after_model" / "model.safetensors").is_file()
    after = json.loads((run_dir / "after" / "eval.json").read_text())
    assert set(after["average"]) >= {"greedy", "MBR@4", "oracle@4", "random@4"}
    assert after["tasks"]["synthetic"]["greedy"]["n"] == 6
    assert (run_dir / "after" / "eval_vs_n.png").is_file()
    summary = (run_dir / "summary.md").read_text()
    assert "| greedy |" in summary and "| MBR@4 |" in summary and "NOT the paper's gains" in summary
    assert "sealong pipeline --run-dir runs/llama31-8b --model /models/Llama-3.1-8B-Instruct" in summary
    assert summary in out.stdout
    # the generalization table: the held-out task and the demo's RULER slice, before vs after, paired
    assert "## Generalization suite: every task before vs after" in summary
    rows = json.loads((run_dir / "suite.json").read_text())
    tasks = {r["task"]: r for r in rows}
    assert tasks["synthetic"]["n"] == 6 and tasks["ruler_niah_single_512"]["n"] == 2
    assert {t for t in tasks if t.startswith("ruler_")} == {f"ruler_{k}_{n}" for k in (
        "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe") for n in ("512",)}
    assert len(_lines(run_dir / "after" / "suite_greedy.jsonl")) == 14
