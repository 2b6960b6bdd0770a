"""Which output to choose without labels: the score stage's scorers, and the consensus filter, on the built-in world.

    python -m bench.bench_selection [--models DIR,DIR] [--questions 120] [--temperature 0.7] [--work-dir DIR]

Per model: N = 16 samples per held-out question with the real sampler (the samples carry `self_certainty`,
recorded during decoding), then the score stage's own choice (`sealong.score.mbr.score_chunk`, the offline
all-MiniLM-L6-v2, an output cut at the token limit never chosen) under each --scorer:

    mbr            mean embedding similarity to the other outputs (the paper)
    self-certainty the output's mean KL(uniform || p_t) over its tokens (Kang et al. 2025, arXiv 2502.18581)
    mbr+certainty  MBR with each peer weighted by its self-certainty

Reported per scorer: final-answer EM and SubEM of the chosen output (95% Wilson intervals), and how often it
chose the same output as mbr. Then the consensus filter (--min-consensus T of `sealong score`): per T, the share
of questions kept and MBR@16's SubEM on the kept and on the dropped ones (does agreement among the samples
predict that the consensus answer is right, without a label?). The questions and models are bench_adaptive's:
world questions 6100.. of the reading world (in neither model's warm-up), contexts of 96-192 tokens; without the
model folders the demo's base model is built first. The models are tiny and weak: 1 question = 100 / questions
points.
"""

import dataclasses
import os
import sys
import time

from bench.bench_adaptive import N, finish, held_out_world, parse_args, sample

SCORERS = ("mbr", "self-certainty", "mbr+certainty")
THRESHOLDS = (0.25, 0.375, 0.5)


def choices(records: list, scorer: str, device: str) -> list:
    """The chosen output index per record under `scorer` (None: the stage skipped the question)."""
    from sealong.config.stages import ScoreConfig
    from sealong.score.mbr import score_chunk

    cfg = dataclasses.replace(ScoreConfig(), scorer=scorer, device=device, dedup_threshold=0.0)
    return [r.get("chosen") for r in score_chunk(records, cfg)]


def measure(name: str, model: str, prompts: str, work: str, device: str, temperature: float) -> list:
    from sealong.evaluate.metrics import wilson_interval
    from sealong.evaluate.report import output_scores
    from sealong.score.consensus import answer_consensus

    t0 = time.perf_counter()
    records = sample(model, prompts, os.path.join(work, f"fixed_T{temperature}.jsonl"), device,
                     temperature=temperature)
    tables = [[output_scores(o, r["answers"]) for o in r["outputs"]] for r in records]
    picks = {s: choices(records, s, device) for s in SCORERS}
    rows = []
    for scorer, chosen in picks.items():
        em = [tables[k][c][0] if c is not None else 0.0 for k, c in enumerate(chosen)]
        subem = [tables[k][c][1] if c is not None else 0.0 for k, c in enumerate(chosen)]
        n = len(records)
        rows.append({"model": name, "T": temperature, "what": f"scorer {scorer}", "questions": n,
                     "EM": 100 * sum(em) / n, "EM CI": [100 * x for x in wilson_interval(sum(em), n)],
                     "SubEM": 100 * sum(subem) / n, "SubEM CI": [100 * x for x in wilson_interval(sum(subem), n)],
                     "same choice as mbr": sum(a == b for a, b in zip(chosen, picks["mbr"])) / n})
    oracle = 100 * sum(max(t[1] for t in table) for table in tables) / len(tables)
    shares = [answer_consensus(r["outputs"]).top_share for r in records]
    mbr_right = [tables[k][c][1] if c is not None else 0.0 for k, c in enumerate(picks["mbr"])]
    for threshold in THRESHOLDS:
        kept = [k for k, s in enumerate(shares) if s >= threshold]
        dropped = [k for k, s in enumerate(shares) if s < threshold]
        mean = lambda idx: 100 * sum(mbr_right[k] for k in idx) / len(idx) if idx else None  # noqa: E731
        rows.append({"model": name, "T": temperature, "what": f"min_consensus {threshold}", "questions": len(records),
                     "kept": len(kept) / len(records), "MBR SubEM kept": mean(kept), "MBR SubEM dropped": mean(dropped)})
    rows[0].update({f"oracle@{N} SubEM": oracle, "mean consensus": sum(shares) / len(shares),
                    "seconds (CPU)": time.perf_counter() - t0})
    return rows


def run(device: str = "cpu", small: bool = True, models: dict | None = None, questions: int = 120,
        temperature: float = 0.7, work_dir: str | None = None) -> dict:
    rows = []
    with held_out_world(models, questions, work_dir, "bench_selection_") as (copies, prompts):
        for name, model in copies.items():
            out = os.path.join(os.path.dirname(prompts), "runs", name)
            os.makedirs(out, exist_ok=True)
            rows += measure(name, model, prompts, out, device, temperature)
    notes = [f"{questions} held-out questions of the built-in reading world (bench_adaptive's), N = {N}, temperature "
             f"{temperature}, 64 new tokens, float32; embeddings: offline all-MiniLM-L6-v2 (last window)",
             "choice = the score stage's chosen output (cut outputs never chosen; no near-duplicate rule here)",
             "min_consensus rows: questions whose top answer cluster holds >= T of the 16 outputs are kept; MBR SubEM "
             "of the kept vs the dropped ones",
             f"tiny weak models: 1 question = {100 / questions:.2f} points"]
    return {"name": "selection", "rows": rows, "notes": notes}


def main(argv=None) -> int:
    args, models = parse_args(argv, __doc__, temperature=(float, 0.7))
    return finish(run(args.device, True, models, args.questions, args.temperature, args.work_dir), args.device)


if __name__ == "__main__":
    sys.exit(main())
