"""Progress of a stage's work: a tqdm bar on a terminal; off a terminal (a log file, a pipe, CI) a log line at most
every `every` seconds with the real count, the rate and the time left, and one at the end:

    12:40:05 sealong.sample: sample 6/15 prompts (40%), 0.42 prompts/s, 21s left; tokens/s 130.4, slots 100%

(tqdm's own bar is disabled without a terminal, and a disabled bar's counter never moves: counts taken from it
read 0.)
"""

from __future__ import annotations

import logging
import sys
import time


EVERY = 5.0  # seconds between two lines off a terminal


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Progress:
    """`update(n, **postfix)` per finished unit of work, `close()` at the end (or use it as a context manager).

    bar: True a tqdm bar on `stream`, False log lines to `log`, None (default) a bar when `stream` is a terminal.
    enabled False: nothing at all (the other ranks of a data-parallel job). `initial`: units done before (a resume):
    counted in n, not in the rate. `clock`: seconds (tests pass a fake one).
    """

    def __init__(self, total: int, unit: str, desc: str, log: logging.Logger | None = None, stream=None,
                 every: float | None = None, bar: bool | None = None, enabled: bool = True, initial: int = 0,
                 clock=time.monotonic):
        self.total, self.unit, self.desc, self.clock = total, unit, desc, clock
        self.every = EVERY if every is None else every
        self.log = log or logging.getLogger("sealong")
        self.n = self.initial = initial
        self.enabled = enabled
        self.postfix: dict = {}
        self.started = self.last = clock()
        self.logged_n = initial
        stream = sys.stderr if stream is None else stream
        use_bar = bar if bar is not None else bool(getattr(stream, "isatty", lambda: False)())
        self.bar = None
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=stream, dynamic_ncols=True)

    def rate(self) -> float:
        return (self.n - self.initial) / max(self.clock() - self.started, 1e-9)

    def line(self) -> str:
        """`desc n/total unit (p%), r unit/s, t left; k v, ...`"""
        rate = self.rate()
        text = f"{self.desc} {self.n}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:.3g} {self.unit}/s"
        if self.n < self.total and rate > 0:
            text += f", {_duration((self.total - self.n) / rate)} left"
        elif self.n >= self.total:
            text += f", {_duration(self.clock() - self.started)} in all"
        if self.postfix:
            text += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def update(self, n: int = 1, **postfix) -> None:
        if not self.enabled:
            return
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if n and now - self.last >= self.every:
            self.log.info(self.line())
            self.last, self.logged_n = now, self.n

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.logged_n:  # the final count, unless the last line already said it
            self.log.info(self.line())
            self.logged_n = self.n
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
