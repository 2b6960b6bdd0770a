"""Provenance: how an output was made, written beside it, and the check that a resume keeps to it.

Every stage writes `<output>.meta.json` beside a file output (`<folder>/meta.json` for a folder output such as
training's `output_dir` or the pipeline's run directory):

    {"stage": "sample", "settings": {...}, "model": {"path": ..., "config_sha256": ...},
     "sealong_version": "0.1.0", "git_commit": "..." or null, "torch": "2.13.0", "created": "2026-...Z"}

`settings` are the options that change the records (for the sampler: model, N, temperature, top-p/k, seed, ...);
records carry the ones that matter to them too (samples: `sampler`, scores and pairs: `scorer` as well), so a
file tells how it was made even apart from its meta file. A stage that resumes into an output made with other
settings stops and names every difference (`check_resume`) instead of mixing records of two settings.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import subprocess

import torch

import sealong
from sealong.jsonl import write_atomic


def meta_path(path: str, directory: bool = False) -> str:
    return os.path.join(path, "meta.json") if directory else str(path) + ".meta.json"


def file_sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model: str | None) -> dict | None:
    """A model folder as its absolute path and the sha256 of its config.json (None: no model, e.g. the default
    embedder; a name that is not a folder is kept as given)."""
    if model is None:
        return None
    folder = os.path.abspath(model) if os.path.isdir(model) else model
    return {"path": folder, "config_sha256": file_sha256(os.path.join(folder, "config.json"))}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the sealong checkout in use (None when it is not a git checkout or git is missing)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(sealong.__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def settings_of(args) -> dict:
    """The plain options (strings, numbers, booleans, None) of an argparse Namespace, by name."""
    return {k: v for k, v in sorted(vars(args).items())
            if not k.startswith("_") and (v is None or isinstance(v, (str, int, float, bool)))}


def stage_meta(stage: str, settings: dict, model: str | None = None) -> dict:
    return {"stage": stage, "settings": settings, "model": model_fingerprint(model),
            "sealong_version": sealong.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def read_meta(path: str, directory: bool = False) -> dict | None:
    meta = meta_path(path, directory)
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta}: not a valid meta file ({err}); delete it if the output is yours") from None
    if not isinstance(value, dict) or not isinstance(value.get("settings"), dict):
        raise ValueError(f"{meta}: not a valid meta file (no settings); delete it if the output is yours")
    return value


def write_meta(path: str, meta: dict, directory: bool = False) -> str:
    target = meta_path(path, directory)
    write_atomic(target, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return target


def same_folder_copy(saved: dict, now: dict, key: str) -> bool:
    """A model folder recorded as `key` (its path) and `key`_config_sha256 counts as the same model at another path
    (a copied run directory, `cp -r run run-sft`; a moved checkpoint) when the sha256 of its config.json is
    recorded on both sides and equal and the folder keeps its name (base_model is not round_1/after_model, whose
    config.json is the same)."""
    sha, old, new = f"{key}_config_sha256", saved.get(key), now.get(key)
    return (saved.get(sha) is not None and saved.get(sha) == now.get(sha) and isinstance(old, str)
            and isinstance(new, str) and os.path.basename(old.rstrip("/")) == os.path.basename(new.rstrip("/")))


def differences(saved: dict, now: dict) -> list[str]:
    """'key: output X, now Y' for every setting that differs (a key missing on one side counts); a model folder's
    path does not count when its config sha256 matches (`same_folder_copy`)."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: output {saved.get(k, '(none)')!r}, now {now.get(k, '(none)')!r}" for k in keys
            if saved.get(k, "(none)") != now.get(k, "(none)") and not same_folder_copy(saved, now, k)]


def _first_record_settings(path: str, key: str | None) -> dict | None:
    from sealong.jsonl import numbered_records

    for _, record in numbered_records(path):
        value = record.get(key) if key else None
        return value if isinstance(value, dict) else None
    return None


def check_resume(path: str, stage: str, settings: dict, has_records: bool, what: str = "output",
                 record_key: str | None = None) -> None:
    """Before resuming into `path`: refuse when its saved settings differ from `settings`, naming each difference.

    The saved settings are the meta file's, else (a meta file lost) those carried by the output's first record
    under `record_key`. An output with no records is started afresh whatever its meta file says.
    """
    if not has_records:
        return
    meta = read_meta(path)
    saved = meta["settings"] if meta is not None else _first_record_settings(path, record_key)
    if saved is None:
        return  # made before settings were recorded: nothing to compare
    differ = differences(saved, settings)
    if differ:
        raise ValueError(f"{what} {path} was made by `sealong {stage}` with other settings; resuming would mix "
                         f"records of both ({'; '.join(differ)}). Use the same settings, or another {what}")


def start(path: str, stage: str, settings: dict, has_records: bool, model: str | None = None,
          what: str = "output", record_key: str | None = None) -> dict:
    """check_resume, then write the meta file (kept as it is when resuming); returns the meta dict."""
    settings = json.loads(json.dumps(settings))  # as the meta file holds them (tuples are lists)
    check_resume(path, stage, settings, has_records, what, record_key)
    meta = read_meta(path) if has_records else None
    if meta is None or meta.get("settings") != settings:
        meta = stage_meta(stage, settings, model)
        write_meta(path, meta)
    return meta
