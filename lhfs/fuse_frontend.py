"""The FUSE frontend: the volume as one regular file, for a loop device to attach to.

This module only translates: each handler turns a FUSE request into an engine call, and
``_errno`` is the one place where an lhfs error becomes an errno. The mount point is a regular
file and the file system's root inode is that file, of the volume's size. Files are opened with
direct I/O so that every read and write reaches the engine (no kernel page cache in between to
make a flush lie).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from .engine import Engine, Faulted
from .errors import InvalidArgument, LhfsError

log = logging.getLogger("lhfs.fuse")

T = TypeVar("T")


def _errno(exc: Exception) -> int:
    """The one mapping from lhfs failures to what the kernel hands to the application."""
    if isinstance(exc, Faulted):
        return errno.EIO
    if isinstance(exc, InvalidArgument):
        return errno.EINVAL
    if isinstance(exc, LhfsError):
        return errno.EIO
    log.exception("unexpected error in a FUSE handler")
    return errno.EIO


def _translate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """pyfuse3 stops its main loop on any exception but FUSEError: convert them all here."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> T:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(_errno(exc)) from None

    return wrapper


class VolumeFile(pyfuse3.Operations):
    """A single-file file system over an engine."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self._started = time.time_ns()

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.st_mode = stat.S_IFREG | 0o600
        attrs.st_nlink = 1
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_size = self.engine.size
        attrs.st_blksize = 4096
        attrs.st_blocks = self.engine.size // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started
        attrs.attr_timeout = 1
        attrs.entry_timeout = 1
        return attrs

    @_translate
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and attr.st_size != self.engine.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # resizing is `lhfs volume expand`
        return await self.getattr(inode)

    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, self.engine.size - off))
        return await self.engine.read(off, size) if size else b""

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.engine.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        await self.engine.write(off, buf)
        return len(buf)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.engine.flush()

    async def flush(self, fh: int) -> None:
        """close(2): durability is fsync's job, not close's."""

    async def release(self, fh: int) -> None:
        """Nothing is held per open file."""

    @_translate
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = self.engine.size // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data


def mount_options() -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=lhfs", "subtype=lhfs"}
    return options
