"""MuSiQue reader: the shared real samples, answer isolation, and file:line errors on malformed records."""

import json
from pathlib import Path

import pytest

import sealong.data
from sealong.data.musique import MusiqueRecord, parse_record, read_musique, to_json

DATA = Path(sealong.data.__file__).parent  # real MuSiQue samples shipped with the package (CC BY 4.0, README.md)
SAMPLE = DATA / "musique_sample.jsonl"
MIXED20 = DATA / "musique_mixed_sample.jsonl"


def _good():
    return {"id": "2hop__1_2", "question": "Who founded the company that made X?",
            "paragraphs": [{"idx": 0, "title": "X", "paragraph_text": "X was made by Y.", "is_supporting": True},
                           {"idx": 1, "title": "Y", "paragraph_text": "Y was founded by Z.", "is_supporting": True},
                           {"idx": 2, "title": "W", "paragraph_text": "Unrelated.", "is_supporting": False}],
            "question_decomposition": [], "answer": "Z", "answer_aliases": ["Mr. Z"], "answerable": True}


def test_reads_the_real_samples():
    recs = read_musique(SAMPLE)
    assert len(recs) == 24 and all(r.answerable for r in recs)
    assert all(r.hops in (2, 3, 4) for r in recs)
    assert all(len(r.supporting) >= 2 for r in recs)
    mixed_answerable = read_musique(MIXED20)
    mixed_all = read_musique(MIXED20, answerable_only=False)
    assert (len(mixed_answerable), len(mixed_all)) == (11, 20)


def test_answers_kept_apart_from_training_fields():
    rec = parse_record(_good(), "x:1")
    assert rec.answers == ("Z", "Mr. Z")
    fields = rec.prompt_fields()
    assert set(fields) == {"id", "question", "hops"}
    assert "Z" not in json.dumps(fields).replace("Z?", "")  # the answer is nowhere in the training view
    assert "answers=" not in repr(rec)


def test_round_trip_official_layout():
    rec = parse_record(_good(), "x:1")
    again = parse_record(to_json(rec), "y:1")
    assert again == rec


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("question"), "missing field 'question'"),
    (lambda r: r.update(id=5), "field 'id' must be str"),
    (lambda r: r["paragraphs"][1].pop("paragraph_text"), "paragraphs[1]: missing field 'paragraph_text'"),
    (lambda r: r["paragraphs"][0].update(is_supporting="yes"), "paragraphs[0]: field 'is_supporting' must be bool"),
    (lambda r: [p.update(is_supporting=False) for p in r["paragraphs"]], "answerable but has no supporting"),
    (lambda r: r.update(answer_aliases="Z"), "answer_aliases"),
    (lambda r: r.update(answerable="true"), "'answerable' must be true or false"),
])
def test_malformed_record_names_file_and_line(tmp_path, mutate, message):
    bad = _good()
    mutate(bad)
    path = tmp_path / "m.jsonl"
    other = dict(_good(), id="2hop__other")
    path.write_text(json.dumps(other) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        read_musique(path)
    assert str(err.value).startswith(f"{path}:3:") and message in str(err.value)


def test_bad_json_and_duplicates(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_good()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        read_musique(path)
    path.write_text(json.dumps(_good()) + "\n" + json.dumps(_good()) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: duplicate id '2hop__1_2' \(first at line 1\)"):
        read_musique(path)
    with pytest.raises(FileNotFoundError, match="MuSiQue file not found"):
        read_musique(tmp_path / "absent.jsonl")


def test_unanswerable_record_kept_only_on_request(tmp_path):
    rec = _good()
    rec.update(id="2hop__u", answerable=False)
    for p in rec["paragraphs"]:
        p["is_supporting"] = False
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_good()) + "\n" + json.dumps(rec) + "\n")
    assert [r.id for r in read_musique(path)] == ["2hop__1_2"]
    assert [r.id for r in read_musique(path, answerable_only=False)] == ["2hop__1_2", "2hop__u"]
    assert isinstance(read_musique(path)[0], MusiqueRecord)
