"""LongBench v1 reader and a MuSiQue -> LongBench converter.

LongBench v1 JSON lines carry `input` (the question), `context`, `answers` (list of strings), `length`,
`dataset`, `language`, `all_classes`, `_id`. SEALONG evaluates on Qasper, MultiFieldQA-en, HotpotQA, MuSiQue and
2WikiMQA. `to_prompt(record)` gives the prompt-file layout the sampling stage reads (`id`, `context`, `question`,
and `answers`, `dataset` carried along for evaluation).
"""

from __future__ import annotations

from pathlib import Path

from .musique import MusiqueRecord, json_lines

PAPER_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "musique", "2wikimqa")
REQUIRED = {"input": str, "context": str, "answers": list, "_id": str}


def parse_longbench(obj, where: str, dataset: str | None = None) -> dict:
    """Validate one LongBench record; `dataset` fills a missing `dataset` field (e.g. from the file name)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in REQUIRED.items():
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], kind):
            raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(obj[key]).__name__}")
    if not obj["answers"] or not all(isinstance(a, str) for a in obj["answers"]):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings")
    rec = dict(obj)
    rec.setdefault("dataset", dataset)
    if not isinstance(rec["dataset"], str) or not rec["dataset"]:
        raise ValueError(f"{where}: field 'dataset' missing and not given")
    rec.setdefault("language", "en")
    rec.setdefault("all_classes", None)
    rec.setdefault("length", len(rec["context"].split()))
    return rec


def read_longbench(path: str | Path, dataset: str | None = None) -> list[dict]:
    """Read a LongBench v1 JSON-lines file (e.g. `musique.jsonl`); the task defaults to the file's stem."""
    path = Path(path)
    out, seen = [], set()
    for where, _, obj in json_lines(path, "LongBench"):
        rec = parse_longbench(obj, where, dataset or path.stem.removesuffix("_e"))
        key = (rec["dataset"], rec["_id"])
        if key in seen:
            raise ValueError(f"{where}: duplicate _id {rec['_id']!r} in task {rec['dataset']!r}")
        seen.add(key)
        out.append(rec)
    return out


def musique_to_longbench(rec: MusiqueRecord, context: str | None = None, dataset: str = "musique") -> dict:
    """A LongBench-format evaluation record from a MuSiQue record.

    `context` defaults to the record's own paragraphs as `Passage i:` blocks in their order; pass a context from
    `sealong.data.context` for a long one. Answers = the answer and its aliases.
    """
    if not rec.answers:
        raise ValueError(f"record {rec.id!r} has no answer: an unanswerable question cannot be an evaluation record")
    if context is None:
        from .context import SEPARATOR, format_passage

        context = SEPARATOR.join(format_passage(i, p) for i, p in enumerate(rec.paragraphs, 1))
    return {"input": rec.question, "context": context, "answers": list(rec.answers),
            "length": len(context.split()), "dataset": dataset, "language": "en", "all_classes": None,
            "_id": rec.id}


def to_prompt(rec: dict) -> dict:
    """The prompts-file record for the sampling stage: `id`, `context`, `question`, plus `answers`, `dataset`."""
    return {"id": f"{rec['dataset']}/{rec['_id']}", "context": rec["context"], "question": rec["input"],
            "answers": rec["answers"], "dataset": rec["dataset"]}
