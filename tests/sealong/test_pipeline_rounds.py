"""`sealong pipeline --rounds 2` on the demo preset with tiny sizes, in one run directory: first stopped early
before round 1's training (a crafted --min-pairs), then continued (round 1 trains), crashed in round 2's training
and resumed: round 1 is not redone, round 2 samples with round 1's merged model on a disjoint slice of the pool,
and summary.md holds the monitoring table with a row per round."""

import contextlib
import io
import json
import logging
import math
import os

import pytest

from sealong import cli
import sealong.pipeline as pipeline

FLAGS = ["--rounds", "2", "--tiny-warmup-steps", "4", "--num-examples", "6", "--num-eval", "4", "--num-samples", "4",
         "--eval-samples", "2", "--max-new-tokens", "12", "--batch-pairs", "2", "--train-args", "--micro_batch_pairs 2",
         # the beyond-the-paper options of the stages, set through the pipeline (their effects: the stages' tests);
         # share 1.0 of 4 stops only at the budget here, so every round keeps enough pairs to train
         "--adaptive-block", "2", "--adaptive-share", "1.0", "--adaptive-min-samples", "4",
         # --pair-weighting is passed as "none": with "margin", a 4-step model's kept pairs can all have vote margin
         # 0 for some draws, which training refuses by design (tests/sealong/test_train_pair_weights.py)
         "--scorer", "mbr+certainty", "--min-consensus", "0", "--pair-weighting", "none"]


def _pipeline(run_dir, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["pipeline", "--run-dir", str(run_dir), *FLAGS, *extra])
    return rc, out.getvalue()


def _ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped before training round 1: more pairs asked for than questions exist."""
    run_dir = tmp_path_factory.mktemp("rounds") / "run"
    rc, out = _pipeline(run_dir, "--min-pairs", "1000")
    assert rc == 0, out[-2000:]
    return run_dir, out


@pytest.mark.slow
def test_early_stop_before_training_prints_and_writes_the_reason(stopped_run):
    run_dir, out = stopped_run
    reason = "stopped before training round 1: too few pairs: "
    assert f"sealong pipeline: {reason}" in out and "fewer than min_pairs 1000" in out
    assert not (run_dir / "round_1" / "train").exists() and not (run_dir / "round_2").exists()
    assert json.loads((run_dir / "round_1" / "monitor.json").read_text())["stopped"].startswith(reason)
    summary = (run_dir / "summary.md").read_text()
    assert f"**Early stop: {reason}" in summary and "no round trained" in summary and summary in out
    assert "| 1 (stopped) |" in summary


@pytest.mark.slow
def test_two_rounds_crash_in_round_2_then_resume(stopped_run, monkeypatch, caplog):
    run_dir, _ = stopped_run
    r1, r2 = run_dir / "round_1", run_dir / "round_2"
    train = pipeline.step_train

    def crash_in_round_2(r, model, folder):
        if folder == r2:
            raise RuntimeError("simulated crash in round 2's training")
        return train(r, model, folder)

    monkeypatch.setattr(pipeline, "step_train", crash_in_round_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _pipeline(run_dir)
    done_round_1 = [r1 / "samples.jsonl", r1 / "scores.jsonl", r1 / "train" / "DONE",
                    r1 / "after_model" / "model.safetensors", r1 / "after" / "eval.json", r1 / "monitor.json"]
    stamps = {p: p.stat().st_mtime_ns for p in done_round_1}
    samples_2 = (r2 / "samples.jsonl").read_text()
    assert samples_2 and not (r2 / "train").exists()

    monkeypatch.setattr(pipeline, "step_train", train)
    caplog.set_level(logging.INFO, logger="sealong")
    rc, out = _pipeline(run_dir)
    assert rc == 0, out[-2000:]
    assert f"round 1: complete ({r1})" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in done_round_1} == stamps  # round 1 was not redone
    assert (r2 / "samples.jsonl").read_text() == samples_2  # nor round 2's sampling

    # round 2 sampled with round 1's merged model, and trained and merged on top of it
    round_1_model = os.path.abspath(r1 / "after_model")
    assert json.loads((r2 / "samples.jsonl.meta.json").read_text())["settings"]["model"] == round_1_model
    assert {json.loads(line)["sampler"]["model"] for line in samples_2.splitlines()} == {round_1_model}
    assert (r2 / "after_model" / "model.safetensors").is_file() and (r2 / "after" / "eval.json").is_file()
    # disjoint slices of one pool, in order
    pool, ids_1, ids_2 = _ids(run_dir / "prompts.jsonl"), _ids(r1 / "prompts.jsonl"), _ids(r2 / "prompts.jsonl")
    assert len(pool) == 12 and ids_1 == pool[:6] and ids_2 == pool[6:]
    assert set(_ids(r1 / "pairs.jsonl")) <= set(ids_1) and set(_ids(r2 / "pairs.jsonl")) <= set(ids_2)

    summary = (run_dir / "summary.md").read_text()
    assert "2 rounds of ORPO" in summary and "[round_2/after/eval.md](round_2/after/eval.md)" in summary
    assert "Early stop" not in summary and (run_dir / "summary_rounds.png").is_file()
    rows = [line for line in summary.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, summary
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 11 and all(math.isfinite(float(c)) for c in cells), row
    # the stage options reached every round's stages; evaluation drew all its samples
    config = json.loads((r2 / "train" / "config.json").read_text())
    assert config["pair_weighting"] == "none" and config["micro_batch_pairs"] == 2  # the flag and --train-args
    assert {json.loads(line)["adaptive_stop"] for line in samples_2.splitlines()} <= {"budget", "consensus"}
    assert json.loads((r2 / "scores.jsonl.meta.json").read_text())["settings"]["scorer"] == "mbr+certainty"
    assert all(len(json.loads(line)["outputs"]) == 2 for line in (r2 / "after" / "sampled.jsonl").read_text().splitlines())
    for k in (1, 2):
        monitor = json.loads((run_dir / f"round_{k}" / "monitor.json").read_text())
        assert monitor["round"] == k and "stopped" not in monitor and monitor["after"]["N"] == 2
