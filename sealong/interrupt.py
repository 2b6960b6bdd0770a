"""Ctrl-C in a stage: one line saying what was kept and that the same command resumes, and exit code 130 (the
shell's 128 + SIGINT), instead of a traceback.

    sealong sample: interrupted: 12 of 40 prompts' samples kept (runs/x/samples.jsonl and its shard files); the same command resumes

Each stage module may define `kept_on_interrupt(cfg) -> str` (what is on disk now). A torchrun worker of a
sealong launcher (SEALONG_LAUNCHED=1, set by sealong.launch.run_job) and any rank but 0 stop without a word: the
launcher, or rank 0, prints the line. An exception raised after a SIGINT arrived (e.g. a collective failing
because another rank stopped) counts as the interrupt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODE = 128 + signal.SIGINT  # 130
_seen: list = []


def _on_sigint(sig, frame):
    _seen.append(sig)
    raise KeyboardInterrupt


def watch() -> None:
    """Note every SIGINT of this process (then raise KeyboardInterrupt, as Python's default handler does)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def interrupted(err: BaseException) -> bool:
    """`err` is, or came after, a Ctrl-C (a SystemExit, e.g. a forwarded SIGTERM, never is)."""
    return isinstance(err, KeyboardInterrupt) or (bool(_seen) and isinstance(err, Exception))


def quiet() -> bool:
    return os.environ.get("SEALONG_LAUNCHED") == "1" or os.environ.get("RANK", "0") != "0"


def stopped(prog: str, module=None, cfg=None) -> int:
    """Print the one line (unless `quiet`) and return EXIT_CODE."""
    if not quiet():
        kept = getattr(module, "kept_on_interrupt", None)
        try:
            what = (kept(cfg) if kept is not None and cfg is not None
                    else "its files are written whole at the end, so none was left half-written; the same command "
                         "runs it again")
        except Exception as err:  # the note must not hide the interrupt
            what = f"(what was kept could not be read: {err})"
        print(f"{prog}: interrupted: {what}", file=sys.stderr, flush=True)
    return EXIT_CODE
