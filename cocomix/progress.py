"""Progress output: a tqdm bar on a terminal, plain lines everywhere else.

A bar redraws one line with carriage returns: readable live, but in a log file (DAG and SLURM jobs
write `> {log} 2>&1`) it is one endless line, or nothing at all with `--no-progress`. So the bar is
drawn only when progress is on and stderr (where tqdm draws) is a terminal; otherwise the commands
print plain lines, flushed, one at a time, on stdout (where their start and done lines go), e.g.

    step 120/366 tokens 491,520 loss 3.412 lr 5.20e-04 10.2k tok/s elapsed 1m02s left 2m11s
"""

from __future__ import annotations

import sys
import time


def use_bar(progress: bool) -> bool:
    """A tqdm bar only with progress on and stderr a terminal; else plain lines."""
    try:
        return progress and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float) -> str:
    """`5s`, `1m02s`, `3h07m`, `2d04h`: two units at most, rounded to the second."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def time_left(elapsed: float, done: float, total: float) -> float | None:
    """Seconds to reach `total` at the rate so far (`done` units in `elapsed` s); None before any."""
    if done <= 0:
        return None
    return elapsed / done * max(0.0, total - done)


def si(x: float) -> str:
    """Three significant digits with a k/M/G suffix: `950`, `10.2k`, `1.5M`."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale * 0.9995:  # 999.6 is 1k, not 1e+03
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


class Reporter:
    """`total` units of work (None: unknown) shown as a tqdm bar (`use_bar`) or as plain lines.

    `update(n)` counts work done; `line(text)` prints `text` with the elapsed and estimated time
    left (plain mode only; the bar shows its own). Callers print on their own schedule, or when
    `due()`: about every `1 / lines` of the total, at least every `every_s` seconds, and at the end.
    Time left is measured from construction, or from `restart_clock()` (e.g. after a warm-up step).
    """

    def __init__(self, desc: str, total: int | None, unit: str, progress: bool = True, initial: int = 0,
                 lines: int = 10, every_s: float = 60.0):
        self.total, self.done, self.every_s = total, initial, every_s
        self.started = self.last_line_at = time.perf_counter()
        self.restart_clock()
        self.step = max(1, total // lines) if total else None  # units between lines
        self.next_mark = initial + self.step if self.step else None
        self.printed_at = initial
        self.bar = None
        if use_bar(progress):
            from tqdm import tqdm  # lazy: only with a bar

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def restart_clock(self) -> None:
        self.clock = (time.perf_counter(), self.done)

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def due(self, final: bool = False) -> bool:
        """Whether a plain line is due now (never with a bar, never twice for the same count)."""
        if self.bar is not None or self.done == self.printed_at:
            return False
        return (final or (self.total is not None and self.done >= self.total)
                or (self.next_mark is not None and self.done >= self.next_mark)
                or time.perf_counter() - self.last_line_at >= self.every_s)

    def left(self) -> float | None:
        if self.total is None:
            return None
        start, done_then = self.clock
        return time_left(time.perf_counter() - start, self.done - done_then, self.total - done_then)

    def line(self, text: str) -> None:
        if self.bar is not None:
            return
        now, left = time.perf_counter(), self.left()
        timing = f"elapsed {duration(now - self.started)}"
        if self.total is not None:
            timing += f" left {duration(left) if left is not None else '?'}"
        print(f"{text} {timing}", flush=True)
        self.last_line_at, self.printed_at = now, self.done
        if self.step:
            while self.next_mark <= self.done:
                self.next_mark += self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
