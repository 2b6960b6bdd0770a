"""Per-round monitoring of `sealong pipeline --rounds` (sealong.evaluate.rounds) on hand-made records: exact values
of the label-free statistics, the labelled oracle / MBR / greedy and their gap, the early-stop rule, the table,
and monitor.json (NaN written as null); a run directory started with other --rounds is refused."""

import json
import math

import pytest

from sealong.evaluate import rounds

SAMPLES = [
    {"id": "a", "outputs": ["x. The answer is Paris", "The answer is paris.", "answer: London", "  "],
     "finish_reasons": ["stop"] * 4, "num_tokens": [4, 4, 2, 0]},
    {"id": "b", "outputs": ["The answer is 1", "The answer is 2"], "finish_reasons": ["length", "length"],
     "num_tokens": [10, 10]},
    {"id": "c", "outputs": ["The answer is z"] * 3, "finish_reasons": ["stop", "length", "stop"],
     "num_tokens": [3, 3, 3]},
    # its only finished output is empty: not all "length", but the score stage skips it as "no finished output"
    {"id": "d", "outputs": ["", "The answer is q", "The answer is r"], "finish_reasons": ["stop", "length", "length"],
     "num_tokens": [0, 5, 5]},
]
SCORES = [
    {"id": "a", "scores": [0.9, 0.8, 0.2, None], "chosen": 0, "rejected": 2, "pair_similarity": 0.5},
    {"id": "b", "scores": [0.3, 0.3], "skipped": "no finished output (all 2 valid outputs cut at the token limit)"},
    {"id": "c", "scores": [0.7, 0.6, 0.65], "pair_similarity": 0.99,
     "skipped": "near-duplicate pair (similarity 0.9900 >= 0.98)"},
    {"id": "d", "scores": [None, 0.4, 0.4], "skipped": "no finished output (all 2 valid outputs cut at the token limit)"},
]


def test_label_free_statistics_exact():
    s = rounds.label_free(SAMPLES, SCORES, pairs=1)
    # clusters: a {paris: 2, london: 1} of 4 (the blank joins none), b {1, 2} of 2, c {z: 3} of 3, d {q, r} of 3
    assert s["questions"] == 4 and s["pairs"] == 1 and s["pair_share"] == 0.25
    assert s["distinct"] == pytest.approx((2 + 2 + 1 + 2) / 4)
    assert s["consensus"] == pytest.approx((2 / 4 + 1 / 2 + 3 / 3 + 1 / 3) / 4)
    assert s["score_spread"] == pytest.approx((0.7 + 0.0 + 0.1 + 0.0) / 4)  # max - min of the valid scores
    assert s["pair_sim"] == pytest.approx(0.5)  # only a kept its pair (c's near-duplicate was dropped)
    assert s["no_finished"] == pytest.approx(2 / 4)  # b: all "length"; d: the score stage's skip reason
    assert s["out_tokens"] == pytest.approx(49 / 12)  # over all 12 outputs


def test_label_free_before_scoring_and_without_questions():
    s = rounds.label_free(SAMPLES[:1], [], pairs=0)
    assert s["consensus"] == pytest.approx(0.5) and math.isnan(s["score_spread"]) and math.isnan(s["pair_sim"])
    empty = rounds.label_free([], [], pairs=0)
    assert empty["questions"] == 0 and math.isnan(empty["consensus"]) and math.isnan(empty["pair_share"])


def _eval(greedy, mbr, oracle, n=4):
    avg = {"greedy": {"subem": greedy, "em": greedy / 2}, f"MBR@{n}": {"subem": mbr, "em": mbr / 2},
           f"oracle@{n}": {"subem": oracle, "em": oracle / 2}, "MBR@1": {"subem": 99.0, "em": 99.0},
           f"random@{n}": {"subem": 1.0, "em": 1.0}}
    return {"ns": [1, 2, n], "average": avg}


def test_labelled_takes_the_largest_n_and_the_gap():
    lab = rounds.labelled(_eval(10.0, 30.0, 55.0))
    assert lab["N"] == 4 and lab["greedy"] == {"subem": 10.0, "em": 5.0}
    assert lab["MBR"] == {"subem": 30.0, "em": 15.0} and lab["oracle"] == {"subem": 55.0, "em": 27.5}
    assert lab["gap"] == {"subem": 25.0, "em": 12.5}
    assert rounds.labelled(None) == {} and rounds.labelled({}) == {}


def test_stop_reason():
    assert "samples agree" in rounds.stop_reason({"consensus": 0.96, "pairs": 50}, 0.95, 8)
    assert "samples agree" in rounds.stop_reason({"consensus": 0.95, "pairs": 50}, 0.95, 8)  # at the threshold
    reason = rounds.stop_reason({"consensus": 0.5, "pairs": 3}, 0.95, 8)
    assert reason.startswith("too few pairs: 3 pair(s)") and "min_pairs 8" in reason
    assert rounds.stop_reason({"consensus": 0.5, "pairs": 8}, 0.95, 8) is None
    assert rounds.stop_reason({"consensus": float("nan"), "pairs": 0}, 0.95, 0) is None  # nothing measured, 0: off


def test_monitor_file_table_and_plot(tmp_path):
    folder = tmp_path / "round_1"
    folder.mkdir()
    for name, records in (("samples.jsonl", SAMPLES), ("scores.jsonl", SCORES), ("pairs.jsonl", SCORES[:1])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    m1 = rounds.round_monitor(folder, 1, _eval(10.0, 30.0, 55.0))
    assert m1["label_free"] == rounds.label_free(SAMPLES, SCORES, 1) and m1["after"]["gap"]["subem"] == 25.0
    rounds.write_monitor(folder, m1)
    saved = json.loads((folder / "monitor.json").read_text())
    assert saved["round"] == 1 and saved["label_free"]["pairs"] == 1
    m2 = {"round": 2, "label_free": rounds.label_free(SAMPLES[:1], [], 0), "after": {}, "stopped": "stopped: why"}
    rounds.write_monitor(tmp_path, m2)
    assert json.loads((tmp_path / "monitor.json").read_text())["label_free"]["pair_sim"] is None  # NaN -> null
    table = rounds.rounds_table(_eval(5.0, 20.0, 40.0), [saved, json.loads((tmp_path / "monitor.json").read_text())])
    rows = table.splitlines()
    assert len(rows) == 5 and all(r.count("|") == 13 for r in rows)
    assert rows[2] == "| 0 (base) |  |  |  |  |  |  |  | 5.0 | 20.0 | 40.0 | +20.0 |"
    assert rows[3] == "| 1 | 1.75 | 0.583 | 0.200 | 0.500 | 50.0 | 4.1 | 1 | 10.0 | 30.0 | 55.0 | +25.0 |"
    assert rows[4] == "| 2 (stopped) | 2.00 | 0.500 |  |  | 0.0 | 2.5 | 0 |  |  |  |  |"
    md = rounds.rounds_markdown(None, [saved, m2], "summary_rounds.png")
    assert "**Early stop: stopped: why.**" in md and "(summary_rounds.png)" in md
    rounds.plot_rounds(_eval(5.0, 20.0, 40.0), [saved, m2], tmp_path / "rounds.png")
    assert (tmp_path / "rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_run_dir_started_with_other_rounds_is_refused(tmp_path, capsys):
    from sealong import cli, provenance

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    provenance.write_meta(str(run_dir), {"stage": "pipeline", "settings": {"rounds": 2}}, directory=True)
    assert cli.main(["pipeline", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--rounds 1: {run_dir} was started with --rounds 2" in err
    assert not (run_dir / "config.yaml").exists()  # refused before any work
