"""`sealong pipeline --preset demo-gain` is deterministic for a fixed seed on one machine: two runs of the same
pipeline (a small configuration of it: fewer warm-up steps, questions and samples) write the same base model, the
same pairs and the same held-out tables before and after the round."""

import json
import os
import signal
import subprocess
import sys

import pytest

SMALL = ["--preset", "demo-gain", "--tiny-warmup-steps", "20", "--num-examples", "16", "--num-eval", "8",
         "--num-samples", "4", "--eval-samples", "4", "--tiny-shape",
         "num_layers=4,hidden_size=128,intermediate_size=384,tie_embeddings=true,warmup_hops=1,warmup_batch=16,"
         "lr_schedule=copy_gated,copy_gate=0,decay_steps=5,warmup_questions=64,dev_questions=8,check_every=10"]
# copy_gate=0: the gate opens at the first dev check (step 10), so the preset's copy-gated schedule, its decay and
# its early end (step 15) run in both runs


def _run_both(*run_dirs):
    """The same command into each folder, the runs side by side, one torch thread each (independent processes:
    each run's outputs are what it would write alone; the test compares two runs, not thread counts)."""
    logs = [open(f"{d}.log", "w+") for d in run_dirs]  # files, not pipes: a full pipe would stall a run
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread each: two runs on two cores, none oversubscribed
    procs = [subprocess.Popen([sys.executable, "-m", "sealong.cli", "pipeline", "--run-dir", str(d), *SMALL],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
             for d, log in zip(run_dirs, logs)]
    try:
        for proc, log in zip(procs, logs):
            proc.wait(timeout=900)
            log.seek(0)
            assert proc.returncode == 0, log.read()[-6000:]
    finally:  # a failed or timed-out run leaves no process behind
        for proc, log in zip(procs, logs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its torchrun job
                proc.wait()
            log.close()


def _tables(run_dir):
    out = {}
    for part in ("before", "after"):
        ev = json.loads((run_dir / part / "eval.json").read_text())
        out[part] = {k: ev[k] for k in ("tasks", "average", "per_question", "questions")}
        out[part + "_greedy"] = (run_dir / part / "greedy.jsonl").read_text()
        out[part + "_sampled"] = (run_dir / part / "sampled.jsonl").read_text()
    return out


@pytest.mark.slow
def test_demo_gain_pipeline_twice_gives_the_same_held_out_tables(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run_both(a, b)
    assert (a / "base_model" / "model.safetensors").read_bytes() == (b / "base_model" / "model.safetensors").read_bytes()
    wa, wb = (json.loads((d / "base_model" / "warmup.json").read_text()) for d in (a, b))
    assert wa["final_dev_check"] == wb["final_dev_check"] and wa["dev_checks"] == wb["dev_checks"]
    assert wa["copy_gate_at"] == 10 and wa["warmup_steps_run"] == 15
    # the records name their run folder (the sampler's model path): the same once that is replaced
    assert (a / "pairs.jsonl").read_text().replace(str(a), str(b)) == (b / "pairs.jsonl").read_text()
    assert (a / "after_model" / "model.safetensors").read_bytes() == (b / "after_model" / "model.safetensors").read_bytes()
    ta, tb = (json.loads(json.dumps(_tables(d)).replace(str(d), "RUN")) for d in (a, b))
    assert ta["before"]["questions"] == 8 and set(ta["after"]["average"]) >= {"greedy", "MBR@4", "oracle@4"}
    assert ta == tb
