"""Whole-file locks (``flock``) that say who waits for what: one process at a time does a
thing to a volume, and the kernel lets go of the lock when its holder dies, however it dies
(a kill -9 leaves nothing to clean up).

Every lock file is opened by ``open_lock``, one way: never through a symbolic link (which
could make lhfs create or lock a file anywhere), and a file that cannot be a lock (a link, a
directory in its place) is refused in one line naming it, not as an ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from lhfs.core.errors import Busy, CorruptState
from lhfs.core.procs import alive

_WHY = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a directory"}


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created, owner-only, if missing; not inherited
    by children); ``CorruptState`` when something else is in its place."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # (its directory is gone: what it locks was removed)
            raise
        why = _WHY.get(exc.errno or 0, f"cannot be opened ({exc.strerror})")
        raise CorruptState(f"lock file {path} {why}: remove it") from None


@contextlib.contextmanager
def held(path: Path) -> Iterator[int]:
    """Hold the lock of ``path`` for the block, waiting for it as long as it takes (for
    locks held only for an instant: a reload-change-save)."""
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def take(path: Path, wait: float, busy: str) -> int:
    """Hold the lock of ``path`` (created, owner-only, if missing), waiting up to ``wait``
    seconds for its holder; the descriptor to close to let go (not inherited by children).
    The holder's pid is kept in the file, for ``Busy(busy)`` to name (where ``busy`` says
    ``{pid}``, else at its end) when it kept the lock longer: only a live one (a holder
    that was killed left its pid there, and another tool may hold the lock without writing
    its own). A lock file removed while this waited (its volume removed) is not held: the
    wait goes on at the path, on the file there now, or ends as its directory did."""
    fd = open_lock(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
                os.close(fd)
                live = holder.isdigit() and alive(int(holder))
                said = f" (pid {holder})" if live else ""
                message = busy.replace("{pid}", said) if "{pid}" in busy else busy + said
                raise Busy(message) from None
            time.sleep(0.05)
            continue
        if not _same_file(path, fd):
            os.close(fd)
            fd = open_lock(path)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``fd`` is the file at ``path`` still (not one removed, or replaced, since)."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def name_held(path: Path, thing: str, doing: str) -> Iterator[None]:
    """Hold the name of ``thing`` ("volume NAME", "backing image NAME") for the block, by
    the lock file ``path``: what makes or removes a named thing holds it, so two commands
    never build or tear down in one place at once. Another command holding it is refused at
    once with ``Busy``, naming what it does (``doing``: "created", "removed") and its pid:
    waiting for it would only end in "already exists" or "no such ...". The lock file goes
    when the block ends (the next one to come makes its own: see the inode check)."""
    while True:
        fd = open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder: list[str] = []
            for _ in range(20):  # (its holder writes its line just after it took the lock)
                holder = os.pread(fd, 100, 0).decode(errors="replace").split()
                if len(holder) > 1:
                    break
                time.sleep(0.01)
            os.close(fd)
            what = holder[1] if len(holder) > 1 else "changed"
            pid = f" (pid {holder[0]})" if holder else ""
            raise Busy(f"{thing} is being {what} by another command{pid}") from None
        if _same_file(path, fd):
            break
        os.close(fd)  # (its holder removed it as it let go: the one there now is free)
    try:
        os.ftruncate(fd, 0)  # (a holder that was killed left its line)
        os.pwrite(fd, f"{os.getpid()} {doing}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # (before the lock goes: see above)
            os.unlink(path)
        os.close(fd)
