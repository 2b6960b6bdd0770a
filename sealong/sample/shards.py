"""Data-parallel sampling: which rank samples which prompts, each rank's shard file, and the merge.

    torchrun --nproc-per-node 8 -m sealong.sampler --model M --prompts P --output run/samples.jsonl ...
    sealong sample --nproc-per-node 8 ...            # the same, torchrun started for you (one node)

Every rank reads the whole prompts file and the ids already in the output, tokenizes the prompts still to do
and splits them by `plan` (balanced by prompt tokens, the same split on every rank). Rank r appends its
records to its own shard `OUTPUT.shard-r` as its prompts finish (append-only, one flushed line per prompt;
a single process is rank 0). When all ranks are done, rank 0 merges the output and every shard into OUTPUT,
in prompt order, atomically (a temporary file renamed over it), then deletes the shards. A killed run leaves the output and the shards as
they were: the next run (with any number of ranks) first merges what is there, so it redoes only the
missing ids. Sample i of prompt `id` draws its randomness from (seed, id, i) alone, and at a fixed number of
decode slots the decode is batch invariant on the CPU in float32, so the merged output is byte-identical to
a one-process run's.

Several nodes: torchrun's rendezvous (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`); the
output's folder must be one shared filesystem (rank 0 checks the merged output holds every id).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from datetime import timedelta

from sealong.jsonl import JsonlError

# barriers wait for the slowest rank of a sampling job (hours); a crashed rank ends the job through torchrun
BARRIER_TIMEOUT = timedelta(days=7)


def plan(lengths: list, world: int) -> list:
    """Split prompts over `world` ranks balanced by length: longest first onto the least-loaded rank.

    Greedy longest-processing-time: prompts sorted by length descending (ties: earlier prompt first), each
    given to the rank with the fewest tokens so far (ties: lowest rank); every rank's load is within one
    prompt of the mean. Returns per rank its prompt indices in ascending (prompt) order. Deterministic.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    loads, parts = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += lengths[i]
        parts[r].append(i)
    return [sorted(p) for p in parts]


def shard_path(output: str, rank: int) -> str:
    return f"{output}.shard-{rank:05d}"


def shard_files(output: str) -> list:
    """Every shard of `output` on disk, from runs of any world size, in rank order (not their .meta.json / .lock)."""
    return sorted(p for p in glob.glob(glob.escape(output) + ".shard-*") if re.fullmatch(r"\d+", p.rsplit("-", 1)[1]))


def complete_lines(path: str):
    """Yield (line number, id, raw line) of a JSON lines file; a torn last line (no newline: a crash) is skipped."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise JsonlError(f"{path}:{n}: expected a JSON object with an 'id'")
            yield n, record["id"], line


def merge(output: str, order: list) -> int:
    """Fold the shards into `output`: its records and the shards', one per id, in the order of the ids in `order`
    (ids not in it after, as found). Written to a temporary file and renamed over `output`; then the shards
    are deleted. Raw lines are copied, never re-serialized. Returns the records in `output`; a no-op (but
    the count) when there is no shard."""
    shards = shard_files(output)
    sources = ([output] if os.path.exists(output) else []) + shards
    lines = {}
    for path in sources:
        for _, key, line in complete_lines(path):
            lines.setdefault(key, line)
    if not shards:
        return len(lines)
    rank = {key: i for i, key in enumerate(order)}
    keys = sorted(lines, key=lambda k: (0, rank[k]) if k in rank else (1, 0))  # stable: unknown ids as found
    tmp = f"{output}.merge-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines[k] for k in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    for path in shards:
        os.remove(path)
    for path in glob.glob(glob.escape(output) + ".shard-*"):  # what the ranks kept beside their shards (.meta.json,
        os.remove(path)                                       # .lock): the merged output has its own
    return len(lines)


class Ranks:
    """This process's place in a data-parallel sampling job (one plain process without torchrun).

    The default process group is NCCL on GPUs, gloo on CPUs (sealong.train.distributed.setup); the
    barriers run in a separate gloo group with a long timeout, since ranks finish at different times.
    """

    def __init__(self, device=None):
        from sealong.train.distributed import setup

        self.info = setup(device)
        self.rank, self.world, self.device = self.info.rank, self.info.world_size, self.info.device
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)

    def barrier(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def sum(self, values: list) -> list:
        """Element-wise sum of a list of integers over the ranks."""
        if self.group is None:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def close(self):
        from sealong.train.distributed import cleanup

        cleanup(self.info)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def flags_of(cfg, skip=("nproc_per_node",)) -> list:
    """The flags that give the stage config `cfg` back through its parser (every field that has a value, as
    `--name=value`): what the launcher passes to each torchrun worker."""
    import dataclasses

    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        flags.append(f"--{f.name}={value}")
    return flags


def launch(module: str, nproc: int, flags: list) -> int:
    """Run `torchrun --standalone --nproc-per-node nproc -m module flags` (one node) and return its exit code,
    through sealong.launch.run_job as `sealong train` does: torchrun in its own process group, signals forwarded,
    torchrun and its workers dying with this process (even by SIGKILL)."""
    from sealong import launch as launcher

    cmd = launcher.launch_command(nproc, flags, module)
    print(f"{module}: " + " ".join(cmd), file=sys.stderr)
    return launcher.run_job(cmd, what=f"the {module} job")
