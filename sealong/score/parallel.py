"""Data-parallel scoring: `torchrun --nproc-per-node K -m sealong.score ...` (or `sealong score --nproc-per-node K`).

The embedding pass dominates the scoring stage, and questions are independent, so the ranks split the
questions still to score (longest records first onto the least-loaded rank, by characters: the same
split on every rank, sealong.sample.shards.plan), each rank scores its share with `score_file` into its own
shards of the scores and pairs files, and rank 0 merges the shards into them in samples order (atomically,
sealong.sample.shards.merge). A killed job leaves shards; the next run folds them in first and scores only
the missing ids. Rank 0 ends with a `score_file` pass over the whole files: it appends the pairs of ids
scored before without a pairs file, and scores anything a rank's shard did not bring (e.g. shards on a
filesystem rank 0 does not see). With the rouge, answer or random utility the merged files are
byte-identical to a one-process run's; embeddings can differ in the last bits between batch compositions.
"""

import os
import sys

from sealong.jsonl import completed_ids
from sealong.sample import shards


def score_file_parallel(samples, out, cfg, ranks, pairs=None, prompts=None) -> dict:
    """score_file(samples, out, cfg, pairs, prompts) over the ranks of `ranks` (sealong.sample.shards.Ranks)."""
    from .mbr import read_samples, score_file

    read_samples(samples, cfg.scorer)  # bad input: the error names the samples file and line, on every rank
    files = [f for f in (out, pairs) if f]
    order = [key for _, key, _ in shards.complete_lines(samples)]
    if ranks.rank == 0:  # fold in a killed run's shards, cut torn last lines, before anyone reads
        for path in files:
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            shards.merge(path, order)
            completed_ids(path)
    ranks.barrier()
    done = completed_ids(out)
    todo = [line for _, key, line in shards.complete_lines(samples) if key not in done]
    mine = [todo[i] for i in shards.plan([len(line) for line in todo], ranks.world)[ranks.rank]]
    subset = f"{out}.samples-{ranks.rank:05d}"
    with open(subset, "w", encoding="utf-8") as f:
        f.writelines(mine)
    try:
        counts = score_file(subset, shards.shard_path(out, ranks.rank), cfg, prompts=prompts,
                            pairs=shards.shard_path(pairs, ranks.rank) if pairs else None, log=None)
    finally:
        os.remove(subset)
    written = ranks.sum([counts["written"], counts["pairs"]])
    ranks.barrier()
    if ranks.rank != 0:
        return {"rank": ranks.rank, "written": counts["written"], "pairs": counts["pairs"]}
    for path in files:
        shards.merge(path, order)
    final = score_file(samples, out, cfg, pairs=pairs, prompts=prompts, log=sys.stderr)
    # the final pass sees every id the ranks just wrote as done: "already done" is what was there before this run
    return dict(final, **{"already done": len(done)}, written=written[0] + final["written"],
                pairs=written[1] + final["pairs"], ranks=ranks.world)
