"""Volumes under a root directory: their durable configuration and where their files live.

``<root>/volumes/<name>/config.json`` holds what must survive everything: size, chunk size,
the replicas (local directories or remote addresses) with the mode the engine last recorded for
each, and the filesystem record that decides whether ``lhfs mount`` may ever format. It is only
ever replaced atomically. Runtime files (the engine's control socket, its pid, logs) sit next to
it and mean nothing after a reboot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lhfs.config import disks
from lhfs.core.durable import atomic_write_json, fsync_dir
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
)
from lhfs.core.names import check_name, check_volume_name
from lhfs.core.procs import process_state
from lhfs.core.units import check_chunk_size, rfc3339
from lhfs.store.chunkstore import check_geometry
from lhfs.wire.auth import VolumeKey

FORMAT = 1
KEY_FILE = "key.json"

# A volume's settings: name -> (default, lowest, highest, what it means). Kept in its
# configuration under "settings"; ``lhfs volume set`` changes them, also while attached.
SETTINGS: dict[str, tuple[float, float, float, str]] = {
    "io_timeout": (
        8.0,
        1.0,
        600.0,
        "seconds a replica may leave I/O unanswered before it is marked ERR (a host whose link "
        "dropped stalls the volume this long at most)",
    ),
    "rejoin_wait": (
        5.0,
        0.0,
        3600.0,
        "seconds a failed replica must answer again before it is rebuilt (a link that flaps is "
        "not rebuilt at every blink; a local replica's process is started again first)",
    ),
    "rejoin_limit": (
        3600.0,
        10.0,
        30 * 86400.0,
        "seconds after which a replica that has not served since it failed is no longer "
        "brought back by itself (replace it: replica add, replica rm)",
    ),
    "system_snapshots": (
        3.0,
        1.0,
        250.0,
        "how many system snapshots (taken by backups and rebuilds) are kept; older ones are "
        "coalesced away in the background, never the last one of a backup target",
    ),
}


def shown(name: str, value: float) -> float | int:
    """A setting's value as said to people and scripts: a count as a whole number."""
    return value if SETTINGS[name][3].startswith("seconds") else int(value)


def check_setting(name: str, value: float) -> float:
    _default, low, high, meaning = SETTINGS[name]
    if not low <= value <= high:
        raise InvalidArgument(f"{name.replace('_', '-')} must be from {low:.12g} to {high:.12g}")
    if not meaning.startswith("seconds") and value != int(value):
        raise InvalidArgument(f"{name.replace('_', '-')} is a count: a whole number")
    return float(value)


def volumes_dir(root: Path) -> Path:
    return Path(root) / "volumes"


@dataclass
class Volume:
    """A volume's directory and configuration; ``save`` makes changes durable."""

    root: Path
    name: str
    config: dict[str, Any]

    @property
    def dir(self) -> Path:
        return volumes_dir(self.root) / self.name

    @property
    def control_socket(self) -> Path:
        return self.dir / "engine.sock"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"

    @property
    def key_path(self) -> Path:
        """The volume's key file (identity and secret, see ``lhfs.wire.auth``): what every
        replica of the volume and every peer talking to one must hold."""
        return self.dir / KEY_FILE

    def key(self) -> VolumeKey:
        """The volume's key; a volume made before volumes had keys gets one now."""
        try:
            return VolumeKey.load(self.key_path)
        except NotFound:
            pass
        with open(self.dir / "config.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.key_path.exists():
                key = VolumeKey.new(self.name)
                key.save(self.key_path)
                self.config = json.loads((self.dir / "config.json").read_text())
                self.config["volume_id"] = key.id_hex
                self.save()
        return VolumeKey.load(self.key_path)

    @property
    def runtime_path(self) -> Path:
        return self.dir / "engine.json"

    @property
    def size(self) -> int:
        return self.config["size"]

    @property
    def chunk_size(self) -> int:
        return self.config["chunk_size"]

    @property
    def replicas(self) -> list[dict[str, Any]]:
        return self.config["replicas"]

    def setting(self, name: str) -> float:
        return float(self.config.get("settings", {}).get(name, SETTINGS[name][0]))

    def settings(self) -> dict[str, float | int]:
        """Every setting as it is now, counts as whole numbers (seconds may have fractions)."""
        return {key: shown(key, self.setting(key)) for key in SETTINGS}

    def replica(self, replica_id: str) -> dict[str, Any]:
        for replica in self.replicas:
            if replica["id"] == replica_id:
                return replica
        raise NotFound(f"volume {self.name} has no replica {replica_id!r}")

    def replica_dir(self, replica: dict[str, Any]) -> Path | None:
        """The directory of a local replica (None for a remote one): under the volume's
        directory, or on a disk of its own (``lhfs.config.disks``)."""
        if not replica.get("local"):
            return None
        return disks.directory(self.dir, self.config.get("volume_id"), replica)

    def save(self) -> None:
        self.save_to(self.dir)

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Reload, change and save the configuration under a lock: the engine and the command
        line both change it, and neither may write back a stale copy over the other's change."""
        with open(self.dir / "config.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.config = json.loads((self.dir / "config.json").read_text())
            change(self.config)
            self.save()

    def removing(self, name: str, begun: bool) -> None:
        """Record that the removal of snapshot ``name`` was begun (``begun``) or is done: one
        stopped half-way (kill -9) leaves some replicas with the snapshot and some without,
        and whoever next works on the replicas finishes it where it is left."""

        def change(config: dict[str, Any]) -> None:
            left = {n for n in config.pop("removing", []) if n != name} | (
                {name} if begun else set()
            )
            config.update({"removing": sorted(left)} if left else {})

        self.update(change)

    @property
    def filesystem(self) -> dict[str, Any] | None:
        """The durable record of the filesystem ``lhfs mount`` created (or adopted), if any.
        A file of its own, written only by ``lhfs mount``."""
        try:
            return json.loads((self.dir / "filesystem.json").read_text())
        except FileNotFoundError:
            return None

    def record_filesystem(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.dir / "filesystem.json", record)

    def filesystem_after(self, stamp: float) -> bool:
        """Whether lhfs recorded the volume's file system (formatted or adopted it) only after
        ``stamp``: the time of its record's file, written once per format or adoption."""
        try:
            return stamp < (self.dir / "filesystem.json").stat().st_mtime
        except FileNotFoundError:
            return False

    def forget_filesystem(self) -> None:
        """The content went back to before ``lhfs mount`` formatted (or adopted) it: its record
        is kept aside (``filesystem.before-revert.json``), and the next mount decides from
        the content, as for a volume never mounted."""
        path = self.dir / "filesystem.json"
        path.replace(self.dir / "filesystem.before-revert.json")
        fsync_dir(self.dir)

    def save_to(self, directory: Path) -> None:
        atomic_write_json(directory / "config.json", self.config)

    def require_not_standby(self, action: str) -> None:
        """A DR standby is written only by its follower until it is activated."""
        if self.config.get("dr"):
            raise Busy(
                f"volume {self.name} is a DR standby: {action} is refused until "
                f"'lhfs dr activate {self.name}'"
            )

    def require_complete(self, action: str) -> None:
        """A volume being restored holds part of a backup: nothing may take it for data."""
        if self.config.get("restoring"):
            raise Busy(
                f"volume {self.name} holds an unfinished restore of "
                f"{self.config['restoring']['backup']}: {action} is refused"
            )

    def runtime(self) -> dict[str, Any] | None:
        """What the running engine published (pid, device), or None when none runs."""
        info = self.runtime_record()
        if info is None or not alive(info.get("pid", -1)):
            return None
        return info

    def runtime_record(self) -> dict[str, Any] | None:
        """What the engine published, running or not: an engine that was killed leaves it
        (and what it left mounted is found from its device)."""
        try:
            info = json.loads(self.runtime_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return info if isinstance(info, dict) and "device" in info else None


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = process_state(pid)
    return state is not None and state != "Z"  # (a zombie is not alive)


@contextlib.contextmanager
def name_held(root: Path, name: str, doing: str) -> Iterator[None]:
    """Hold the volume name ``name`` under ``root`` for the block: a create and a removal
    each take it, so that two commands never build or tear down in one place at once (two
    creates of one name once cleared each other's staging directory, and one said it had made
    a volume whose replicas the other had replaced). Another command holding it is refused
    at once with ``Busy``, naming what it does (``doing``: "created", "removed") and its pid:
    waiting for it would only end in "already exists" or "no such volume". The lock file
    ``volumes/.NAME.lock`` goes when the block ends."""
    check_name(name, "volume name")
    base = volumes_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / f".{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
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
            raise Busy(f"volume {name} is being {what} by another command{pid}") from None
        try:
            mine = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            mine = False
        if mine:
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


def create(
    root: Path,
    name: str,
    size: int,
    chunk_size: int,
    replicas: int,
    backing_image: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    on_disks: list[Path] | None = None,
) -> tuple[Volume, Path]:
    """Record a new volume in a temporary directory; the caller initialises the replicas there
    (those ``on_disks``, one per disk in order, on their disks) and publishes it with
    ``finish_create``, all while it holds the name (``name_held``): a staging directory found
    then is what a create cut short left, never another command's work."""
    check_volume_name(name)
    check_chunk_size(chunk_size)
    check_geometry(size, chunk_size)
    if not 1 <= replicas <= 16:
        raise InvalidArgument("a volume has 1 to 16 replicas")
    base = volumes_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = base / name
    if directory.exists():
        raise AlreadyExists(f"volume {name} already exists")
    tmp = base / f".{name}.creating"
    clear(root, name, tmp)  # (what a create cut short left)
    (tmp / "replicas").mkdir(mode=0o700, parents=True)
    config = {
        "format": FORMAT,
        "name": name,
        "size": size,
        "chunk_size": chunk_size,
        "created": rfc3339(),
        "backing_image": backing_image,
        "replicas": [
            {"id": f"r{i + 1}", "local": True, "address": None, "mode": "RW", "error": None}
            | ({"disk": str(on_disks[i])} if on_disks else {})
            for i in range(replicas)
        ],
        "next_replica": replicas + 1,
        **(extra or {}),
    }
    key = VolumeKey.new(name)
    key.save(tmp / KEY_FILE)
    config["volume_id"] = key.id_hex
    atomic_write_json(tmp / "config.json", config)
    return Volume(Path(root), name, config), tmp


def clear(
    root: Path, name: str, directory: Path, config: dict[str, Any] | None = None
) -> list[str]:
    """Delete a volume's directory that is no longer listed (a create cut short, an rm's
    trash) and its replicas on disks, as ``config`` (else the one in it) names them; what was
    left (directories on disks that are not mounted)."""
    if config is None:
        try:
            config = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    left = []
    if isinstance(config, dict) and isinstance(config.get("replicas"), list):
        gone = Volume(Path(root), name, config)
        for replica in config["replicas"]:
            try:
                kept = disks.remove(gone, replica) if replica.get("disk") else None
            except (LhfsError, AttributeError) as exc:  # (not what lhfs wrote: not acted on)
                kept = f"replica {replica!r}: {exc}"
            if kept:
                left.append(kept)
    shutil.rmtree(directory, ignore_errors=True)
    return left


def finish_create(volume: Volume, tmp: Path) -> None:
    """Publish a volume whose replicas were initialised in ``tmp`` (a rename: all or nothing)."""
    os.rename(tmp, volume.dir)


def load(root: Path, name: str) -> Volume:
    check_name(name, "volume name")
    path = volumes_dir(root) / name / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no volume named {name!r} (under {root})") from None
    except ValueError as exc:
        raise CorruptState(f"{path} is damaged: {exc}") from None
    return Volume(Path(root), name, config)


def list_names(root: Path) -> list[str]:
    base = volumes_dir(root)
    if not base.exists():
        return []
    return sorted(  # (not ``.NAME.creating`` or ``.NAME.removing``: work under way or cut)
        p.name
        for p in base.iterdir()
        if not p.name.startswith(".") and (p / "config.json").exists()
    )
