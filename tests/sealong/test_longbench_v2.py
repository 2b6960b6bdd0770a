"""LongBench v2 reader, prompts, middle truncation, answer extraction and accuracy, against the official code's
behaviour (THUDM/LongBench pred.py / result.py, re-implemented here) on a small fixture written in the test."""

import json
import re

import pytest

from sealong.data import longbench_v2 as lb2


def official_extract_answer(response):  # pred.py, re-implemented
    response = response.replace('*', '')
    match = re.search(r'The correct answer is \(([A-D])\)', response)
    if match:
        return match.group(1)
    match = re.search(r'The correct answer is ([A-D])', response)
    if match:
        return match.group(1)
    return None


def _records():
    base = {"domain": "Single-Document QA", "sub_domain": "Financial", "question": " Which year? ",
            "choice_A": "1990 ", "choice_B": "1991", "choice_C": "1992", "choice_D": "1993", "context": "  Doc text. "}
    spec = [("a", "easy", "short", "A"), ("b", "hard", "short", "B"), ("c", "hard", "medium", "C"),
            ("d", "easy", "long", "D"), ("e", "hard", "long", "A")]
    return [dict(base, _id=i, difficulty=d, length=n, answer=a) for i, d, n, a in spec]


def test_reader_jsonl_and_array_and_its_errors(tmp_path):
    recs = _records()
    (tmp_path / "v2.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "v2.json").write_text(json.dumps(recs))
    assert lb2.read_longbench_v2(tmp_path / "v2.jsonl") == lb2.read_longbench_v2(tmp_path / "v2.json") == recs
    bad = dict(recs[0], answer="E")
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer' must be one of A, B, C, D"):
        lb2.read_longbench_v2(tmp_path / "bad.jsonl")
    (tmp_path / "miss.jsonl").write_text(json.dumps({k: v for k, v in recs[0].items() if k != "choice_C"}) + "\n")
    with pytest.raises(ValueError, match="missing field 'choice_C'"):
        lb2.read_longbench_v2(tmp_path / "miss.jsonl")


def test_prompts_are_the_official_templates_filled():
    rec = _records()[0]
    assert lb2.build_prompt(rec) == (
        "Please read the following text and answer the question below.\n\n<text>\nDoc text.\n</text>\n\n"
        "What is the correct answer to this question: Which year?\nChoices:\n(A) 1990\n(B) 1991\n(C) 1992\n"
        "(D) 1993\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
    assert lb2.build_prompt(rec, "0shot_cot").endswith("(D) 1993\n\nLet\u2019s think step by step:")
    second = lb2.cot_answer_prompts(lb2.to_prompts([rec], cot=True), [{"id": "longbench_v2/a",
                                                                        "outputs": [" It is 1990. "]}])[0]
    assert "The text is too long and omitted here." in second["prompt"] and "Doc text" not in second["prompt"]
    assert "Let\u2019s think step by step: It is 1990.\n\nBased on the above, what is the single" in second["prompt"]
    p = lb2.to_prompts([rec])[0]
    assert p["answers"] == ["A"] and p["metric"] == "choice" and p["prompt"] == lb2.build_prompt(rec)


@pytest.mark.parametrize("response", [
    "The correct answer is (B)", "**The correct answer is (C)**", "The correct answer is D.",
    "I think (A). The correct answer is (B). The correct answer is (C)", "the correct answer is (A)",
    "The correct answer is (E)", "The correct answer is: (A)", "Answer: B", "", "The correct answer is A or B",
    "The correct answer is *(D)*", "The correct answer is (b)", "The correct answer is Both"])
def test_extraction_equals_the_official_one(response):
    assert lb2.extract_answer(response) == official_extract_answer(response)


def test_accuracy_by_difficulty_and_length_as_result_py():
    recs = _records()
    responses = ["The correct answer is (A)", "The correct answer is (C)", "The correct answer is C",
                 "no idea", "The correct answer is (A)."]
    acc = lb2.accuracy(recs, responses)
    # right: a (easy short), c (hard medium), e (hard long); wrong: b (hard short), d (easy long, no letter)
    assert acc == {"overall": 60.0, "easy": 50.0, "hard": 66.7, "short": 50.0, "medium": 100.0, "long": 50.0,
                   "n": {"overall": 5, "easy": 2, "hard": 3, "short": 2, "medium": 1, "long": 2}}
    assert lb2.accuracy(recs, responses, compensated=True)["overall"] == 65.0  # d: 0.25
    judged = [official_extract_answer(r.strip()) == rec["answer"] for r, rec in zip(responses, recs)]
    assert acc["overall"] == round(100 * sum(judged) / len(judged), 1)


def test_truncation_keeps_the_head_and_tail_as_pred_py():
    from sealong.tiny import build_tokenizer

    tok = build_tokenizer([" ".join(f"w{i}" for i in range(40))])
    prompt = " ".join(f"w{i}" for i in range(40))
    ids = tok.encode(prompt)
    for max_len in (9, 10):
        cut = lb2.truncate_middle(prompt, tok, max_len)
        kept = ids[:max_len // 2] + ids[-max_len // 2:]
        assert cut == tok.decode(kept, skip_special_tokens=True) and len(tok.encode(cut)) == max_len
    assert cut.split()[:5] == ["w0", "w1", "w2", "w3", "w4"] and cut.split()[-1] == "w39"
    assert lb2.truncate_middle(prompt, tok, 100) == prompt
