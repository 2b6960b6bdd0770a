"""JSON lines files of a run directory: read with file:line errors, append-only writes, resume by id.

Every stage writes one record per question as one line, appended and flushed (`append_jsonl`). A crash can
leave at most one torn last line (no trailing newline); `repair_torn_tail` cuts it off before a stage
resumes, and `completed_ids` tells the stage which ids are already done. Lines are decoded as UTF-8 and parsed
with `json.loads`, never evaluated; every error names the file, the line and the column. Ids are strings or
integers (never bools: `true` is not the id 1) and unique within a file (`IdChecker`).
"""

import json
import os

from sealong.lock import disk_full


class JsonlError(ValueError):
    """A malformed JSON lines file; the message starts with `path:line:`."""


def json_lines(path: str):
    """Yield (line number, decoded JSON value) for the non-blank lines of a JSON lines file.

    Each line is decoded as UTF-8 and parsed without its line ending, so errors name the file, the line and the
    real column: a non-UTF-8 byte, or invalid JSON (a line torn by a crash says where it stops). JsonlError.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise JsonlError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); convert the file to UTF-8") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def numbered_records(path: str, required: tuple[str, ...] = ()):
    """Yield (line number, record) for the records (dicts) of a JSON lines file; blank lines are skipped.

    Raises JsonlError naming the file and line for a line that is not UTF-8, not JSON, not a JSON object, or
    lacks a required field. Callers that check fields of their own use the line number in their errors.
    """
    for lineno, record in json_lines(path):
        if not isinstance(record, dict):
            raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            raise JsonlError(f"{path}:{lineno}: missing field(s) {', '.join(map(repr, missing))}")
        yield lineno, record


def check_id(value, where: str, key: str = "id"):
    """An id is a string or an integer (not a bool: `true` would equal the id 1, nor a float, list or object)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise JsonlError(f"{where}: {key!r} must be a string or an integer, got {type(value).__name__} {value!r}")
    return value


class IdChecker:
    """Checks the ids of one file as they are read: type (check_id) and uniqueness, with both lines named."""

    def __init__(self, path: str, key: str = "id"):
        self.path, self.key, self.first_line = path, key, {}

    def __call__(self, lineno: int, value):
        where = f"{self.path}:{lineno}"
        check_id(value, where, self.key)
        if value in self.first_line:
            raise JsonlError(f"{where}: duplicate {self.key} {value!r} (first at line {self.first_line[value]})")
        self.first_line[value] = lineno
        return value


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
    return {check_id(record[key], f"{path}:{n}", key) for n, record in numbered_records(path, required=(key,))}


def append_jsonl(path: str, records, fsync: bool = True) -> None:
    """Append records (dicts), one line each, flushed (and fsynced) so a crash loses at most the line in flight.

    A full disk raises OutputError: the complete lines already in the file are kept (a torn last one is cut
    when the stage resumes) and a re-run continues after them."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as err:
        full = disk_full(err, path, "every complete record written before is kept; free space and re-run to resume")
        if full is None:
            raise
        raise full from None


def fsync_path(path: str) -> None:
    """Flush a file, or a folder's entries, to disk (folders cannot be fsynced on every file system)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str, path: str) -> None:
    """Rename a finished temporary file over `path` durably: the file's data on disk first, then the rename,
    then the folder entry; a crash (even a power loss) leaves the old file or the new one, never an empty one."""
    fsync_path(str(tmp))
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_atomic(path: str, text) -> None:
    """Write `text` (a string, or an iterable of strings written one by one) to `path` through `path.tmp` and
    `publish`. A full disk raises OutputError; the previous file is kept."""
    path = str(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for chunk in [text] if isinstance(text, str) else text:
                f.write(chunk)
        publish(tmp, path)
    except OSError as err:
        full = disk_full(err, path, "the previous version of the file (if any) is kept")
        if full is None:
            raise
        if os.path.exists(tmp):
            os.remove(tmp)
        raise full from None


def write_jsonl_atomic(path: str, records) -> int:
    """Write all records (dicts), one line each, with write_atomic; returns their number."""
    count = [0]

    def lines():
        for record in records:
            count[0] += 1
            yield json.dumps(record, ensure_ascii=False) + "\n"

    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    write_atomic(path, lines())
    return count[0]
