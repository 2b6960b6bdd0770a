"""Run a function in W processes joined by a gloo process group, and collect each rank's result.

    from gloo_harness import run_distributed
    results = run_distributed(fn, world_size=4, args=(x,))   # results[r] = fn(rank=r, world_size=4, *args)

`fn` must be importable by name in a fresh process (a module-level function in a test file or a package);
arguments and results travel by pickle (CPU tensors are fine). If any rank raises, the first error is
re-raised here with that rank's traceback; a rank that hangs past `timeout` fails the call.
"""

import os
import pickle
import queue
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank of run_distributed raised; the message holds the rank and its traceback."""


def _worker(rank, world_size, init_file, fn, args, kwargs, results, timeout):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
            # plain pickle copies tensor data; the queue's own pickler would share it through a file
            # descriptor that dies with this process
            results.put((rank, True, pickle.dumps(value)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size, args=(), kwargs=None, timeout=300.0):
    """Call fn(rank, world_size, *args, **kwargs) in `world_size` gloo processes; return results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, kwargs or {}, results, timeout))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        collected = {}
        try:
            while len(collected) < world_size:
                try:
                    rank, ok, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(collected))
                    raise RankError(f"ranks {missing} gave no result within {timeout:.0f} s") from None
                if not ok:
                    raise RankError(f"rank {rank} of {world_size} failed:\n{value}")
                collected[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5 if len(collected) == world_size else 0.1)
                if p.is_alive():
                    p.terminate()
                    p.join()
    return [collected[r] for r in range(world_size)]
