"""Crash-safe file updates.

A reader after a crash must see either the old or the new content of a metadata file, never a
mix or an empty file: write a temporary file, fsync it, rename it over the old one, then fsync
the directory so that the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make the creations, renames and deletions inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file, whole.
    Raises before the replace, leaving the old file, or (``sync_dir``) after it, when the
    directory could not be synced: the new file is in place then; without ``sync_dir`` the
    caller syncs the directory and tells the two apart."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):  # a left-over of a crash (or a planted link:
        os.unlink(tmp)  # it is never followed)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # (a full disk: the space it took goes back)
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, sync_dir: bool = True) -> None:
    """``atomic_write`` of a JSON document (sorted keys, so that equal states give equal files)."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", sync_dir)


def copy_sparse(
    source: Path, target: Path, progress: Callable[[int, int], None] | None = None
) -> None:
    """Copy ``source`` to a new ``target`` keeping its holes: an image of 80 MiB that holds
    1 MiB of data takes 1 MiB (copied whole, it took 80 under the root and 80 per replica).
    Only the ranges the file system says hold data are copied, and copied for real (the
    kernel's copy may share the blocks of the source, where one bad sector would then be in
    every copy: each replica's copy must be a copy). ``progress(done, total)`` is told how
    far it went."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # (no data past ``offset``: the rest is a hole)
                    raise
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                data = os.pread(src.fileno(), min(end - start, 8 << 20), start)
                if not data:  # (the source shrank under us)
                    raise OSError(errno.EIO, f"{source} ended at {start} while being copied")
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(dst.fileno(), view, start + len(data) - len(view)) :]
                start += len(data)
                if progress:
                    progress(start, size)
            offset = end
        dst.truncate(size)
        if progress:
            progress(size, size)


def drop_device(device: Path) -> None:
    """Remove the device file an attach made, once nothing is mounted on it (an empty file
    left where a volume was is litter, and one more thing to refuse at the next attach).
    Done by the detach, and by the engine as it ends: an attach killed while its engine
    started left the file to nobody. A file mounted on lies on another device than its
    directory."""
    with contextlib.suppress(OSError):
        info = device.lstat()
        mounted = info.st_dev != device.parent.stat().st_dev
        if stat.S_ISREG(info.st_mode) and info.st_size == 0 and not mounted:
            device.unlink()
