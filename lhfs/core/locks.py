"""Whole-file locks (``flock``) that say who waits for what: one process at a time does a
thing to a volume, and the kernel lets go of the lock when its holder dies, however it dies
(a kill -9 leaves nothing to clean up)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from lhfs.core.errors import Busy


def take(path: Path, wait: float, busy: str) -> int:
    """Hold the lock of ``path`` (created, owner-only, if missing), waiting up to ``wait``
    seconds for its holder; the descriptor to close to let go (not inherited by children).
    ``Busy(busy)`` when the holder kept it longer."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise Busy(busy) from None
            time.sleep(0.05)
