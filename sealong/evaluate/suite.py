"""The generalization table: every evaluation task, before vs after, on the same questions (`sealong eval --suite`).

Tasks are the `dataset` of the samples records, each scored on its greedy output (outputs[0]) by the record's
`metric`:
    subem              LongBench v1 (the paper's SubEM, max over the gold answers; records without `metric`)
    string_match_all   RULER niah / vt / cwe / fwe: the share of the expected strings in the output
    string_match_part  RULER QA: 1 if any expected string is in the output
    choice             LongBench v2: the extracted letter (official extraction) equals the answer; its rows by
                       difficulty (easy / hard) and length (short / medium / long) follow the overall one
One row per task: n = the questions in both files (a question in one file only is left out and counted), the mean
score before and after (%), the difference and its 95% paired confidence interval: with d_i = after_i - before_i
over the n questions, mean(d) +- 1.959964 * sd(d) / sqrt(n), sd with n - 1 (the normal approximation of the
paired difference; none for n < 2), and for 0/1 scores the exact McNemar p-value (sealong.evaluate.metrics).

    sealong eval --suite --before runs/x/before/suite_greedy.jsonl,runs/x/before/greedy.jsonl \\
        --after runs/x/after/suite_greedy.jsonl,runs/x/after/greedy.jsonl --out-dir runs/x/suite
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .metrics import best_over_answers, mcnemar_exact

log = logging.getLogger("sealong.eval")
Z95 = 1.959964


def record_score(rec: dict, output: str) -> float:
    """The score in [0, 1] of one output for its record, by the record's `metric` (default subem)."""
    from sealong.data import longbench_v2, ruler

    metric = rec.get("metric", "subem")
    if metric in ruler.METRICS:
        return ruler.METRICS[metric](output, rec["answers"])
    if metric == "choice":
        return longbench_v2.judge(output, rec["answers"][0])
    if metric in ("subem", "f1"):
        return best_over_answers(output, rec["answers"], metric)
    raise ValueError(f"record {rec.get('id')!r}: unknown metric {metric!r}")


def task_scores(records: list[dict]) -> dict[str, dict]:
    """{task: {"metric": name, "scores": {id: score}}} of greedy samples records (outputs[0]); LongBench v2 adds
    "longbench_v2 (easy)", ... rows."""
    out: dict[str, dict] = {}
    for r in records:
        metric = r.get("metric", "subem")
        s = record_score(r, r["outputs"][0])
        tasks = [r.get("dataset", "all")]
        if metric == "choice":
            tasks += [f"{tasks[0]} ({'easy' if r.get('difficulty') == 'easy' else 'hard'})",
                      f"{tasks[0]} ({r.get('length') if r.get('length') in ('short', 'medium') else 'long'})"]
        for t in tasks:
            row = out.setdefault(t, {"metric": "accuracy" if metric == "choice" else metric, "scores": {}})
            if r["id"] in row["scores"]:
                raise ValueError(f"suite: question {r['id']!r} twice in task {t!r}")
            row["scores"][r["id"]] = s
    return out


def paired_ci(before: list[float], after: list[float], z: float = Z95) -> tuple[float, float | None, float | None]:
    """(mean difference, lo, hi) of after - before over paired questions; lo = hi = None for fewer than 2."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_ci: need equal non-empty lists, got {len(before)} and {len(after)}")
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    m = sum(d) / n
    if n < 2:
        return m, None, None
    half = z * math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
    return m, m - half, m + half


def suite_rows(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per task present before and after, over the questions in both (see the module docstring)."""
    b, a = task_scores(before), task_scores(after)
    rows = []
    for task in sorted(set(b) & set(a), key=_task_key):
        common = sorted(set(b[task]["scores"]) & set(a[task]["scores"]))
        dropped = len(set(b[task]["scores"]) ^ set(a[task]["scores"]))
        if not common:
            continue
        xs, ys = [b[task]["scores"][i] for i in common], [a[task]["scores"][i] for i in common]
        diff, lo, hi = paired_ci(xs, ys)
        binary = all(v in (0.0, 1.0) for v in xs + ys)
        rows.append({"task": task, "metric": b[task]["metric"], "n": len(common), "dropped": dropped,
                     "before": 100 * sum(xs) / len(xs), "after": 100 * sum(ys) / len(ys), "diff": 100 * diff,
                     "ci": None if lo is None else [100 * lo, 100 * hi],
                     "p": mcnemar_exact(xs, ys)["p_value"] if binary else None})
    for task in sorted(set(b) ^ set(a)):
        log.warning(f"suite: task {task!r} is only in the {'before' if task in b else 'after'} files: no row")
    return rows


def _task_key(task: str):
    family = 0 if task.startswith("ruler_") else 1 if task.startswith("longbench_v2") else -1
    return (family, task)


def suite_markdown(rows: list[dict]) -> str:
    """The table: task, metric, n, before, after, difference [95% paired CI], McNemar p."""
    lines = ["| task | metric | n | before | after | after - before [95% paired CI] | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}]" if r["ci"] else ""
        p = f"{r['p']:.3g}" if r["p"] is not None else ""
        n = f"{r['n']}" + (f" ({r['dropped']} unpaired left out)" if r["dropped"] else "")
        lines.append(f"| {r['task']} | {r['metric']} | {n} | {r['before']:.1f} | {r['after']:.1f} | "
                     f"{r['diff']:+.1f}{ci} | {p} |")
    return "\n".join(lines) + "\n"


SUITE_LEGEND = """- One row per task, greedy outputs, the same questions before and after. **subem**: LongBench v1's SubEM (the
  paper's); **string_match_all**: RULER's recall of the expected strings; **accuracy**: LongBench v2's multiple
  choice (official answer extraction), by difficulty and length below its overall row.
- **[95% paired CI]**: mean of the per-question differences +- 1.96 x their standard deviation / sqrt(n); **McNemar
  p**: exact test of the discordant questions, for 0/1 scores."""


def suite_section(rows: list[dict], title: str = "## Generalization suite: every task before vs after") -> str:
    if not rows:
        return ""
    return f"{title}\n\n{suite_markdown(rows)}\n{SUITE_LEGEND}\n"


def write_suite(rows: list[dict], out_dir: str | Path) -> dict:
    from sealong.jsonl import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "suite.md", "json": out / "suite.json"}
    write_atomic(str(paths["md"]), "# Evaluation suite\n\n" + suite_section(rows, "## Before vs after"))
    write_atomic(str(paths["json"]), json.dumps(rows, indent=1) + "\n")
    return paths


def read_files(spec: str) -> list[dict]:
    """Samples records of comma-separated files (greedy outputs; ids unique across them)."""
    from .samples import read_samples

    out, seen = [], set()
    for path in (p.strip() for p in spec.split(",") if p.strip()):
        for r in read_samples(path):
            if r["id"] in seen:
                raise ValueError(f"{path}: id {r['id']!r} also in an earlier file")
            seen.add(r["id"])
            out.append(r)
    return out


def run_suite(args) -> int:
    """`sealong eval --suite --before FILES --after FILES [--out-dir DIR]`."""
    if not args.before or not args.after:
        raise ValueError("eval --suite: give --before FILES and --after FILES (greedy samples, comma-separated)")
    rows = suite_rows(read_files(args.before), read_files(args.after))
    if not rows:
        raise ValueError("eval --suite: no task has a question in both the before and the after files")
    out_dir = args.out_dir or str(Path(args.after.split(",")[0]).parent / "suite")
    paths = write_suite(rows, out_dir)
    print(suite_markdown(rows))
    log.info("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---- the pipeline's suite steps (sealong.pipeline) ---------------------------------------------------------------

def file_kind(path: str) -> str:
    """"longbench" (v1), "longbench_v2" or "ruler" (written by `sealong synth --ruler`), from the file's first
    record."""
    from sealong.data.longbench_v2 import is_longbench_v2

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--eval-files: file not found: {path}")
    with p.open(encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        return "longbench_v2"
    line = head.split("\n", 1)[0]
    try:
        obj = json.loads(line)
    except ValueError:
        return "longbench"  # the v1 reader names the bad line
    if is_longbench_v2(obj):
        return "longbench_v2"
    return "ruler" if isinstance(obj, dict) and obj.get("kind") == "ruler" else "longbench"


def demo_ruler(r, model: str) -> list[dict]:
    """The offline demo's RULER slice, kept small (the default demo takes minutes on 2 cores): every task, 2 records
    at 512 tokens (RULER's smallest length that holds cwe's solved example), words from the tiny model's closed
    vocabulary, the run's world passages as the haystack."""
    from sealong.data import ruler
    from sealong.jsonl import read_jsonl
    from sealong.model import ModelConfig, load_tokenizer

    tok = load_tokenizer(model)
    positions = ModelConfig.from_folder(model).max_position_embeddings
    world = r.run / "world_musique.jsonl"
    passages = ([p["paragraph_text"] for rec in read_jsonl(str(world)) for p in rec["paragraphs"]]
                if world.is_file() else [])
    vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2]
    cfg = ruler.RulerConfig(lengths=(min(512, positions),), per_task=2,
                            seed=r.configs["synth"].seed, haystack="passages", vocabulary=vocab,
                            passages=list(dict.fromkeys(passages)), tokens_to_generate=r.configs["sample"].max_new_tokens)
    records = ruler.generate(tok, cfg)
    ruler.check_writable(tok, records)
    return records


def suite_prompts(r, model: str) -> Path | None:
    """run_dir/suite_prompts.jsonl: the RULER and LongBench v2 records of --eval-files (v2 prompts cut in the
    middle to the model's window as the official code does), or the demo's RULER slice; None when there are none."""
    from sealong.data import longbench_v2
    from sealong.jsonl import read_jsonl, write_jsonl_atomic

    out = r.run / "suite_prompts.jsonl"
    if out.is_file():
        return out
    files = [f.strip() for f in r.args.eval_files.split(",")] if r.args.eval_files else []
    records = []
    for f in files:
        kind = file_kind(f)
        if kind == "ruler":
            records += list(read_jsonl(f))
        elif kind == "longbench_v2":
            from sealong.data.prompts import chat_token_ids
            from sealong.model import ModelConfig, load_tokenizer

            tok = load_tokenizer(model)
            s = r.configs["sample"]
            limit = s.max_prompt_tokens or ModelConfig.from_folder(model).max_position_embeddings - s.max_new_tokens
            overhead = len(chat_token_ids(tok, "")) if getattr(tok, "chat_template", None) else 0
            records += longbench_v2.to_prompts(longbench_v2.read_longbench_v2(f), tok, limit - overhead)
    if not files and r.args.model is None:
        records = demo_ruler(r, model)
    if not records:
        return None
    n = write_jsonl_atomic(str(out), records)
    r.say(f"suite: {n} RULER / LongBench v2 prompts -> {out}")
    return out


def suite_sample(r, model: str, prompts: Path | None, folder: Path, sample) -> None:
    """Greedy outputs of `model` on the suite prompts into folder/suite_greedy.jsonl (resumed by id)."""
    if prompts is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    r.say(f"suite: greedy outputs on {prompts.name} -> {folder / 'suite_greedy.jsonl'}")
    sample(r, model, prompts, folder / "suite_greedy.jsonl", num_samples=1, temperature=0.0, adaptive_block=0)


def pipeline_section(r, after_dir: Path) -> str:
    """summary.md's generalization table (also run_dir/suite.md, suite.json): every task of before/ vs after_dir,
    from the held-out greedy outputs (greedy.jsonl) and the suite's (suite_greedy.jsonl)."""
    def records(folder):
        files = [folder / n for n in ("greedy.jsonl", "suite_greedy.jsonl") if (folder / n).is_file()]
        return read_files(",".join(map(str, files))) if files else []

    before, after = records(r.run / "before"), records(after_dir)
    rows = suite_rows(before, after) if before and after else []
    if not rows:
        return ""
    write_suite(rows, r.run)
    return suite_section(rows)
