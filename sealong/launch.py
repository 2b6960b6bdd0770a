"""Launching torchrun jobs so that no worker outlives its launcher.

    launcher (`sealong train`, `sealong pipeline`, `sealong sample / score --nproc-per-node K`)
      └─ torchrun            own process group; SIGINT / SIGTERM / SIGHUP of the launcher forwarded to the group;
           │                 parent-death signal: dies (SIGTERM) when the launcher dies, even by SIGKILL
           └─ workers        torchrun starts each in a session of its own (its group signals miss them), so each
                             worker sets its own parent-death signal (`die_with_parent`, called by
                             sealong.train.distributed.setup under torchrun): it dies when torchrun dies

The parent-death signal is Linux's prctl(PR_SET_PDEATHSIG); elsewhere a thread watches the parent pid and
signals its own process when the parent is gone. A forwarded signal the job does not obey within `grace`
seconds is followed by SIGKILL of the group; then the launcher stops as the signal asks.

Ctrl-C: torchrun runs through this module (`python -m sealong.launch TORCHRUN-ARGS` = torchrun less its traceback
and shutdown warnings when a signal stops it); the workers see SEALONG_LAUNCHED=1 and stop without a word
(sealong.config.parser.stage_main), so the launcher's stage prints the one line of what was kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def launch_command(nproc: int, flags: list[str], module: str = "sealong.train") -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node=N -m MODULE FLAGS` (one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *flags]


def without_launcher_flags(argv: list) -> list:
    """`argv` less `--nproc-per-node N` / `--nproc_per_node=N`: what sealong.train itself reads."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in ("--nproc-per-node", "--nproc_per_node"):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here: the child setup after fork must not load libraries


def _set_parent_death_signal(sig: int) -> bool:
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch_parent(parent: int, sig: int, every: float = 1.0) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="sealong-parent-watch", daemon=True).start()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have this process receive `sig` when its parent exits (a torchrun worker: when torchrun dies)."""
    parent = os.getppid()
    if not _set_parent_death_signal(sig):
        _watch_parent(parent, sig)
    elif os.getppid() != parent or parent == 1:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def _child_setup() -> None:
    """Runs in the child between fork and exec: dies with the launcher."""
    _set_parent_death_signal(signal.SIGTERM)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_job(cmd: list[str], grace: float = 30.0, what: str = "the training job") -> int:
    """Run `cmd` (a torchrun command) in its own process group and return its exit code.

    SIGINT / SIGTERM / SIGHUP received meanwhile are forwarded to the group; if the group has not exited
    `grace` seconds later it is killed. After a forwarded signal the launcher itself stops: SIGINT raises
    KeyboardInterrupt, the others SystemExit(128 + signal). Any other exit from here (an exception) kills the
    group first, so no worker is left behind.
    """
    # without a parent-death signal the child watches nothing: an orphaned torchrun would keep training, so
    # where prctl is missing the group is at least killed on every exit from this function
    proc = subprocess.Popen(_quiet(cmd), start_new_session=True, env=dict(os.environ, SEALONG_LAUNCHED="1"),
                            preexec_fn=_child_setup if _PRCTL is not None else None)
    received: list[int] = []

    def forward(sig, _frame):
        received.append(sig)
        _signal_group(proc, sig)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        deadline = None
        while proc.poll() is None:
            if received and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    if received:
        if received[0] == signal.SIGINT:  # Ctrl-C: the stage says in one line what was kept (stage_main)
            raise KeyboardInterrupt
        name = signal.Signals(received[0]).name
        print(f"sealong: {name} forwarded to {what} (pid {proc.pid}); it exited with {proc.returncode}",
              file=sys.stderr)
        raise SystemExit(128 + received[0])
    return proc.returncode


def _quiet(cmd: list[str]) -> list[str]:
    """`python -m torch.distributed.run ARGS` as `python -m sealong.launch ARGS` (see `torchrun`); others as given."""
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        return [cmd[0], "-m", "sealong.launch", *cmd[3:]]
    return cmd


class _ShutdownNotes(logging.Filter):
    """Drops torchrun's notes of a shutdown by signal ("Received 2 death signal", "... closing signal SIGINT")."""

    def filter(self, record):
        message = record.getMessage()
        return "death signal" not in message and "closing signal" not in message


def torchrun(argv: list[str]) -> int:
    """torchrun (torch.distributed.run.main) for `run_job`: a signal that stops it (SignalException: it has sent
    the signal on to its workers and waited for them) ends it with 128 + signal, without a traceback or its
    shutdown warnings; every other outcome is torchrun's own."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    for handler in logging.getLogger("torch.distributed").handlers + logging.getLogger("torch").handlers:
        handler.addFilter(_ShutdownNotes())
    try:
        main(argv)
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
