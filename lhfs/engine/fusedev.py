"""The kernel's FUSE protocol, spoken directly on ``/dev/fuse``, for a file system of one file.

Why not a binding: a FUSE binding hands requests to the program one at a time, each after a
round of the event loop. lhfs serves one regular file whose requests are nearly all reads and
writes, and its engine gains most from seeing many of them at once: this channel reads every
request the kernel has queued in one go (a burst), lets the frontend submit them all, and only
then sends them to the replicas, so that a burst of sixteen 4 KiB writes costs each replica one
receive and one send instead of sixteen. A null file system served this way answers about three
times the requests per second of one served through pyfuse3 on the same machine (see
``bench/RESULTS.md``). Speaking the protocol directly also gives ``fallocate``, which the
binding lacked: discard through the device reaches the replicas as trim.

The protocol (``linux/fuse.h``): each read of the device returns one request, a
``fuse_in_header`` and the operation's arguments; each reply is one write, a
``fuse_out_header`` (length, ``-errno``, the request's ``unique``) and the answer. The mount is
made with mount(2), as root (loop devices and mounting a file system on the volume need root
anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import trio

from lhfs.core.errors import LhfsError
from lhfs.wire import shm

# Opcodes (linux/fuse.h, enum fuse_opcode) that a single-file file system meets.
GETATTR, SETATTR, OPEN, READ, WRITE, STATFS, RELEASE = 3, 4, 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT, INTERRUPT, DESTROY, FALLOCATE = 20, 25, 26, 36, 38, 43
FORGET, BATCH_FORGET = 2, 42
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = shm.FUSE_OUT  # len, error (-errno), unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
ATTR_OUT = struct.Struct("<QII" + "QQQQQQ" + "IIIIIIIIII")  # valid, nsec, pad, fuse_attr
SETATTR_IN = struct.Struct("<IIQQ")  # valid, padding, fh, size (the rest is not needed)
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
IO_IN = struct.Struct("<QQI")  # fuse_read_in / fuse_write_in: fh, offset, size (then flags...)
IO_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII6I")
FALLOCATE_IN = struct.Struct("<QQQI")  # fh, offset, length, mode
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")

KERNEL_MAJOR = 7
OUR_MINOR = 38  # the version of linux/fuse.h these structures follow
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_MAX_PAGES = 1 << 22
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FATTR_SIZE = 1 << 3
NOTIFY_INVAL_INODE_CODE = 2
ROOT_INODE = 1

MAX_WRITE = 1 << 20  # the largest write the kernel sends in one request (max_pages 256)
MAX_BACKGROUND = 64  # requests of asynchronous direct I/O the kernel keeps in flight
BURST = 64  # requests read before the frontend's end-of-burst hook runs (bounds latency)
# The end-of-burst hook (which sends what was submitted to the replicas) also runs after every
# PUSH_EVERY requests and after every BURST_BYTES read: the replicas start on the first
# requests of a burst while the engine reads the rest, instead of waiting for all of it. With
# 16 requests in flight, against one send per burst: 4 KiB random reads +10-20%, writes +7-20%
# (one and three replicas), 1 MiB writes +10-17%; every request or every second did worse.
PUSH_EVERY = 4
BURST_BYTES = 1 << 20
BUFFER = MAX_WRITE + (64 << 10)  # room for the largest request
POOL_SLOTS = 96  # request buffers in the engine's shared pool (in flight, held, the next)
_SPARES = 16  # read buffers kept for reuse (each as large as the largest request)

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(LhfsError):
    """The file could not be mounted as a FUSE device."""


def attr_reply(size: int, mtime: int, timeout: int = 1) -> bytes:
    """A ``fuse_attr_out`` for the one file: a regular file of ``size`` bytes, owned by the
    mounting user, mode 0600."""
    return ATTR_OUT.pack(
        timeout, 0, 0,
        ROOT_INODE, size, size // 512, mtime, mtime, mtime,
        0, 0, 0, stat.S_IFREG | 0o600, 1, os.getuid(), os.getgid(), 0, 4096, 0,
    )  # fmt: skip


class FuseChannel:
    """A mounted FUSE device on the regular file ``path``; see the module docstring."""

    def __init__(self, path: Path, fsname: str = "lhfs") -> None:
        self.path = Path(path)
        self.fsname = fsname
        self.fd = -1
        self._stopped = False
        self._mounted = False
        self._buffer: bytearray | memoryview = bytearray(BUFFER)
        self._slot: int | None = None  # the pool slot ``_buffer`` is, if it is one
        self._kept = False
        self._spares: list[bytearray] = []
        self.pool: shm.Region | None = None

    def share(self, pool: shm.Region) -> None:
        """Read requests into slots of ``pool``, memory the engine shares with its local
        replicas: a write's data is then where they read it from. When every slot is taken
        (held by requests in flight), requests are read into private buffers meanwhile."""
        self.pool = pool
        self._buffer, self._slot = self._fresh()

    def _fresh(self) -> tuple[bytearray | memoryview, int | None]:
        """A buffer to read the next request into: a free pool slot, else a private one."""
        slot = self.pool.take() if self.pool is not None else None
        if slot is not None:
            return self.pool.view(slot), slot
        return (self._spares.pop() if self._spares else bytearray(BUFFER)), None

    # -- mount --------------------------------------------------------------------------------

    def open(self) -> int:
        """Open the FUSE device before mounting it: local replicas get it at their connection
        (they answer reads on it, ``shm``), which may come before the mount."""
        if os.geteuid() != 0:
            raise MountError("attaching a volume needs root (it mounts a FUSE device)")
        if self.fd < 0:
            try:
                self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise MountError(f"cannot open /dev/fuse: {exc.strerror}") from None
        return self.fd

    def mount(self) -> None:
        """Mount the device on ``path`` (which must be a regular file)."""
        if not self.path.is_file():
            raise MountError(f"{self.path} is not a regular file")
        self.open()
        options = f"fd={self.fd},rootmode={stat.S_IFREG:o},user_id=0,group_id=0,default_permissions"
        result = _libc.mount(
            self.fsname.encode(),
            str(self.path).encode(),
            f"fuse.{self.fsname}".encode(),
            _MS_NOSUID | _MS_NODEV,
            options.encode(),
        )
        if result != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise MountError(f"cannot mount {self.path}: {os.strerror(code)}")
        self._mounted = True
        os.set_blocking(self.fd, False)

    def _unmount(self) -> None:
        """Detach the mount lazily: a process still using the file keeps it until it lets go."""
        if self._mounted:
            self._mounted = False
            _libc.umount2(str(self.path).encode(), _MNT_DETACH)

    def stop(self, unmount: bool = True) -> None:
        """Unmount (unless not ``unmount``) and end ``serve`` (from the event loop; never
        raises)."""
        self._stopped = True
        if unmount:
            self._unmount()
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)

    def close(self, unmount: bool = True) -> None:
        """Unmount if still mounted (unless not ``unmount``: the mount stays, dead, as a
        killed engine leaves it) and close the device; never raises."""
        self._stopped = True
        if unmount:
            self._unmount()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    # -- requests and replies -----------------------------------------------------------------

    async def serve(
        self, handle: Callable[[int, int, memoryview], None], after_burst: Callable[[], None]
    ) -> None:
        """Read requests until the file is unmounted or ``stop`` is called. Every request the
        kernel has queued is read and handed to ``handle(opcode, unique, args)``, which must
        not block (it answers at once or arranges for an answer later) and must copy what it
        keeps of ``args``, a view into a buffer that the next request overwrites, or call
        ``keep``. ``after_burst`` runs every few requests (``PUSH_EVERY``) and at the end."""
        while not self._stopped:
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:  # stop()
                return
            unpushed = count = 0
            for _ in range(BURST):
                buf = self._buffer
                try:
                    n = os.readv(self.fd, [buf])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.ENOENT):  # interrupted before read
                        continue
                    if exc.errno == errno.ENODEV:  # unmounted
                        return
                    raise
                if n < IN_HEADER.size:
                    continue
                length, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
                handle(opcode, unique, memoryview(buf)[IN_HEADER.size : min(n, length)])
                if self._kept:  # the handler keeps this buffer: read the next into another
                    self._kept = False
                    self._buffer, self._slot = self._fresh()
                unpushed += n
                count += 1
                if count == PUSH_EVERY or unpushed >= BURST_BYTES:
                    after_burst()
                    unpushed = count = 0
            if count:
                after_burst()

    def keep(self) -> Callable[[], None]:
        """Called by a handler that keeps the request's data (a large write, sent to the
        replicas from where the kernel put it rather than copied): the next request is read
        into another buffer. Call the returned function once the data is no longer used."""
        self._kept = True
        kept, slot, pool = self._buffer, self._slot, self.pool

        def release() -> None:
            if slot is not None and pool is not None:
                pool.give(slot)
            elif len(self._spares) < _SPARES and isinstance(kept, bytearray):
                self._spares.append(kept)

        return release

    def reply(self, unique: int, *parts: bytes | bytearray | memoryview) -> None:
        """Answer a request with data (never blocks: the kernel takes a reply whole)."""
        length = OUT_HEADER.size + sum(map(len, parts))
        self._write([OUT_HEADER.pack(length, 0, unique), *parts])

    def reply_error(self, unique: int, code: int) -> None:
        self._write([OUT_HEADER.pack(OUT_HEADER.size, -code, unique)])

    def _write(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        if self.fd >= 0:  # (closed: an answer that came too late has nobody to go to)
            shm.fuse_write(self.fd, pieces)

    def invalidate_attributes(self) -> None:
        """Tell the kernel to forget the file's cached attributes (its size changed)."""
        payload = NOTIFY_INVAL_INODE.pack(ROOT_INODE, -1, 0)
        header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), NOTIFY_INVAL_INODE_CODE, 0)
        self._write([header, payload])

    @staticmethod
    def init_reply(args: memoryview) -> bytes:
        """Accept the kernel's INIT: asynchronous reads and direct I/O, 1 MiB requests."""
        major, minor, max_readahead, flags = INIT_IN.unpack_from(args)
        if major != KERNEL_MAJOR:
            raise MountError(f"the kernel speaks FUSE {major}.{minor}, not {KERNEL_MAJOR}.x")
        want = flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES)
        return INIT_OUT.pack(
            KERNEL_MAJOR, min(minor, OUR_MINOR), max_readahead, want,
            MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1,
            MAX_WRITE // 4096, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
