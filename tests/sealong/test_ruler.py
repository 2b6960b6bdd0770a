"""RULER-style tasks generated locally (sealong.data.ruler): deterministic for a seed, at the target token lengths
(+-2%), needles exactly once, and RULER's string_match_all / string_match_part scoring."""

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from sealong.data import ruler
from sealong.data.ruler import RulerConfig, generate


@pytest.fixture(scope="module")
def bert():
    from sealong.data.synthetic import load_counting_tokenizer

    return load_counting_tokenizer(None)  # the offline BERT tokenizer (no chat template: plain encode)


def _tokens(tok, r):
    return len(tok(r["prompt"])["input_ids"]) + r["tokens_to_generate"]


def test_records_are_deterministic_for_a_seed(bert):
    a = generate(bert, RulerConfig(lengths=(1024,), per_task=2, seed=3))
    b = generate(bert, RulerConfig(lengths=(1024,), per_task=2, seed=3))
    c = generate(bert, RulerConfig(lengths=(1024,), per_task=2, seed=4))
    assert a == b and len(a) == 14
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert len({r["prompt"] for r in a}) == 14  # the two records of a task differ
    # a record does not depend on what else is generated
    one = generate(bert, RulerConfig(tasks=("cwe",), lengths=(1024,), per_task=2, seed=3))
    assert one == [r for r in a if r["task"] == "cwe"]


@pytest.mark.parametrize("task,lengths", [(t, (4096,)) for t in ruler.TASKS] + [
    pytest.param("niah_single", (8192, 16384, 32768), marks=pytest.mark.slow),
    pytest.param("fwe", (8192, 16384), marks=pytest.mark.slow), pytest.param("cwe", (8192,), marks=pytest.mark.slow)])
def test_records_are_at_the_target_length(bert, task, lengths):
    for r in generate(bert, RulerConfig(tasks=(task,), lengths=lengths, per_task=1)):
        got = _tokens(bert, r)
        assert got == r["length"]
        assert 0.98 * r["target_length"] <= got <= r["target_length"], (task, got, r["target_length"])


def test_needles_values_exactly_once_and_the_answers_are_right(bert):
    recs = {r["task"]: r for r in generate(bert, RulerConfig(lengths=(2048,), per_task=1, seed=1))}
    for name in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        r = recs[name]
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", r["prompt"])
        keys = Counter(k for k, _ in needles)
        t = ruler.TASKS[name]
        assert len(keys) == max(t.num_k, t.num_q) and set(keys.values()) == {t.num_v}
        assert len(r["answers"]) == t.num_q * t.num_v
        for a in r["answers"]:
            assert r["prompt"].count(a) == 1  # the needle's value: exactly once in the whole prompt
        asked = {k for k, v in needles if v in r["answers"]}
        assert all(k in r["prompt"].rsplit("\n", 1)[-1] for k in asked)  # the question names the asked keys
    vt = recs["vt"]
    value = vt["question"]
    lines = vt["prompt"].split("\n\n", 2)[-1]  # after the solved example
    chain = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", lines))
    holders = [v for v in chain if chain[v] == value]
    while len(holders) < len(chain):
        more = [v for v in chain if chain[v] in holders and v not in holders]
        if not more:
            break
        holders += more
    assert sorted(holders) == sorted(vt["answers"]) and len(vt["answers"]) == 5
    cwe = recs["cwe"]
    listed = Counter(re.findall(r"\d+\. (\w+)", cwe["prompt"].rsplit("Question:", 2)[1]))
    assert sorted(w for w, _ in listed.most_common(10)) == sorted(cwe["answers"])
    assert min(listed[w] for w in cwe["answers"]) > max(c for w, c in listed.items() if w not in cwe["answers"])
    fwe = recs["fwe"]
    words = Counter(fwe["prompt"].split("coded words. ", 1)[1].split("\nQuestion:")[0].split())
    top = [w for w, _ in words.most_common(4) if w != "..."]
    assert top[:3] == fwe["answers"] and words.most_common(1)[0][0] == "..."


def ruler_string_match_all(preds, refs):  # RULER scripts/eval/synthetic/constants.py, re-implemented
    return round(sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
                     for p, ref in zip(preds, refs)) / len(preds) * 100, 2)


def ruler_string_match_part(preds, refs):
    return round(sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref)
                     for p, ref in zip(preds, refs)) / len(preds) * 100, 2)


def test_scores_equal_rulers_string_match_on_hand_made_cases():
    preds = ["The special magic numbers are 1234567 and 7654321.", "  KCFRK, JFELT\x07and nothing", "none",
             "Answer: apple BANANA cherry", "7654321"]
    refs = [["1234567", "7654321"], ["kcfrk", "JFELT", "ABCDE"], ["x"], ["apple", "banana", "cherry", "date"],
            ["1234567", "7654321"]]
    assert ruler.score(preds, refs, "string_match_all") == ruler_string_match_all(preds, refs) == 58.33
    assert ruler.score(preds, refs, "string_match_part") == ruler_string_match_part(preds, refs) == 80.0
    assert ruler.match_all(preds[1], refs[1]) == pytest.approx(2 / 3)
    assert ruler.postprocess(" a\tb\x00c ") == "a\nb\nc"


def test_vocabulary_mode_for_a_closed_tokenizer_and_the_synth_stage(tmp_path):
    from sealong.data.fresh_world import fresh_questions
    from sealong.tiny import build_tokenizer, demo_texts

    tok = build_tokenizer(demo_texts())  # the offline demo's word-level tokenizer: no digits beyond 63, no '-'
    passages = [p.text for q in fresh_questions(0, 4)["train"] for p in q.paragraphs]  # the demo world's own
    vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2]
    recs = generate(tok, RulerConfig(lengths=(512, 1024), per_task=1, haystack="passages", vocabulary=vocab,
                                     passages=passages, tokens_to_generate=40))
    ruler.check_writable(tok, recs)
    assert all("<unk>" not in tok.decode(tok(a)["input_ids"]) for r in recs for a in r["answers"])
    for r in recs:
        assert 0.98 * r["target_length"] <= r["length"] <= r["target_length"]
        if r["task"].startswith("niah"):
            assert all(r["prompt"].count(a) == 1 for a in r["answers"])
    with pytest.raises(ValueError, match="cannot write the answer"):
        ruler.check_writable(tok, generate(tok, RulerConfig(tasks=("niah_single",), lengths=(512,), per_task=1,
                                                            haystack="passages", passages=passages)))
    from sealong.data.synthetic import run

    args = SimpleNamespace(out_dir=str(tmp_path), tokenizer=None, ruler=True, ruler_tasks="niah_single,vt",
                           ruler_lengths="1024", ruler_per_task=2, ruler_haystack=None, seed=0, overwrite=False)
    assert run(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "ruler.jsonl").open()]
    assert [r["id"] for r in lines] == ["ruler/niah_single/1024/0", "ruler/niah_single/1024/1", "ruler/vt/1024/0",
                                        "ruler/vt/1024/1"]
    assert all(r["metric"] == "string_match_all" and r["kind"] == "ruler" for r in lines)


def test_a_records_own_prompt_is_what_the_sampler_encodes_and_it_stays_out_of_the_samples():
    from sealong.data.prompts import chat_token_ids, prompt_token_ids, record_token_ids
    from sealong.sample.sampler import samples_record
    from sealong.tiny import build_tokenizer

    tok = build_tokenizer(["What is the answer ? Passage one two three"])
    rec = {"id": "a", "context": "one two", "question": "What is the answer ?", "prompt": "three two one ?"}
    assert record_token_ids(tok, rec) == chat_token_ids(tok, "three two one ?")
    plain = {k: v for k, v in rec.items() if k != "prompt"}
    assert record_token_ids(tok, plain, "default") == prompt_token_ids(tok, "one two", "What is the answer ?", "default")
    out = samples_record(rec, [], tok, 5, False)
    assert "prompt" not in out and "context" not in out and out["question"] == "What is the answer ?"
