"""The built-in offline world: valid MuSiQue records whose answers follow from their supporting passages."""

import json
import re
from argparse import Namespace

import pytest

import sealong.data
from sealong.data.musique import parse_record, read_musique
from sealong.data.synthetic import run
from sealong.data.world import RELATIONS, World, WorldConfig, world_questions

FACT = re.compile(r"The (\w+) of (.+?) is (.+?)\.")


def _facts(text):
    return {(s, r): o for r, s, o in FACT.findall(text)}


@pytest.mark.parametrize("seed", [0, 5])
def test_questions_follow_from_supporting_passages(seed):
    questions = World(WorldConfig(seed=seed)).questions(30)
    assert [len(q.chain) for q in questions[:6]] == [2, 3, 4, 2, 3, 4]
    assert len({q.text for q in questions}) == 30
    for q in questions:
        rec = parse_record(q.to_json(), f"world:{q.id}")  # the official layout validates
        assert rec.hops == len(q.chain) and rec.answers == (q.answer,)
        # walk the question's relations through the supporting passages only
        facts = {}
        for p in rec.supporting:
            facts.update(_facts(p.text))
        node = q.chain[0][0]
        for rel in re.findall(r"the (\w+) of", q.text)[::-1]:
            assert rel in RELATIONS
            node = facts[(node, rel)]
        assert node == q.answer
        assert len(rec.paragraphs) == WorldConfig().paragraphs_per_record
        assert q.reasoning().endswith(f"The answer is {q.answer}.")
        steps = q.to_json()["question_decomposition"]
        assert [s["answer"] for s in steps] == [o for _, _, o in q.chain]
        assert all(rec.paragraphs[s["paragraph_support_idx"]].is_supporting for s in steps)


def test_question_sets_are_disjoint_and_stable():
    a = world_questions(3, 10, 5)
    b = world_questions(3, 10, 5, 7)
    assert [q.text for q in a["train"] + a["eval"]] == [q.text for q in b["train"] + b["eval"]]
    texts = [q.text for q in b["train"] + b["eval"] + b["warmup"]]
    assert len(texts) == len(set(texts)) == 22


def test_world_is_seeded():
    a = [q.to_json() for q in World(WorldConfig(seed=1)).questions(10)]
    b = [q.to_json() for q in World(WorldConfig(seed=1)).questions(10)]
    c = [q.to_json() for q in World(WorldConfig(seed=2)).questions(10)]
    assert a == b and a != c


def test_too_many_questions_for_a_tiny_world_is_an_error():
    tiny = WorldConfig(num_people=2, num_cities=2, num_countries=2, num_companies=2, num_currencies=2, seed=0)
    with pytest.raises(ValueError, match="too few distinct"):
        World(tiny).questions(500, hops=(2,))


def _args(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), musique=None, tokenizer=None, num_examples=12, num_eval=4,
                min_tokens=60, max_tokens=200, distractors="random", embed_model=None, seed=0,
                include_unanswerable=False, overwrite=False, eval_musique=None)
    base.update(kw)
    return Namespace(**base)


def test_synth_stage_writes_prompts_without_answers_and_a_heldout_eval(tmp_path, caplog):
    assert run(_args(tmp_path)) == 0
    run_dir = tmp_path / "run"
    prompts = [json.loads(line) for line in (run_dir / "prompts.jsonl").open()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").open()]
    world = read_musique(run_dir / "world_musique.jsonl")
    assert len(prompts) == len(world) == 12 and len(evals) == 4
    answers = {r.id: r.answers[0] for r in world}
    for p in prompts:
        assert "answer" not in p and "answers" not in p
        assert p["context_tokens"] <= p["target_tokens"] or p["supporting_over_budget"]
    assert all(e["answers"] and e["dataset"] == "synthetic" for e in evals)
    assert not {e["input"] for e in evals} & {p["question"] for p in prompts}  # held out: other questions
    assert len(answers) == 12
    before = (run_dir / "prompts.jsonl").stat().st_mtime_ns
    caplog.set_level("INFO", logger="sealong")
    assert run(_args(tmp_path)) == 0 and "skipping" in caplog.text  # done: skipped
    assert (run_dir / "prompts.jsonl").stat().st_mtime_ns == before


def test_synth_stage_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--num-examples must be >= 1"):
        run(_args(tmp_path, num_examples=0))
    with pytest.raises(FileNotFoundError, match="MuSiQue file not found"):
        run(_args(tmp_path, musique=str(tmp_path / "none.jsonl")))


def test_synth_stage_from_musique_files(tmp_path):
    from pathlib import Path

    data = Path(sealong.data.__file__).parent  # real MuSiQue samples shipped with the package (CC BY 4.0)
    args = _args(tmp_path, musique=str(data / "musique_sample.jsonl"), num_examples=5,
                 eval_musique=str(data / "musique_mixed_sample.jsonl"), num_eval=3, min_tokens=300, max_tokens=600)
    assert run(args) == 0
    prompts = [json.loads(line) for line in (tmp_path / "run" / "prompts.jsonl").open()]
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert len(prompts) == 5 and all("answer" not in p and p["context"].startswith("Passage 1:") for p in prompts)
    assert len(evals) == 3 and all(e["dataset"] == "musique" and e["answers"] for e in evals)
    assert not (tmp_path / "run" / "world_musique.jsonl").exists()


def test_synth_stage_world_hops_and_passages(tmp_path):
    """`--world-hops 1 --world-passages 4` (the demo-gain preset's world): 1-hop questions of 4 passages each,
    the warm-up's dev slice drawn from the same world."""
    assert run(_args(tmp_path, world_hops="1", world_passages=4, min_tokens=1000, max_tokens=1000)) == 0
    world = read_musique(tmp_path / "run" / "world_musique.jsonl")
    assert {r.id.split("__")[0] for r in world} == {"1hop"} and {len(r.paragraphs) for r in world} == {4}
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert {e["_id"].split("__")[0] for e in evals} == {"1hop"}
