"""A stuck rank fails the job within `dist_timeout` seconds, and is named.

Every collective of the job waits at most `dist_timeout` seconds (the process group's timeout, set in
sealong.train.distributed.setup) instead of gloo's / NCCL's 30 minutes. A rank that is alive but stuck (a hung
data read, a wedged device) would still fail the others with a bare timeout of their all-reduce, so before the
gradient all-reduce of every optimizer step the ranks meet at `torch.distributed.monitored_barrier` on a gloo
group of their own: rank 0 waits up to `dist_timeout` seconds and then raises StuckRankError naming every rank
that did not arrive; torchrun then stops the others. With sequence parallelism a rank stuck in its forward pass
is caught earlier by its ring / Ulysses partners' collective timeout (same limit, no rank named).
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

import torch.distributed as dist


class StuckRankError(RuntimeError):
    """Some ranks did not reach a step's synchronization point within dist_timeout; the message names them."""


def check_timeout(seconds: float) -> float:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"dist_timeout must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


class StepWatchdog:
    """`check(step)` on every rank before the step's gradient all-reduce; a no-op in a single process."""

    def __init__(self, timeout: float):
        self.timeout = check_timeout(timeout)
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank creates it, at the same point
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))

    def check(self, step: int, where: str = "the gradient all-reduce") -> None:
        if self.group is None:
            return
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.timeout), wait_all_ranks=True)
        except RuntimeError as err:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
            who = f"rank(s) {found.group(1).strip()}" if found else "rank 0 or a peer (the connection failed)"
            raise StuckRankError(
                f"step {step}: {who} did not reach {where} within dist_timeout={self.timeout:g} s (stuck or dead); "
                f"stopping the job (rank {dist.get_rank()} reporting: {str(err).splitlines()[0]})") from None
