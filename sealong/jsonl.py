"""JSON lines files of a run directory: read with file:line errors, append-only writes, resume by id.

Every stage writes one record per question as one line, appended and flushed (`append_jsonl`). A crash can
leave at most one torn last line (no trailing newline); `repair_torn_tail` cuts it off before a stage
resumes, and `completed_ids` tells the stage which ids are already done. Lines are parsed with `json.loads`,
never evaluated.
"""

import json
import os


class JsonlError(ValueError):
    """A malformed JSON lines file; the message starts with `path:line:`."""


def numbered_records(path: str, required: tuple[str, ...] = ()):
    """Yield (line number, record) for the records (dicts) of a JSON lines file; blank lines are skipped.

    Raises JsonlError naming the file and line for a line that is not a JSON object or lacks a required field.
    Callers that check fields of their own use the line number in their errors.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise JsonlError(f"{path}:{lineno}: missing field(s) {', '.join(map(repr, missing))}")
            yield lineno, record


def read_jsonl(path: str, required: tuple[str, ...] = ()):
    """Yield the records of a JSON lines file (see numbered_records for the checks and errors)."""
    for _, record in numbered_records(path, required):
        yield record


def repair_torn_tail(path: str) -> int:
    """Cut a torn last line (one without its newline, left by a crash mid-write); returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # walk back to the last newline
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        f.truncate(keep)
        return size - keep


def completed_ids(path: str, key: str = "id") -> set:
    """Ids already written to `path` (after cutting a torn last line); empty when the file does not exist."""
    if not os.path.exists(path):
        return set()
    repair_torn_tail(path)
    return {record[key] for record in read_jsonl(path, required=(key,))}


def append_jsonl(path: str, records, fsync: bool = True) -> None:
    """Append records (dicts), one line each, flushed (and fsynced) so a crash loses at most the line in flight."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
