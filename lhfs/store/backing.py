"""Backing images: the shared, read-only bottom of a snapshot chain, identified by content.

Two replica directories may keep the same image under different file names, so an image is
never known by its name: its identity is ``"<xxh3-128 hex>-<size>"`` of its bytes. Hashing a big
image on every open would be slow, so the store remembers the file's (size, mtime, inode) next
to the id and hashes again only when that stamp changed.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import xxhash

from lhfs.core.errors import BackingImageMismatch, NotFound
from lhfs.store.layer import DATA, pread_into

_READ_SIZE = 4 << 20
_ZEROS = memoryview(bytes(_READ_SIZE))  # (what a hole reads as, hashed without a read)
# What ``content_id`` makes: matched whole (``fullmatch``).
IMAGE_ID = re.compile(r"[0-9a-f]{32}-[0-9]{1,16}")


def content_id(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """The content identity of an image file: xxh3-128 of all its bytes, and their count.
    Its holes are hashed as the zeros they read as, without reading them (the id is the same;
    a sparse 10 TiB image took hours to read, at most minutes to hash). ``progress(done,
    total)`` is told the bytes hashed as it goes."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        fd = f.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # (no holes to ask for: read it all)
            size = 0
            while block := f.read(_READ_SIZE):
                digest.update(block)
                size += len(block)
            return f"{digest.hexdigest()}-{size}"
        size = os.fstat(fd).st_size
        done = 0
        while done < size:
            try:
                data = min(os.lseek(fd, done, os.SEEK_DATA), size)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # (no data past ``done``: the rest is a hole)
                    raise
                data = size
            while done < data:
                digest.update(_ZEROS[: min(data - done, _READ_SIZE)])
                done += min(data - done, _READ_SIZE)
                progress and progress(done, size)
            end = min(os.lseek(fd, done, os.SEEK_HOLE), size) if done < size else size
            while done < end:
                block = os.pread(fd, min(end - done, _READ_SIZE), done)
                if not block:  # (it shrank under us: what it holds now is what it is)
                    size = end = done
                    break
                digest.update(block)
                done += len(block)
                progress and progress(done, size)
        if progress:
            progress(size, size)
    return f"{digest.hexdigest()}-{size}"


def hole_at(fd: int, start: int, end: int) -> bool:
    """Whether bytes ``start`` to ``end`` of the open file ``fd`` are a hole (zeros that need
    not be read: a thin image is mostly holes, and reading them costs as much as data);
    False where the file system cannot tell."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError as exc:
        return exc.errno == errno.ENXIO  # (no data at all past ``start``)


def id_size(image_id: str) -> int:
    """The size in bytes recorded in an image id."""
    return int(image_id.rsplit("-", 1)[1])


def file_stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class BackingImage:
    """An open backing image: reads chunks of it, at the same offsets as the volume."""

    def __init__(self, path: Path, image_id: str, chunk_size: int) -> None:
        self.path = path
        self.id = image_id
        self.size = id_size(image_id)
        self.chunk_size = chunk_size
        self.nchunks = -(-self.size // chunk_size)
        self.fd = os.open(path, os.O_RDONLY)
        self._sums: dict[int, tuple[int, bytes]] | None = None

    @classmethod
    def verify_and_open(
        cls, path: Path, image_id: str, stamp: list[int] | None, chunk_size: int
    ) -> tuple[BackingImage, list[int]]:
        """Open ``path`` only if its content is ``image_id``; returns the image and a fresh stamp.

        Refusing a mismatch matters: a chain whose bottom silently changed would serve data that
        was never written.
        """
        if not path.exists():
            raise NotFound(f"backing image file {path} is missing (expected image {image_id})")
        now = file_stamp(path)
        if now != stamp:
            found = content_id(path)
            if found != image_id:
                raise BackingImageMismatch(
                    f"backing image {path.name} has content {found}, the volume expects {image_id}"
                )
        return cls(path, image_id, chunk_size), now

    def covers(self, chunk: int) -> bool:
        return chunk < self.nchunks

    def read_chunk(self, chunk: int) -> bytes:
        buf = bytearray(self.chunk_size)
        if chunk < self.nchunks:
            pread_into(self.fd, memoryview(buf), chunk * self.chunk_size, True)
        return bytes(buf)

    def read_run(self, first: int, count: int) -> bytearray:
        buf = bytearray(count * self.chunk_size)
        pread_into(self.fd, memoryview(buf), first * self.chunk_size, True)
        return buf

    def sums(self) -> dict[int, tuple[int, bytes]]:
        """``{chunk: (state, digest)}``, computed once per open image: its content never
        changes, and an image replaced by another is another object."""
        if self._sums is None:
            self._sums = {c: (st, d) for c, st, d in self.compute_sums()}
        return self._sums

    def compute_sums(self) -> list[tuple[int, int, bytes]]:
        out = []
        cs = self.chunk_size
        per_read = max(1, (4 << 20) // cs)
        for first in range(0, self.nchunks, per_read):
            count = min(per_read, self.nchunks - first)
            view = memoryview(self.read_run(first, count))
            out += [
                (first + k, DATA, xxhash.xxh3_128_digest(view[k * cs : (k + 1) * cs]))
                for k in range(count)
            ]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
