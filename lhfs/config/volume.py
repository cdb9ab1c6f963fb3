"""Volumes under a root directory: their durable configuration and where their files live.

``<root>/volumes/<name>/config.json`` holds what must survive everything: size, chunk size,
the replicas (local directories or remote addresses) with the mode the engine last recorded for
each, and the filesystem record that decides whether ``lhfs mount`` may ever format. It is only
ever replaced atomically. Runtime files (the engine's control socket, its pid, logs) sit next to
it and mean nothing after a reboot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lhfs.config import disks
from lhfs.core import locks
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
from lhfs.core.procs import alive as alive  # (volumes.alive: said where records are read)
from lhfs.core.procs import argv_of, is_pid
from lhfs.core.units import check_chunk_size, rfc3339
from lhfs.store.chunkstore import check_geometry, replica_volume_id
from lhfs.wire.auth import VolumeKey
from lhfs.wire.protocol import MAX_EPOCH, MAX_START_EPOCH

FORMAT = 1
KEY_FILE = "key.json"
FS_STATES = ("formatting", "formatted")  # a filesystem record's states (lhfs mount)
MODES = ("RW", "WO", "ERR")  # a replica's modes, as the engine records them

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


def changed_settings(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What changed between two ``Volume.settings()``, as the volume's log says it
    ("io-timeout 8 -> 4"; empty if nothing did), named as ``volume set`` takes them."""
    return ", ".join(
        f"{key.replace('_', '-')} {before.get(key):g} -> {after[key]:g}"
        for key in after
        if before.get(key) != after[key]
    )


def check_setting(name: str, value: float) -> float | int:
    """``value`` if ``name`` may take it, as it is kept: a count as a whole number (5, where
    ``5.0`` in config.json read as a fraction)."""
    _default, low, high, meaning = SETTINGS[name]
    if not low <= value <= high:
        raise InvalidArgument(f"{name.replace('_', '-')} must be from {low:.12g} to {high:.12g}")
    if meaning.startswith("seconds"):
        return float(value)
    if value != int(value):
        raise InvalidArgument(f"{name.replace('_', '-')} is a count: a whole number")
    return int(value)


def only_replica(name: str, replica_id: str) -> str:
    """Why ``replica rm`` keeps the only replica of volume ``name``, whatever its mode: a
    volume with none has nothing to serve, nor to rebuild a new replica from."""
    return (
        f"{replica_id} is the only replica of {name}: a volume keeps one at least; add "
        f"another first ('lhfs replica add {name}'), or remove the volume ('lhfs volume rm "
        f"{name}')"
    )


def unservable(vol: Volume) -> str | None:
    """Why a volume whose configuration loads cannot be served, if it cannot: no replica
    left (an lhfs from before ``replica rm`` kept the last one could remove it), or a session
    epoch past ``MAX_START_EPOCH`` (edited by hand: sessions count up from it, and none may
    reach the wire's limit). Refused by an attach and said by ``doctor``; ``volume info``
    and ``volume rm`` still take it."""
    path = vol.dir / "config.json"
    if not vol.config["replicas"]:
        return (
            f"{path}: replicas is empty: volume {vol.name} has no replica left to serve "
            f"from; remove it ('lhfs volume rm {vol.name}') and restore it from a backup"
        )
    epoch = vol.config.get("epoch") or 0
    highest = MAX_START_EPOCH - (1 << 32)  # (room for more sessions than any volume counts)
    if epoch > highest:
        return (
            f"{path}: epoch must be at most {highest} for a session to start from it, not "
            f"{epoch} (the file was edited or damaged: set it back to the highest epoch its "
            "replicas' epoch files hold)"
        )
    return None


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

    def replica_log(self, replica_id: str) -> Path:
        """Where a local replica's process logs (``lhfs logs`` shows it as ``[ID]``)."""
        return self.dir / f"{replica_id}.log"

    @property
    def key_path(self) -> Path:
        """The volume's key file (identity and secret, see ``lhfs.wire.auth``): what every
        replica of the volume and every peer talking to one must hold."""
        return self.dir / KEY_FILE

    def key(self) -> VolumeKey:
        """The volume's key; a volume made before volumes had keys gets one now. One whose
        key is missing while its configuration or a replica names its identity already (the
        file lost, or a root restored without it) is refused, changing nothing: a new key
        would be another volume to its replicas, which then refuse it for good."""
        try:
            return VolumeKey.load(self.key_path)
        except NotFound:
            pass
        with locks.held(self.dir / "config.lock"):
            if not self.key_path.exists():
                self.config = read_config(self.dir / "config.json")
                known = self.config.get("volume_id") or self._replicas_volume_id()
                if known:
                    raise NotFound(
                        f"volume {self.name}: its key {self.key_path} is missing, and its "
                        f"replicas know the volume by it (id {known}): restore key.json from "
                        f"a backup of the root, or from a copy 'lhfs volume key {self.name}' "
                        "wrote; nothing was changed"
                    )
                key = VolumeKey.new(self.name)
                key.save(self.key_path)
                self.config["volume_id"] = key.id_hex
                self.save()
        return VolumeKey.load(self.key_path)

    def _replicas_volume_id(self) -> str | None:
        """The volume identity a local replica's ``volume.json`` records, if any does."""
        for replica in self.replicas:
            with contextlib.suppress(LhfsError):
                directory = self.replica_dir(replica)
                if directory is not None and (known := replica_volume_id(directory)):
                    return known
        return None

    @property
    def runtime_path(self) -> Path:
        return self.dir / "engine.json"

    @property
    def engine_lock(self) -> Path:
        """Held by the volume's engine for its life (one engine per volume), with its pid."""
        return self.dir / "engine.lock"

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
        line both change it, and neither may write back a stale copy over the other's change.
        A volume removed meanwhile is said as such (not as a raw missing ``config.lock``)."""
        lock, path = self.dir / "config.lock", self.dir / "config.json"
        try:
            with locks.held(lock):
                self.config = read_config(path)
                change(self.config)
                self.save()
        except FileNotFoundError as exc:
            if exc.filename not in (str(lock), str(path)):
                raise
            raise NotFound(f"no volume named {self.name!r} (under {self.root})") from None

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
        A file of its own, written only by ``lhfs mount``. A damaged one is refused in one
        line (``CorruptState``), never read as missing: no record means "never formatted",
        and ``lhfs mount`` formats such a volume when it looks blank (see "Formatting at most
        once" in the README)."""
        path = self.dir / "filesystem.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CorruptState(f"{path} is damaged: {exc}") from None
        if not isinstance(record, dict):
            raise CorruptState(f"{path} is damaged: not a JSON object")
        for field in ("type", "uuid"):
            if not isinstance(record.get(field), str):
                raise CorruptState(
                    f"{path}: {field} must be a string, not {record.get(field)!r:.60}"
                )
        if record.get("state") not in FS_STATES:
            raise CorruptState(
                f"{path}: state must be formatting or formatted, not {record.get('state')!r:.60}"
            )
        return record

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
        return info if info is not None and is_engine(info["pid"], self.name) else None

    def runtime_record(self) -> dict[str, Any] | None:
        """What the engine published, running or not: an engine that was killed leaves it
        (and what it left mounted is found from its device). A record whose pid is not one
        (damaged, edited) says the pid the engine lock keeps if that is the volume's engine
        still (taken for dead, its FUSE device was unmounted under it and its record removed,
        and no command could reach it again), else pid 0: an engine that crashed, which
        detach or the next attach cleans up after; never a ``TypeError`` in every command."""
        try:
            info = json.loads(self.runtime_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("device"), str):
            return None
        if not is_pid(info.get("pid")):
            info["pid"] = 0
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(self.engine_lock, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    holder = int(os.pread(fd, 16, 0).decode().strip())
                finally:
                    os.close(fd)
                info["pid"] = holder if is_engine(holder, self.name) else 0
        return info


def is_engine(pid: Any, name: str) -> bool:
    """Whether process ``pid`` is volume ``name``'s engine. The one test of it: a runtime
    record's pid may belong to anything once its engine died (after a reboot, say), and such
    a process must never be taken for the engine (every command would call the volume
    attached) nor signalled."""
    command = argv_of(pid)
    return b"engine-run" in command and name.encode() in command


def name_held(root: Path, name: str, doing: str) -> contextlib.AbstractContextManager[None]:
    """Hold the volume name ``name`` under ``root`` for the block (``locks.name_held``): a
    create and a removal each take it, so that two commands never build or tear down in one
    place at once (two creates of one name once cleared each other's staging directory, and
    one said it had made a volume whose replicas the other had replaced). The lock file is
    ``volumes/.NAME.lock``."""
    check_name(name, "volume name")
    base = volumes_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return locks.name_held(base / f".{name}.lock", f"volume {name}", doing)


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
    if path.parent.is_symlink():  # (another volume's, shown and removed under this name)
        raise CorruptState(
            f"volume directory {path.parent} is a symbolic link (to "
            f"{os.readlink(path.parent)}): a volume lives in a directory of its own; remove "
            "the link"
        )
    try:
        return Volume(Path(root), name, read_config(path))
    except FileNotFoundError:
        raise NotFound(f"no volume named {name!r} (under {root})") from None


def read_config(path: Path) -> dict[str, Any]:
    """The configuration in ``path``, once ``check_config`` passed it."""
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise CorruptState(f"{path} is damaged: {exc}") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptState(f"{path} cannot be read: {exc.strerror}") from None
    return check_config(config, path)


def check_config(config: Any, path: Path) -> dict[str, Any]:
    """Return ``config``, read from ``path``, if lhfs could have written it.

    Every command reads the fields it needs straight from the dictionary, so a file that is
    valid JSON but of another shape (edited by hand, written half by a tool, a disk's damage)
    would surface as a ``KeyError`` or ``TypeError`` anywhere, or worse be acted on: a size of
    ``"x"`` once made an attach fail as if no replica could start, and ``volume rm`` deleted
    the directory on its strength. So each field is checked here, where it is read, and a bad
    file is refused in one line naming it and the field (``CorruptState``). Fields lhfs added
    over time may be missing (an older volume's configuration has none of them).
    """

    def bad(field: str, should: str, value: Any) -> CorruptState:
        return CorruptState(f"{path}: {field} must be {should}, not {value!r:.60}")

    def typed(field: str, kinds: tuple[type, ...], should: str, needed: bool = False) -> Any:
        value = config.get(field)
        if (value is not None or needed) and (
            isinstance(value, bool) or not isinstance(value, kinds)  # (a bool is no number)
        ):
            raise bad(field, should, value)
        return value

    if not isinstance(config, dict):
        raise CorruptState(f"{path} is damaged: not a JSON object")
    fmt = typed("format", (int,), "an integer")
    if fmt is not None and fmt > FORMAT:
        raise CorruptState(f"{path} was written by a newer lhfs (format {fmt}): upgrade lhfs")
    size = typed("size", (int,), "an integer", needed=True)
    chunk_size = typed("chunk_size", (int,), "an integer", needed=True)
    try:
        check_geometry(size, chunk_size)
    except InvalidArgument as exc:
        raise CorruptState(f"{path}: size and chunk_size: {exc}") from None
    next_replica = typed("next_replica", (int,), "a whole number from 0")
    if next_replica is not None and next_replica < 0:
        raise bad("next_replica", "a whole number from 0", next_replica)
    # (below the wire's limit: an engine never records one above it; whether a volume may
    # still start a session from it is ``unservable``'s question, so that a volume left there
    # can still be looked at and removed)
    epoch = typed("epoch", (int,), "a whole number")
    if epoch is not None and not 0 <= epoch < MAX_EPOCH:
        raise bad("epoch", f"a whole number from 0 to {MAX_EPOCH - 1}", epoch)
    for field in ("name", "volume_id", "backing_image", "backing_image_name", "created"):
        typed(field, (str,), "a string or null")
    for field in ("settings", "backups", "snapshot_holds", "removing"):
        if field in config and config[field] is None:  # (null: none, as readers take a gap)
            del config[field]
    for field in ("dr", "restoring", "settings", "backups", "snapshot_holds", "last_rw"):
        typed(field, (dict,), "an object or null")
    last_rw = config.get("last_rw")  # (a faulted volume: the replica it waits for)
    if last_rw and not isinstance(last_rw.get("id"), str):
        raise bad("last_rw.id", "a string", last_rw.get("id"))
    if last_rw and type(last_rw.get("revision", -1)) is not int:
        raise bad("last_rw.revision", "an integer", last_rw.get("revision"))
    removing = typed("removing", (list,), "a list of snapshot names")
    if removing and not all(isinstance(n, str) for n in removing):
        raise bad("removing", "a list of snapshot names", removing)
    restoring = config.get("restoring")
    if restoring and not isinstance(restoring.get("backup"), str):
        raise bad("restoring.backup", "a string", restoring.get("backup"))
    if restoring and type(restoring.get("pid")) is not int:
        raise bad("restoring.pid", "a process id", restoring.get("pid"))
    for key, value in (config.get("settings") or {}).items():
        if key in SETTINGS:
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidArgument("not a number")
                check_setting(key, value)
            except InvalidArgument as exc:
                raise bad(f"settings.{key}", f"a valid value ({exc})", value) from None
    replicas = typed("replicas", (list,), "a list of replicas", needed=True)
    ids: set[str] = set()
    for i, replica in enumerate(replicas):
        field = f"replicas[{i}]"
        if not isinstance(replica, dict):
            raise bad(field, "an object", replica)
        if not isinstance(replica.get("id"), str):
            raise bad(f"{field}.id", "a string", replica.get("id"))
        if replica["id"] in ids:  # (two would be one directory, one process, one mode)
            raise bad(f"{field}.id", "an id no other replica of the volume has", replica["id"])
        ids.add(replica["id"])
        for key in ("address", "mode", "error", "disk", "uid", "tls_ca", "held"):
            if replica.get(key) is not None and not isinstance(replica[key], str):
                raise bad(f"{field}.{key}", "a string or null", replica[key])
        if replica.get("mode") is not None and replica["mode"] not in MODES:
            raise bad(f"{field}.mode", "one of " + ", ".join(MODES), replica["mode"])
        for key in ("local", "rotten_backing", "unbuilt"):  # (a "no" would be taken for true)
            if replica.get(key) is not None and not isinstance(replica[key], bool):
                raise bad(f"{field}.{key}", "true, false or null", replica[key])
        if not replica.get("local") and not isinstance(replica.get("address"), str):
            raise bad(f"{field}.address", "a replica's address (it is not local)", None)
        flushed = replica.get("flushed")  # (the revision it last said it holds durably)
        if flushed is not None and (type(flushed) is not int or flushed < 0):
            raise bad(f"{field}.flushed", "a whole number from 0", flushed)
    if "next_replica" not in config:  # (never reused: the next number above every one made)
        config["next_replica"] = _next_replica(replicas, path.parent / "replicas")
    return config


def named_by_id(root: Path, volume_id: str) -> str | None:
    """The name of the volume of ``root`` whose identity is ``volume_id``, if it has one: a
    replica of another volume is named to the operator as that volume."""
    for name in list_names(root):
        with contextlib.suppress(LhfsError, OSError, ValueError):
            if load(root, name).config.get("volume_id") == volume_id:
                return name
    return None


def _next_replica(replicas: list[dict[str, Any]], directory: Path) -> int:
    """The number of the next replica of a configuration that does not say it (written by
    hand or by a tool): above every replica it names and every local directory left."""
    names = [str(r["id"]) for r in replicas]
    with contextlib.suppress(OSError):
        names += [entry.name for entry in directory.iterdir()]
    numbers = [int(found[1]) for name in names if (found := re.fullmatch(r"r([0-9]+)", name))]
    return max(numbers, default=0) + 1


def list_names(root: Path) -> list[str]:
    base = volumes_dir(root)
    if not base.exists():
        return []
    return sorted(  # (not ``.NAME.creating`` or ``.NAME.removing``: work under way or cut)
        p.name
        for p in base.iterdir()
        if not p.name.startswith(".") and (p / "config.json").exists()
    )


def readable(root: Path) -> Iterator[Volume]:
    """Every volume of ``root`` whose configuration reads, for what looks across volumes (a
    device in use, a loop device's owner): one damaged volume must not stop commands about
    the others (a command about it says what is wrong), nor one removed after it was listed
    (a loop over the volumes there are must not fail for one that went meanwhile)."""
    for name in list_names(root):
        with contextlib.suppress(CorruptState, NotFound):
            yield load(root, name)
