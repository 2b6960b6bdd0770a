"""MuSiQue reader for the official JSON-lines format (Trivedi et al., TACL 2022, CC BY 4.0).

One record per line with the keys `id`, `paragraphs` (list of `{idx, title, paragraph_text, is_supporting}`),
`question`, `question_decomposition`, `answer`, `answer_aliases`, `answerable`. Every record is validated; a
malformed one raises `ValueError` naming the file and line.

Training never sees an answer: `MusiqueRecord.prompt_fields()` is the only view the long-context builder and
the sampling stage use, and it carries the id, question and paragraphs only. The answers live in
`MusiqueRecord.answers`, read by evaluation alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sealong import jsonl


@dataclass(frozen=True)
class Paragraph:
    idx: int
    title: str
    text: str
    is_supporting: bool


@dataclass(frozen=True)
class MusiqueRecord:
    id: str
    question: str
    paragraphs: tuple[Paragraph, ...]
    answerable: bool = True
    answers: tuple[str, ...] = field(default=(), repr=False)  # answer + aliases: evaluation only

    @property
    def hops(self) -> int:
        """Number of hops from the id prefix (`2hop__`, `3hop1__`, `4hop3__`); 0 when the id has no such prefix."""
        head = self.id.split("__", 1)[0]
        return int(head[0]) if head[:1].isdigit() and "hop" in head else 0

    @property
    def supporting(self) -> list[Paragraph]:
        return [p for p in self.paragraphs if p.is_supporting]

    def prompt_fields(self) -> dict:
        """The fields a training prompt may use: no answer, no alias, no decomposition answers."""
        return {"id": self.id, "question": self.question, "hops": self.hops}


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


def parse_record(obj, where: str) -> MusiqueRecord:
    """Validate one decoded JSON object; `where` is `file:line` for the error message."""
    _require(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    for key, kind in (("id", str), ("question", str), ("paragraphs", list)):
        _require(key in obj, where, f"missing field {key!r}")
        _require(isinstance(obj[key], kind), where, f"field {key!r} must be {kind.__name__}, got {type(obj[key]).__name__}")
    _require(obj["id"].strip() != "", where, "field 'id' is empty")
    _require(obj["question"].strip() != "", where, f"record {obj['id']!r}: field 'question' is empty")
    answerable = obj.get("answerable", True)
    _require(isinstance(answerable, bool), where, "field 'answerable' must be true or false")
    paragraphs = []
    for k, p in enumerate(obj["paragraphs"]):
        at = f"{where}: paragraphs[{k}]"
        _require(isinstance(p, dict), at, "expected an object")
        for key, kind in (("title", str), ("paragraph_text", str), ("is_supporting", bool)):
            _require(key in p, at, f"missing field {key!r}")
            _require(isinstance(p[key], kind), at, f"field {key!r} must be {kind.__name__}")
        idx = p.get("idx", k)
        _require(isinstance(idx, int) and not isinstance(idx, bool), at, "field 'idx' must be an integer")
        paragraphs.append(Paragraph(idx, p["title"], p["paragraph_text"], p["is_supporting"]))
    answer = obj.get("answer", "")
    aliases = obj.get("answer_aliases", []) or []
    _require(isinstance(answer, str), where, "field 'answer' must be a string")
    _require(isinstance(aliases, list) and all(isinstance(a, str) for a in aliases), where,
             "field 'answer_aliases' must be a list of strings")
    if answerable:
        _require(any(p.is_supporting for p in paragraphs), where,
                 f"record {obj['id']!r} is answerable but has no supporting paragraph")
        _require(answer.strip() != "", where, f"record {obj['id']!r} is answerable but has an empty 'answer'")
    answers = tuple(dict.fromkeys(a for a in [answer, *aliases] if a.strip()))
    return MusiqueRecord(obj["id"], obj["question"], tuple(paragraphs), answerable, answers)


def read_musique(path: str | Path, answerable_only: bool = True) -> list[MusiqueRecord]:
    """Read a MuSiQue JSON-lines file; unanswerable records are skipped unless `answerable_only=False`.

    Blank lines are ignored; duplicate ids are an error (they would collide in every resumable stage).
    """
    records, seen = [], {}
    for where, lineno, obj in json_lines(path, "MuSiQue"):
        rec = parse_record(obj, where)
        _require(rec.id not in seen, where, f"duplicate id {rec.id!r} (first at line {seen.get(rec.id)})")
        seen[rec.id] = lineno
        if rec.answerable or not answerable_only:
            records.append(rec)
    return records


def hop_balanced_slice(records: list[MusiqueRecord], n: int, seed: int) -> list[MusiqueRecord]:
    """`n` records drawn seeded and evenly across hop counts (round-robin over the hop counts in increasing order,
    each count's records in a `random.Random(seed)` order; a count that runs out leaves its turns to the others),
    returned in file order. The dev file's own order (all 2-hop first) never decides the evaluation slice."""
    import random

    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.hops, []).append(i)
    queues = []
    for hops in sorted(groups):
        order = groups[hops][:]
        rng.shuffle(order)
        queues.append(order)
    picked: list[int] = []
    while len(picked) < min(n, len(records)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return [records[i] for i in sorted(picked)]


def json_lines(path: str | Path, kind: str):
    """Yield (`file:line`, line number, decoded object) for the non-blank lines of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    for lineno, obj in jsonl.json_lines(str(path)):  # non-UTF-8 or invalid JSON: file, line and column
        yield f"{path}:{lineno}", lineno, obj


def to_json(rec: MusiqueRecord, decomposition: list | None = None) -> dict:
    """The official MuSiQue layout of a record (used by the built-in world to write its files)."""
    answers = list(rec.answers)
    return {
        "id": rec.id,
        "paragraphs": [{"idx": p.idx, "title": p.title, "paragraph_text": p.text, "is_supporting": p.is_supporting}
                       for p in rec.paragraphs],
        "question": rec.question,
        "question_decomposition": decomposition or [],
        "answer": answers[0] if answers else "",
        "answer_aliases": answers[1:],
        "answerable": rec.answerable,
    }
