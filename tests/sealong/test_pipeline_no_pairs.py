"""Zero pairs (--min-consensus 0.9 on a tiny model's disagreeing samples, or N = 1): the score stage writes an
empty pairs file and says why, and the pipeline's single round stops before training with the reason (as a
round of --rounds 2 does), exit 0, summary.md with the base model's table."""

import contextlib
import io
import json

import pytest

from sealong import cli

FLAGS = ["--tiny-warmup-steps", "2", "--num-examples", "4", "--num-eval", "2", "--num-samples", "2",
         "--eval-samples", "2", "--max-new-tokens", "6"]


@pytest.mark.slow
def test_no_pair_stops_the_single_round_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["pipeline", "--run-dir", str(run_dir), *FLAGS, "--min-consensus", "0.9"])
    assert rc == 0, out.getvalue()[-2000:]
    assert (run_dir / "pairs.jsonl").is_file() and (run_dir / "pairs.jsonl").read_text() == ""
    reason = "stopped before training round 1: too few pairs: 0 pair(s) survived scoring, fewer than min_pairs 8"
    assert f"sealong pipeline: {reason}" in out.getvalue()
    assert json.loads((run_dir / "monitor.json").read_text())["stopped"] == reason
    assert not (run_dir / "train").exists() and "no round trained" in (run_dir / "summary.md").read_text()


def test_score_with_one_sample_writes_an_empty_pairs_file(tmp_path, caplog):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"q{i}", "question": "q", "context": "c", "outputs": ["x"],
                                           "finish_reasons": ["stop"]}) + "\n" for i in range(3)))
    caplog.set_level("WARNING", logger="sealong")
    assert cli.main(["score", "--run-dir", str(tmp_path), "--utility", "random"]) == 0
    assert (tmp_path / "pairs.jsonl").read_text() == ""
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 3
    assert f"no pair written to {tmp_path / 'pairs.jsonl'}: skipped" in caplog.text
