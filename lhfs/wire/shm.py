"""Memory an engine shares with the replica processes of its own host.

Why: over a socket, a 1 MiB write to three local replicas is copied ten times (device to
engine, engine to three sockets, three sockets to three replicas, three replicas to the page
cache) and a read four times. With shared memory the FUSE device hands a write's data to the
engine once, into memory each local replica maps, and each replica writes it to its layer from
there; a read is read by the replica into memory the engine maps and answered to the device
from there. Only small descriptors (``protocol.WRITE_SHM``, ``READ_SHM``) cross the socket.

Two kinds of region, each a sealed ``memfd`` passed over the authenticated local socket:

- the engine's *pool* (one per engine), cut into slots that the FUSE channel reads requests
  into; replicas map it read-only (they get a read-only descriptor of it), so no replica can
  change a write's data, another replica's or a later request's;
- one *read region* per connection, which only that replica writes into. When the connection
  fails, its region is dropped with it: a replica that was slow rather than dead and fills a
  slot late can only write into memory nobody reads any more.

Ownership is explicit. A pool slot is the FUSE request's until the write was answered by every
replica; a slot whose descriptor went to a replica whose connection then failed (it may still
read the slot later, if it was slow rather than dead) is *held* for that connection and not
reused until the engine has a newer session with that replica (which fences the old one: the
replica refuses whatever the old connection still delivers) or the engine ends. Regions are
sealed against shrinking, so a mapping can never lose its pages under a reader (SIGBUS).

Reads go one step further: the engine also gives each local replica its FUSE device, and a
read the kernel asked for is answered to the kernel by the replica itself (``READ_REPLY``),
from its read region, the engine only told when it is done. Why: the engine is one thread
serving every request, and with small reads it was the bottleneck (answering the kernel,
which also completes the caller's I/O, was the largest part of its work per read); the
replica that read the data is otherwise idle. A replica can answer only what the engine
asked of it, and the kernel accepts one answer per request: if the engine asks another
replica again (the first one's connection failed), the later answer is refused as unknown.
A replica closes the device with its engine connection, so an engine that dies leaves the
FUSE connection to end as it did before, once its replicas noticed (they read end-of-file).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MAX_REGION = 1 << 30  # what a replica agrees to map per region
READ_SLOT = 1 << 20  # a read region's slot: the largest read the kernel sends
READ_SLOTS = 64  # reads in flight to one replica through shared memory (more go by socket)
FUSE_OUT = struct.Struct("<IiQ")  # a FUSE answer's header: length, error (-errno), unique
FUSE_DEVICE = (10, 229)  # /dev/fuse: major, minor


def _address(buffer: mmap.mmap | memoryview) -> int:
    """Where a writable buffer lies in this process's memory."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # (the export it holds would keep the mapping from closing)


class Region:
    """A sealed memfd of ``slots`` slots of ``slot_size`` bytes, mapped in this process."""

    def __init__(self, name: str, slots: int, slot_size: int) -> None:
        self.slot_size = slot_size
        self.size = slots * slot_size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self._view = memoryview(self.map)
        self._base = _address(self.map)
        self._free = list(range(slots - 1, -1, -1))
        self._in_use: set[int] = set()
        self._tainted: dict[int, object] = {}  # slot -> the connection that may still read it
        self._held: dict[object, list[int]] = {}  # connection -> slots it may still read

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        """A free slot, or None when all are in use (the caller goes the socket's way)."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._in_use.add(slot)
        return slot

    def view(self, slot: int, length: int | None = None) -> memoryview:
        start = slot * self.slot_size
        return self._view[start : start + (self.slot_size if length is None else length)]

    def locate(self, data: object) -> int | None:
        """The offset in this region of ``data`` if it is a view into it, else None."""
        if not isinstance(data, memoryview) or data.obj is not self.map or not data.nbytes:
            return None  # (the common answer, without asking ctypes)
        at = _address(data) - self._base
        return at if at >= 0 and at + data.nbytes <= self.size else None

    def taint(self, slot: int, connection: object) -> None:
        """``connection`` failed with a descriptor of ``slot`` unanswered: when given back, the
        slot waits until ``connection`` can no longer read it (``forget``)."""
        if slot in self._in_use:
            self._tainted[slot] = connection

    def give(self, slot: int) -> None:
        """The slot's request is over; it is reused unless a failed connection may read it."""
        if slot not in self._in_use:
            return
        self._in_use.discard(slot)
        connection = self._tainted.pop(slot, None)
        if connection is None:
            self._free.append(slot)
        else:
            self._held.setdefault(connection, []).append(slot)

    def forget(self, connection: object) -> None:
        """``connection`` is fenced or gone: the slots held for it are free again."""
        for slot in self._held.pop(connection, []):
            self._free.append(slot)
        for slot, holder in list(self._tainted.items()):
            if holder is connection:
                del self._tainted[slot]

    def read_only_fd(self) -> int:
        """A new read-only descriptor of the region (for a replica that only reads it)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Unmap and close (a view still in use keeps the mapping until it is dropped)."""
        with contextlib.suppress(BufferError):
            self._view.release()
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def check_size(size: int) -> None:
    """Refuse (``ValueError``) to map a region of ``size`` bytes: none, or more than agreed."""
    if not 0 < size <= MAX_REGION:
        raise ValueError(f"a shared region of {size} bytes is outside 1..{MAX_REGION}")


def map_received(fd: int, size: int, writable: bool) -> mmap.mmap:
    """Map a region another process sent, after checking that it is one: sealed against
    shrinking (else the sender could cut pages from under this process's reads, a SIGBUS) and
    as large as announced. Closes ``fd``; raises ``ValueError`` with the reason."""
    try:
        check_size(size)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ValueError("the shared region is not a sealed memfd") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError("the shared region is not sealed against shrinking")
        if os.fstat(fd).st_size != size:
            raise ValueError(f"the shared region is not of the announced {size} bytes")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, prot=prot)
    finally:
        os.close(fd)


def check_fuse_device(fd: int) -> None:
    """Refuse (``ValueError``) a descriptor that is not the FUSE device."""
    info = os.fstat(fd)
    device = (os.major(info.st_rdev), os.minor(info.st_rdev))
    if not stat.S_ISCHR(info.st_mode) or device != FUSE_DEVICE:
        raise ValueError("the third shared descriptor is not the FUSE device")


def fuse_write(fd: int, pieces: list[bytes | bytearray | memoryview]) -> None:
    """Write one message (an answer, a notification) to the FUSE device, from the engine or a
    replica. ENOENT: the request was interrupted, or answered already (by another replica),
    and the kernel no longer waits for it; ENODEV/EBADF: unmounted meanwhile. Neither is the
    writer's failure."""
    try:
        os.writev(fd, pieces)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
            raise


def answer_fuse(fd: int, unique: int, data: memoryview) -> None:
    """Answer the kernel's FUSE request ``unique`` with ``data``."""
    fuse_write(fd, [FUSE_OUT.pack(FUSE_OUT.size + len(data), 0, unique), data])
