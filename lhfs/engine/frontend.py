"""The FUSE frontend: the volume as one regular file, for a loop device to attach to.

This module only translates: each request from the kernel (read off ``/dev/fuse`` by
``fusedev.FuseChannel``) becomes an engine call, and ``_errno`` is the one place where an lhfs
error becomes an errno. The mount point is a regular file and the file system's root inode is
that file, of the volume's size. The file is opened with direct I/O so that every read, write
and fsync reaches the engine (no kernel page cache in between to make a flush lie).

Reads, writes, fsync and fallocate are submitted without waiting and answered from the
engine's completion callbacks; the other requests are answered at once. After each burst of
requests the engine pushes them to the replicas together.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from functools import partial

from lhfs.core.errors import InvalidArgument, LhfsError, NoSpace
from lhfs.engine import fusedev as f
from lhfs.engine.engine import Engine, Faulted
from lhfs.engine.metrics import IoStats

log = logging.getLogger("lhfs.fuse")

_PUNCH_HOLE, _KEEP_SIZE, _ZERO_RANGE = 0x02, 0x01, 0x10
_KEEP = 128 << 10  # writes this large are sent from the read buffer rather than copied


def _errno(exc: Exception) -> int:
    """The one mapping from lhfs failures to what the kernel hands to the application."""
    if isinstance(exc, Faulted):
        return errno.EIO
    if isinstance(exc, InvalidArgument):
        return errno.EINVAL
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, LhfsError):
        return errno.EIO
    log.error("unexpected error in the FUSE frontend", exc_info=exc)
    return errno.EIO


class VolumeFile:
    """A single-file file system over an engine."""

    def __init__(
        self, engine: Engine, channel: f.FuseChannel, stats: IoStats | None = None
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.stats = stats or IoStats()  # what the metrics report (cheap: plain counters)
        self._mtime = int(time.time())

    async def serve(self) -> None:
        """Answer the kernel until the file is unmounted or the channel is stopped."""
        await self.channel.serve(self.handle, self.engine.push)

    def handle(self, opcode: int, unique: int, args: memoryview) -> None:
        """One request; never raises (a failure is the request's error answer)."""
        channel = self.channel
        try:
            if opcode == f.WRITE:
                _, offset, size = f.IO_IN.unpack_from(args)
                if offset + size > self.engine.size:
                    channel.reply_error(unique, errno.ENOSPC)
                    return
                data = args[f.IO_IN_SIZE : f.IO_IN_SIZE + size]
                since = self.stats.started()
                if size >= _KEEP or channel.pool is not None:  # sent from where it was read
                    done = partial(self._written, unique, size, channel.keep(), since)
                else:
                    data, done = bytes(data), partial(self._written, unique, size, None, since)
                self.engine.submit_write(offset, data, done)
            elif opcode == f.READ:
                _, offset, size = f.IO_IN.unpack_from(args)
                size = max(0, min(size, self.engine.size - offset))
                if size == 0:
                    channel.reply(unique)
                else:
                    since = self.stats.started()
                    done = partial(self._read, unique, size, since)
                    self.engine.submit_read(offset, size, done, unique)
            elif opcode == f.FSYNC:
                since = self.stats.started()
                self.engine.submit_flush(partial(self._done, unique, "flush", 0, since))
            elif opcode == f.FALLOCATE:
                self._fallocate(unique, args)
            elif opcode in (f.GETATTR, f.SETATTR):
                if opcode == f.SETATTR:
                    valid, _, _, size = f.SETATTR_IN.unpack_from(args)
                    if valid & f.FATTR_SIZE and size != self.engine.size:
                        # resizing is `lhfs volume expand`
                        channel.reply_error(unique, errno.EPERM)
                        return
                channel.reply(unique, f.attr_reply(self.engine.size, self._mtime))
            elif opcode == f.OPEN:
                flags = f.FOPEN_DIRECT_IO | f.FOPEN_PARALLEL_DIRECT_WRITES
                channel.reply(unique, f.OPEN_OUT.pack(f.ROOT_INODE, flags, 0))
            elif opcode in (f.FLUSH, f.RELEASE, f.DESTROY):
                # close(2) is not a flush (fsync is), and nothing is held per open file
                channel.reply(unique)
            elif opcode == f.STATFS:
                blocks = self.engine.size // 4096
                channel.reply(
                    unique, f.STATFS_OUT.pack(blocks, 0, 0, 0, 0, 4096, 255, 4096, 0, *[0] * 6)
                )
            elif opcode == f.INIT:
                channel.reply(unique, channel.init_reply(args))
            elif opcode not in f.NO_REPLY:
                channel.reply_error(unique, errno.ENOSYS)
        except Exception as exc:
            channel.reply_error(unique, _errno(exc))

    def _fallocate(self, unique: int, args: memoryview) -> None:
        """Punching a hole or zeroing a range is a trim: the range reads as zeros afterwards
        (a loop device turns discard and write-zeroes into these). Reserving space is not
        offered: the volume is thin, and saying yes would promise space it does not hold."""
        _, offset, length, mode = f.FALLOCATE_IN.unpack_from(args)
        if mode & ~(_PUNCH_HOLE | _KEEP_SIZE | _ZERO_RANGE) or not mode & (
            _PUNCH_HOLE | _ZERO_RANGE
        ):
            self.channel.reply_error(unique, errno.EOPNOTSUPP)  # not ENOSYS: that sticks
            return
        if not mode & _KEEP_SIZE and offset + length > self.engine.size:
            self.channel.reply_error(unique, errno.EOPNOTSUPP)  # the file cannot grow
            return
        length = min(length, max(0, self.engine.size - offset))
        if length == 0:
            self.channel.reply(unique)
            return
        since = self.stats.started()
        self.engine.submit_trim(offset, length, partial(self._done, unique, "trim", length, since))

    def _written(
        self,
        unique: int,
        size: int,
        release: Callable[[], None] | None,
        since: float,
        error: Exception | None,
    ) -> None:
        if release is not None:
            release()
        self.stats.done("write", size, since, error is not None)
        if error is None:
            self.channel.reply(unique, f.WRITE_OUT.pack(size, 0))
        else:
            self.channel.reply_error(unique, _errno(error))

    def _read(
        self,
        unique: int,
        size: int,
        since: float,
        error: Exception | None,
        data: memoryview | bytes | None,
    ) -> None:
        self.stats.done("read", size, since, error is not None)
        if error is None:
            if data is not None:  # (None: a local replica answered the kernel itself)
                self.channel.reply(unique, data)
        else:
            self.channel.reply_error(unique, _errno(error))

    def _done(self, unique: int, op: str, size: int, since: float, error: Exception | None) -> None:
        self.stats.done(op, size, since, error is not None)
        if error is None:
            self.channel.reply(unique)
        else:
            self.channel.reply_error(unique, _errno(error))
