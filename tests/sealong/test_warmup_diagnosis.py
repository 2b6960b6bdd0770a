"""The warm-up's diagnosis on the labelled dev slice (sealong.diagnosis): counted by hand, and equal to a recount
from the dev outputs the warm-up writes."""

import hashlib
import json
import re
from collections import Counter

import pytest

from sealong.data.fresh_world import FreshWorld, FreshWorldConfig, fresh_questions
from sealong.diagnosis import confuser_objects, context_entities, diagnose
from sealong.evaluate.metrics import final_answer, normalize_answer


def _row(hops, answer, greedy, samples, pick, entities=("Ada Moss", "Oslo", "Lima", "Peru"), confusers=("Lima",)):
    return {"id": f"q{answer}{hops}", "hops": hops, "answer": answer, "greedy": f"The answer is {greedy}.",
            "samples": [f"So the answer is {s}." for s in samples], "mbr_pick": pick, "cut": [False] * len(samples),
            "context_entities": list(entities), "confusers": list(confusers)}


def test_diagnosis_by_hand():
    rows = [_row(2, "Oslo", "Oslo", ["Oslo", "Lima", "Lima", "Oslo"], 0),  # right; oracle, MBR right, majority Oslo
            _row(2, "Oslo", "Lima", ["Lima", "Lima", "Oslo", "Rome"], 2),  # confuser; MBR right, majority wrong
            _row(3, "Peru", "Rome", ["Rome", "Rome", "Rome", "Rome"], 0),  # not in the context; nothing right
            _row(3, "Peru", "Peru", ["Peru", "Peru", "Peru", "Lima"], 3)]  # right; MBR wrong
    d = diagnose(rows)
    assert d == {"greedy": 50.0, "greedy_2hop": 50.0, "greedy_3hop": 50.0, "copy_rate": 75.0, "confuser_rate": 25.0,
                 "oracle@4": 75.0, "mbr@4": 50.0, "random@4": pytest.approx(100 * (2 + 1 + 0 + 3) / 16),
                 "majority@4": 50.0, "cut_at_limit": 0.0, "questions": 4}
    assert "mbr@4" not in diagnose([{**r, "mbr_pick": None} for r in rows])


def test_context_entities_and_confusers_of_a_question():
    q = FreshWorld().question(3)
    context = "\n\n".join(f"Passage {i}:\n{p.title}\n{p.text}" for i, p in enumerate(q.paragraphs))
    ents = context_entities(context)
    assert q.answer in ents and q.chain[0][0] in ents and len(ents) == len(set(ents))
    assert len(q.confusers) == len(q.chain)
    for (s, rel, o), (near, crel, co) in zip(q.chain, q.confusers):  # same relation, another subject and object
        assert crel == rel and near != s and co != o
        assert any(p.text == f"The {rel} of {near} is {co}." and not p.is_supporting for p in q.paragraphs)
    assert confuser_objects(q, context) == [o for _, _, o in q.confusers]
    assert confuser_objects(q, "") == []


def test_one_hop_world_and_curriculum_hops():
    qs = FreshWorld(FreshWorldConfig(hops=(1, 2, 3))).questions(6)
    assert [len(q.chain) for q in qs] == [1, 2, 3, 1, 2, 3]
    # the 2-3 hop world is unchanged by the confusers field: the same questions (digest taken before it existed)
    sets = fresh_questions(0, 50, 20, 30, 10)
    text = json.dumps([[q.to_json(), q.reasoning()] for k in sets for q in sets[k]])
    assert hashlib.md5(text.encode()).hexdigest() == "de76b060e9314fa5aa2890567e9467e1"


@pytest.mark.slow
def test_warmup_diagnosis_equals_a_recount_of_its_dev_outputs(tmp_path):
    from sealong.tiny import TinyConfig, build_base_model, build_tokenizer, demo_prompts, demo_texts

    cfg = TinyConfig(warmup_steps=4, warmup_questions=16, dev_questions=6, check_every=2, dev_samples=4,
                     max_new_tokens=12, warmup_hops=(1, 2, 3), curriculum_steps=2, lr_schedule="cosine")
    lines = []
    stats = build_base_model(tmp_path / "base_model", cfg, skip_questions=10, log=lines.append)
    saved = json.loads((tmp_path / "base_model" / "warmup.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "base_model" / "dev_outputs.jsonl").read_text().splitlines()]
    assert saved["final_dev_check"] == stats["final_dev_check"] and len(rows) == 6
    assert any(line.startswith("warm-up diagnosis (labelled dev slice, 6 questions") for line in lines)

    # the dev questions and contexts, regenerated: the rows are theirs
    dev = fresh_questions(0, 10, 0, 16, 6)["dev"]
    contexts = [r["context"] for r in demo_prompts(build_tokenizer(demo_texts()), dev, cfg)]
    fact = re.compile(r"The \w+ of (.+?) is (.+?)\.")
    ans = lambda text: normalize_answer(final_answer(text))  # noqa: E731
    counts = Counter()
    for q, ctx, row in zip(dev, contexts, rows):
        assert (row["id"], row["answer"], row["hops"]) == (q.id, q.answer, len(q.chain))
        entities = {normalize_answer(e) for pair in fact.findall(ctx) for e in pair}
        confusers = {normalize_answer(o) for s, rel, o in q.confusers if f"The {rel} of {s} is {o}." in ctx}
        assert {normalize_answer(e) for e in row["context_entities"]} == entities
        assert {normalize_answer(e) for e in row["confusers"]} == confusers
        g, right = ans(row["greedy"]), [ans(o) == normalize_answer(q.answer) for o in row["samples"]]
        counts["greedy"] += g == normalize_answer(q.answer)
        counts[f"greedy_{len(q.chain)}hop"] += g == normalize_answer(q.answer)
        counts["copy_rate"] += g in entities
        counts["confuser_rate"] += g in confusers
        counts["oracle@4"] += any(right)
        counts["mbr@4"] += right[row["mbr_pick"]]
        counts["random@4"] += sum(right) / 4
        top = Counter(ans(o) for o in row["samples"]).most_common(1)[0][0]
        counts["majority@4"] += top == normalize_answer(q.answer)
        counts["cut_at_limit"] += sum(row["cut"]) / 4
    hops = Counter(len(q.chain) for q in dev)
    want = {k: 100 * v / (hops[int(k[7])] if k.startswith("greedy_") else 6) for k, v in counts.items()}
    got = stats["final_dev_check"]
    assert set(got) == set(want) | {"greedy_2hop", "greedy_3hop", "questions"} and got["questions"] == 6
    for k, v in got.items():
        if k != "questions":
            assert v == pytest.approx(want.get(k, 0.0)), k


def test_tiny_shape_overrides_and_the_pipeline_check():
    from sealong.config.parser import resolve
    from sealong.pipeline import check
    from sealong.tiny import TinyConfig, parse_overrides

    got = parse_overrides("num_layers=4, tie_embeddings=true,warmup_hops=1+2+3,lr_schedule=cosine,warmup_lr=1e-3")
    assert got == {"num_layers": 4, "tie_embeddings": True, "warmup_hops": (1, 2, 3), "lr_schedule": "cosine",
                   "warmup_lr": 1e-3}
    assert TinyConfig(**got).num_layers == 4 and parse_overrides("") == {}
    for bad, match in (("layers=4", "TinyConfig field"), ("tie_embeddings=yes", "true or false"), ("num_layers", "field=value")):
        with pytest.raises(ValueError, match=match):
            parse_overrides(bad)
    with pytest.raises(ValueError, match="TinyConfig field"):
        check(resolve("pipeline", ["--preset", "demo-gain", "--tiny-shape", "hidden=128"]).cfg, "demo-gain")
