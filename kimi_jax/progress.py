"""One progress policy for every command (run, vindex, digest).

On a terminal, a bar redrawn in place (tqdm). Anywhere else (a log file, a pipe, CI) plain lines
and never a carriage-return redraw: a line each time another tenth of the work is done, and one
at the end, each saying what is being done, how far along, and how long it has taken. ``run``
writes its own line per step instead (:class:`kimi_jax.run.console.Progress`); it draws its
terminal bar through :func:`progress_bar` too.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["is_terminal", "progress_bar", "LineProgress"]

LINES = 10  # lines a non-terminal progress writes over the whole work, besides the last


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None,
                 unit_scale: bool = False):  # fmt: skip
    """A bar on a terminal, plain lines elsewhere, nothing when not ``enabled``; each takes tqdm's
    ``update``, ``set_description``, ``set_postfix_str``, ``write``, ``close`` and ``n``."""
    stream = stream if stream is not None else sys.stderr
    if enabled and is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, stream, enabled, unit_scale)


class LineProgress:
    """tqdm's interface as plain lines (see the module doc)."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, enabled: bool = True,
                 unit_scale: bool = False):  # fmt: skip
        self.total, self.desc, self.unit, self.stream = max(int(total), 0), desc, unit, stream
        self.enabled, self.unit_scale = enabled, unit_scale
        self.n, self.postfix, self.shown = 0, "", 0  # shown: the tenths already written
        self.started = time.perf_counter()
        self.closed = False

    def update(self, count: int = 1) -> None:
        self.n += count
        tenth = self.n * LINES // self.total if self.total else 0
        if tenth > self.shown and self.n < self.total:
            self.shown = tenth
            self._line()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed and self.total:
            self._line(done=True)
        self.closed = True

    def _amount(self, n: int) -> str:
        if self.unit_scale and self.unit == "B":
            return f"{n / 2**20:,.1f} MiB"
        return f"{n:,}"

    def _line(self, done: bool = False) -> None:
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        more = f", {self.postfix}" if self.postfix else ""
        verb = "done" if done else "at"
        unit = "" if self.unit_scale and self.unit == "B" else f" {self.unit}"
        self.write(f"{self.desc}: {verb} {self._amount(self.n)} of {self._amount(self.total)}{unit}{share}{more}, "
                   f"{time.perf_counter() - self.started:.1f} s")  # fmt: skip
