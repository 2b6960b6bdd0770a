"""Evaluation: SubEM (HELMET) and token F1 (LongBench) over samples files; greedy, MBR@N, oracle@N, random@N.

Metrics, max over the gold answers (answer + aliases), on the whole output (no answer extraction, as the paper):
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
import sys
from pathlib import Path

from sealong.jsonl import publish, write_atomic

from .metrics import METRICS, best_over_answers, normalize_answer, sub_em, token_f1  # noqa: F401


# ---- samples files ------------------------------------------------------------------------------------------------

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


def default_ns(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself."""
    ns, n = [], 1
    while n < n_max:
        ns.append(n)
        n *= 2
    return ns + [n_max]


def mbr_choices(records: list[dict], ns: list[int], embed_model: str | None = None,
                trust_remote_code: bool = False) -> list[dict[int, int]]:
    """Per record, {n: index of the output MBR chooses among the first n}."""
    import torch
    import sealong_kernels as sk

    from sealong.score.embed import embed  # the scoring stage's embeddings: MBR@n here is what `sealong score` would pick

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat = [o for r in records for o in r["outputs"]]
    emb = embed(flat, embed_model, device, 64, trust_remote_code).float()
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


def evaluate(greedy: list[dict] | None, sampled: list[dict] | None, ns: list[int] | None = None,
             embed_model: str | None = None, mbr: bool = True, trust_remote_code: bool = False) -> dict:
    """Per-task results {task: {mode: {"subem", "f1", "avg_tokens", "n"}}} and their macro "average"."""
    rows: dict[str, dict[str, list[tuple[float, float, float]]]] = {}  # task -> mode -> [(subem, f1, tokens)]

    def add(task, mode, r, i_or_list):
        idx = i_or_list if isinstance(i_or_list, list) else [i_or_list]
        s = [best_over_answers(r["outputs"][i], r["answers"], "subem") for i in idx]
        f = [best_over_answers(r["outputs"][i], r["answers"], "f1") for i in idx]
        t = [r["num_tokens"][i] for i in idx]
        rows.setdefault(task, {}).setdefault(mode, []).append((sum(s) / len(s), sum(f) / len(f), sum(t) / len(t)))

    for r in greedy or []:
        add(r["dataset"], "greedy", r, 0)
    if sampled:
        n_max = min(len(r["outputs"]) for r in sampled)
        ns = sorted(n for n in (ns or default_ns(n_max)) if 1 <= n <= n_max)
        if not ns:
            raise ValueError(f"ns: no value between 1 and the smallest sample count {n_max}")
        picks = mbr_choices(sampled, ns, embed_model, trust_remote_code) if mbr else None
        for k, r in enumerate(sampled):
            subem = [best_over_answers(o, r["answers"], "subem") for o in r["outputs"]]
            f1 = [best_over_answers(o, r["answers"], "f1") for o in r["outputs"]]
            for n in ns:
                best = max(range(n), key=lambda i: (subem[i], f1[i]))
                add(r["dataset"], f"oracle@{n}", r, best)
                add(r["dataset"], f"random@{n}", r, list(range(n)))
                if picks is not None:
                    add(r["dataset"], f"MBR@{n}", r, picks[k][n])
    result = {"tasks": {}, "ns": ns if sampled else []}
    for task, modes in sorted(rows.items()):
        result["tasks"][task] = {
            mode: {"subem": 100 * sum(v[0] for v in vals) / len(vals), "f1": 100 * sum(v[1] for v in vals) / len(vals),
                   "avg_tokens": sum(v[2] for v in vals) / len(vals), "n": len(vals)}
            for mode, vals in modes.items()}
    modes = sorted({m for t in result["tasks"].values() for m in t}, key=_mode_key)
    result["average"] = {
        m: {key: sum(t[m][key] for t in result["tasks"].values() if m in t) /
            sum(1 for t in result["tasks"].values() if m in t) for key in ("subem", "f1", "avg_tokens")}
        for m in modes}
    return result


def _mode_key(mode: str):
    name, _, n = mode.partition("@")
    return ({"greedy": 0, "MBR": 1, "oracle": 2, "random": 3}.get(name, 4), int(n or 0))


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


def plot_vs_n(result: dict, path: str | Path, title: str = "") -> None:
    """oracle@n, MBR@n and random@n (average SubEM) against n, greedy as a horizontal line (the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = result["ns"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("oracle", "o-"), ("MBR", "s-"), ("random", "^--")):
        ys = [result["average"].get(f"{name}@{n}", {}).get("subem") for n in ns]
        if ns and all(y is not None for y in ys):
            ax.plot(ns, ys, style, label=f"{name}@N")
    if "greedy" in result["average"]:
        ax.axhline(result["average"]["greedy"]["subem"], color="gray", linestyle=":", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples)")
    ax.set_ylabel("average SubEM")
    ax.set_title(title or "oracle@N and MBR@N against N")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out_dir: str | Path, plot: bool = True) -> dict:
    """eval.json, eval.md (SubEM and F1 tables) and eval_vs_n.png in out_dir, each written atomically; eval.json
    last, so that its presence (what the pipeline checks to skip an evaluation) means the report is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md"}
    _atomic_write(paths["md"], "## SubEM\n\n" + markdown_table(result, "subem") + "\n## F1\n\n" + markdown_table(result, "f1"))
    if plot and result["ns"]:
        paths["png"] = out / "eval_vs_n.png"
        tmp = out / "eval_vs_n.tmp.png"
        plot_vs_n(result, tmp)
        publish(tmp, paths["png"])  # fsync, then rename
    _atomic_write(paths["json"], json.dumps(result, indent=1))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(str(path), text)  # temporary file, fsync, rename (sealong.jsonl)


def compare_table(before: dict, after: dict, metric: str = "subem") -> str:
    """Markdown: one row per mode present in both, average over tasks before and after, and the change."""
    lines = [f"| mode | before ({metric}) | after ({metric}) | change | tokens before | tokens after |",
             "|---|---|---|---|---|---|"]
    for m in before["average"]:
        if m in after["average"]:
            b, a = before["average"][m], after["average"][m]
            lines.append(f"| {m} | {b[metric]:.1f} | {a[metric]:.1f} | {a[metric] - b[metric]:+.1f} | "
                         f"{b['avg_tokens']:.1f} | {a['avg_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


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


def run(args) -> int:
    if args.greedy is None and args.sampled is None:
        raise ValueError("eval: give --greedy FILE and/or --sampled FILE")
    from sealong import provenance
    from sealong.lock import claim_output

    ns = parse_ns(args.ns)
    out_dir = args.out_dir or str(Path(args.sampled or args.greedy).parent / "eval")
    with claim_output(out_dir, directory=True, what="--out-dir"):  # writable and ours, before any work
        greedy = read_samples(args.greedy) if args.greedy else None
        sampled = read_samples(args.sampled) if args.sampled else None
        result = evaluate(greedy, sampled, ns, args.embed_model, mbr=not args.no_mbr,
                          trust_remote_code=getattr(args, "trust_remote_code", False))
        paths = write_report(result, out_dir, plot=not args.no_plot)
        settings = {"greedy": args.greedy, "sampled": args.sampled, "ns": result["ns"], "mbr": not args.no_mbr,
                    "embed_model": args.embed_model}
        paths["meta"] = provenance.write_meta(out_dir, provenance.stage_meta("eval", settings, args.embed_model),
                                              directory=True)
    print(Path(paths["md"]).read_text())
    print("eval: wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None):
    """`python -m sealong.evaluate`: options are EvalConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("eval", argv, prog="python -m sealong.evaluate")


if __name__ == "__main__":
    sys.exit(main())
