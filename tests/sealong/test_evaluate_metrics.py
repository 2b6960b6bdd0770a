"""SubEM (HELMET) and token F1 (LongBench) on hand-worked cases, and the evaluation modes over samples files."""

import json

import pytest

from sealong.config.parser import resolve
from sealong.evaluate.report import (best_over_answers, compare_table, default_ns, evaluate, markdown_table, normalize_answer,
                              parse_ns, read_samples, run, sub_em, token_f1)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and THE plum.", "apple pear and plum"),
    ("theatre another anthem", "theatre another anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("  many\tspaces \n here ", "many spaces here"),
    ("Café Müller", "café müller"),                     # unicode letters are lower-cased, kept
    ("“quoted” — dash", "“quoted” — dash"),             # non-ASCII punctuation is not string.punctuation: kept
    ("rock'n'roll", "rocknroll"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_subem_hand_cases():
    assert sub_em("The answer is the Eiffel Tower.", "Eiffel Tower") == 1.0
    assert sub_em("It is Paris", "paris, france") == 0.0
    assert sub_em("It is not there", "no") == 1.0  # the known pitfall: "no" inside "not" counts (as HELMET)
    assert sub_em("Tokyo", "Tokyo Tower") == 0.0     # the gold must be inside the prediction, not the reverse
    assert sub_em("Die Brücke, 1905.", "die brücke") == 1.0
    assert sub_em("anything", "The") == 1.0          # a gold that normalizes to "" is a substring of everything
    assert best_over_answers("He was born in NYC.", ["New York City", "NYC"], "subem") == 1.0


def test_token_f1_hand_cases():
    assert token_f1("It is not there", "no") == 0.0          # F1 has no substring pitfall
    assert token_f1("the Eiffel Tower", "Eiffel Tower") == 1.0
    # pred tokens [paris, is, in, france], gold [paris, france]: p = 2/4, r = 2/2, f1 = 2 * .5 * 1 / 1.5
    assert token_f1("Paris is in France.", "Paris, France") == pytest.approx(2 / 3)
    # repeated tokens are counted with multiplicity: pred [a_, a_, b] vs gold [a_, b, b] -> common 2
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "x") == 0.0
    assert best_over_answers("Paris is in France", ["Lyon", "Paris"], "f1") == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="answers is empty"):
        best_over_answers("x", [], "f1")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sampled():
    return [
        {"id": "a", "dataset": "t1", "answers": ["Paris"], "num_tokens": [3, 5, 7, 9],
         "finish_reasons": ["stop"] * 4, "outputs": ["Lyon it is", "Paris", "Rome", "Lyon is it"]},
        {"id": "b", "dataset": "t2", "answers": ["blue"], "num_tokens": [2, 2, 2, 2],
         "finish_reasons": ["stop", "stop", "length", "stop"], "outputs": ["red", "green", "blue", "red"]},
    ]


def test_modes_on_hand_worked_samples():
    greedy = [dict(r, outputs=r["outputs"][:1], num_tokens=r["num_tokens"][:1]) for r in _sampled()]
    res = evaluate(greedy, _sampled(), ns=[1, 2, 4], mbr=False)
    t1, t2 = res["tasks"]["t1"], res["tasks"]["t2"]
    assert t1["greedy"]["subem"] == 0 and t1["oracle@1"]["subem"] == 0
    assert t1["oracle@2"]["subem"] == 100 and t1["oracle@2"]["avg_tokens"] == 5
    assert t1["random@4"]["subem"] == 25 and t1["random@4"]["avg_tokens"] == 6
    assert t2["oracle@2"]["subem"] == 0 and t2["oracle@4"]["subem"] == 100
    assert res["average"]["oracle@4"]["subem"] == 100 and res["average"]["random@4"]["subem"] == 25
    table = markdown_table(res)
    assert table.splitlines()[0].startswith("| task (subem) | greedy | oracle@1")
    assert "| **average** |" in table and "avg output tokens" in table
    assert "| greedy | 0.0 [0.0, 65.8] | 0.0 [0.0, 65.8] | +0.0 |" in compare_table(res, res)  # Wilson, n = 2


def test_mbr_mode_picks_the_consensus_and_never_a_truncated_output():
    res = evaluate(None, _sampled(), ns=[4], mbr=True)
    # t1: "Lyon it is" / "Lyon is it" agree with each other, so MBR picks a Lyon answer: SubEM 0 (oracle 100)
    assert res["tasks"]["t1"]["MBR@4"]["subem"] == 0 and res["tasks"]["t1"]["oracle@4"]["subem"] == 100
    # t2: the only correct output was cut off at the token limit: never chosen
    assert res["tasks"]["t2"]["MBR@4"]["subem"] == 0


def test_eval_stage_writes_tables_and_plot(tmp_path):
    path = _write(tmp_path / "s.jsonl", _sampled())
    args = resolve("eval", ["--sampled", path, "--ns", "1,2,4", "--no_mbr", "--out_dir", str(tmp_path / "ev")]).cfg
    assert run(args) == 0
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert data["ns"] == [1, 2, 4] and set(data["tasks"]) == {"t1", "t2"}
    assert (tmp_path / "ev" / "eval_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    assert "## F1" in (tmp_path / "ev" / "eval.md").read_text()
    # eval.json is written last: the pipeline takes its presence as "this evaluation is complete"
    times = {name: (tmp_path / "ev" / name).stat().st_mtime_ns for name in ("eval.md", "eval_vs_n.png", "eval.json")}
    assert times["eval.json"] >= max(times["eval.md"], times["eval_vs_n.png"])


def test_bad_inputs_name_the_argument_or_line(tmp_path):
    with pytest.raises(ValueError, match="--ns"):
        parse_ns("1,x")
    with pytest.raises(ValueError, match="--ns"):
        parse_ns("0,2")
    bad = _sampled()
    del bad[1]["answers"]
    with pytest.raises(ValueError, match=r"s\.jsonl:2: missing field\(s\) 'answers'"):
        read_samples(_write(tmp_path / "s.jsonl", bad))
    bad = _sampled()
    bad[1]["answers"] = ["Paris", None]
    with pytest.raises(ValueError, match=r"s\.jsonl:2: .*'answers' must be a non-empty list of strings"):
        read_samples(_write(tmp_path / "s.jsonl", bad))
    bad = _sampled()
    bad[0]["num_tokens"] = [1]
    with pytest.raises(ValueError, match=r"s\.jsonl:1: .*'num_tokens' must be a list of 4 numbers"):
        read_samples(_write(tmp_path / "s.jsonl", bad))
    with pytest.raises(ValueError, match="give --greedy FILE and/or --sampled FILE"):
        run(resolve("eval", ["--no_mbr", "--no_plot"]).cfg)
    assert default_ns(32) == [1, 2, 4, 8, 16, 32] and default_ns(6) == [1, 2, 4, 6]


def test_mean_interval_stays_inside_the_scores_range():
    from sealong.evaluate.metrics import mean_interval

    lo, hi = mean_interval([0.0] * 23 + [0.25])  # random@N of a nearly always wrong mode: the normal bound dips below 0
    assert lo == 0.0 and 0.0 < hi < 1.0
    assert mean_interval([1.0] * 23 + [0.75])[1] == 1.0
