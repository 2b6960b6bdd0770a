"""Reading samples files with gold answers (the evaluation's input): one definition for report.py and suite.py."""


def read_samples(path: str) -> list[dict]:
    """Samples records with gold answers; errors name the file and line."""
    from sealong.jsonl import IdChecker, JsonlError, numbered_records

    out, check_id = [], IdChecker(path)
    for k, r in numbered_records(path, required=("id", "outputs", "answers")):
        check_id(k, r["id"])
        if not isinstance(r["outputs"], list) or not r["outputs"] or not all(isinstance(o, str) for o in r["outputs"]):
            raise JsonlError(f"{path}:{k}: (id {r['id']!r}) 'outputs' must be a non-empty list of strings")
        if not isinstance(r["answers"], list) or not r["answers"] or not all(isinstance(a, str) for a in r["answers"]):
            raise JsonlError(f"{path}:{k}: (id {r['id']!r}) 'answers' must be a non-empty list of strings")
        n = len(r["outputs"])
        r.setdefault("num_tokens", [len(o.split()) for o in r["outputs"]])
        r.setdefault("finish_reasons", ["stop"] * n)
        for key, kinds in (("num_tokens", (int, float)), ("finish_reasons", str)):
            value = r[key]
            if (not isinstance(value, list) or len(value) != n
                    or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)):
                raise JsonlError(f"{path}:{k}: (id {r['id']!r}) {key!r} must be a list of {n} "
                                 f"{'numbers' if key == 'num_tokens' else 'strings'}")
        if not isinstance(r.get("dataset", "all"), str):
            raise JsonlError(f"{path}:{k}: (id {r['id']!r}) 'dataset' must be a string")
        r.setdefault("dataset", "all")
        out.append(r)
    if not out:
        raise ValueError(f"{path}: no records")
    return out
