"""Evaluation: final-answer EM, SubEM (HELMET) and token F1 (LongBench) over samples files; greedy, MBR@N, oracle@N,
random@N, with 95% confidence intervals, the share of outputs cut at the token limit, and a paired McNemar test
of before vs after (`paired_test`).

Metrics, max over the gold answers (answer + aliases); SubEM and F1 on the whole output (no answer extraction, as
the paper); EM on the final answer (`metrics.final_answer`: the text after the last "answer is"):
    normalize(s) = collapse_whitespace(remove_articles(remove_punctuation(lower(s))))   # LongBench = HELMET
    SubEM(pred, gold) = 1 if normalize(gold) is a character substring of normalize(pred) else 0
    F1(pred, gold)    = token F1 of the whitespace tokens of normalize(pred) and normalize(gold)  (LongBench qa_f1)
Punctuation is ASCII `string.punctuation` and articles are whole words (`a`, `an`, `the`), exactly as both
references; unicode letters are lower-cased by `str.lower` and other unicode punctuation is kept. SubEM is a
substring test: gold "no" matches "not" -- reported as is (that is the paper's metric); F1 does not have the pitfall.

Modes over the samples stage's output (records with `outputs`, `num_tokens`, `finish_reasons`, `answers`, `dataset`):
    greedy    outputs[0] of a greedy (temperature 0) samples file
    MBR@n     the output the scoring stage would choose among the first n: argmax of the mean embedding cosine to the
              others (sealong_kernels.mbr_scores / select_pairs), a finished output over a truncated one
    oracle@n  the best of the first n by the metric (an upper bound)
    random@n  the expected metric of a uniformly random one of the first n (the mean over them; no draw noise)
Tables per task (`dataset`) and their macro average, in markdown and JSON, with the average output length in tokens
(the paper's check that gains do not come from longer outputs), and a PNG of oracle@n and MBR@n against n.

    python -m sealong.evaluate --greedy runs/x/eval_greedy.jsonl --sampled runs/x/eval_samples.jsonl --out-dir runs/x/eval
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from sealong.jsonl import publish, write_atomic

from .samples import read_samples  # noqa: F401 (re-exported: callers read samples files from here)
from .metrics import (METRICS, best_over_answers, final_em, mcnemar_exact, mean_interval, normalize_answer,  # noqa: F401
                      sub_em, token_f1, wilson_interval)

log = logging.getLogger("sealong.eval")


def default_ns(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself."""
    ns, n = [], 1
    while n < n_max:
        ns.append(n)
        n *= 2
    return ns + [n_max]


def mbr_choices(records: list[dict], ns: list[int], embed_model: str | None = None,
                trust_remote_code: bool = False, window: str = "last") -> list[dict[int, int]]:
    """Per record, {n: index of the output MBR chooses among the first n}."""
    import torch
    import sealong_kernels as sk

    from sealong.score.embed import embed  # the scoring stage's embeddings: MBR@n here is what `sealong score` would pick

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat = [o for r in records for o in r["outputs"]]
    log.info(f"eval: embedding {len(flat)} outputs of {len(records)} questions for MBR@n")
    emb = embed(flat, embed_model, device, 64, trust_remote_code, window).float()
    choices, start = [], 0
    for r in records:
        m = len(r["outputs"])
        e = emb[start:start + m]
        start += m
        valid = torch.tensor([bool(o.strip()) for o in r["outputs"]], device=device)
        finished = torch.tensor([f == "stop" for f in r["finish_reasons"]], device=device)
        picks = {}
        for n in ns:
            if n > m:
                continue
            if not valid[:n].any():
                picks[n] = 0  # every output empty: any pick scores the same
                continue
            scores = sk.mbr_scores(e[None, :n], valid[None, :n])
            chosen, _ = sk.select_pairs(scores, chosen_mask=finished[None, :n])
            picks[n] = int(chosen[0])
        choices.append(picks)
    return choices


SCORES = ("em", "subem", "f1")  # per output: final-answer exact match, SubEM (whole output), token F1


def output_scores(output: str, answers: list[str]) -> tuple[float, float, float]:
    """(final-answer EM, SubEM, F1) of one output, each the max over the gold answers."""
    return (max(final_em(output, a) for a in answers), best_over_answers(output, answers, "subem"),
            best_over_answers(output, answers, "f1"))


def evaluate(greedy: list[dict] | None, sampled: list[dict] | None, ns: list[int] | None = None,
             embed_model: str | None = None, mbr: bool = True, trust_remote_code: bool = False,
             settings: dict | None = None, window: str = "last") -> dict:
    """Per-task results {task: {mode: {"em", "subem", "f1", "avg_tokens", "cut", "n", "ci"}}}, their macro
    "average", the per-question outcomes of greedy and MBR@max ("per_question", for paired tests), the number of
    questions and the `settings` (model, N, temperature, embedder, seed: written into eval.md).

    em = final-answer exact match (`final_answer`), subem = HELMET's SubEM on the whole output, f1 = LongBench's;
    cut = % of the mode's outputs stopped at the token limit; ci = 95% intervals of em and subem over the
    questions (Wilson for 0/1 outcomes; a normal approximation for random@n, an average over n outputs)."""
    greedy, sampled, dropped = paired_records(greedy, sampled)
    rows: dict[str, dict[str, list[tuple]]] = {}  # task -> mode -> [(em, subem, f1, tokens, cut)]
    per_question: dict[str, dict[str, list[float]]] = {}

    def add(task, mode, r, i_or_list, table):
        idx = i_or_list if isinstance(i_or_list, list) else [i_or_list]
        vals = [table[i] + (r["num_tokens"][i], float(r["finish_reasons"][i] == "length")) for i in idx]
        rows.setdefault(task, {}).setdefault(mode, []).append(tuple(sum(v[k] for v in vals) / len(vals)
                                                                    for k in range(5)))
        return vals[0]

    for r in greedy or []:
        v = add(r["dataset"], "greedy", r, 0, [output_scores(r["outputs"][0], r["answers"])])
        per_question.setdefault("greedy", {})[r["id"]] = list(v[:3])
    if sampled:
        n_max = min(len(r["outputs"]) for r in sampled)
        ns = sorted(n for n in (ns or default_ns(n_max)) if 1 <= n <= n_max)
        if not ns:
            raise ValueError(f"ns: no value between 1 and the smallest sample count {n_max}")
        counts = {len(r["outputs"]) for r in sampled}  # several: an adaptive samples file; "@spent" = each one's own
        spent = len(counts) > 1
        picks = (mbr_choices(sampled, sorted(set(ns) | counts) if spent else ns, embed_model, trust_remote_code, window)
                 if mbr else None)
        from sealong.progress import Progress

        progress = Progress(len(sampled), "questions", "eval", log)  # a bar on a terminal, else a line every few s
        for k, r in enumerate(sampled):
            table = [output_scores(o, r["answers"]) for o in r["outputs"]]
            for n, label in [(n, str(n)) for n in ns] + ([(len(table), "spent")] if spent else []):
                best = max(range(n), key=lambda i: (table[i][1], table[i][0], table[i][2]))
                add(r["dataset"], f"oracle@{label}", r, best, table)
                add(r["dataset"], f"random@{label}", r, list(range(n)), table)
                if picks is not None:
                    v = add(r["dataset"], f"MBR@{label}", r, picks[k][n], table)
                    if label == str(ns[-1]):
                        per_question.setdefault(f"MBR@{n}", {})[r["id"]] = list(v[:3])
            progress.update(1)
        progress.close()
    result = {"tasks": {}, "ns": ns if sampled else [], "settings": dict(settings or {}),
              "questions": len({r["id"] for r in (greedy or []) + (sampled or [])}), "per_question": per_question}
    if dropped:
        result["dropped"] = dropped
    pooled: dict[str, list[tuple]] = {}
    for task, modes in sorted(rows.items()):
        result["tasks"][task] = {mode: _summarize(mode, vals) for mode, vals in modes.items()}
        for mode, vals in modes.items():
            pooled.setdefault(mode, []).extend(vals)
    modes = sorted({m for t in result["tasks"].values() for m in t}, key=_mode_key)
    result["average"] = {}
    for m in modes:
        tasks = [t[m] for t in result["tasks"].values() if m in t]
        avg = {key: sum(t[key] for t in tasks) / len(tasks) for key in ("em", "subem", "f1", "avg_tokens", "cut")}
        avg["n"] = sum(t["n"] for t in tasks)
        avg["ci"] = _summarize(m, pooled[m])["ci"]  # over the pooled questions (= the task's when there is one)
        result["average"][m] = avg
    return result


def paired_records(greedy: list[dict] | None, sampled: list[dict] | None) -> tuple:
    """(greedy, sampled, dropped): with both files given, only the questions in both, so that every row of the
    tables is over the same questions; `dropped` counts the questions left out ({} when none). Questions in
    neither file's intersection are named in the log; no common question at all is an error."""
    if not greedy or not sampled:
        return greedy, sampled, {}
    g_ids, s_ids = {r["id"] for r in greedy}, {r["id"] for r in sampled}
    if g_ids == s_ids:
        return greedy, sampled, {}
    common = g_ids & s_ids
    if not common:
        raise ValueError(f"eval: the greedy file's {len(g_ids)} questions and the sampled file's {len(s_ids)} have no "
                         "id in common: the rows could not be paired")
    dropped = {"greedy_only": len(g_ids - common), "sampled_only": len(s_ids - common), "kept": len(common)}
    log.warning(f"eval: evaluating the {len(common)} questions in both files; dropped {dropped['greedy_only']} only in "
                f"the greedy file (e.g. {sorted(g_ids - common)[:3]}) and {dropped['sampled_only']} only in the "
                f"sampled file (e.g. {sorted(s_ids - common)[:3]})")
    return [r for r in greedy if r["id"] in common], [r for r in sampled if r["id"] in common], dropped


def _summarize(mode: str, vals: list[tuple]) -> dict:
    n = len(vals)
    out = {key: 100 * sum(v[k] for v in vals) / n for k, key in enumerate(SCORES)}
    out.update(avg_tokens=sum(v[3] for v in vals) / n, cut=100 * sum(v[4] for v in vals) / n, n=n, ci={})
    for k, key in enumerate(SCORES[:2]):
        xs = [v[k] for v in vals]
        lo, hi = mean_interval(xs) if mode.startswith("random") else wilson_interval(sum(xs), n)
        out["ci"][key] = [100 * lo, 100 * hi]
    return out


def _mode_key(mode: str):
    name, _, n = mode.partition("@")
    return ({"greedy": 0, "MBR": 1, "oracle": 2, "random": 3}.get(name, 4), int(n) if n.isdigit() else 1 << 30)


LEGEND = """- **greedy**: one output at temperature 0.
- **MBR@N**: of N sampled outputs, the one with the highest mean embedding similarity to the others (the method's
  own choice, no label; an output cut at the token limit is never chosen).
- **oracle@N**: the best of the N outputs by the gold answer (an upper bound: how often ANY sample is right).
- **random@N**: the average over the N outputs (what one random sample scores).
- **@spent** (samples files of the adaptive sample count, where questions have different numbers of outputs):
  the mode over each question's own outputs; the @n modes go up to the smallest count.
- **EM**: the final answer (the text after the last "answer is") equals a gold answer after normalization;
  **SubEM**: a normalized gold answer occurs anywhere in the output (the paper's metric; it also counts an answer
  that is only mentioned on the way); **F1**: token F1 (LongBench).
- **[lo, hi]**: 95% confidence interval over the questions (Wilson score interval; random@N: normal approximation).
- **cut %**: share of the mode's outputs that stopped at the token limit (max_new_tokens) instead of ending."""


def settings_header(result: dict) -> str:
    s = result.get("settings") or {}
    parts = [f"{result.get('questions', '?')} questions"] + [f"{k}: {v}" for k, v in s.items()]
    d = result.get("dropped")
    if d:  # greedy and sampled files over different questions: only the common ones are evaluated
        parts[0] += (f" (in both files; dropped {d['greedy_only']} only in the greedy file and {d['sampled_only']} "
                     "only in the sampled file)")
    return "Settings: " + "; ".join(parts) + "\n"


def _ci(res: dict, key: str) -> str:
    lo, hi = res.get("ci", {}).get(key, (float("nan"), float("nan")))
    return f"{res[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def modes_table(result: dict) -> str:
    """Markdown: one row per mode (average over tasks): EM and SubEM with 95% CIs, F1, tokens, cut %."""
    lines = ["| mode | EM [95% CI] | SubEM [95% CI] | F1 | avg output tokens | cut at token limit % |",
             "|---|---|---|---|---|---|"]
    for m, res in result["average"].items():
        lines.append(f"| {m} | {_ci(res, 'em')} | {_ci(res, 'subem')} | {res['f1']:.1f} | {res['avg_tokens']:.1f} | "
                     f"{res['cut']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict, metric: str = "subem") -> str:
    """Tasks as rows, modes as columns, the macro average last; plus the average output length row."""
    modes = list(result["average"])
    head = f"| task ({metric}) | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes) + "\n"
    lines = []
    for task, res in result["tasks"].items():
        cells = [f"{res[m][metric]:.1f}" if m in res else "" for m in modes]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(f"{result['average'][m][metric]:.1f}" for m in modes) + " |")
    lines.append("| avg output tokens | " + " | ".join(f"{result['average'][m]['avg_tokens']:.1f}" for m in modes) + " |")
    return head + "\n".join(lines) + "\n"


def eval_markdown(result: dict, title: str = "Evaluation") -> str:
    """eval.md: settings header, the modes table with CIs, the legend, per-task SubEM / EM / F1 tables."""
    return (f"# {title}\n\n{settings_header(result)}\n{modes_table(result)}\n{LEGEND}\n\n"
            "## SubEM per task\n\n" + markdown_table(result, "subem") + "\n## EM per task\n\n"
            + markdown_table(result, "em") + "\n## F1\n\n" + markdown_table(result, "f1"))


# the lines of plot_vs_n, widest first and drawn first: where two lines coincide (a tiny model's MBR and random
# often do), the narrower one stays visible on top of the wider one, each with its own marker
LINE_STYLES = (("oracle", dict(marker="o", linestyle="-", linewidth=4.0, markersize=10, alpha=0.45, zorder=2,
                                clip_on=False)),
               ("MBR", dict(marker="s", linestyle="-", linewidth=2.2, markersize=6, zorder=3, clip_on=False)),
               ("random", dict(marker="^", linestyle="--", linewidth=1.2, markersize=4, zorder=4, clip_on=False)))


def fitted_ylim(values, span: float = 10.0) -> tuple[float, float]:
    """A y-range (percent) that fits `values`: their range with a margin, at least `span` points tall, inside
    0-100 (a fixed 0-100 axis squashes lines that all lie under 20%)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(2.0, 0.1 * (hi - lo), (span - (hi - lo)) / 2)
    lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
    if hi - lo < span:  # against 0 or 100: grow the other way
        lo, hi = (lo, min(100.0, lo + span)) if lo == 0.0 else (max(0.0, hi - span), hi)
    return lo, hi


def plot_vs_n(results: dict, path: str | Path, metric: str = "subem") -> tuple[float, float]:
    """oracle@n, MBR@n and random@n against n, greedy as a horizontal line (the paper's Figure 1): one panel per
    entry of `results` ({title: result}, e.g. before and after), side by side with ONE shared y-axis fitted to
    every panel's values (`fitted_ylim`), x ticks at the n evaluated (1, 2, 4, 8, ...). Returns the y-range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), sharey=True, squeeze=False)
    shown = []
    for ax, (title, result) in zip(axes[0], results.items()):
        ns = result["ns"]
        for name, style in LINE_STYLES:
            ys = [result["average"].get(f"{name}@{n}", {}).get(metric) for n in ns]
            if ns and all(y is not None for y in ys):
                ax.plot(ns, ys, label=f"{name}@N", **style)
                shown += ys
        if "greedy" in result["average"]:
            ax.axhline(result["average"]["greedy"][metric], color="gray", linestyle=":", linewidth=1.5, zorder=5,
                       label="greedy")
            shown.append(result["average"]["greedy"][metric])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N (samples)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ylim = fitted_ylim(shown)  # one shared scale for every panel: before and after read alike
    axes[0][0].set_ylim(*ylim)
    axes[0][0].set_ylabel(f"average {'SubEM' if metric == 'subem' else metric.upper()} (%)")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ylim


def write_report(result: dict, out_dir: str | Path, plot: bool = True, title: str = "Evaluation") -> dict:
    """eval.json, eval.md and eval_vs_n.png in out_dir, each written atomically; eval.json last, so that its
    presence (what the pipeline checks to skip an evaluation) means the report is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md"}
    _atomic_write(paths["md"], eval_markdown(result, title))
    if plot and result["ns"]:
        paths["png"] = out / "eval_vs_n.png"
        tmp = out / "eval_vs_n.tmp.png"
        plot_vs_n({f"{title}: SubEM against N": result}, tmp)
        publish(tmp, paths["png"])  # fsync, then rename
    _atomic_write(paths["json"], json.dumps(result, indent=1))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(str(path), text)  # temporary file, fsync, rename (sealong.jsonl)


def compare_table(before: dict, after: dict, metric: str = "subem") -> str:
    """Markdown: one row per mode present in both, average over tasks before and after (95% CIs), the change."""
    lines = [f"| mode | before ({metric}) | after ({metric}) | change | tokens before | tokens after | cut % before | "
             "cut % after |", "|---|---|---|---|---|---|---|---|"]
    for m in before["average"]:
        if m in after["average"]:
            b, a = before["average"][m], after["average"][m]
            cell = (lambda r: _ci(r, metric)) if metric in b.get("ci", {}) else (lambda r: f"{r[metric]:.1f}")
            lines.append(f"| {m} | {cell(b)} | {cell(a)} | {a[metric] - b[metric]:+.1f} | "
                         f"{b['avg_tokens']:.1f} | {a['avg_tokens']:.1f} | {b.get('cut', 0):.1f} | {a.get('cut', 0):.1f} |")
    return "\n".join(lines) + "\n"


def paired_test(before: dict, after: dict, mode: str = "greedy", metric: str = "em") -> dict | None:
    """Exact McNemar test of `mode`'s per-question `metric` (0/1) before vs after, over the questions in both."""
    b, a = before.get("per_question", {}).get(mode), after.get("per_question", {}).get(mode)
    if not b or not a:
        return None
    k = SCORES.index(metric)
    ids = sorted(set(b) & set(a))
    return mcnemar_exact([b[i][k] for i in ids], [a[i][k] for i in ids])


def summary_markdown(before: dict, after: dict, n: int, run_dir, plot_name: str, dev_check: dict | None = None,
                     mode: str = "orpo", rounds: int = 1, after_dir: str = "after") -> str:
    """The before/after summary: settings, the verdict of the paired test on greedy final-answer EM (and SubEM),
    the table of greedy / MBR@n / oracle@n / random@n with 95% CIs, the warm-up's consensus check, legend, plots;
    `after` is the model after `rounds` rounds, its tables in run_dir/`after_dir`."""
    keep = {"greedy", f"MBR@{n}", f"oracle@{n}", f"random@{n}"}
    pick = lambda res: {**res, "average": {m: v for m, v in res["average"].items() if m in keep}}  # noqa: E731
    done = "one round" if rounds == 1 else f"{rounds} rounds"
    lines = ["# SEALONG run summary", "", f"run directory: {run_dir}; {done} of {mode.upper()}", "",
             settings_header(after), ""]
    for metric, name in (("em", "final-answer EM"), ("subem", "SubEM")):
        t = paired_test(before, after, "greedy", metric)
        if t is None:
            continue
        gain = 100 * (t["c_wrong_to_right"] - t["b_right_to_wrong"]) / max(1, t["n"])
        verdict = ("a statistically significant GAIN" if gain > 0 and t["p_value"] < 0.05 else
                   "a statistically significant LOSS" if gain < 0 and t["p_value"] < 0.05 else
                   "NO statistically significant change")
        lines.append(f"**Greedy {name}, before vs after: {gain:+.1f} points on {t['n']} held-out questions: {verdict}** "
                     f"(exact McNemar test, p = {t['p_value']:.3g}; {t['c_wrong_to_right']} question(s) went wrong -> "
                     f"right, {t['b_right_to_wrong']} right -> wrong).")
        lines.append("")
    lines += ["## Before and after (average over tasks)", "", "Final-answer exact match (EM):", "",
              compare_table(pick(before), pick(after), "em"), "SubEM (gold answer anywhere in the output; the paper's):",
              "", compare_table(pick(before), pick(after), "subem"), "F1:", "",
              compare_table(pick(before), pick(after), "f1")]
    if dev_check:
        g, m = dev_check.get("greedy"), next((v for k, v in dev_check.items() if k.startswith("mbr@")), None)
        o = next((v for k, v in dev_check.items() if k.startswith("oracle@")), None)
        held = "beat" if m is not None and g is not None and m > g else "did NOT beat"
        ready = g is not None and o is not None and m is not None and 30 <= g <= 60 and o - g >= 25 and m - g >= 8
        lines += ["## Consensus check before the method (labelled warm-up dev slice only, never the held-out questions)",
                  "", f"On {dev_check.get('questions')} labelled dev questions of the warm-up world, the embedding "
                  f"consensus (MBR) {held} greedy: " + ", ".join(f"{k} {v:.1f}" for k, v in dev_check.items()
                                                              if k != "questions") + ".", "",
                  "The preconditions for a gain (dev greedy 30-60%, oracle@16 - greedy >= 25 and MBR@16 - greedy >= 8 "
                  "points) were "
                  + ("met." if ready else "NOT met: the base model does not read well enough for the consensus to "
                     "teach it anything, so no gain is expected and none is claimed."), ""]
    lines += ["## Legend", "", LEGEND, "", "## Plots", "",
              f"- [{plot_name}]({plot_name}): before and after side by side, one shared y-axis",
              f"- [before/eval_vs_n.png](before/eval_vs_n.png), [{after_dir}/eval_vs_n.png]({after_dir}/eval_vs_n.png); "
              f"tables: [before/eval.md](before/eval.md), [{after_dir}/eval.md]({after_dir}/eval.md)", ""]
    return "\n".join(lines)


def advice_markdown(results: dict, n: int, demo: bool = False) -> str:
    """'What this run says' for a first run: where the method's own choice (MBR@n) scores below random@n (the
    consensus picks worse than chance: its pairs teach noise) or below greedy, for each of `results`
    ({"before": result, ...}), and what to try next. "" when neither happens."""
    found, below_random = [], False
    for name, result in results.items():
        avg = result.get("average", {})
        mbr, rnd, greedy = avg.get(f"MBR@{n}"), avg.get(f"random@{n}"), avg.get("greedy")
        if mbr is None:
            continue
        for other, label in ((rnd, f"random@{n}"), (greedy, "greedy")):
            low = [k for k in ("em", "subem") if other is not None and mbr[k] < other[k]]
            if low:
                below_random |= label.startswith("random")
                found.append(f"- {name}: **MBR@{n} is below {label}** (" + "; ".join(
                    f"{'EM' if k == 'em' else 'SubEM'} {mbr[k]:.1f} vs {other[k]:.1f}" for k in low) + ")")
    if not found:
        return ""
    oracle = next((r["average"].get(f"oracle@{n}") for r in results.values() if f"oracle@{n}" in r.get("average", {})),
                  None)
    if below_random:
        why = ("The method's own choice (the sample most similar to the others) is no better than chance here, so the "
               "preference pairs it builds carry little or a wrong signal: no gain is to be expected from training on "
               "them.")
    else:  # above chance, below greedy
        why = ("The method's own choice (the sample most similar to the others) beats a random sample but not the "
               "model's greedy answer, so its chosen answers are on average no better than what greedy decoding "
               "already gives: little gain in greedy accuracy is to be expected from training on them.")
    lines = ["## What this run says", "", *found, "",
             why + (f" oracle@{n} is {oracle['subem']:.1f} SubEM: " if oracle else " ")
             + "a consensus can only pick a right answer that some samples hold.", "", "What to try next:"]
    if demo:
        lines.append("- `sealong pipeline --preset demo-gain`: a base model warmed up until it copies answers from "
                     "the context (held-out greedy about 38%, oracle@8 about 80% SubEM, MBR@8 above random@8); README, "
                     "\"The self-improvement demo\"")
    lines += ["- the settings that matter: more samples (`--num-samples`, the paper's 32; `--eval-samples`), the "
              "temperature (`--temperature`: too low, the samples agree on the greedy answer; too high, on nothing), "
              "`--max-new-tokens` when many outputs are cut (cut % above; a cut output is never chosen), the embedder "
              "(`--embedding-model`, the paper's jina-embeddings-v3) and its window (`score.window`, `eval.window`)",
              "- beyond the paper: `--min-consensus` (train only on questions whose samples agree) and `--scorer "
              "mbr+certainty`", ""]
    return "\n".join(lines)


# ---- the `eval` stage ---------------------------------------------------------------------------------------------

def parse_ns(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ns: expected comma-separated integers, got {text!r}") from None
    if not ns or min(ns) < 1:
        raise ValueError(f"--ns: values must be >= 1, got {text!r}")
    return ns


def check_swapped(greedy: list[dict] | None, sampled: list[dict] | None, greedy_path: str, sampled_path: str) -> None:
    """--greedy and --sampled given the wrong way round: the greedy file's records hold several outputs (or were
    sampled at a temperature > 0) while the sampled file's hold one each (or were decoded at temperature 0)."""
    if not greedy or not sampled:
        return

    def temperature(records):
        return {r["sampler"].get("temperature") for r in records if isinstance(r.get("sampler"), dict)} - {None}

    many_greedy = all(len(r["outputs"]) > 1 for r in greedy)
    one_sampled = all(len(r["outputs"]) == 1 for r in sampled)
    hot_greedy, cold_sampled = temperature(greedy) - {0}, temperature(sampled) == {0}  # 0.0 == 0
    if (many_greedy and one_sampled) or (hot_greedy and cold_sampled):
        raise ValueError(f"--greedy {greedy_path} and --sampled {sampled_path} look swapped: the greedy file's records "
                         f"hold {max(len(r['outputs']) for r in greedy)} output(s) (temperature "
                         f"{sorted(temperature(greedy)) or 'unknown'}), the sampled file's "
                         f"{max(len(r['outputs']) for r in sampled)} (temperature {sorted(temperature(sampled)) or 'unknown'})")


def run(args) -> int:
    if getattr(args, "suite", False):  # the generalization table (sealong.evaluate.suite)
        from .suite import run_suite

        return run_suite(args)
    if args.greedy is None and args.sampled is None:
        raise ValueError("eval: give --greedy FILE and/or --sampled FILE")
    from sealong import provenance
    from sealong.lock import claim_output

    ns = parse_ns(args.ns)
    out_dir = args.out_dir or str(Path(args.sampled or args.greedy).parent / "eval")
    with claim_output(out_dir, directory=True, what="--out-dir"):  # writable and ours, before any work
        greedy = read_samples(args.greedy) if args.greedy else None
        sampled = read_samples(args.sampled) if args.sampled else None
        check_swapped(greedy, sampled, args.greedy, args.sampled)
        result = evaluate(greedy, sampled, ns, args.embed_model, mbr=not args.no_mbr,
                          trust_remote_code=args.trust_remote_code,
                          settings={"embedder": args.embed_model or "all-MiniLM-L6-v2 (offline)"}, window=args.window)
        paths = write_report(result, out_dir, plot=not args.no_plot)
        settings = {"greedy": args.greedy, "sampled": args.sampled, "ns": result["ns"], "mbr": not args.no_mbr,
                    "embed_model": args.embed_model, "window": args.window}
        paths["meta"] = provenance.write_meta(out_dir, provenance.stage_meta("eval", settings, args.embed_model),
                                              directory=True)
    print(Path(paths["md"]).read_text())
    log.info("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None):
    """`python -m sealong.evaluate`: options are EvalConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("eval", argv, prog="python -m sealong.evaluate")


if __name__ == "__main__":
    sys.exit(main())
