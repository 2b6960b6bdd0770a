"""`sealong eval --suite`: per-task scores by the record's metric, paired over the questions in both files, and the
paired confidence interval against a direct computation."""

import json
import math

import pytest

from sealong.config.parser import resolve
from sealong.evaluate import suite
from sealong.evaluate.report import run


def _s(i, task, output, answers, **kw):
    return {"id": f"{task}/{i}", "dataset": task, "outputs": [output], "answers": answers, **kw}


def test_paired_ci_equals_a_direct_computation():
    before = [1, 0, 0, 1, 0, 1, 0, 0]
    after = [1, 1, 1, 0, 0, 1, 1, 0]
    d = [1 - 1, 1 - 0, 1 - 0, 0 - 1, 0 - 0, 1 - 1, 1 - 0, 0 - 0]  # = [0, 1, 1, -1, 0, 0, 1, 0]
    mean = 2 / 8
    var = (3 * (1 - 0.25) ** 2 + (-1 - 0.25) ** 2 + 4 * 0.25 ** 2) / 7  # sample variance of d, by hand
    half = 1.959964 * math.sqrt(var / 8)
    m, lo, hi = suite.paired_ci(before, after)
    assert sum(d) / 8 == mean == m
    assert lo == pytest.approx(mean - half, abs=1e-12) and hi == pytest.approx(mean + half, abs=1e-12)
    assert suite.paired_ci([0.5], [1.0]) == (0.5, None, None)


def test_suite_rows_score_each_kind_and_pair_the_questions():
    before = [_s(0, "musique", "It is Paris.", ["Paris"]), _s(1, "musique", "Rome", ["Paris"]),
              _s(0, "ruler_niah_single_4k", "1234567", ["1234567"], metric="string_match_all"),
              _s(1, "ruler_niah_single_4k", "none", ["7654321"], metric="string_match_all"),
              _s(2, "ruler_niah_multivalue_4k", "11 and 22", ["11", "22", "33", "44"], metric="string_match_all"),
              _s(0, "longbench_v2", "The correct answer is (A)", ["A"], metric="choice", difficulty="easy",
                 length="short"),
              _s(1, "longbench_v2", "The correct answer is (A)", ["B"], metric="choice", difficulty="hard",
                 length="long"),
              _s(9, "musique", "only before", ["x"])]
    after = [_s(0, "musique", "Paris", ["Paris"]), _s(1, "musique", "Paris!", ["Paris"]),
             _s(0, "ruler_niah_single_4k", "1234567", ["1234567"], metric="string_match_all"),
             _s(1, "ruler_niah_single_4k", "it is 7654321", ["7654321"], metric="string_match_all"),
             _s(2, "ruler_niah_multivalue_4k", "11, 22, 33", ["11", "22", "33", "44"], metric="string_match_all"),
             _s(0, "longbench_v2", "the answer is A", ["A"], metric="choice", difficulty="easy", length="short"),
             _s(1, "longbench_v2", "**The correct answer is (B)**", ["B"], metric="choice", difficulty="hard",
                length="long")]
    rows = {r["task"]: r for r in suite.suite_rows(before, after)}
    assert list(rows) == ["musique", "ruler_niah_multivalue_4k", "ruler_niah_single_4k", "longbench_v2",
                          "longbench_v2 (easy)", "longbench_v2 (hard)", "longbench_v2 (long)", "longbench_v2 (short)"]
    mu = rows["musique"]
    assert (mu["n"], mu["dropped"], mu["before"], mu["after"], mu["diff"]) == (2, 1, 50.0, 100.0, 50.0)
    assert mu["p"] == 1.0 and mu["metric"] == "subem"
    mv = rows["ruler_niah_multivalue_4k"]
    assert (mv["before"], mv["after"], mv["p"], mv["ci"]) == (50.0, 75.0, None, None)  # recall 2/4 -> 3/4; n = 1
    lb = rows["longbench_v2"]
    assert (lb["before"], lb["after"], lb["metric"]) == (50.0, 50.0, "accuracy")  # no letter extracted after for 0
    assert rows["longbench_v2 (hard)"]["diff"] == 100.0
    table = suite.suite_markdown(list(rows.values()))
    assert "| musique | subem | 2 (1 unpaired left out) | 50.0 | 100.0 | +50.0 [" in table


def test_eval_suite_stage_writes_the_table(tmp_path):
    def write(name, recs):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(path)

    b = write("b.jsonl", [_s(i, "t", "x" if i % 2 else "y", ["x"]) for i in range(6)])
    a = write("a.jsonl", [_s(i, "t", "x", ["x"]) for i in range(6)])
    cfg = resolve("eval", ["--suite", "--before", b, "--after", a, "--out-dir", str(tmp_path / "out")]).cfg
    assert run(cfg) == 0
    rows = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert rows[0]["task"] == "t" and rows[0]["before"] == 50.0 and rows[0]["after"] == 100.0
    assert "| t | subem | 6 | 50.0 | 100.0 | +50.0 [" in (tmp_path / "out" / "suite.md").read_text()
    with pytest.raises(ValueError, match="--before FILES and --after FILES"):
        run(resolve("eval", ["--suite", "--before", b]).cfg)


def test_eval_files_kinds_and_the_pipeline_check(tmp_path):
    from types import SimpleNamespace

    from sealong.pipeline import check

    v1 = tmp_path / "musique.jsonl"
    v1.write_text(json.dumps({"input": "q", "context": "c", "answers": ["a"], "_id": "1"}) + "\n")
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps([{"_id": "x", "choice_A": "a", "answer": "A"}]))
    v2l = tmp_path / "v2.jsonl"
    v2l.write_text(json.dumps({"_id": "x", "choice_A": "a", "answer": "A"}) + "\n")
    rl = tmp_path / "ruler.jsonl"
    rl.write_text(json.dumps({"id": "ruler/vt/4096/0", "kind": "ruler", "prompt": "p"}) + "\n")
    assert [suite.file_kind(str(p)) for p in (v1, v2, v2l, rl)] == ["longbench", "longbench_v2", "longbench_v2",
                                                                    "ruler"]
    cfg = SimpleNamespace(model=None, musique=None, tiny_shape=None, eval_files=f"{rl},{v2}")
    with pytest.raises(ValueError, match="at least one LongBench v1 file"):
        check(cfg)
    check(SimpleNamespace(model=None, musique=None, tiny_shape=None, eval_files=f"{v1},{rl},{v2}"))
    with pytest.raises(FileNotFoundError, match="file not found"):
        suite.file_kind(str(tmp_path / "none.jsonl"))


def test_pipeline_suite_prompts_cut_longbench_v2_to_the_window(tmp_path):
    from types import SimpleNamespace

    from tiny_checkpoint import build_checkpoint

    from sealong.data.prompts import record_token_ids
    from sealong.model import load_tokenizer

    model = build_checkpoint(tmp_path / "m", max_positions=256)
    long_context = " ".join(["the city of paris"] * 200)  # far over the window
    rec = {"_id": "x", "domain": "d", "sub_domain": "s", "difficulty": "hard", "length": "long",
           "question": "what city ?", "choice_A": "paris", "choice_B": "london", "choice_C": "a", "choice_D": "the",
           "answer": "A", "context": long_context}
    (tmp_path / "v2.jsonl").write_text(json.dumps(rec) + "\n")
    said = []
    r = SimpleNamespace(run=tmp_path, args=SimpleNamespace(eval_files=str(tmp_path / "v2.jsonl"), model=model),
                        configs={"sample": SimpleNamespace(max_prompt_tokens=None, max_new_tokens=32)}, say=said.append)
    out = suite.suite_prompts(r, model)
    prompts = [json.loads(x) for x in out.open()]
    tok = load_tokenizer(model)
    assert len(prompts) == 1 and prompts[0]["answers"] == ["A"] and prompts[0]["metric"] == "choice"
    n = len(record_token_ids(tok, prompts[0]))
    # within the sampler's limit (this closed test vocabulary drops the template's unknown words when decoding the
    # cut, so it lands below the limit; test_longbench_v2 checks the cut itself against pred.py's)
    assert 150 <= n <= 256 - 32
    assert "the city of paris" in prompts[0]["prompt"] and "london" in prompts[0]["prompt"]  # head and tail kept
