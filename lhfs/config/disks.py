"""Local replicas on disks of their own.

By default a volume's local replicas live under the root, on the root's file system: they
survive a killed process, not a lost disk. A replica can instead be placed on another disk,
named by the mount point of its file system (``volume create --disks``, ``replica add --disk``);
its directory is then ``<disk>/lhfs/<volume>.<volume id>/<replica>``.

The mistakes this guards against are the ones that lose a replica silently:

- **Two replicas on one disk**, so that losing it loses both: a disk must not be the file system
  another replica of the volume is on (the root's, for a replica under the root).
- **A disk that is not mounted.** Its mount point is then an empty directory on the root's file
  system; a replica started there would be rebuilt from scratch onto the wrong disk. A disk
  must be a mount point when a replica is placed on it, and a replica's process is started only
  if its disk is mounted and holds its directory; otherwise it stays failed with that reason,
  and comes back by itself once the disk is mounted again (within the volume's rejoin limit).
  A different disk mounted in its place (device names reorder at boot) holds no such
  directory and is refused the same way.
- **A disk others can write to.** lhfs runs as root there; a symbolic link planted as
  ``<disk>/lhfs`` would send a replica (and later ``volume rm``) somewhere else. A disk whose
  top others may write is refused unless it has the sticky bit (then no one else can rename
  what lhfs made there), and every level under it is opened without following links and must
  be a directory of lhfs's user, on the disk's file system, that no one else can write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Protocol

from lhfs.core.errors import CorruptState, InvalidArgument, NotFound, NotPermitted, StorageError

HOME = "lhfs"  # what lhfs keeps on a disk, beside anything else there


class Volume(Protocol):
    """What is asked of a volume here (``lhfs.config.volume.Volume``, which uses this module)."""

    @property
    def replicas(self) -> list[dict[str, Any]]: ...

    def replica_dir(self, replica: dict[str, Any]) -> Path | None: ...


def check(disk: str | Path, taken: dict[str, tuple[Path, str | None]]) -> Path:
    """``disk`` (its real path) as the place of a new replica of a volume whose other local
    replicas live in ``taken`` (``placed``); refused if it is not a mounted file system, or is
    one those replicas are on, or if one of their disks is not mounted (it could be this one,
    mounted elsewhere). File systems are told apart, not drives: two partitions or subvolumes
    of one drive pass as two disks."""
    path = Path(os.path.realpath(disk))
    if not path.is_dir():
        raise NotFound(f"disk {path} is not a directory")
    if not os.path.ismount(path):
        raise InvalidArgument(
            f"disk {path} is not a mount point: is its disk mounted? (name a disk by the mount "
            "point of its file system)"
        )
    device = path.stat().st_dev
    for replica_id, (directory, its_disk) in taken.items():
        if its_disk is not None and not os.path.ismount(its_disk):
            raise NotFound(
                f"the disk of replica {replica_id} ({its_disk}) is not mounted, so {path} may be "
                f"that disk mounted elsewhere: mount it, or remove {replica_id} first"
            )
        if _device(directory) == device or directory.is_relative_to(path):
            raise InvalidArgument(
                f"disk {path} is the file system replica {replica_id} is on ({directory}): one "
                "lost disk would take both; give each replica a disk of its own"
            )
    return path


def placed(vol: Volume) -> dict[str, tuple[Path, str | None]]:
    """Where the volume's local replicas live: replica id -> (directory, disk or None)."""
    out = {}
    for replica in vol.replicas:
        directory = vol.replica_dir(replica)
        if directory is not None:
            out[replica["id"]] = (directory, replica.get("disk"))
    return out


def directory(vol_dir: Path, volume_id: str | None, replica: dict[str, Any]) -> Path:
    """A local replica's directory: on its disk, or under the volume's directory. (Only
    replicas on disks need the volume's id: volumes older than their keys have none.) The
    configuration's fields are checked first: a path is never made of what they hold."""
    return _levels(vol_dir, volume_id, replica)[0]


def _levels(vol_dir: Path, volume_id: str | None, replica: dict[str, Any]) -> tuple[Path, list]:
    """``directory``, and its levels under the disk (none for a replica under the root)."""
    rid = replica.get("id")
    if not isinstance(rid, str) or not _REPLICA_ID.fullmatch(rid):
        raise CorruptState(f"{vol_dir}/config.json names a replica {rid!r}: not an lhfs id")
    disk = replica.get("disk")
    if not disk:
        return vol_dir / "replicas" / rid, []
    if not isinstance(volume_id, str) or not _VOLUME_ID.fullmatch(volume_id):
        raise CorruptState(f"{vol_dir}/config.json holds no valid volume id for replica {rid}")
    if not isinstance(disk, str) or not os.path.isabs(disk) or ".." in Path(disk).parts:
        raise CorruptState(f"{vol_dir}/config.json names replica {rid}'s disk {disk!r}")
    parts = [HOME, f"{vol_dir.name}.{volume_id}", rid]
    return Path(disk).joinpath(*parts), parts


_REPLICA_ID = re.compile(r"r[0-9]{1,9}")
_VOLUME_ID = re.compile(r"[0-9a-f]{8,64}")


def _open(disk: str, home: Path, depth: int, create: bool = False) -> int:
    """A descriptor of the first ``depth`` levels of a replica's directory ``home`` under
    ``disk``, each opened without following links and checked (see above); made, owner-only,
    where missing with ``create`` (else ``FileNotFoundError``)."""
    parts = home.relative_to(disk).parts[:depth]
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECTORY)
    info = os.fstat(fd)
    device = info.st_dev
    path = Path(disk)
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        os.close(fd)  # (others could rename <disk>/lhfs away and put a link in its place)
        raise NotPermitted(
            f"disk {disk} may be written by others (mode {info.st_mode & 0o777:o}) and has no "
            f"sticky bit: lhfs does not use it ('chmod go-w {disk}', or 'chmod +t {disk}')"
        )
    try:
        for part in parts:
            path = path / part
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            try:
                level = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                why = f"{path} is not a directory but a link or a file: {_UNSAFE}"
                raise NotPermitted(why) from None
            os.close(fd)
            fd = level
            info = os.fstat(fd)
            if info.st_dev != device or info.st_uid != os.getuid() or info.st_mode & 0o022:
                raise NotPermitted(
                    f"{path} is another file system's, another user's or writable by others: "
                    + _UNSAFE
                )
        return fd
    except BaseException:
        os.close(fd)
        raise


_UNSAFE = "lhfs does not use it (move it away, or use another disk)"


def ready(vol: Volume, replica: dict[str, Any]) -> None:
    """Before a local replica's process starts: a replica on a disk needs that disk mounted,
    holding its directory (``NotFound`` says which is missing)."""
    disk = replica.get("disk")
    if not disk:
        return
    if not os.path.ismount(disk):
        raise NotFound(f"its disk {disk} is not mounted")
    home = vol.replica_dir(replica)
    assert home is not None
    try:
        os.close(_open(disk, home, 3))
    except FileNotFoundError:
        raise NotFound(
            f"its directory {home} is not on the disk mounted at {disk} (another disk mounted "
            f"there?): mount its own, or replace the replica (replica rm, replica add --disk)"
        ) from None


def make(vol: Volume, replica: dict[str, Any]) -> Path:
    """Create a new local replica's (empty) directory, owner-only, and return it; on a disk,
    only while that disk is mounted (never on the root's disk under its mount point)."""
    home = vol.replica_dir(replica)
    assert home is not None
    disk = replica.get("disk")
    if disk and not os.path.ismount(disk):
        raise NotFound(f"disk {disk} is not mounted any more")
    try:
        if disk:
            os.close(_open(disk, home, 3, create=True))
        else:
            for level in reversed([home, *home.parents]):
                if not level.exists():
                    level.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:  # (a disk mounted read-only, full, or not ours to write)
        raise StorageError(f"cannot make {exc.filename or home}: {exc.strerror or exc}") from None
    return home


def remove(vol: Volume, replica: dict[str, Any]) -> str | None:
    """Delete a local replica's directory (and, on a disk, the volume's directory there once it
    is empty); what was left (a disk that is not mounted: its directory there, if any)."""
    home = vol.replica_dir(replica)
    if home is None:
        return None
    disk = replica.get("disk")
    if not disk:
        shutil.rmtree(home, ignore_errors=True)
        return None
    if not os.path.ismount(disk):
        return f"{home} (disk {disk} is not mounted)"
    try:  # (through descriptors: a level swapped for a link meanwhile is not followed)
        fd = _open(disk, home, 2)
    except FileNotFoundError:
        return None
    except NotPermitted as exc:
        return f"{home} ({exc})"
    try:
        shutil.rmtree(home.name, dir_fd=fd, ignore_errors=True)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        home.parent.rmdir()
    return None


def _device(path: Path) -> int:
    """The device of the file system ``path`` is on (of its nearest existing parent)."""
    for level in (path, *path.parents):
        with contextlib.suppress(OSError):
            return level.stat().st_dev
    return -1
