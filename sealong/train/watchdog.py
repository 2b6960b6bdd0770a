"""A stuck rank fails the job within `dist_timeout` seconds, and is named with the step and phase it stopped in.

Every collective of the job waits at most `dist_timeout` seconds (the process group's timeout, set in
sealong.train.distributed.setup) instead of gloo's / NCCL's 30 minutes. A rank that is alive but stuck (a hung
data read, a wedged device) fails the others with a bare backend timeout ("Timed out waiting 15000ms for send
operation to complete") of whichever collective they wait in: an all-gather of FSDP's forward, a reduce-scatter
of its backward, the gradient all-reduce, a checkpoint's barrier. To name it, every rank keeps a heartbeat:

* the training loop marks each phase boundary (`Heartbeat.mark(step, phase, waits_in)`: start-up, forward,
  backward, gradient all-reduce, optimizer step, metrics all-reduce, logging and checks, checkpoint save): an
  assignment in memory, no collective and no store traffic in the hot path (nothing per layer);
* a side thread publishes the mark every `every` seconds through the c10d store (key `sealong/heartbeat/RANK`),
  with the time and whether the main thread is waiting inside torch.distributed at that moment (its innermost
  Python frame, read with sys._current_frames) or elsewhere (computing, sleeping, reading a file), and where;
* a rank whose collective times out reads the other ranks' heartbeats before it raises (`Heartbeat.diagnose`):
  the ranks that are not waiting in a collective, or whose heartbeat stopped or never started, are the ones
  that did not arrive. It raises StuckRankError naming them, the step, the collective it waited in and the
  phase each stuck rank is in; torchrun then stops the other workers.

A timeout that no heartbeat explains (every peer waiting: collectives issued in different orders) is re-raised
as the backend reported it. Where the backend does not time out (a process group made by the caller with a
longer timeout), the side thread reports the same error itself once its main thread has waited in one collective
call for dist_timeout plus a grace, and ends the process. "Waiting" is the main thread's innermost Python frame
inside torch.distributed (DCP's file writing excepted). Not covered: NCCL aborts a timed-out process from its
own watchdog at dist_timeout, before that grace; its heartbeats are then only in the store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time

import torch.distributed as dist

KEY = "sealong/heartbeat/{}"
log = logging.getLogger("sealong.train")


class StuckRankError(RuntimeError):
    """Some ranks did not reach a collective within dist_timeout; the message names them, the step and phase."""


def check_timeout(seconds: float) -> float:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"dist_timeout must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)


DISTRIBUTED = os.path.dirname(dist.__file__) + os.sep  # .../torch/distributed/
STORAGE = os.path.join(DISTRIBUTED, "checkpoint") + os.sep  # DCP's file writing: work, not a wait (its collectives
#                                                             run in distributed_c10d.py)


def _frame_of(thread_id):
    """(innermost Python frame, waiting in a torch.distributed collective, 'file:line in function') of a thread."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return None, False, "?"
    code = frame.f_code
    where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
    return frame, code.co_filename.startswith(DISTRIBUTED) and not code.co_filename.startswith(STORAGE), where


def timed_out(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) is a collective's or the store's timeout."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if "Timed out" in text or "timed out" in text or "Timeout" in text or "timeout" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


class Heartbeat:
    """This rank's (step, phase), published through the c10d store by a side thread; a no-op in one process.

    `mark(step, phase, waits_in)`: the phase this rank entered and the collective it waits in next when that
    times out ("the forward all-gather"), for the message. `diagnose(err)` after a timeout: a StuckRankError
    naming the peers that did not arrive, or None.

    Should the backend not time out (NCCL aborts from its own watchdog; a process group made by the caller
    with a longer timeout), the side thread itself reports: once the main thread has waited in one collective
    call for `timeout + grace` seconds it logs the StuckRankError and ends the process (exit code 1; torchrun
    then stops the others). grace: max(5 s, a quarter of the timeout), so that the backend's own error, which
    unwinds the main thread, comes first where there is one."""

    def __init__(self, timeout: float, every: float = 0.5):
        self.timeout, self.every = check_timeout(timeout), every
        self.grace = max(5.0, 0.25 * self.timeout)
        self.state = (0, "start-up", "the first collective", time.time())  # replaced whole: atomic for the thread
        self.store, self._stop = None, threading.Event()
        self._wait_frame, self._wait_start = None, 0.0
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self._main = threading.get_ident()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="sealong-heartbeat", daemon=True)
        self._thread.start()

    def mark(self, step: int, phase: str, waits_in: str) -> None:
        if self.state[:3] != (step, phase, waits_in):
            self.state = (step, phase, waits_in, time.time())

    def _publish(self):
        step, phase, _, since = self.state
        frame, waiting, where = _frame_of(self._main)
        now = time.time()
        if not waiting:
            self._wait_frame = None
        elif frame is not self._wait_frame:  # a new collective call (the frame is held: its id is not reused)
            self._wait_frame, self._wait_start = frame, now
        del frame
        self.store.set(KEY.format(self.rank), json.dumps(
            {"step": step, "phase": phase, "since": since, "time": now, "waiting": waiting, "where": where}))
        return now - self._wait_start if waiting else 0.0, where

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                waited, where = self._publish()
                if waited > self.timeout + self.grace:
                    self._give_up(waited, where)
            except Exception:  # the store is gone (the job is ending): nothing left to tell
                return

    def _give_up(self, waited, where):
        """The backend did not time out: report the stuck peers from here and end this process."""
        stuck = self.diagnose(TimeoutError(f"waited {waited:.0f} s in {where}: timed out (the backend did not)"))
        if stuck is None:
            return
        log.error("StuckRankError: %s", stuck)
        print(f"sealong.train.watchdog.StuckRankError: {stuck}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)  # the main thread is blocked in the collective: nothing can unwind it

    def close(self):
        self._stop.set()

    def peers(self) -> dict:
        """rank -> its last published heartbeat (a dict), or None where it never published one."""
        out = {}
        for r in range(self.world):
            if r != self.rank:
                key = KEY.format(r)
                out[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return out

    def diagnose(self, err: BaseException) -> StuckRankError | None:
        if self.store is None or not timed_out(err):
            return None
        step, _, waits_in, _ = self.state
        try:
            beats = self.peers()
        except Exception:  # the store went with the stuck rank (it hosted it): say what is known
            return None
        now, stale = time.time(), max(10 * self.every, 5.0)  # a busy machine may delay a thread by seconds
        stuck, notes = [], []
        for r, beat in sorted(beats.items()):
            if beat is None:
                stuck.append(r)
                notes.append(f"rank {r}: no heartbeat (never started)")
            elif now - beat["time"] > stale:
                stuck.append(r)
                notes.append(f"rank {r}: dead or frozen, no heartbeat for {now - beat['time']:.0f} s "
                             f"(last: {_at(beat)})")
            elif not beat["waiting"]:
                stuck.append(r)
                notes.append(f"rank {r}: {_at(beat)} for {now - beat['since']:.1f} s, at {beat['where']}")
        if not stuck:
            return None
        first = str(err).strip().splitlines()
        return StuckRankError(
            f"{f'step {step}' if step else 'start-up'}: rank(s) {', '.join(map(str, stuck))} did not reach "
            f"{waits_in} within dist_timeout={self.timeout:g} s ({'; '.join(notes)}); stopping the job "
            f"(rank {self.rank} reporting: {first[-1] if first else type(err).__name__})")


def _at(beat):
    """'in step 2's forward' / 'in start-up'."""
    return f"in step {beat['step']}'s {beat['phase']}" if beat["step"] else f"in {beat['phase']}"
