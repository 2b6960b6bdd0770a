"""Bad input to every reader stops with the file and line: non-UTF-8 bytes, a truncated JSON line (the real
column), ids of the wrong type (a list, a float, true: `true` is not the id 1), and duplicate ids."""

import json

import pytest

from sealong.data.longbench import read_longbench
from sealong.data.musique import read_musique
from sealong.evaluate.report import read_samples as read_eval_samples
from sealong.jsonl import JsonlError, completed_ids, numbered_records
from sealong.sample.sampler import read_prompts
from sealong.score.mbr import read_samples as read_score_samples
from sealong.train.pairs import load_pairs

PROMPT = {"id": "a", "context": "c", "question": "q"}
SAMPLE = {"id": "a", "question": "q", "outputs": ["x", "y"], "answers": ["x"]}
PAIR = {"id": "a", "prompt": "w1 w2", "chosen_text": "w3", "rejected_text": "w4"}
MUSIQUE = {"id": "2hop__1", "question": "q", "answer": "x", "answer_aliases": [], "answerable": True,
           "paragraphs": [{"idx": 0, "title": "t", "paragraph_text": "p", "is_supporting": True}]}
LONGBENCH = {"input": "q", "context": "c", "answers": ["x"], "_id": "a", "dataset": "musique"}


def _tokenizer():
    from train_fixtures import build_tokenizer

    return build_tokenizer()


READERS = {
    "jsonl": (lambda p: list(numbered_records(p)), PROMPT),
    "prompts": (read_prompts, PROMPT),
    "score samples": (read_score_samples, SAMPLE),
    "eval samples": (read_eval_samples, SAMPLE),
    "pairs": (lambda p: load_pairs(p, _tokenizer()), PAIR),
    "musique": (read_musique, MUSIQUE),
    "longbench": (read_longbench, LONGBENCH),
}


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line).encode() if not isinstance(line, bytes)
                    else line)
            f.write(b"\n")
    return str(path)


@pytest.mark.parametrize("reader", READERS)
def test_non_utf8_names_file_and_line(tmp_path, reader):
    read, good = READERS[reader]
    bad = json.dumps(dict(good, id="b", _id="b")).encode().replace(b'"b"', b'"\xff\xfe"')
    path = _write(tmp_path / "in.jsonl", [good, bad])
    with pytest.raises(ValueError, match=rf"in\.jsonl:2: not UTF-8 .*byte 0xff at column \d+"):
        read(path)


@pytest.mark.parametrize("reader", READERS)
def test_truncated_line_reports_the_real_column(tmp_path, reader):
    read, good = READERS[reader]
    text = json.dumps(good)
    path = _write(tmp_path / "in.jsonl", [good, text[:12]])
    with pytest.raises(ValueError, match=r"in\.jsonl:2: not valid JSON .* column (\d+)") as err:
        read(path)
    assert "column 1)" not in str(err.value)


@pytest.mark.parametrize("reader", ["prompts", "score samples", "eval samples", "pairs"])
@pytest.mark.parametrize("bad_id", [["a", "b"], 1.5, True, None, {"x": 1}])
def test_id_of_the_wrong_type_names_file_and_line(tmp_path, reader, bad_id):
    read, good = READERS[reader]
    path = _write(tmp_path / "in.jsonl", [good, dict(good, id=bad_id)])
    with pytest.raises(ValueError, match=r"in\.jsonl:2: .*'id' must be a string or an integer"):
        read(path)


@pytest.mark.parametrize("reader", ["prompts", "score samples", "eval samples", "pairs"])
def test_duplicate_ids_are_rejected_and_true_is_not_1(tmp_path, reader):
    read, good = READERS[reader]
    path = _write(tmp_path / "in.jsonl", [dict(good, id=1), dict(good, id="1"), dict(good, id=1)])
    with pytest.raises(ValueError, match=r"in\.jsonl:3: duplicate id 1 \(first at line 1\)"):
        read(path)


def test_completed_ids_checks_types(tmp_path):
    path = _write(tmp_path / "out.jsonl", [{"id": 1}, {"id": ["x"]}])
    with pytest.raises(JsonlError, match=r"out\.jsonl:2: 'id' must be a string or an integer, got list"):
        completed_ids(str(path))
