"""Monitoring of `sealong pipeline --rounds K`, one record per round (round_k/monitor.json), a table across rounds
and one plot (summary_rounds.png) in summary.md, and the label-free early-stop rule.

Label-free, from a round's own files (samples.jsonl, scores.jsonl, pairs.jsonl: the samples the round trains on,
drawn by the model that enters the round), each a mean over the round's questions unless said otherwise:
    distinct       answer clusters per question (sealong.score.consensus: equal extracted final answers)
    consensus      top-cluster share: size of the largest answer cluster / the question's samples
    score_spread   max - min of the question's valid MBR scores (questions with at least two)
    pair_sim       similarity of chosen vs rejected (`pair_similarity`), over the questions that kept a pair
    no_finished    share of questions with no finished output: every finish_reason "length", or the score
                   stage's skip reason "no finished output ..."
    out_tokens     output length in tokens, the mean over all outputs (`num_tokens`)
    pairs          pairs kept (lines of pairs.jsonl), and pair_share = pairs / questions
With labels (the held-out evaluation set only, never the training questions), from the eval.json of the model
after the round (round_k/after/) and of the base model (before/), SubEM (the paper's metric) and final-answer EM:
    oracle@N (exploration: the share of questions with at least one right sample), MBR@N and greedy
    (exploitation: what the label-free selection and plain decoding pick), gap = oracle@N - MBR@N.
B-STaR (Zeng et al. 2024, arXiv 2412.17256) watches exactly this pair: exploration decays over the rounds of
self-training, and the gap says how much the selection leaves on the table.

Early stop (`stop_reason`): after a round's scoring and before its training, the round has nothing left to teach
when its samples already agree (mean consensus >= stop_consensus: the MBR pair then contrasts equal answers) or
when fewer than min_pairs pairs survived scoring.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sealong.jsonl import read_jsonl, write_atomic

LABEL_FREE = ("questions", "distinct", "consensus", "score_spread", "pair_sim", "no_finished", "out_tokens", "pairs",
              "pair_share")
MODES = ("greedy", "MBR", "oracle")


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def label_free(samples: list[dict], scores: list[dict], pairs: int) -> dict:
    """The label-free statistics of one round (see the module docstring); `scores` may be empty (not scored yet);
    a mean over no question is NaN (written as null in monitor.json)."""
    from sealong.score.consensus import answer_consensus

    clusters = [answer_consensus(r["outputs"]) for r in samples]
    lengths = [t for r in samples for t in r.get("num_tokens", [])]
    skipped_unfinished = {s["id"] for s in scores if str(s.get("skipped", "")).startswith("no finished output")}
    unfinished = [r["id"] in skipped_unfinished or (bool(r.get("finish_reasons"))
                                                    and all(f == "length" for f in r["finish_reasons"]))
                  for r in samples]
    spreads = []
    for s in scores:
        valid = [x for x in s.get("scores") or [] if x is not None]
        if len(valid) >= 2:
            spreads.append(max(valid) - min(valid))
    sims = [s["pair_similarity"] for s in scores if "skipped" not in s and s.get("pair_similarity") is not None]
    n = len(samples)
    return {"questions": n, "distinct": _mean([c.distinct for c in clusters]),
            "consensus": _mean([c.top_share for c in clusters]), "score_spread": _mean(spreads),
            "pair_sim": _mean(sims), "no_finished": _mean([float(u) for u in unfinished]),
            "out_tokens": _mean(lengths), "pairs": pairs, "pair_share": pairs / n if n else float("nan")}


def labelled(result: dict) -> dict:
    """{mode: {"subem", "em"}} of greedy, MBR@N and oracle@N (N = the largest n evaluated) from an eval.json
    result, and "gap" = oracle@N - MBR@N per metric; {} without one."""
    if not result:
        return {}
    avg, n = result["average"], max(result.get("ns") or [0])
    out = {"N": n}
    for mode in MODES:
        res = avg.get(mode if mode == "greedy" else f"{mode}@{n}")
        if res is not None:
            out[mode] = {"subem": res["subem"], "em": res["em"]}
    if "MBR" in out and "oracle" in out:
        out["gap"] = {k: out["oracle"][k] - out["MBR"][k] for k in ("subem", "em")}
    return out


def round_monitor(folder: str | Path, round_k: int, after: dict | None = None, stopped: str | None = None) -> dict:
    """monitor.json's record of the round in `folder` (its samples.jsonl, scores.jsonl, pairs.jsonl, and the
    eval result `after` of its trained model when there is one)."""
    folder = Path(folder)

    def records(name):
        path = folder / name
        return list(read_jsonl(str(path))) if path.is_file() else []

    pairs = folder / "pairs.jsonl"
    n_pairs = sum(1 for _ in read_jsonl(str(pairs))) if pairs.is_file() else 0
    out = {"round": round_k, "label_free": label_free(records("samples.jsonl"), records("scores.jsonl"), n_pairs),
           "after": labelled(after)}
    if stopped:
        out["stopped"] = stopped
    return out


def write_monitor(folder: str | Path, monitor: dict) -> Path:
    """folder/monitor.json, atomically; NaN written as null."""
    path = Path(folder) / "monitor.json"
    clean = json.loads(json.dumps(monitor), parse_constant=lambda _: None)  # NaN -> null
    write_atomic(str(path), json.dumps(clean, indent=1) + "\n")
    return path


def stop_reason(stats: dict, stop_consensus: float, min_pairs: int) -> str | None:
    """Why the round (its label-free `stats`) has nothing left to teach, or None: its samples agree (mean top-cluster
    share >= stop_consensus) or fewer than min_pairs pairs survived scoring."""
    consensus = stats.get("consensus")
    if consensus is not None and not math.isnan(consensus) and consensus >= stop_consensus:
        return (f"the samples agree: mean top-cluster share {consensus:.3f} >= stop_consensus {stop_consensus} "
                "(no preference signal left)")
    if stats.get("pairs", 0) < min_pairs:
        return f"too few pairs: {stats.get('pairs', 0)} pair(s) survived scoring, fewer than min_pairs {min_pairs}"
    return None


def _cell(value, fmt: str = ".3f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def rounds_table(before: dict | None, monitors: list[dict]) -> str:
    """Markdown: one row per round (label-free: its training samples; labelled: its trained model on the held-out
    set, SubEM), and a first row "0 (base)" with the base model's labelled numbers."""
    head = ("| round | distinct | consensus | MBR score spread | pair sim | no finished % | output tokens | pairs | "
            "greedy | MBR@N | oracle@N | oracle - MBR |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def labelled_cells(lab):
        return [_cell(lab.get(m, {}).get("subem"), ".1f") for m in MODES] + [_cell(lab.get("gap", {}).get("subem"),
                                                                                   "+.1f")]
    if before:
        lines.append("| 0 (base) | " + " | ".join([""] * 7 + labelled_cells(labelled(before))) + " |")
    for m in monitors:
        s = m["label_free"]
        cells = [_cell(s["distinct"], ".2f"), _cell(s["consensus"]), _cell(s["score_spread"]), _cell(s["pair_sim"]),
                 _cell(None if s["no_finished"] is None else 100 * s["no_finished"], ".1f"),
                 _cell(s["out_tokens"], ".1f"), str(s["pairs"])]
        name = f"{m['round']}" + (" (stopped)" if m.get("stopped") else "")
        lines.append(f"| {name} | " + " | ".join(cells + labelled_cells(m.get("after") or {})) + " |")
    return "\n".join(lines) + "\n"


ROUNDS_LEGEND = """- Label-free columns describe the round's training samples, drawn by the model that entered the round (round 1: the
  base model): **distinct** answer clusters per question, **consensus** = mean share of the largest cluster,
  **MBR score spread** = mean max - min of a question's MBR scores, **pair sim** = mean similarity of chosen vs
  rejected, **no finished %** = questions whose outputs all hit the token limit, **output tokens** = mean output
  length, **pairs** = pairs kept for training.
- Labelled columns (held-out evaluation set, SubEM) describe the model after the round's training (row 0: the base
  model): **oracle@N** = exploration (any of N samples right), **MBR@N** and **greedy** = exploitation; a shrinking
  oracle@N or a growing oracle - MBR gap is what B-STaR (arXiv 2412.17256) warns about."""


def plot_rounds(before: dict | None, monitors: list[dict], path: str | Path) -> None:
    """One figure: oracle@N, MBR@N and greedy SubEM (left axis, %) of the base model (round 0) and of each round's
    trained model, and the label-free consensus of each round's samples (right axis, 0-1), against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = ([(0, labelled(before))] if before else []) + [(m["round"], m.get("after") or {}) for m in monitors]
    from .report import LINE_STYLES, fitted_ylim

    styles = dict(LINE_STYLES[:2], greedy=dict(marker="d", linestyle=":", linewidth=1.2, markersize=4, zorder=4))
    shown = []
    for mode, style in styles.items():  # widest first: coinciding lines stay visible (report.LINE_STYLES)
        pts = [(k, lab[mode]["subem"]) for k, lab in rows if mode in lab]
        if pts:
            ax.plot(*zip(*pts), label=f"{mode}@N" if mode != "greedy" else mode, **style)
            shown += [y for _, y in pts]
    ax.set_ylim(*fitted_ylim(shown))  # fits the data (a fixed 0-100 squashes lines under 20%)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out SubEM (%)")
    ax.set_xticks([k for k, _ in rows] or [0])
    ax.grid(alpha=0.3)
    right = ax.twinx()
    pts = [(m["round"], m["label_free"]["consensus"]) for m in monitors
           if m["label_free"]["consensus"] is not None and not math.isnan(m["label_free"]["consensus"])]
    if pts:
        right.plot(*zip(*pts), "x--", color="tab:purple", label="consensus (label-free)")
    right.set_ylim(0, 1)
    right.set_ylabel("consensus of the round's samples")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4,
              fontsize=8, frameon=False)  # below the axes: never over the points
    ax.set_title("SEALONG rounds: exploration, exploitation, consensus")
    fig.tight_layout()
    tmp = f"{os.fspath(path)}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def monitor_line(monitor: dict) -> str:
    """One log line of a round's monitor record."""
    s, lab = monitor["label_free"], monitor.get("after") or {}
    text = (f"consensus {_cell(s['consensus'])}, distinct {_cell(s['distinct'], '.2f')}, score spread "
            f"{_cell(s['score_spread'])}, pairs {s['pairs']}")
    if lab:
        text += "; held-out SubEM " + ", ".join(f"{m} {_cell(lab[m]['subem'], '.1f')}" for m in MODES if m in lab)
    return text


def rounds_markdown(before: dict | None, monitors: list[dict], plot_name: str | None = None) -> str:
    """summary.md's section: the stop reason (if any), the table across rounds, its legend and the plot link."""
    lines = ["## Monitoring per round", ""]
    stopped = [m["stopped"] for m in monitors if m.get("stopped")]
    if stopped:
        lines += [f"**Early stop: {stopped[0]}.**", ""]
    if len(monitors) > 1 or stopped:
        lines += ["Round k samples with the model that left round k-1 (merged weights) and trains a new LoRA on them.",
                  ""]
    lines += [rounds_table(before, monitors), ROUNDS_LEGEND, ""]
    if plot_name:
        lines += [f"- [{plot_name}]({plot_name}): oracle@N, MBR@N, greedy and the consensus against the round", ""]
    return "\n".join(lines)
