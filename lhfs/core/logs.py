"""The logs of lhfs's background processes: one format, files rotated by size, read back.

Every service (an engine, a replica, a DR follower) logs lines that start with an RFC 3339 UTC
time, so that ``lhfs logs`` can merge the logs of a volume's processes in time order. Started
with ``--log FILE``, a service writes FILE itself and rotates it when it passes
``LHFS_LOG_MAX_BYTES`` (10 MiB), keeping ``LOG_KEEP`` older files (FILE.1 the newest of them);
its standard error follows the current file, so that what Python prints on a crash lands there
too. Without ``--log`` (under a service manager) it logs to standard error.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import BinaryIO

LOG_MAX_BYTES = 10 << 20
LOG_KEEP = 3
_STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{whole}.{int(record.msecs):03d}Z"


class _Rotating(RotatingFileHandler):
    """Rotates, then points standard error at the new file."""

    def doRollover(self) -> None:
        super().doRollover()
        if self.stream is not None:
            os.dup2(self.stream.fileno(), 2)


def max_bytes() -> int:
    """The size at which a log rotates: ``$LHFS_LOG_MAX_BYTES`` or 10 MiB."""
    try:
        return max(4096, int(os.environ.get("LHFS_LOG_MAX_BYTES", LOG_MAX_BYTES)))
    except ValueError:
        return LOG_MAX_BYTES


def setup(path: Path | None) -> None:
    """Log INFO and above to ``path`` (rotated by size), or to standard error."""
    handler: logging.Handler
    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = _Rotating(path, maxBytes=max_bytes(), backupCount=LOG_KEEP)
        if handler.stream is not None:
            os.dup2(handler.stream.fileno(), 2)
    handler.setFormatter(_Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def note(path: Path, name: str, message: str) -> None:
    """Append one line to the log at ``path`` from another process than its service's, in
    its format: what a command did to a detached volume belongs in that volume's log. It is
    rotated as its service rotates it (``_roll``): a volume left detached for long, its
    snapshots taken and removed by a timer, would otherwise grow it without bound. A log that
    cannot be written is let be (the change was made: it is no failure of the command)."""
    record = logging.LogRecord(name, logging.INFO, "", 0, message, None, None)
    line = (_Formatter("%(asctime)s %(name)s: %(message)s").format(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size and os.fstat(fd).st_size + len(line) >= max_bytes():
            os.close(fd)
            _roll(path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


def _roll(path: Path) -> None:
    """Rotate a log as ``RotatingFileHandler`` does: FILE.N-1 becomes FILE.N (the oldest,
    FILE.LOG_KEEP, is overwritten), ..., FILE becomes FILE.1."""
    for n in range(LOG_KEEP - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def last_line(path: Path) -> str:
    """The last line a service logged: what a process that exited at start said (its error).
    Reads the end of the file only: a log may be 10 MiB."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError as exc:
        return f"its log cannot be read ({exc})"
    return lines[-1] if lines else "nothing logged"


def files(path: Path) -> list[Path]:
    """A log's files, oldest first: the rotated ones, then the current one."""
    older = [path.with_name(f"{path.name}.{n}") for n in range(LOG_KEEP, 0, -1)]
    return [p for p in [*older, path] if p.exists()]


def remove(path: Path) -> None:
    """Delete a log and its rotated files (those of a process that is gone for good: a replica
    removed, whose id a later replica may take)."""
    for name in files(path):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def entries(
    path: Path, everything: bool, upto: tuple[int, int] | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """``(stamp, text)`` for each entry of a log (a line with its continuation lines, such as
    a traceback's); ``everything``: the rotated files too. ``upto``: (inode, offset) where a
    ``Follower`` of the log starts: the current file is read up to there, if it is still that
    file (what comes after is the follower's to show, once)."""
    yield from _grouped(_lines(path, everything, upto))


def _lines(path: Path, everything: bool, upto: tuple[int, int] | None) -> Iterator[bytes]:
    """The lines of a log's files, oldest first, read as they are asked for (see
    ``entries``)."""
    for name in files(path) if everything else [path] if path.exists() else []:
        with open(name, "rb") as f:
            end = None
            if upto is not None and name == path and os.fstat(f.fileno()).st_ino == upto[0]:
                end = upto[1]
            yield from f if end is None else _upto(f, end)


def _upto(f: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of ``f`` that start before byte ``end``."""
    while f.tell() < end:
        line = f.readline()
        if not line:
            return
        yield line


def last_entries(
    path: Path, count: int, upto: tuple[int, int] | None = None
) -> list[tuple[bytes, bytes]]:
    """The last ``count`` entries of a log's current file (``upto``: see ``entries``), read
    from its end, as much as they take: a log of 10 MiB costs the few kilobytes shown.
    The end is read in growing pieces until it holds ``count`` entry starts (or is the whole
    file); lines before the first start are the tail of an earlier entry, left out."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    with f:
        limit = f.seek(0, os.SEEK_END)
        if upto is not None and os.fstat(f.fileno()).st_ino == upto[0] and upto[1] < limit:
            limit = upto[1]
            if limit > 0:  # (a line that starts before it is the history's, whole)
                f.seek(limit - 1)
                limit += 0 if f.read(1) == b"\n" else len(f.readline())
        piece = 64 << 10
        while True:
            start = max(0, limit - piece)
            f.seek(start)
            lines = f.read(limit - start).splitlines(keepends=True)
            if start > 0:
                lines = lines[1:]  # (it may begin inside a line)
            starts = [n for n, line in enumerate(lines) if _STAMP.match(line)]
            if start == 0 or len(starts) >= count:  # (each from a start is whole)
                break
            piece *= 4
    if start > 0:
        lines = lines[starts[0] :] if starts else []
    return list(_grouped(lines))[-count:]


def _grouped(lines: Iterator[bytes] | list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """``(stamp, text)`` of each entry of ``lines``: a stamped line with the unstamped lines
    after it (a traceback's); unstamped lines first are an entry of their own."""
    stamp = b""
    entry: list[bytes] = []
    for line in lines:
        found = _STAMP.match(line)
        if found and entry:
            yield stamp, b"".join(entry)
            entry = []
        if not entry:
            stamp = found.group(0) if found else stamp
        entry.append(line if line.endswith(b"\n") else line + b"\n")
    if entry:
        yield stamp, b"".join(entry)


def _tagged(
    label: str, path: Path, everything: bool, upto: tuple[int, int] | None
) -> Iterator[tuple[bytes, str, int, bytes]]:
    """``(stamp, label, n, text)`` of a log's entries, as ``merged`` orders them."""
    for n, (stamp, text) in enumerate(entries(path, everything, upto)):
        yield stamp, label, n, text


def merged(
    logs: dict[str, Path],
    lines: int,
    everything: bool,
    upto: dict[str, tuple[int, int]] | None = None,
) -> Iterator[tuple[str, bytes, bytes]]:
    """``(label, stamp, text)`` of the entries of several logs, in time order; the last
    ``lines`` of them (all with ``lines`` 0). ``upto``: where the followers of some start
    (see ``entries``). The last ``lines`` are found among each log's last ``lines`` (read from
    its end: ``last_entries``); all of them are merged as they are read (``heapq.merge``),
    never all held: the logs of a volume may be hundreds of megabytes. Each log's own order
    is kept (an entry a stalled process wrote after newer ones stays after them)."""
    where = upto or {}
    if lines and not everything:
        tagged = [
            (stamp, label, n, text)
            for label, path in logs.items()
            for n, (stamp, text) in enumerate(last_entries(path, lines, where.get(label)))
        ]
        tagged.sort(key=lambda item: (item[0], item[1], item[2]))
        for stamp, label, _, text in tagged[-lines:]:
            yield label, stamp, text
        return
    streams = [_tagged(label, path, everything, where.get(label)) for label, path in logs.items()]
    stream = heapq.merge(*streams, key=lambda item: item[:3])
    for stamp, label, _, text in collections.deque(stream, lines) if lines else stream:
        yield label, stamp, text


def labelled(label: str, text: bytes) -> bytes:
    """``text`` with each line prefixed by ``[label]``."""
    prefix = f"[{label}] ".encode()
    return b"".join(prefix + line for line in text.splitlines(keepends=True))


class Follower:
    """New lines of a log as they come, across rotation (the file is reopened when its name
    names another file, or when it shrank). ``start``: (inode, offset) where it began, the
    end of the file then (None: there was no file)."""

    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self.path = path
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self._open(at_end=True)
        self.start = None if self._file is None else (self._inode, self._file.tell())

    def _open(self, at_end: bool) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open between polls
        except FileNotFoundError:
            return
        if self._file is not None:
            self._file.close()
        self._file = f
        self._inode = os.fstat(f.fileno()).st_ino
        if at_end:
            f.seek(0, os.SEEK_END)

    def poll(self) -> bytes:
        """What was appended since the last poll (whole lines only, as they are)."""
        out = b""
        if self._file is not None:
            out = self._read()
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return out
        if self._file is None or info.st_ino != self._inode:
            self._open(at_end=False)  # rotated: the rest of the old file was read above
            out += self._read()
        elif info.st_size < self._file.tell():  # truncated
            self._file.seek(0)
            out += self._read()
        return out

    def _read(self) -> bytes:
        """The whole lines appended since the last read, read at once: a burst of many
        megabytes (a follower stopped for a while) costs its size, not its size squared."""
        assert self._file is not None
        data = self._file.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # (an incomplete line: read it next time)
            self._file.seek(whole - len(data), os.SEEK_CUR)
        return data[:whole]


FOLLOW_WINDOW = 1.0  # seconds an entry followed is held for others logged before it


def stamp_of(when: float) -> bytes:
    """The stamp a log line of time ``when`` starts with (as ``_Formatter`` writes it)."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    return f"{whole}.{int(when * 1000) % 1000:03d}Z ".encode()


class Merger:
    """The new entries of several logs (``Follower``s) merged in time order, as ``merged``
    orders a log's past: each entry is held until ``window`` seconds past its time, so that
    one another process logged a moment before it, but that was read after it (each file is
    read in turn, every ``poll``), comes out first. An entry that reaches its file later than
    that (a process stalled between its stamp and its write) comes out as soon as it is read,
    after newer ones. Continuation lines (a traceback's) stay with their entry while it is
    held; read after it went out, they come out on their own with its time."""

    def __init__(self, followers: list[Follower], window: float = FOLLOW_WINDOW) -> None:
        self.followers = followers
        self.window = window
        self._held: list[list] = []  # [stamp, label, seq, text], in the order read
        self._open: dict[str, list] = {}  # label -> its last entry, while held
        self._last: dict[str, bytes] = {}  # label -> the stamp of its last entry
        self._seq = 0

    def poll(self, now: float | None = None) -> bytes:
        """Read what each log got since, and give the entries whose time has come
        (``labelled``, in time order)."""
        for follower in self.followers:
            for line in follower.poll().splitlines(keepends=True):
                self._add(follower.label, line)
        return self._out(stamp_of((time.time() if now is None else now) - self.window))

    def flush(self) -> bytes:
        """Every entry held, in time order (at the end)."""
        return self._out(None)

    def _add(self, label: str, line: bytes) -> None:
        found = _STAMP.match(line)
        entry = self._open.get(label)
        if found is None and entry is not None:
            entry[3] += line
            return
        stamp = found.group(0) if found else self._last.get(label, b"")
        self._last[label] = stamp
        entry = [stamp, label, self._seq, line]
        self._seq += 1
        self._open[label] = entry
        self._held.append(entry)

    def _out(self, mark: bytes | None) -> bytes:
        ready = [e for e in self._held if mark is None or e[0] <= mark]
        if not ready:
            return b""
        self._held = [e for e in self._held if not (mark is None or e[0] <= mark)]
        for entry in ready:
            if self._open.get(entry[1]) is entry:
                del self._open[entry[1]]
        ready.sort(key=lambda e: (e[0], e[1], e[2]))
        return b"".join(labelled(label, text) for _, label, _, text in ready)
