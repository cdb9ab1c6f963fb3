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
    The holder's pid is kept in the file, for ``Busy(busy)`` to name (where ``busy`` says
    ``{pid}``, else at its end) when it kept the lock longer."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
                os.close(fd)
                said = f" (pid {holder})" if holder.isdigit() else ""
                message = busy.replace("{pid}", said) if "{pid}" in busy else busy + said
                raise Busy(message) from None
            time.sleep(0.05)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
