"""The scoring stage's entry point: `python -m sealong.score` / `sealong score` (options: ScoreConfig).

    python -m sealong.score --run-dir runs/x                    # samples.jsonl (+ prompts.jsonl) -> scores.jsonl, pairs.jsonl
    python -m sealong.score --samples s.jsonl --out scores.jsonl [--prompts p.jsonl --pairs pairs.jsonl]

Resolves the paths, then scores in one process (sealong.score.mbr.score_file) or over torchrun ranks
(sealong.score.parallel); what is computed and written is described in sealong/score/mbr.py.
"""

import dataclasses
import logging
import os
import sys

from sealong.sample import shards

from .mbr import read_samples, score_file
from .parallel import score_file_parallel

log = logging.getLogger("sealong.score")


def run(args):
    """The stage: --run-dir's default paths or the given ones, one process or data parallel; 0 on success."""
    run_dir = args.run_dir

    def default(value, name):
        return value if value is not None else (os.path.join(run_dir, name) if run_dir else None)

    samples, out = default(args.samples, "samples.jsonl"), default(args.out, "scores.jsonl")
    pairs, prompts = default(args.pairs, "pairs.jsonl"), default(args.prompts, "prompts.jsonl")
    # input errors raise (ValueError, FileNotFoundError; JsonlError names file:line): stage_main prints them as
    # one line `sealong score: error: ...` and exits 2, as every stage does
    if samples is None or out is None:
        raise ValueError("give --run-dir, or --samples and --out")
    if prompts and not os.path.exists(prompts):
        if args.prompts is not None:
            raise FileNotFoundError(f"--prompts {prompts} does not exist")
        prompts = None
    cfg = args  # ScoreConfig (sealong/config/stages.py)
    if cfg.nproc_per_node > 1 and not shards.under_torchrun():
        read_samples(samples, cfg.scorer)  # a bad line: one `error:` line and exit 2 here, not torchrun's 1
        return shards.launch("sealong.score", cfg.nproc_per_node, shards.flags_of(cfg))
    ranks = shards.Ranks(cfg.device)
    try:
        if ranks.world > 1:  # data parallel (sealong/score/parallel.py)
            cfg = dataclasses.replace(cfg, device=cfg.device or str(ranks.device))
            counts = score_file_parallel(samples, out, cfg, ranks, pairs=pairs, prompts=prompts)
        else:
            counts = score_file(samples, out, cfg, pairs=pairs, prompts=prompts)
    finally:
        ranks.close()
    if ranks.rank != 0:
        return 0
    if pairs and not os.path.exists(pairs):  # no pair at all (all skipped, N = 1, ...): an empty file, not none
        open(pairs, "a").close()
    if pairs and os.path.getsize(pairs) == 0:
        log.warning(f"no pair written to {pairs}: " + (", ".join(f"{k} {v}" for k, v in counts.items()
                                                                if k.startswith("skipped")) or "no question scored"))
    log.info(", ".join(f"{k} {v}" for k, v in counts.items()))
    log.info(f"scores -> {out}" + (f", pairs -> {pairs}" if pairs else ""))
    return 0


def kept_on_interrupt(args) -> str:
    """What a Ctrl-C leaves (sealong.interrupt): the questions whose scores are in the scores file and its shards."""
    out = args.out if args.out is not None else os.path.join(args.run_dir or "", "scores.jsonl")
    parts = shards.shard_files(out)
    paths = ([out] if os.path.exists(out) else []) + parts
    done = {key for path in paths for _, key, _ in shards.complete_lines(path)}
    return f"{len(done)} questions' scores kept ({out}{' and its shard files' if parts else ''}); the same command resumes"


def main(argv=None):
    """`python -m sealong.score`: options are ScoreConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("score", argv, prog="python -m sealong.score")


if __name__ == "__main__":
    sys.exit(main())
