"""LongBench v2 (Bai et al. 2024, arXiv 2412.15204): reader, prompts, answer extraction and accuracy, as the official
code (THUDM/LongBench, `pred.py`, `result.py`, `prompts/0shot*.txt`) does.

Records: one JSON object per line (or one JSON array) with `_id`, `domain`, `sub_domain`, `difficulty` ("easy" /
"hard"), `length` ("short" / "medium" / "long"), `question`, `choice_A`..`choice_D`, `answer` (a letter A-D) and
`context`. Nothing is shipped: point `--eval-files` at the benchmark's data file.

Prompts (`build_prompt`): the official zero-shot template, or its chain-of-thought variant, filled with the context,
question and choices (each stripped, as `pred.py`). The chain-of-thought evaluation is two passes: the model writes its
reasoning (up to 1024 tokens), then a second prompt (`cot_answer_prompt`: the question, the choices and that reasoning,
with the context omitted) asks for the single answer. A prompt over the model's window is cut in the middle as
`pred.py` does: of `tokenizer.encode(prompt)` (special tokens included) it keeps ids[:max_len // 2] +
ids[-max_len // 2:] (the first floor(max_len / 2) and the last ceil(max_len / 2) tokens: Python floors the negated
length) and decodes them back to text without special tokens (`truncate_middle`).

Answer extraction (`extract_answer`): asterisks removed, then the first "The correct answer is (X)", else the first
"The correct answer is X", X in A-D; None when neither occurs (counted wrong; `compensated` counts it 0.25, as
result.py's option). Accuracy overall, by difficulty (easy / hard: anything not "easy" is hard) and by length (short /
medium / long: anything else is long), as result.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
          "choice_D", "answer", "context")

_HEAD = "Please read the following text and answer the {what} below.\n\n"
_CHOICES = ("What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
            "(D) $C_D$\n\n")
TEMPLATES = {
    "0shot": _HEAD.format(what="question") + "<text>\n$DOC$\n</text>\n\n" + _CHOICES
    + 'Format your response as follows: "The correct answer is (insert answer here)".',
    "0shot_cot": _HEAD.format(what="questions") + "<text>\n$DOC$\n</text>\n\n" + _CHOICES
    + "Let\u2019s think step by step:",
    "0shot_cot_ans": _HEAD.format(what="questions") + "The text is too long and omitted here.\n\n" + _CHOICES
    + "Let\u2019s think step by step: $COT$\n\nBased on the above, what is the single, most likely answer choice? "
    'Format your response as follows: "The correct answer is (insert answer here)".',
}
MAX_NEW_TOKENS = {"0shot": 128, "0shot_cot": 1024, "0shot_cot_ans": 128}  # pred.py


def parse_record(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in FIELDS:
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r} (a LongBench v2 record has {', '.join(FIELDS)})")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    if obj["answer"] not in ("A", "B", "C", "D"):
        raise ValueError(f"{where}: field 'answer' must be one of A, B, C, D, got {obj['answer']!r}")
    return {k: obj[k] for k in FIELDS}


def is_longbench_v2(obj) -> bool:
    """A decoded record looks like LongBench v2 (multiple choice) rather than v1."""
    return isinstance(obj, dict) and "choice_A" in obj and "answer" in obj


def read_longbench_v2(path: str | Path) -> list[dict]:
    """Read LongBench v2 records: JSON lines, or the whole file one JSON array (the Hugging Face `data.json`)."""
    from .musique import json_lines

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        raise FileNotFoundError(f"LongBench v2 file not found: {path}")
    if text.lstrip().startswith("["):
        items = [(f"{path}[{i}]", obj) for i, obj in enumerate(json.loads(text))]
    else:
        items = [(where, obj) for where, _, obj in json_lines(path, "LongBench v2")]
    out, seen = [], set()
    for where, obj in items:
        rec = parse_record(obj, where)
        if rec["_id"] in seen:
            raise ValueError(f"{where}: duplicate _id {rec['_id']!r}")
        seen.add(rec["_id"])
        out.append(rec)
    return out


def build_prompt(rec: dict, template: str = "0shot", cot: str = "") -> str:
    """The official prompt text of a record: `template` is 0shot, 0shot_cot or 0shot_cot_ans (with `cot`, the
    model's reasoning from the 0shot_cot pass)."""
    text = (TEMPLATES[template].replace("$DOC$", rec["context"].strip()).replace("$Q$", rec["question"].strip())
            .replace("$C_A$", rec["choice_A"].strip()).replace("$C_B$", rec["choice_B"].strip())
            .replace("$C_C$", rec["choice_C"].strip()).replace("$C_D$", rec["choice_D"].strip()))
    return text.replace("$COT$", cot) if template == "0shot_cot_ans" else text


def truncate_middle(prompt: str, tokenizer, max_len: int) -> str:
    """pred.py's truncation: over max_len tokens, keep ids[:max_len // 2] + ids[-max_len // 2:] and decode."""
    ids = tokenizer.encode(prompt)
    if len(ids) <= max_len:
        return prompt
    ids = ids[:max_len // 2] + ids[-max_len // 2:]
    return tokenizer.decode(ids, skip_special_tokens=True)


def extract_answer(response: str) -> str | None:
    """pred.py's extract_answer: the letter of "The correct answer is (X)", else of "The correct answer is X"."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match:
        return match.group(1)
    match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def judge(response: str, answer: str, compensated: bool = False) -> float:
    """1 if the extracted letter is the answer, else 0 (0.25 for no letter with `compensated`, as result.py)."""
    pred = extract_answer(response.strip())
    if pred is None and compensated:
        return 0.25
    return float(pred == answer)


def accuracy(records: list[dict], responses: list[str], compensated: bool = False) -> dict:
    """result.py's table in %: overall, easy, hard, short, medium, long (None for an empty group), and the counts."""
    groups = {g: [] for g in ("overall", "easy", "hard", "short", "medium", "long")}
    for rec, resp in zip(records, responses, strict=True):
        acc = judge(resp, rec["answer"], compensated)
        groups["overall"].append(acc)
        groups["easy" if rec["difficulty"] == "easy" else "hard"].append(acc)
        groups[rec["length"] if rec["length"] in ("short", "medium") else "long"].append(acc)
    out = {g: (round(100 * sum(v) / len(v), 1) if v else None) for g, v in groups.items()}
    out["n"] = {g: len(v) for g, v in groups.items()}
    return out


def to_prompts(records: list[dict], tokenizer=None, max_len: int | None = None, cot: bool = False) -> list[dict]:
    """Prompts-file records for the sampler (its `prompt` field is the whole user message) carrying what scoring
    needs: `answers` = [the letter], `metric` "choice", `difficulty`, `length`, `domain`; cut in the middle when a
    tokenizer and max_len are given."""
    out = []
    for rec in records:
        prompt = build_prompt(rec, "0shot_cot" if cot else "0shot")
        if tokenizer is not None and max_len is not None:
            prompt = truncate_middle(prompt, tokenizer, max_len)
        out.append({"id": f"longbench_v2/{rec['_id']}", "dataset": "longbench_v2", "kind": "longbench_v2",
                    "prompt": prompt, "context": "", "question": rec["question"], "answers": [rec["answer"]],
                    "metric": "choice", "difficulty": rec["difficulty"], "length": rec["length"],
                    "domain": rec["domain"], "sub_domain": rec["sub_domain"], "cot": cot,
                    **({"choices": {k: rec[f"choice_{k}"] for k in "ABCD"}} if cot else {})})
    return out


def cot_answer_prompts(prompts: list[dict], samples: list[dict]) -> list[dict]:
    """The second pass of the chain-of-thought evaluation: per first-pass samples record (its outputs[0], stripped,
    is the reasoning), the 0shot_cot_ans prompt (context omitted, as the official template)."""
    by_id = {p["id"]: p for p in prompts}
    out = []
    for s in samples:
        p = by_id[s["id"]]
        rec = {"context": "", "question": p["question"], **{f"choice_{k}": v for k, v in p["choices"].items()}}
        out.append(dict(p, prompt=build_prompt(rec, "0shot_cot_ans", s["outputs"][0].strip()), cot_pass=2,
                        reasoning=s["outputs"][0].strip()))
    return out
