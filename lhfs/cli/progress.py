"""Progress of long work: a bar on a terminal, a plain line per step elsewhere, or nothing."""

from __future__ import annotations

import sys
from types import TracebackType


class Progress:
    """``update(percent)``; prints only when the figure changed (by a step, off a terminal)."""

    def __init__(self, label: str, quiet: bool = False, step: float = 10.0) -> None:
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.step = step
        self._last = -1.0

    def update(self, percent: float) -> None:
        if self.quiet:
            return
        if self.tty:
            filled = int(percent / 100 * 30)
            sys.stderr.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {percent:5.1f}%"
            )
            sys.stderr.flush()
        elif percent >= 100 or percent - self._last >= self.step:
            print(f"{self.label}: {percent:.0f}%", file=sys.stderr, flush=True)
        else:
            return
        self._last = percent

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tty and not self.quiet and self._last >= 0:
            sys.stderr.write("\n")
