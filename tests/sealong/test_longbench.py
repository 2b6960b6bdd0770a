"""LongBench v1 reader and the MuSiQue -> LongBench converter."""

import json
from pathlib import Path

import pytest

import sealong.data
from sealong.data.longbench import musique_to_longbench, read_longbench, to_prompt
from sealong.data.musique import read_musique

SAMPLE = Path(sealong.data.__file__).parent / "musique_sample.jsonl"  # real MuSiQue records (CC BY 4.0)


def _rec(i=0):
    return {"input": f"Question {i}?", "context": "Passage 1:\nT\nSome text.", "answers": ["Ans", "ans two"],
            "length": 4, "dataset": "musique", "language": "en", "all_classes": None, "_id": f"id{i}"}


def test_reads_longbench_and_fills_task_from_file_name(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    r = _rec()
    del r["dataset"], r["length"]
    path.write_text(json.dumps(r) + "\n" + json.dumps(_rec(1)) + "\n")
    recs = read_longbench(path)
    assert [x["dataset"] for x in recs] == ["hotpotqa", "musique"]
    assert recs[0]["length"] == 5 and recs[0]["language"] == "en"
    prompt = to_prompt(recs[1])
    assert prompt == {"id": "musique/id1", "context": r["context"], "question": "Question 1?",
                      "answers": ["Ans", "ans two"], "dataset": "musique"}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("input"), "missing field 'input'"),
    (lambda r: r.update(answers="Ans"), "field 'answers' must be list"),
    (lambda r: r.update(answers=[]), "non-empty list of strings"),
    (lambda r: r.update(_id=3), "field '_id' must be str"),
])
def test_malformed_longbench_names_file_and_line(tmp_path, mutate, message):
    bad = _rec(1)
    mutate(bad)
    path = tmp_path / "musique.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        read_longbench(path)
    assert str(err.value).startswith(f"{path}:2:") and message in str(err.value)


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "musique.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\n" + json.dumps(_rec(0)) + "\n")
    with pytest.raises(ValueError, match=r"musique\.jsonl:2: duplicate _id 'id0'"):
        read_longbench(path)


def test_converter_round_trips_through_the_reader(tmp_path):
    recs = read_musique(SAMPLE)[:3]
    out = [musique_to_longbench(r) for r in recs]
    path = tmp_path / "musique.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in out))
    back = read_longbench(path)
    for rec, lb in zip(recs, back):
        assert lb["_id"] == rec.id and lb["input"] == rec.question and lb["dataset"] == "musique"
        assert lb["answers"] == list(rec.answers) and lb["answers"][0] == rec.answers[0]
        assert lb["context"].startswith("Passage 1:\n" + rec.paragraphs[0].title + "\n")
        assert lb["context"].count("Passage ") == len(rec.paragraphs)
        assert lb["length"] == len(lb["context"].split())
    custom = musique_to_longbench(recs[0], context="CTX", dataset="mytask")
    assert custom["context"] == "CTX" and custom["dataset"] == "mytask"
