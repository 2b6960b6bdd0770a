"""Data-parallel scoring: 2 gloo ranks resuming a killed run's shards give the one-process files, byte for byte
(with the certainty-weighted scorer and the consensus filter on)."""

import os
import subprocess
import sys

from test_mbr_stage import SAMPLES, _write
from test_score_certainty import WITH_CERTAINTY

from sealong.sample import shards
from sealong.score import stage


def test_two_ranks_resume_shards_and_equal_one_process(tmp_path):
    low = {"id": "q6", "outputs": [f"The answer is {w}." for w in "one two three four five six".split()],
           "self_certainty": [1.0] * 6}  # 6 answers, 1 each: consensus 1/6 < 0.2
    records = WITH_CERTAINTY + [low]
    samples = _write(tmp_path / "samples.jsonl", records)
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": r["id"], "context": f"context of {r['id']}"} for r in records])
    flags = ["--samples", samples, "--prompts", prompts, "--utility", "rouge", "--dedup-threshold", "0", "--chunk", "2",
             "--scorer", "mbr+certainty", "--min-consensus", "0.2"]
    one_out, one_pairs = str(tmp_path / "one.jsonl"), str(tmp_path / "one_pairs.jsonl")
    assert stage.main(flags + ["--out", one_out, "--pairs", one_pairs]) == 0
    scores, pairs = open(one_out).read().splitlines(keepends=True), open(one_pairs).read().splitlines(keepends=True)
    assert len(scores) == 6 and len(pairs) == 2  # q1, q2 have pairs; q6 is skipped for low consensus
    assert '"skipped": "low consensus (0.1667 < 0.2)"' in scores[5]
    # a killed 2-rank run: rank 1 had scored q2 (pair first, then scores) and was writing q5; rank 0 had q4
    out, out_pairs = str(tmp_path / "scores.jsonl"), str(tmp_path / "pairs.jsonl")
    open(shards.shard_path(out, 1), "w").write(scores[1] + scores[4][:30])
    open(shards.shard_path(out_pairs, 1), "w").write(pairs[1])
    open(shards.shard_path(out, 0), "w").write(scores[3])
    cmd = [sys.executable, "-m", "sealong.score", *flags, "--out", out, "--pairs", out_pairs, "--nproc-per-node", "2",
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written 4," in done.stderr and "ranks 2" in done.stderr  # q1, q3, q5, q6: only the missing ids
    assert "questions 6, already done 2, written 4," in done.stderr  # q2, q4 from the shards (not all 6)
    assert open(out).read() == "".join(scores) and open(out_pairs).read() == "".join(pairs)
    left = [n for n in os.listdir(tmp_path) if not n.endswith((".meta.json", ".lock"))]  # provenance and locks stay
    assert shards.shard_files(out) == shards.shard_files(out_pairs) == [] and sorted(left) == sorted(
        ["samples.jsonl", "prompts.jsonl", "one.jsonl", "one_pairs.jsonl", "scores.jsonl", "pairs.jsonl"])
    assert not [n for n in os.listdir(tmp_path) if ".shard-" in n]
