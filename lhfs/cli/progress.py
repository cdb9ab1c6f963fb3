"""Progress of long work: how much, how fast, how long yet.

On a terminal, one line redrawn in place: a bar, the percentage, bytes done of the total, the
rate and the time left. Elsewhere (a log, a pipe), a plain line at every tenth of the way and
exactly one at 100%, so that a log shows the progress without flooding. ``quiet``: nothing.
Written by hand: a progress library would cost every small command its import.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from lhfs.core.units import format_size

_REDRAW = 0.1  # seconds between redraws on a terminal


class Progress:
    """``update(percent, done=None, total=None)``: ``done`` and ``total`` in bytes when known
    (the rate is then in bytes per second, else in percent)."""

    def __init__(self, label: str, quiet: bool = False, step: float = 10.0) -> None:
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.step = step
        self._started = time.monotonic()
        self._printed = -step  # the last tenth printed off a terminal
        self._drawn = 0.0
        self._finished = False

    def update(self, percent: float, done: int | None = None, total: int | None = None) -> None:
        if self.quiet or self._finished:
            return
        percent = max(0.0, min(100.0, percent))
        now = time.monotonic()
        if self.tty:
            if percent < 100 and now - self._drawn < _REDRAW:
                return
            self._drawn = now
            filled = int(percent / 100 * 24)
            bar = "#" * filled + "." * (24 - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self._figures(percent, done, total)}\x1b[K")
            sys.stderr.flush()
        elif percent >= 100 or percent - self._printed >= self.step:
            self._printed = percent // self.step * self.step
            line = f"{self.label}: {self._figures(percent, done, total)}"
            print(line, file=sys.stderr, flush=True)
        self._finished = percent >= 100

    def note(self, text: str) -> None:
        """A line for the operator while the work goes on (a wait, a fallback), on a line of
        its own above the bar; shown with ``quiet`` too: it is not progress."""
        if self.tty and self._drawn:  # (a bar under way is drawn again at its next update)
            sys.stderr.write("\n" if self._finished else "\r\x1b[K")
            self._drawn = 0.0
        print(f"lhfs: {text}", file=sys.stderr, flush=True)

    def _figures(self, percent: float, done: int | None, total: int | None) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        out = "100%" if percent >= 100 else f"{percent:4.1f}%"
        if done is not None and total:
            out += f" {format_size(done)}/{format_size(total)} {format_size(int(done / elapsed))}/s"
        if 0 < percent < 100 and elapsed > 1:
            left = elapsed * (100 - percent) / percent
            out += f" ETA {int(left // 60)}:{int(left % 60):02d}"
        elif percent >= 100:
            out += f" in {elapsed:.1f}s"
        return out

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tty and not self.quiet and self._drawn:
            sys.stderr.write("\n")


class Steps:
    """Progress of work done in steps, one after the other (copying a file in, then hashing
    it; the parts of a system backup): a bar each, labelled by the step (and ``of``: what it
    works on), and notes on lines of their own between them."""

    def __init__(self, quiet: bool, of: str = "") -> None:
        self.quiet, self.of = quiet, of
        self.bar: Progress | None = None

    def update(
        self, what: str, percent: float, done: int | None = None, total: int | None = None
    ) -> None:
        label = f"{what} {self.of}" if self.of else what
        if self.bar is None or self.bar.label != label:
            self.close()
            self.bar = Progress(label, quiet=self.quiet)
        self.bar.update(percent, done, total)

    def step(self, what: str, done: int, total: int) -> None:
        """Bytes ``done`` of the ``total`` (what ``images.create`` and the checks are told)."""
        self.update(what, 100 * done / total if total else 100.0, done, total)

    def note(self, text: str) -> None:
        """A line for the operator (see ``Progress.note``)."""
        if self.bar is None:
            print(f"lhfs: {text}", file=sys.stderr, flush=True)
        else:
            self.bar.note(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
