"""Evaluation hygiene (issue 23, item 5): greedy and sampled files over different questions are evaluated on the
questions in both, saying how many were dropped; the MuSiQue evaluation slice is drawn seeded across hop counts."""

import json
from argparse import Namespace
from pathlib import Path

import pytest

import sealong.data
from sealong.data.musique import hop_balanced_slice, read_musique
from sealong.evaluate.report import evaluate, settings_header


def _rec(i, outputs, answer="x"):
    return {"id": f"q{i}", "dataset": "t", "answers": [answer], "outputs": outputs,
            "num_tokens": [1] * len(outputs), "finish_reasons": ["stop"] * len(outputs)}


def test_greedy_and_sampled_over_different_questions_are_paired_on_the_intersection(caplog):
    greedy = [_rec(i, ["x"]) for i in range(4)]  # q0..q3, all right
    sampled = [_rec(i, ["y", "y"]) for i in range(2, 7)]  # q2..q6, all wrong
    with caplog.at_level("WARNING", logger="sealong.eval"):
        res = evaluate(greedy, sampled, ns=[2], mbr=False)
    # only q2, q3 are in both: every row counts those two
    assert res["questions"] == 2
    assert {m: v["n"] for m, v in res["average"].items()} == {"greedy": 2, "oracle@2": 2, "random@2": 2}
    assert res["dropped"] == {"greedy_only": 2, "sampled_only": 3, "kept": 2}
    assert "dropped 2 only in the greedy file and 3 only in the sampled file" in settings_header(res)
    assert "dropped 2 only in the greedy file" in caplog.text
    assert set(res["per_question"]["greedy"]) == {"q2", "q3"}


def test_same_questions_drop_nothing_and_disjoint_files_are_refused():
    same = evaluate([_rec(0, ["x"])], [_rec(0, ["x", "y"])], ns=[2], mbr=False)
    assert "dropped" not in same and same["questions"] == 1
    with pytest.raises(ValueError, match="no id in common"):
        evaluate([_rec(0, ["x"])], [_rec(1, ["x", "y"])], ns=[2], mbr=False)


def test_musique_eval_slice_is_seeded_across_hop_counts(tmp_path):
    path = Path(sealong.data.__file__).parent / "musique_mixed_sample.jsonl"
    records = read_musique(path)  # 11 answerable: nine 2-hop (the first seven in a row), one 3-hop, one 4-hop
    assert [r.hops for r in records[:3]] == [2, 2, 2]  # what the first-N slice took
    picked = hop_balanced_slice(records, 3, seed=0)
    assert sorted(r.hops for r in picked) == [2, 3, 4]
    assert [r.id for r in picked] == [r.id for r in hop_balanced_slice(records, 3, seed=0)]  # deterministic
    assert [r.id for r in picked] == [r.id for r in records if r.id in {p.id for p in picked}]  # in file order
    counts = {h: sum(r.hops == h for r in hop_balanced_slice(records, 7, seed=1)) for h in (2, 3, 4)}
    assert counts == {2: 5, 3: 1, 4: 1}  # one 3-hop and one 4-hop record: their later turns go to the 2-hop ones
    assert len(hop_balanced_slice(records, 100, seed=0)) == len(records)


def test_synth_eval_musique_uses_the_hop_balanced_slice(tmp_path):
    from sealong.data.synthetic import run

    data = Path(sealong.data.__file__).parent
    args = Namespace(out_dir=str(tmp_path / "run"), musique=str(data / "musique_sample.jsonl"), tokenizer=None,
                     num_examples=2, num_eval=3, min_tokens=200, max_tokens=300, distractors="random",
                     embed_model=None, seed=0, include_unanswerable=False, overwrite=False,
                     eval_musique=str(data / "musique_mixed_sample.jsonl"))
    assert run(args) == 0
    ids = [json.loads(line)["_id"] for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert sorted(i.split("__")[0][0] for i in ids) == ["2", "3", "4"]
