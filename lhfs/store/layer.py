"""One layer of a replica's snapshot chain: a sparse data file and an index log.

Chunk ``c`` of a layer lives at byte ``c * chunk_size`` of the layer's data file, the same offset
it has in the volume, so a run of neighbouring chunks is one ``pread``/``pwrite``. The data file
alone cannot say which chunks the layer holds (a chunk of zeros written on purpose must hide the
layers below it, and a crash can leave bytes that were never committed), so each layer keeps an
index: chunk -> ``DATA`` or ``ZERO`` (a tombstone that reads as zeros). Chunks not in the index
fall through to the layer below.

The index is an append-only log of batches. A batch is written and fsynced only by ``commit``,
after the data it describes was fdatasync'ed, and carries a checksum: replay stops at the first
torn or damaged batch, so a crash leaves the index of the last completed flush and never points
at data that was not durable. Memory is one dict entry per chunk the layer holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from lhfs.core.durable import atomic_write, fsync_dir
from lhfs.core.errors import CorruptState, DamagedLayers, NoSpace

ABSENT = 0  # only in the log: the chunk left the layer (trimmed away, nothing below to hide)
DATA = 1
ZERO = 2

# magic, entry count, revision, xxh64 of (count, revision, entries)
_BATCH = struct.Struct("<4sIQQ")
_ENTRY = struct.Struct("<QB")  # chunk number, state
_MAGIC = b"LHI1"
_SUMS_MAGIC = b"LHS1"
_SUM_ENTRY = struct.Struct("<QB16s")  # chunk number, state, xxh3-128 digest

ZERO_DIGEST = bytes(16)
# the checksum of a DATA chunk past the end of a cut data file: one no data has, so that a scrub
# finds the chunk changed and a rebuild copies it whole (zeros would match a chunk of zeros)
CUT_DIGEST = b"\xff" * 16

# The only layer ids lhfs makes (``secrets.token_hex(8)``); matched whole (``fullmatch``).
LAYER_ID = re.compile(r"[0-9a-f]{16}")
LAYER_SUFFIXES = ("data", "idx", "sums")


def layer_file(directory: Path, layer_id: str, suffix: str) -> Path:
    """The path of one of a layer's files. Layer ids come from the replica's metadata, a file
    that may have been damaged or planted: an id that is not one lhfs makes (``../x``, a NUL)
    is refused here too, behind the check of the metadata, so that no layer file is ever made
    or opened outside its directory."""
    if not isinstance(layer_id, str) or not LAYER_ID.fullmatch(layer_id):
        raise CorruptState(f"{directory}: {str(layer_id)[:40]!r} is not a layer id")
    return directory / f"{layer_id}.{suffix}"


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a byte range; best effort, as the index decides what it reads as."""
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def no_room(what: str) -> Iterator[None]:
    """Report a full disk met inside the block as ``NoSpace``, for steps that change nothing
    when they fail (creating a file, replacing one atomically)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise NoSpace(f"no space left on the replica's disk for {what}") from None
        raise


def reserve(fd: int, offset: int, length: int, what: str) -> None:
    """Claim the disk space of a byte range before anything is written into it, so that a
    full disk refuses a write whole (``NoSpace``) instead of failing it half-way, which would
    leave the replica unlike the others. Allocated ranges cost nothing; a file system that
    cannot preallocate is written without the claim (a full disk then fails the write)."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err in _FULL:
        raise NoSpace(f"no space left on the replica's disk for {what}")
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))


def pread_into(fd: int, view: memoryview, offset: int, zeros_past_end: bool = False) -> None:
    """Fill ``view`` from ``offset``. A layer's data file holds every chunk its index calls
    DATA whole (checked at open, ``Layer.check_data``), so a read that meets the end of one
    means the file was cut since: ``CorruptState``, never zeros served as the volume's data.
    ``zeros_past_end``: the file really ends there (a backing image's last chunk)."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            if zeros_past_end:
                view[:] = bytes(len(view))
                return
            raise CorruptState(
                f"{os.readlink(f'/proc/self/fd/{fd}')} ends at byte {offset}, "
                "inside a chunk its index holds: the file was cut"
            )
        view = view[n:]
        offset += n


def pwrite_all(fd: int, view: memoryview | bytes | bytearray, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    n = os.pwrite(fd, view, offset)
    if n < len(view):
        view = memoryview(view)[n:]
        while view:
            offset += n
            n = os.pwrite(fd, view, offset)
            view = view[n:]


# Layer data reaches the page cache at most this much per write. The kernel gives a buffered
# write a folio as large as the write itself, and ext4 (Linux 6.x) then makes every later
# write into that folio pay in proportion to its size: a 4 KiB write into data written 1 MiB
# at a time took 14 us here, against 3.5 us into data written 64 KiB at a time (1.5 us at
# 4 KiB). Random 4 KiB writes through a 3-replica device after a sequential fill: 7.5k ->
# 14-16k IOPS; 1 MiB sequential writes (16 pieces where 1 did) lost 0-9% in alternating runs.
DATA_PIECE = 64 << 10
INDEX_ROOM = 64 << 10  # index log claimed ahead of need (a header-only flush adds 24 bytes)


def write_data(fd: int, view: memoryview | bytes | bytearray, offset: int) -> None:
    """Write layer data a page-cache-friendly piece at a time (see ``DATA_PIECE``), the pieces
    aligned to ``DATA_PIECE`` in the file as the folios they become are."""
    if offset % DATA_PIECE + len(view) <= DATA_PIECE:  # (one piece: most writes)
        pwrite_all(fd, view, offset)
        return
    view = memoryview(view)
    pos = 0
    while pos < len(view):
        n = DATA_PIECE - (offset + pos) % DATA_PIECE
        pwrite_all(fd, view[pos : pos + n], offset + pos)
        pos += n


class Layer:
    """A layer's files and index; the chain structure (parents, names) lives in the store."""

    def __init__(self, directory: Path, layer_id: str, chunk_size: int) -> None:
        self.id = layer_id
        self.chunk_size = chunk_size
        self.data_path = layer_file(directory, layer_id, "data")
        self.index_path = layer_file(directory, layer_id, "idx")
        self.sums_path = layer_file(directory, layer_id, "sums")
        self.index: dict[int, int] = {}
        self.pending: list[tuple[int, int]] = []
        self.revision = 0
        self._fd = -1
        self._log_entries = 0
        self._log_size = 0  # bytes of the index log
        self._log_room = 0  # bytes of it known claimed on disk (see ``claim_index``)
        # whether the next flush's batch has its room, as far as writes into chunks the layer
        # holds go (they add no entry): such a write then claims nothing (a check per write)
        self.flush_room = False
        self._sums: dict[int, tuple[int, bytes]] | None = None
        self._sums_dirty = False
        self._torn_at: int | None = None

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, layer_id: str, chunk_size: int) -> Layer:
        """Create the empty files of a new layer (the caller makes the directory entry durable)."""
        layer = cls(directory, layer_id, chunk_size)
        for path in (layer.data_path, layer.index_path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        return layer

    @classmethod
    def load(cls, directory: Path, layer_id: str, chunk_size: int) -> Layer:
        """Open an existing layer and replay its index log up to the last complete batch."""
        layer = cls(directory, layer_id, chunk_size)
        layer._replay()
        layer.check_data()
        return layer

    def check_data(self) -> None:
        """Refuse a data file shorter than the end of the last chunk the index calls DATA.
        Every way a chunk enters a layer writes it whole before a flush records it (a rebuild's
        partial write extends the file over its chunk), and the flush fdatasyncs the data (and
        so the file's size) before the index batch: no crash leaves a shorter file. One that is
        shorter was cut or replaced since, and its missing bytes would read as zeros, served as
        the volume's data (and copied by a rebuild from it)."""
        last = max((c for c, s in self.index.items() if s == DATA), default=-1)
        if last < 0:
            return
        try:
            size = self.data_path.stat().st_size
        except FileNotFoundError:
            raise DamagedLayers(
                f"{self.data_path} is missing, its index holds data: the layer is damaged"
            ) from None
        end = (last + 1) * self.chunk_size
        if size < end:
            raise DamagedLayers(
                f"{self.data_path} holds {size} bytes, its index holds data up to byte {end}: "
                "the file was cut"
            )

    @property
    def fd(self) -> int:
        """The data file, opened on first use so that long chains do not hold every descriptor."""
        if self._fd < 0:
            self._fd = os.open(self.data_path, os.O_RDWR)
        return self._fd

    def open(self) -> int:
        """Open the data file now rather than on first use: done on the event loop before work
        on the layer goes to a thread, so that two threads never both open it (one descriptor
        would leak)."""
        return self.fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove_files(self) -> None:
        self.close()
        for path in (self.data_path, self.index_path, self.sums_path):
            path.unlink(missing_ok=True)

    # -- index --------------------------------------------------------------------------------

    def set(self, chunk: int, state: int) -> None:
        """Record a state change; it becomes durable at the next ``commit``."""
        if state == ABSENT:
            self.index.pop(chunk, None)
        else:
            self.index[chunk] = state
        self.pending.append((chunk, state))
        self.flush_room = False

    def commit(self, revision: int) -> None:
        """Append the pending index changes as one checksummed batch and fsync the log.

        The caller must have made the data they describe durable first (``sync_data``).
        """
        if not self.pending and revision == self.revision:
            return
        entries = b"".join(_ENTRY.pack(c, s) for c, s in self.pending)
        body = struct.pack("<IQ", len(self.pending), revision) + entries
        header = _BATCH.pack(_MAGIC, len(self.pending), revision, xxhash.xxh64_intdigest(body))
        batch = header + entries
        fd = os.open(self.index_path, os.O_WRONLY)
        try:
            if self._torn_at is not None:
                os.ftruncate(fd, self._torn_at)
                self._torn_at = None
                self._log_room = 0  # (a cut frees what was claimed past the end)
                self.flush_room = False
            end = os.fstat(fd).st_size
            if end + len(batch) > self._log_room:
                reserve(fd, end, len(batch), "a flush")
            try:
                pwrite_all(fd, batch, end)
                os.fsync(fd)
            except BaseException:
                # Never leave a torn batch behind: replay stops at the first one, so every
                # batch a later commit appended after it would be lost at the next open.
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    self._torn_at = end  # (cut before the next batch, then)
                self._log_room = 0  # (a cut frees what was claimed past the end)
                self.flush_room = False
                raise
        finally:
            os.close(fd)
        self._log_entries += len(self.pending)
        self._log_size = end + len(batch)
        self.pending.clear()
        self.revision = revision
        if self._log_room and self._log_room - self._log_size < INDEX_ROOM // 4:
            with contextlib.suppress(OSError, NoSpace):  # (claimed ahead while there is room)
                self._claim_log(self._log_size + INDEX_ROOM)
        self.flush_room = self._log_size + 2 * _BATCH.size <= self._log_room

    def claim_index(self, entries: int) -> None:
        """Claim the index log's room for ``entries`` more entries, and the header of the batch
        that will hold them, before the writes they describe are taken: a full disk then
        refuses the write (``NoSpace``), never the flush of a write it took. Every write
        claims (most with ``entries`` 0: a write into a chunk the head holds still makes the
        next flush add a header). Claimed ahead, ``INDEX_ROOM`` at a time, or just what is
        needed when the disk has less."""
        need = self._log_size + (len(self.pending) + entries) * _ENTRY.size + 2 * _BATCH.size
        if need > self._log_room:
            try:
                self._claim_log(need + INDEX_ROOM)
            except NoSpace:
                self._claim_log(need)
        self.flush_room = True

    def _claim_log(self, size: int) -> None:
        fd = os.open(self.index_path, os.O_WRONLY)
        try:
            reserve(fd, 0, size, "a write's index")
        finally:
            os.close(fd)
        self._log_room = size

    def sync_data(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def writeback_job(self) -> Callable[[], None] | None:
        """A job for another thread that pushes the data written so far towards the disk:
        during a long copy into the layer, the disk then works alongside the copy and the final
        flush finds little to do. It syncs through a file description of its own, opened now
        (the layer may be closed meanwhile), never a duplicate of the layer's: a write error it
        meets is then still reported to the layer's own flush, not consumed by the job."""
        if self._fd < 0:
            return None
        fd = os.open(self.data_path, os.O_RDONLY)

        def job() -> None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        return job

    def needs_compaction(self) -> bool:
        return self._log_entries > 4096 and self._log_entries > 2 * len(self.index)

    def compact(self) -> None:
        """Rewrite the log as one batch of the live entries (crash-safe replace). Only an
        economy: the caller goes on if it fails (a full disk), and it is tried again later."""
        live = sorted(self.index.items())
        entries = b"".join(_ENTRY.pack(c, s) for c, s in live)
        body = struct.pack("<IQ", len(live), self.revision) + entries
        header = _BATCH.pack(_MAGIC, len(live), self.revision, xxhash.xxh64_intdigest(body))
        atomic_write(self.index_path, header + entries)
        self._log_entries = len(live)
        self._log_size = self._log_room = len(header) + len(entries)
        self.flush_room = False
        self.pending = []

    def _replay(self) -> None:
        raw = self.index_path.read_bytes()
        pos = 0
        while pos + _BATCH.size <= len(raw):
            magic, count, revision, digest = _BATCH.unpack_from(raw, pos)
            end = pos + _BATCH.size + count * _ENTRY.size
            if magic != _MAGIC or end > len(raw):
                break
            entries = raw[pos + _BATCH.size : end]
            if xxhash.xxh64_intdigest(struct.pack("<IQ", count, revision) + entries) != digest:
                break
            # The usual batch has no chunk leaving the layer: it is replayed at C speed (every
            # command that opens a store replays every layer). A state byte ends each entry.
            if ABSENT not in entries[_ENTRY.size - 1 :: _ENTRY.size]:
                self.index.update(_ENTRY.iter_unpack(entries))
            else:
                for chunk, state in _ENTRY.iter_unpack(entries):
                    if state == ABSENT:
                        self.index.pop(chunk, None)
                    else:
                        self.index[chunk] = state
            self.revision = revision
            self._log_entries += count
            pos = end
        if pos != len(raw):
            # A torn tail from a crash mid-commit: cut it so that later batches append cleanly.
            os.truncate(self.index_path, pos)
        self._log_size = pos

    # -- data ---------------------------------------------------------------------------------

    def read_chunk(self, chunk: int) -> bytes:
        """The raw bytes of one chunk as stored (zeros for a tombstone)."""
        if self.index.get(chunk) != DATA:
            return bytes(self.chunk_size)
        buf = bytearray(self.chunk_size)
        pread_into(self.fd, memoryview(buf), chunk * self.chunk_size)
        return bytes(buf)

    def data_bytes(self) -> int:
        return self.chunk_size * list(self.index.values()).count(DATA)

    # -- checksums ----------------------------------------------------------------------------

    def read_run(self, first: int, count: int) -> bytearray:
        """The stored bytes of ``count`` neighbouring chunks in one pread."""
        buf = bytearray(count * self.chunk_size)
        pread_into(self.fd, memoryview(buf), first * self.chunk_size)
        return buf

    def compute_sums(self) -> list[tuple[int, int, bytes]]:
        """Per-chunk (chunk, state, xxh3-128) of everything the layer holds, by chunk number.
        Hashes straight from a read-only mapping of the data file: no copy of the data."""
        cs = self.chunk_size
        size = os.fstat(self.fd).st_size
        out = []
        mapped = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ) if size else None
        try:
            if mapped is not None:
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped) if mapped is not None else memoryview(b"")
            for chunk in sorted(self.index):
                state = self.index[chunk]
                start = chunk * cs
                if state != DATA:
                    out.append((chunk, state, ZERO_DIGEST))
                elif start + cs <= size:
                    out.append((chunk, DATA, xxhash.xxh3_128_digest(view[start : start + cs])))
                else:  # the file was cut since it was opened (see ``check_data``)
                    out.append((chunk, DATA, CUT_DIGEST))
            view.release()
        finally:
            if mapped is not None:
                mapped.close()
        return out

    def sums(self, fresh: bool = False) -> dict[int, tuple[int, bytes]]:
        """The layer's checksums, ``{chunk: (state, digest)}``: those recorded (kept in memory
        and in a file, valid as long as this immutable layer is unchanged or changed only
        through ``record_sum``), or with ``fresh`` recomputed from disk (a rebuild target's
        view of itself). Checksums computed from committed data are saved. Fresh ones are not:
        they may describe data not yet flushed, so they are saved, like those a rebuild keeps
        up to date, by ``save_sums`` when the rebuild has flushed (a file that outlived its
        data after a crash would make a rebuild skip chunks the layer lacks)."""
        if fresh:
            self.drop_sums()
        if self._sums is None:
            try:
                raw = self.sums_path.read_bytes()
            except FileNotFoundError:
                raw = b""
            entries: list[tuple[int, int, bytes]] = []
            if raw[:4] == _SUMS_MAGIC and (len(raw) - 4) % _SUM_ENTRY.size == 0:
                entries = list(_SUM_ENTRY.iter_unpack(raw[4:]))
            computed = len(entries) != len(self.index)
            if computed:
                entries = self.compute_sums()
            self._sums = {c: (st, d) for c, st, d in entries}
            if computed:
                self._sums_dirty = True
                if not fresh:
                    self.save_sums()
        return self._sums

    def save_sums(self) -> None:
        if self._sums is not None and self._sums_dirty:
            entries = [(c, *self._sums[c]) for c in sorted(self._sums)]
            atomic_write(
                self.sums_path, _SUMS_MAGIC + b"".join(_SUM_ENTRY.pack(*e) for e in entries)
            )
            self._sums_dirty = False

    def cached_sums(self) -> list[tuple[int, int, bytes]]:
        """``sums`` as a list in chunk order, saved first if a rebuild changed them."""
        sums = self.sums()
        self.save_sums()
        return [(c, *sums[c]) for c in sorted(sums)]

    def record_sum(self, chunk: int, state: int, data: bytes | memoryview = b"") -> None:
        """Keep the cached checksums true while a rebuild writes a chunk: the checksum of the
        bytes written, computed as they arrive, instead of re-reading the whole layer later."""
        if self._sums is None:
            self.drop_sums()
            return
        if not self._sums_dirty:
            if self.sums_path.exists():  # never a stale file after a crash
                self.sums_path.unlink()
                fsync_dir(self.sums_path.parent)
            self._sums_dirty = True
        if state == ABSENT:
            self._sums.pop(chunk, None)
        else:
            digest = xxhash.xxh3_128_digest(data) if state == DATA else ZERO_DIGEST
            self._sums[chunk] = (state, digest)

    def drop_sums(self) -> None:
        """Forget the cached checksums before the layer's content changes (coalesce into it)."""
        self._sums = None
        self._sums_dirty = False
        if self.sums_path.exists():
            self.sums_path.unlink()
            fsync_dir(self.sums_path.parent)
