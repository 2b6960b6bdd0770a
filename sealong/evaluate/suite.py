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
    from .report import read_samples

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
