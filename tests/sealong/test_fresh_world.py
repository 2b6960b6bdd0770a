"""The reading world (fresh facts per question) and the statistics and reports of the demo."""

import json
import re

import pytest

from sealong.data.fresh_world import TRACE_FORMS, FreshWorld, FreshWorldConfig, fresh_questions
from sealong.data.musique import parse_record
from sealong.evaluate.metrics import final_answer, final_em, mcnemar_exact, wilson_interval

FACT = re.compile(r"The (\w+) of (.+?) is (.+?)\.")


def test_answers_follow_from_the_supporting_passages_only():
    for q in FreshWorld().questions(40):
        rec = parse_record(q.to_json(), f"world:{q.id}")
        assert len(q.chain) in (2, 3) and rec.hops == len(q.chain)
        assert len(rec.paragraphs) == FreshWorldConfig().paragraphs_per_record
        facts = {}
        for p in rec.supporting:
            facts.update({(s, r): o for r, s, o in FACT.findall(p.text)})
        node = q.chain[0][0]
        for rel in re.findall(r"the (\w+) of", q.text)[::-1]:
            node = facts[(node, rel)]
        assert node == q.answer
        # every chain subject has a confuser: a near-name (one of its two words shared) with the same relation
        for s, rel, o in q.chain:
            if " " in s:
                near = [p for p in rec.paragraphs if not p.is_supporting and p.text.startswith(f"The {rel} of ")
                        and set(p.title.split()) & set(s.split())]
                assert near and all(FACT.findall(p.text)[0][2] != o for p in near)


def test_facts_are_fresh_per_question_and_stable():
    a = fresh_questions(0, 30, 10, 5, 5)
    b = fresh_questions(0, 30, 10, 20, 5)
    assert [q.to_json() for q in a["train"] + a["eval"]] == [q.to_json() for q in b["train"] + b["eval"]]
    assert [q.id for q in a["warmup"]] == [q.id for q in b["warmup"][:5]]
    # the same subject gets different facts in different questions: nothing to memorize
    seen = {}
    clashes = 0
    for q in b["train"] + b["eval"] + b["warmup"]:
        for s, rel, o in q.chain:
            clashes += seen.setdefault((s, rel), o) != o
    assert clashes > 0
    assert len({q.answer for q in b["train"]}) > 15
    with pytest.raises(ValueError, match="paragraphs_per_record"):
        FreshWorld(FreshWorldConfig(paragraphs_per_record=4))


def test_trace_forms_are_paraphrases_with_the_same_final_answer():
    q = FreshWorld().question(7)
    traces = [q.reasoning(k) for k in range(len(TRACE_FORMS))]
    assert len(set(traces)) == len(TRACE_FORMS) >= 2
    assert all(final_answer(t).rstrip(".") == q.answer and final_em(t, q.answer) for t in traces)
    assert not final_em(traces[0].replace(f"is {q.answer}.", "is Nowhere."), q.answer)


def test_mcnemar_exact_and_wilson_by_hand():
    # 10 discordant pairs, all wrong -> right: p = 2 * 0.5^10
    t = mcnemar_exact([0] * 10 + [1] * 5, [1] * 10 + [1] * 5)
    assert (t["b_right_to_wrong"], t["c_wrong_to_right"]) == (0, 10) and t["p_value"] == pytest.approx(2 / 1024)
    # b = 3, c = 7: p = 2 * P[X <= 3], X ~ Bin(10, 1/2) = 2 * 176 / 1024
    t = mcnemar_exact([1] * 3 + [0] * 7, [0] * 3 + [1] * 7)
    assert t["p_value"] == pytest.approx(2 * 176 / 1024)
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0
    with pytest.raises(ValueError, match="outcomes"):
        mcnemar_exact([1], [1, 0])
    lo, hi = wilson_interval(40, 100)  # Wilson 95%: [0.309, 0.498]
    assert lo == pytest.approx(0.3094, abs=1e-4) and hi == pytest.approx(0.4980, abs=1e-4)


def _samples(right_greedy, n_questions=20, n=8):
    greedy, sampled = [], []
    for i in range(n_questions):
        gold = f"City{i}"
        g = f"The answer is {gold}." if i < right_greedy else "The answer is Lima."
        greedy.append({"id": f"q{i}", "dataset": "synthetic", "answers": [gold], "outputs": [g], "num_tokens": [5],
                       "finish_reasons": ["stop"]})
        outs = [f"The answer is {gold}." if k % 2 == 0 else "The answer is Lima." for k in range(n)]
        sampled.append({"id": f"q{i}", "dataset": "synthetic", "answers": [gold], "outputs": outs,
                        "num_tokens": [5] * n, "finish_reasons": ["stop"] * (n - 1) + ["length"]})
    return greedy, sampled


def test_eval_and_summary_reports_say_what_a_reader_needs(tmp_path):
    from sealong.evaluate.report import evaluate, summary_markdown, write_report

    settings = {"model": "tiny", "N": 8, "temperature": 1.0, "embedder": "MiniLM", "seed": 0}
    before = evaluate(*_samples(4), ns=[1, 2, 4, 8], mbr=False, settings=settings)
    after = evaluate(*_samples(16), ns=[1, 2, 4, 8], mbr=False, settings=settings)
    assert before["average"]["greedy"]["em"] == 20 and after["average"]["greedy"]["em"] == 80
    assert before["average"]["random@8"]["cut"] == pytest.approx(100 / 8)
    lo, hi = before["average"]["greedy"]["ci"]["em"]
    assert lo < 20 < hi
    paths = write_report(before, tmp_path / "before", title="Evaluation before SEALONG")
    md = paths["md"].read_text()
    for needle in ("20 questions", "model: tiny", "N: 8", "temperature: 1.0", "embedder: MiniLM", "seed: 0",
                   "**MBR@N**", "**oracle@N**", "**random@N**", "cut at token limit", "95%"):
        assert needle in md, needle
    assert "| greedy | 20.0 [" in md
    text = summary_markdown(before, after, 8, tmp_path, "summary_vs_n.png",
                            {"greedy": 40.0, "mbr@16": 55.0, "oracle@16": 85.0, "questions": 64})
    assert "16 question(s) went wrong -> right" in text or "12 question(s) went wrong -> right" in text
    assert "+60.0 points on 20 held-out questions: a statistically significant GAIN" in text
    assert "p = 0.000" in text or "p = 6.1e-05" in text
    assert "(summary_vs_n.png)" in text and "(before/eval.md)" in text
    assert "consensus (MBR) beat greedy" in text and "were met." in text
    weak = summary_markdown(before, after, 8, tmp_path, "s.png", {"greedy": 2.0, "mbr@16": 6.0, "oracle@16": 21.0})
    assert "were NOT met" in weak and "none is claimed" in weak
    same = summary_markdown(before, before, 8, tmp_path, "s.png")
    assert "NO statistically significant change" in same
    json.dumps(before)  # eval.json stays JSON


def test_plot_has_one_shared_axis_and_distinct_titles(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sealong.evaluate.report import evaluate, plot_vs_n

    res = evaluate(*_samples(4), ns=[1, 2, 4, 8], mbr=False)
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot_vs_n({"before": res, "after": res}, tmp_path / "p.png")
    (fig,) = figs
    a, b = fig.axes
    assert a.get_shared_y_axes().joined(a, b)
    assert [t.get_text() for t in a.get_xticklabels()] == ["1", "2", "4", "8"]
    assert a.get_title() != b.get_title()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_gain_preset_resolves_to_the_documented_settings(tmp_path):
    from sealong.config.parser import resolve
    from sealong.pipeline import check, stage_configs

    r = resolve("pipeline", ["--preset", "demo-gain"])
    configs = stage_configs(r.cfg, r.sections)
    assert (configs["synth"].num_examples, configs["synth"].num_eval, configs["sample"].num_samples,
            r.cfg.eval_samples) == (512, 400, 16, 8)
    assert configs["sample"].temperature == 1.0 and configs["sample"].max_new_tokens == 32
    assert configs["train"].mode == "orpo" and r.cfg.tiny_warmup_steps == 3000
    assert (configs["synth"].world_hops, configs["synth"].world_passages, configs["synth"].seed) == ("1", 4, 0)
    assert "tie_embeddings=true" in r.cfg.tiny_shape and "warmup_hops=1" in r.cfg.tiny_shape
    assert "lr_schedule=copy_gated,copy_gate=40,decay_steps=500,check_every=250" in r.cfg.tiny_shape
    assert resolve("pipeline", []).common["preset"] == "demo"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="demo presets build their own tiny model"):
        check(resolve("pipeline", ["--preset", "demo-gain", "--model", str(tmp_path)]).cfg, "demo-gain")
