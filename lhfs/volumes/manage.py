"""Volume management as the command line sees it: create, attach, detach, inspect, snapshot.

An attached volume is handled through its engine's control socket; a detached one directly on
its local replica directories (only the replicas not recorded as failed, which all hold the same
data). Every check that can refuse a request runs before anything changes.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from lhfs.config import disks
from lhfs.config import volume as volumes
from lhfs.core import logs
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    WrongState,
)
from lhfs.core.names import check_name
from lhfs.core.procs import is_lhfs, stopped, wait_for
from lhfs.core.units import rfc3339
from lhfs.engine import control, housekeeping
from lhfs.store.chunkstore import ChunkStore, disk_bytes
from lhfs.volumes import attachment, standby

T = TypeVar("T")

# -- create and remove -----------------------------------------------------------------------


def create(
    root: Path,
    name: str,
    size: int,
    chunk_size: int,
    replicas: int,
    backing: Path | None,
    extra: dict[str, Any] | None = None,
    on_disks: list[str] | None = None,
    backing_id: str | None = None,
) -> volumes.Volume:
    """Create a volume with local replicas, under the root or one on each of ``on_disks``
    (``lhfs.config.disks``); ``extra`` goes into its configuration from the start (a DR
    standby is never visible without its ``dr`` section). ``backing_id``: the content id a
    registered backing image was recorded with (its file changed since: refused)."""
    if backing is not None and not backing.is_file():
        raise NotFound(f"backing image file {backing} does not exist")
    if on_disks and len(on_disks) != replicas:
        raise InvalidArgument(f"{len(on_disks)} disks for {replicas} replicas: give one each")
    chosen: dict[str, tuple[Path, str | None]] = {}
    for n, disk in enumerate(on_disks or (), 1):
        path = disks.check(disk, chosen)
        chosen[f"r{n}"] = (path, str(path))
    with volumes.name_held(root, name, "created"):
        if _trash(root, name).exists():  # (both would then answer to 'volume rm NAME')
            raise WrongState(
                f"a removal of volume {name} was cut short: 'lhfs volume rm {name}' finishes "
                "it; then create the volume"
            )
        vol, tmp = volumes.create(
            root,
            name,
            size,
            chunk_size,
            replicas,
            extra=extra,
            on_disks=[p for p, _ in chosen.values()],
        )
        try:
            _make_replicas(vol, tmp, backing, backing_id)
            volumes.finish_create(vol, tmp)
        except BaseException:
            volumes.clear(root, name, tmp, vol.config)
            raise
    return vol


class ImageChanged(CorruptState):
    """A registered backing image's file no longer holds the content its id says (changed
    in place, its size and time kept): a restore that looked for that content goes without
    it, as for an image it found modified."""


def _make_replicas(
    vol: volumes.Volume, tmp: Path, backing: Path | None, backing_id: str | None
) -> None:
    """Initialise the replicas of a volume being created in ``tmp`` (under it, or on their
    disks), and record its backing image's content id."""
    for replica in vol.replicas:
        store = ChunkStore.create(
            disks.make(vol, replica) if replica.get("disk") else tmp / "replicas" / replica["id"],
            vol.size,
            vol.chunk_size,
            backing,
            _image_file(replica["id"], backing),
            volume_id=vol.config["volume_id"],
        )
        info = store.info()
        store.close()
        found = info["backing_image"] and info["backing_image"]["id"]
        if backing_id is not None and found != backing_id:
            raise ImageChanged(
                f"the backing image file {backing} changed since it was registered (it "
                f"was {backing_id}, it is {found}): register it again under another name"
            )
    vol.config["backing_image"] = info["backing_image"] and info["backing_image"]["id"]
    vol.save_to(tmp)


def _image_file(replica_id: str, backing: Path | None) -> str:
    """The name of a replica's copy of its backing image: its own, from the image's file name
    cut to what a file name of lhfs may hold (a replica knows its image by content, never by
    this name; one taken whole was refused past 61 characters or with a space)."""
    if backing is None:
        return "backing.img"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", backing.stem).strip("._-")[:40] or "image"
    return f"{replica_id}-{stem}.img"


def remove(
    root: Path, name: str, follower_stopped: bool = False, volume_id: str | None = None
) -> list[str]:
    """Delete a detached volume; a standby's follower stops first (unless the caller stopped
    it and holds its lock: ``follower_stopped``). The rename to a trash directory is the
    point of no return: then the replicas on disks go (the configuration read before says
    where), then the rest. Returns what was left: directories on disks that are not mounted.
    Done holding the name (``volumes.name_held``): two removals at once, or one and a create,
    never tear down what the other works on; and the command lock (``attachment.exclusive``):
    an attach or mount under way, its engine not yet recorded, is waited for, then refused.
    ``volume_id``: only the volume of that identity (a failed restore removes the volume it
    made, never one made under its name since); another is left alone (nothing returned)."""
    check_removable(volumes.load(root, name))  # (refused at once, before any wait for a lock)
    with volumes.name_held(root, name, "removed"), attachment.exclusive(volumes.load(root, name)):
        vol = volumes.load(root, name)  # (as the attach or detach it waited for left it)
        if volume_id is not None and vol.config.get("volume_id") != volume_id:
            return []
        check_removable(vol)
        if not follower_stopped:
            standby.remove(vol)
        trash = _trash(root, name)
        _not_mounted_in(trash)  # (an earlier rm of a volume of that name was cut short)
        volumes.clear(root, name, trash)  # (what such an rm left)
        os.rename(vol.dir, trash)
        return volumes.clear(root, name, trash, vol.config)


def _trash(root: Path, name: str) -> Path:
    """Where a volume being removed is, from the rename that removes it until it is gone."""
    return volumes.volumes_dir(root) / f".{name}.removing"


def _not_mounted_in(trash: Path) -> None:
    """Refuse to delete a trash directory something is mounted in: the deletion would fail
    half-way, or go down into the mounted file system."""
    inside = attachment.mounts_under(trash) if trash.exists() else []
    if inside:
        raise Busy(f"{inside[0]} is mounted: unmount it")


def removals_cut_short(root: Path, under_way: bool = False) -> list[str]:
    """The volumes whose removal was cut short (a killed ``volume rm``): renamed out of
    sight, their files still there; ``volume rm NAME`` finishes it (``finish_removal``). Not
    one under way (unless ``under_way``): the name lock's line names a live lhfs command
    (read, never probed: a probe of the lock would make a create or rm of that name at that
    instant refused)."""
    base = volumes.volumes_dir(root)
    found = base.glob(".*.removing") if base.is_dir() else []
    names = sorted(p.name[1 : -len(".removing")] for p in found)
    return [n for n in names if under_way or not _being_removed(base / f".{n}.lock")]


def _being_removed(lock: Path) -> bool:
    try:
        holder = lock.read_text().split()
    except OSError:
        return False
    return bool(holder) and holder[0].isdigit() and is_lhfs(int(holder[0]))


def finish_removal(root: Path, name: str) -> list[str]:
    """Finish the removal of a volume that a killed ``volume rm`` left renamed out of sight
    (it could be neither seen nor removed: "no volume named"); ``NotFound`` when none was
    left. What was left, as ``remove``. Holding the name: a removal under way is refused."""
    if not _trash(root, name).exists():
        volumes.load(root, name)  # (says there is no such volume)
        raise NotFound(f"no volume named {name!r} (under {root})")
    with volumes.name_held(root, name, "removed"):
        trash = _trash(root, name)
        if not trash.exists():  # (the rm it waited for finished it)
            raise NotFound(f"no volume named {name!r} (under {root})")
        _not_mounted_in(trash)
        return volumes.clear(root, name, trash)


def check_removable(vol: volumes.Volume) -> None:
    """Refuse to remove a volume that something still stands on: its engine (attached), what
    an engine that died left mounted, a loop device on its device file, anything mounted
    inside its directory (removing the directory would fail half-way, with the volume's
    configuration already gone), a restore or a backup that runs on it (it would fail on
    files gone under it, and a restore's cleanup once removed whatever had been made under
    its name since)."""
    if vol.runtime() is not None:
        raise Busy(f"volume {vol.name} is attached: detach it first")
    require_let_go(vol)
    restorer = (vol.config.get("restoring") or {}).get("pid", -1)
    if restorer != os.getpid() and is_lhfs(restorer):  # (its own cleanup removes it)
        raise Busy(f"volume {vol.name} is being restored by pid {restorer}: wait for it or stop it")
    backups = sorted(set(housekeeping.holders(vol.config).values()))
    if backups:
        raise Busy(f"volume {vol.name} is being backed up by pid {backups[0]}: wait for it")
    inside = attachment.mounts_under(vol.dir)
    if inside:
        raise Busy(f"{inside[0]} is mounted inside volume {vol.name}'s directory: unmount it")
    loops = attachment.loops_backed_by(vol.dir / "device")  # (a file system may sit on them)
    if loops:
        raise Busy(
            f"{', '.join(loops)} still uses volume {vol.name}'s device file: "
            f"{attachment.held_how(loops)}"
        )
    for replica in vol.replicas:  # (a configuration naming what lhfs never made: refused here)
        vol.replica_dir(replica)


def require_let_go(vol: volumes.Volume) -> None:
    """Refuse a volume whose engine died (its runtime record left behind) until ``volume
    detach`` (or ``umount``, ``attach``, ``mount``) has cleaned up after it. What the engine
    left may still be mounted: a file system on a loop device on its dead FUSE mount, whose
    page cache and open files show what the volume held then. Changing the replicas under it
    (a revert above all) makes that mount show what is no longer the volume; and a replica
    process that outlived its engine may still hold its directory. The cleanup is not done
    here: it unmounts a file system that processes may still use, which the operator does
    knowingly, by the command that says what it let go."""
    record = vol.runtime_record()
    if record is None or attachment.engine_alive(vol, record):
        return
    device = Path(record["device"])
    left = attachment.describe(attachment.leftovers(device), device)
    raise WrongState(
        f"volume {vol.name} crashed (its engine died{' and left ' + left if left else ''}): "
        f"'lhfs volume detach {vol.name}' cleans up after it first"
    )


def export_key(root: Path, name: str, out: Path) -> None:
    """Write a copy of the volume's key to ``out`` (owner-only), never over an existing file."""
    key = volumes.load(root, name).key()
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"{out} already exists: choose another file")
    if not out.parent.is_dir():
        raise NotFound(f"directory {out.parent} does not exist")
    key.save(out)


# -- inspection ------------------------------------------------------------------------------


def healthy_local_dirs(vol: volumes.Volume) -> list[Path]:
    """The directories of the RW local replicas of a detached volume: every one must be
    there (one skipped would drift from the others while recorded RW)."""
    healthy = [r for r in vol.replicas if r.get("mode", "RW") == "RW" and r.get("local")]
    for replica in healthy:
        try:
            disks.ready(vol, replica)
        except NotFound as exc:
            raise NotFound(f"replica {replica['id']} of {vol.name}: {exc}") from None
    dirs = [vol.replica_dir(r) for r in healthy]
    if not dirs:
        raise NotFound(f"volume {vol.name} has no healthy local replica")
    return [d for d in dirs if d is not None]


def freshest_local(vol: volumes.Volume) -> Path:
    best, best_rev = None, -1
    for directory in healthy_local_dirs(vol):
        with ChunkStore.open(directory) as store:
            if store.revision > best_rev:
                best, best_rev = directory, store.revision
    assert best is not None
    return best


# The keys of ``volume info --json`` and of each of its replicas: present in every state
# (``None`` when unknown or not applicable), so that a script reads them without guessing.
VOLUME_KEYS = (
    "name", "state", "size", "chunk_size", "backing_image", "filesystem", "settings",
    "attached", "device", "pid", "metrics", "loop", "mountpoint", "writes", "replicas",
    "snapshots", "restoring", "dr", "leftovers", "shared_writes", "shared_reads",
    "replica_answered_reads", "refused_writes", "last_refusal", "backups",
)  # fmt: skip
REPLICA_KEYS = (
    "id", "address", "mode", "error", "since", "revision", "rebuild_progress",
    "rebuild_stats", "rejoin", "pid", "disk_bytes", "disk_free", "shared_memory", "link",
    "failures", "restarts", "dir", "disk",
)  # fmt: skip


def info(root: Path, name: str) -> dict[str, Any]:
    """A volume's state, its replicas and snapshots, where it is attached and mounted."""
    vol = volumes.load(root, name)
    base: dict[str, Any] = {
        "name": name,
        "size": vol.size,
        "chunk_size": vol.chunk_size,
        "backing_image": vol.config.get("backing_image"),
        "filesystem": _filesystem(vol),
        "settings": vol.settings(),
        "dr": _shown_dr(vol.config.get("dr")),
        "backups": _backup_bases(vol),
    }
    if vol.config.get("restoring"):  # a restore whose process died leaves it incomplete
        mark = vol.config["restoring"]
        base["restoring"] = {**mark, "interrupted": not is_lhfs(mark["pid"])}
    record = vol.runtime_record()
    if record is not None:
        alive = vol.runtime() is not None  # (a dead engine's address serves nothing)
        base.update(
            _where(Path(record["device"])), metrics=record.get("metrics") if alive else None
        )
    runtime = vol.runtime()
    if runtime is not None:
        try:
            if stopped(runtime["pid"]):  # (it answers nothing until continued)
                raise control.EngineSilent("stopped")
            live = control.call(vol.control_socket, "info", timeout=ANSWER_WITHIN)
        except (control.NotAttached, control.EngineGone):  # (it died: shown as such below)
            live = None
        except control.EngineSilent:
            return _stable(
                {
                    **base,
                    "state": NOT_ANSWERING,
                    "attached": True,
                    "device": runtime["device"],
                    "pid": runtime["pid"],
                    "replicas": _recorded(vol),
                    "snapshots": [],  # (unknown: only its engine may ask its replicas)
                },
                vol,
            )
        if live is not None:
            snapshots = [_snapshot_entry(s) for s in live.pop("snapshots") if s["name"]]
            if vol.config.get("restoring"):
                live["state"] = "restoring"
            return _stable({**base, **live, "attached": True, "snapshots": snapshots}, vol)
    replicas = _recorded(vol)
    try:
        snapshots = [_snapshot_entry(s) for s in _detached_layers(vol, remote=False) if s["name"]]
    except LhfsError:
        snapshots = []  # (``snapshot ls`` says why instead, or asks a remote replica)
    state = "restoring" if vol.config.get("restoring") else "detached"
    if vol.config.get("dr"):
        state = "restoring" if standby.load_state(vol)["backup"] is None else "standby"
    if record is not None:  # its engine died: say so, and what it left mounted
        state = "crashed"
        base["leftovers"] = attachment.leftovers(Path(record["device"]))
        base["device"] = record["device"]
    return _stable(
        {**base, "state": state, "attached": False, "replicas": replicas, "snapshots": snapshots},
        vol,
    )


def _backup_bases(vol: volumes.Volume) -> list[dict[str, Any]]:
    """Per backup target, the last backup to it and the snapshot kept for it, the base of the
    next (``housekeeping.needed``): a target no longer used keeps its snapshot until that
    backup is removed from it (``backup rm``, ``backup prune``), and this shows which."""
    shown = []
    for target, record in sorted((vol.config.get("backups") or {}).items()):
        if isinstance(record, dict):
            stamp = record.get("timestamp")
            shown.append(
                {
                    "target": target,
                    "backup": record.get("backup"),
                    "snapshot": record.get("snapshot"),
                    "at": rfc3339(stamp) if isinstance(stamp, (int, float)) else None,
                }
            )
    return shown


NOT_ANSWERING = "not answering"  # the state of an attached volume whose engine is silent
ANSWER_WITHIN = 10.0  # seconds an engine that is not stopped has to answer 'info'
# (it answers within some 7 s even when a replica is stuck: its own waits are bounded)


def not_answering(root: Path, name: str, pid: int) -> str:
    """What to do about a volume whose engine does not answer, in words (each command runs as
    it is written). A stopped engine is continued, or killed and cleaned up after: letting it
    go while stopped would wait on it (a file system on it cannot be unmounted)."""
    lhfs = f"lhfs --root {shlex.quote(str(root))}"
    if stopped(pid):
        return (
            f"its engine (pid {pid}) is stopped: 'kill -CONT {pid}' resumes it; "
            f"'{lhfs} volume detach --force {name}' kills it instead (writes not yet flushed "
            "are lost)"
        )
    return (
        f"its engine (pid {pid}) did not answer within {ANSWER_WITHIN:g}s: try again, or "
        f"'{lhfs} volume detach --force {name}' lets it go (writes not yet flushed are lost)"
    )


def _answering(root: Path, name: str, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` of a volume whose engine answered, else ``WrongState`` saying what to do:
    for what only the engine knows (its snapshots, its replicas' modes now)."""
    if info["state"] == NOT_ANSWERING:
        raise WrongState(f"volume {name} does not answer: {not_answering(root, name, info['pid'])}")
    return info


def _recorded(vol: volumes.Volume) -> list[dict[str, Any]]:
    """The replicas as the configuration records them (what shows when no engine says)."""
    return [
        {
            "id": r["id"],
            "address": r.get("address") if not r.get("local") else None,
            **_unplaced(vol, r),
            **_disk(vol, r),
        }
        for r in vol.replicas
    ]


def _shown_dr(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A standby's section as shown: its time as RFC 3339 (kept as seconds, which its lag is
    counted from)."""
    if not config or not isinstance(config.get("created"), (int, float)):
        return config
    return {**config, "created": rfc3339(config["created"])}


def _where(device: Path) -> dict[str, Any]:
    """The loop device on an attached volume's device file, and where it is mounted."""
    loops = attachment.loops_backed_by(device)
    mounts = [m for loop in loops for m in attachment.mounted_at(loop)]
    return {"loop": loops[0] if loops else None, "mountpoint": mounts[0] if mounts else None}


def _unplaced(vol: volumes.Volume, replica: dict[str, Any]) -> dict[str, str | None]:
    """A detached replica's mode and error as recorded, unless its disk is not there: then it
    is ERR with the reason (the next attach finds the same), not RW with nothing to show."""
    try:
        disks.ready(vol, replica)
    except LhfsError as exc:  # (not there, or not safe to use)
        return {"mode": "ERR", "error": str(exc), "rejoin": replica.get("held")}
    return {
        "mode": replica.get("mode", "RW"),
        "error": replica.get("error"),
        "rejoin": replica.get("held"),  # (a scrub's verdict: what the next attach does)
    }


def _disk(vol: volumes.Volume, replica: dict[str, Any]) -> dict[str, int | None]:
    """What a local replica's directory takes on its disk and what that disk has free."""
    directory = vol.replica_dir(replica)
    if directory is None or not directory.is_dir():
        return {"disk_bytes": None, "disk_free": None}
    return {"disk_bytes": disk_bytes(directory), "disk_free": shutil.disk_usage(directory).free}


def _stable(info: dict[str, Any], vol: volumes.Volume) -> dict[str, Any]:
    """Every key in every state (None when unknown), in one order; with where each local
    replica lives (``dir``) and the disk it was placed on (``disk``: None under the root)."""
    for replica in info["replicas"]:
        with contextlib.suppress(LhfsError):
            entry = vol.replica(replica["id"])
            home = vol.replica_dir(entry)
            replica.update(dir=home and str(home), disk=entry.get("disk"))
    info["replicas"] = [{key: r.get(key) for key in REPLICA_KEYS} for r in info["replicas"]]
    extra = {key: value for key, value in info.items() if key not in VOLUME_KEYS}
    return {**{key: info.get(key) for key in VOLUME_KEYS}, **extra}


def _peer_layers(answer: Any) -> list[dict[str, Any]]:
    """A remote replica's list of layers, checked before use (what a peer says is not
    trusted): each an object with the fields a snapshot entry shows."""
    fields = {"name": (str, type(None)), "created": (str, type(None)), "size": (int,)}
    if not isinstance(answer, list) or not all(
        isinstance(layer, dict)
        and isinstance(layer.get("active"), bool)
        and all(isinstance(layer.get(key), kinds) for key, kinds in fields.items())
        for layer in answer
    ):
        raise CorruptState("it answered a list of layers that is not one")
    return answer


def _snapshot_entry(layer: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": layer["name"],
        "created": layer["created"],
        "size": layer["size"],
        "active": layer["active"],
    }


def list_volumes(root: Path) -> list[dict[str, Any]]:
    """``info`` of every volume, asked of their engines at once: one that does not answer
    costs its wait once, not once per volume listed before it."""
    with ThreadPoolExecutor(8) as pool:
        found = pool.map(lambda name: _info_or_damaged(root, name), volumes.list_names(root))
        return [entry for entry in found if entry is not None]


def _filesystem(vol: volumes.Volume) -> dict[str, Any] | None:
    """The volume's file system record as ``info`` shows it: a damaged one as its ``error``,
    beside everything else (the replicas' state, the engine's) that still reads."""
    try:
        return vol.filesystem
    except CorruptState as exc:
        return {"error": str(exc)}


def _info_or_damaged(root: Path, name: str) -> dict[str, Any] | None:
    """``info``; state ``damaged`` and why, for a volume whose files (its configuration, its
    filesystem record) are damaged; None for one removed since it was listed. One volume's
    trouble must not hide every other volume of the root (a listing failed as a whole)."""
    try:
        return info(root, name)
    except CorruptState as exc:
        return {"name": name, "state": "damaged", "error": str(exc)}
    except NotFound:
        if (volumes.volumes_dir(root) / name / "config.json").exists():
            raise
        return None


def checksum(root: Path, name: str, progress: control.Progress | None = None) -> str:
    """xxh3-128 of the volume's whole content (what its engine reads, when attached); not of
    an unfinished restore's (it would look like a volume's)."""
    vol = volumes.load(root, name)
    vol.require_complete("a checksum")
    if vol.runtime() is not None:

        def ask() -> str:
            control.call(vol.control_socket, "flush")
            return control.call_watched(vol.control_socket, "checksum", progress, "checksum")

        return _engine_or_offline(vol, ask, lambda now: _checksum_offline(now, progress))
    with _detached(vol) as now:
        if now is not None:
            return _checksum_offline(now, progress)
    return checksum(root, name, progress)  # (attached meanwhile, its lock let go: its engine)


def _checksum_offline(vol: volumes.Volume, progress: control.Progress | None) -> str:
    """``checksum`` of a detached volume (held: ``_detached``), from its freshest replica."""
    digest = xxhash.xxh3_128()
    with ChunkStore.open(freshest_local(vol)) as store:
        done = 0
        for piece in store.content():
            digest.update(piece)
            done += len(piece)
            if progress:
                progress(100 * done / max(1, store.size), done, store.size)
    return digest.hexdigest()


def _engine_or_offline(
    vol: volumes.Volume, ask: Callable[[], T], offline: Callable[[volumes.Volume], T]
) -> T:
    """``ask`` the engine of ``vol``, found attached a moment before; if it went away
    meanwhile by a detach before the request reached it (``NotAttached``: nothing was
    sent), the command is done as for a detached volume (``offline``, held by ``_detached``,
    which waits for the detach to end) rather than failing with "not attached". Why: a
    command racing a detach asked for something a detached volume does too. An engine that
    went away *with* the request (``EngineGone``) may have carried it out: doing it again
    could fail for a change this very command made (a snapshot then "exists"), so that is
    said as it was. One attached again meanwhile is asked again."""
    try:
        return ask()
    except control.NotAttached as exc:
        gone = exc
    with _detached(vol) as now:
        if now is not None and now.runtime_record() is None:
            return offline(now)
        if now is not None:
            raise gone
    return ask()


# -- changes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _detached(vol: volumes.Volume) -> Iterator[volumes.Volume | None]:
    """Hold the volume's command lock (``attachment.exclusive``) while a command works on the
    replica directories of a detached volume: an attach at that moment found them taken (its
    replica processes "did not start": a needless rebuild, or no replica at all), or took
    them first and left the command refused, or half done. The attach waits, or is waited
    for. Yields the volume as it is now, or None when it was attached meanwhile (then its
    engine is asked instead). A crashed volume is refused (``require_let_go``): every
    command on a detached volume's replicas comes here, so none works under what its dead
    engine left mounted."""
    with attachment.exclusive(vol):
        now = volumes.load(vol.root, vol.name)
        attached = now.runtime() is not None
        if not attached:
            require_let_go(now)
        yield None if attached else now


def _on_every_replica(vol: volumes.Volume, action: str, *args: Any) -> Any:
    """Apply a store method to every healthy local replica of a detached volume, held by
    ``_detached`` (its remote ones are recorded as having missed it: ``_remote_missed``)."""
    result = None
    directories = healthy_local_dirs(vol)
    _remote_missed(vol, action)
    for directory in directories:
        with ChunkStore.open(directory) as store:
            result = getattr(store, action)(*args)
    return result


def _note(vol: volumes.Volume, message: str) -> None:
    """Say in the volume's log (``engine.log``: ``lhfs logs VOL`` shows it as ``[engine]``)
    what a command did to the volume while detached: its engine logs what it does while
    attached, and an operator reconstructing what happened to a volume reads one log."""
    logs.note(vol.engine_log, "lhfs.command", f"{message} (detached)")


def _remote_missed(vol: volumes.Volume, what: str) -> None:
    """Before a change to a detached volume, which reaches its local replicas only: record
    its remote ones failed, so that the next attach rebuilds them from a local one instead of
    trusting what is no longer the volume (a replica that missed an expansion is smaller)."""
    remote = {r["id"] for r in vol.replicas if not r.get("local") and r.get("mode", "RW") == "RW"}
    if not remote:
        return
    why = f"missed a{'n' if what[0] in 'aeiou' else ''} {what} while detached: rebuilt at attach"

    def change(config: dict[str, Any]) -> None:
        for replica in config["replicas"]:
            if replica["id"] in remote:
                replica.update(mode="ERR", error=why, since=rfc3339())

    vol.update(change)


def set_settings(root: Path, name: str, values: dict[str, float]) -> dict[str, float | int]:
    """Change a volume's settings (``config.volume.SETTINGS``); an attached volume's engine
    takes them at once. Returns every setting, as it is now."""
    vol = volumes.load(root, name)
    values = {key: volumes.check_setting(key, value) for key, value in values.items()}
    record = vol.runtime_record() if values else None
    if record is not None:  # (a stopped engine is refused before anything is changed)
        attachment.stopped_engine(vol, record, force=False, then="set")
    before = vol.settings()
    vol.update(lambda config: config.setdefault("settings", {}).update(values))
    if values and vol.runtime() is not None:  # (its engine logs what changed)
        control.call(vol.control_socket, "settings", **values)
    elif values and volumes.changed_settings(before, vol.settings()):
        _note(vol, f"settings changed: {volumes.changed_settings(before, vol.settings())}")
    return vol.settings()


def expand(root: Path, name: str, size: int) -> dict[str, Any]:
    """Grow a volume and, when it is mounted with ``lhfs mount``, its loop device and file
    system too (ext4 online, xfs with xfs_growfs). Says what it did, and what remains to be
    done when it could not: ``changed`` (False: it already had that size), ``size``, ``loop``
    (the loop device grown), ``filesystem`` and ``mountpoint`` (the file system grown),
    ``todo`` (None, or the command an operator still has to run). Asked for the size it
    has, an attached volume's loop device or file system smaller than that is grown: an
    expansion killed (or short of a tool) after the volume grew left them small, and nothing
    else grows them while the volume stays mounted."""
    vol = volumes.load(root, name)
    done: dict[str, Any] = {
        "name": name, "changed": False, "size": size, "loop": None, "filesystem": None,
        "mountpoint": None, "todo": None,
    }  # fmt: skip
    if size == vol.size:
        return {**done, **_grow_on_top(vol, size, only_behind=True)}
    _may_grow(vol, size)
    done["changed"] = True
    if vol.runtime() is None:
        with _detached(vol) as now:
            if now is not None and now.size == size:  # (another expand did it meanwhile)
                return {**done, "changed": False}
            if now is not None:
                _may_grow(now, size)  # (as it is now: it may have changed while this waited)
                _on_every_replica(now, "expand", size)
                now.update(lambda config: config.update(size=size))
                _note(now, f"expanded from {vol.size} to {size} bytes")
                return {**done, "todo": _grow_later(now)}
    control.call(vol.control_socket, "expand", size=size)
    return {**done, **_grow_on_top(vol, size)}


def _may_grow(vol: volumes.Volume, size: int) -> None:
    """Refuse an expansion of ``vol`` to ``size`` that cannot be done."""
    if size < vol.size:
        raise InvalidArgument(f"cannot shrink volume {vol.name} ({vol.size} bytes) to {size}")
    if size % vol.chunk_size:
        raise InvalidArgument(f"size {size} is not a multiple of the chunk size {vol.chunk_size}")
    vol.require_not_standby("expanding it")
    vol.require_complete("expanding it")


def _grow_on_top(vol: volumes.Volume, size: int, only_behind: bool = False) -> dict[str, Any]:
    """Grow the loop device and file system on an attached volume to its ``size``
    (``mount.grow``: what it did); nothing for a detached one. ``only_behind``: only if its
    loop device is smaller (an expansion killed before it grew it)."""
    from lhfs.volumes import mount

    runtime = vol.runtime()
    if runtime is None:
        return {}
    device, tried = Path(runtime["device"]), vol.dir / mount.GROW_TRIED
    if only_behind and not (mount.loop_behind(device, size) or mount.fs_behind(device, tried)):
        return {}
    return mount.grow(device, size, tried)


def _grow_later(vol: volumes.Volume) -> str | None:
    """What an operator still has to do after a detached volume grew: its file system."""
    from lhfs.volumes import mount

    try:
        record = vol.filesystem
    except CorruptState as exc:  # (the volume grew: what is left to do is to mend the record)
        return f"its file system record is damaged ({exc}): grow the file system by hand"
    if record is None or record["state"] != "formatted":  # (no loop device to grow now)
        return None
    if record["type"] in mount.GROW:  # (what 'lhfs mount' grows, by however little)
        return f"its {record['type']} file system grows at its next 'lhfs mount'"
    return f"grow its {record['type']} file system once mounted, with its own tool"


def snapshot_create(
    root: Path, name: str, snapshot: str | None, system: bool = False, hold: str | None = None
) -> dict[str, Any]:
    """A snapshot on every replica. ``system``: one of lhfs's own (a backup's), which
    housekeeping may coalesce away later; an operator's name may not look like one. ``hold``:
    taken inside that hold of the volume's I/O (``io_held``)."""
    if snapshot is None:  # (two in one second: the second gets -2, and so on)
        stamp = time.strftime("snap-%Y%m%d-%H%M%S")
        taken = {s["name"] for s in snapshot_list(root, name)}
        snapshot, n = stamp, 1
        while snapshot in taken:
            n += 1
            snapshot = f"{stamp}-{n}"
    vol = volumes.load(root, name)
    snapshot = check_name(snapshot, "snapshot name")
    if housekeeping.is_system(snapshot) != system:
        prefixes = " and ".join(f"'{prefix}'" for prefix in housekeeping.SYSTEM_PREFIXES)
        raise InvalidArgument(
            f"snapshot names starting with {prefixes} are lhfs's own (housekeeping removes "
            "them): choose another name"
        )
    vol.require_not_standby("a snapshot")
    vol.require_complete("a snapshot")
    if snapshot in vol.config.get("removing", []):  # (its removal would take the new one)
        raise WrongState(
            f"the removal of snapshot {snapshot!r} was cut short: 'lhfs snapshot rm {name} "
            f"{snapshot}' finishes it, then the name is free"
        )
    if vol.runtime() is None:
        with _detached(vol) as now:
            if now is not None:
                return _snapshot_offline(now, snapshot)
    if hold is not None:  # (inside a hold, which only its engine has)
        return _snapshot_entry(
            control.call(vol.control_socket, "snapshot", name=snapshot, hold=hold)
        )
    return _engine_or_offline(
        vol,
        lambda: _snapshot_entry(control.call(vol.control_socket, "snapshot", name=snapshot)),
        lambda now: _snapshot_offline(now, snapshot),
    )


def _snapshot_offline(vol: volumes.Volume, snapshot: str) -> dict[str, Any]:
    """A snapshot on every local replica of a detached volume (held: ``_detached``)."""
    with contextlib.ExitStack() as opened:
        stores = [opened.enter_context(ChunkStore.open(d)) for d in healthy_local_dirs(vol)]
        have = sum(store.has_snapshot(snapshot) for store in stores)
        if have:  # refuse before changing anything
            cut = f" on {have} of {len(stores)} replicas only (a snapshot create cut short): "
            cut += f"'lhfs snapshot rm {vol.name} {snapshot}' removes it"
            raise AlreadyExists(
                f"snapshot {snapshot!r} already exists{cut if have < len(stores) else ''}"
            )
        _remote_missed(vol, "snapshot")
        taken = _snapshot_entry([store.snapshot(snapshot) for store in stores][-1])
        _note(vol, f"snapshot {snapshot} taken")
        return taken


HOLD_WAIT = 300.0  # seconds a volume's hold may wait for a snapshot removal under way
HOLD_LEASE = 60.0  # seconds a volume's I/O stays held at most (``lhfs.engine.hold``)


@contextlib.contextmanager
def io_held(vols: list[volumes.Volume]) -> Iterator[dict[str, str]]:
    """Hold the I/O of every attached volume of ``vols`` at once for the block, so that the
    snapshots taken inside it (``snapshot_create`` with each volume's hold, yielded by name)
    are from one instant across them (``lhfs.engine.hold``). Each is prepared first (I/O
    flowing), then all are frozen together. Raises ``WrongState`` after the block if a hold
    ran out before it was let go: the snapshots may then not be from one instant. Each hold
    lives on its own connection to its engine, which ends it if this process dies."""
    holds: dict[str, tuple[volumes.Volume, str]] = {}
    finished = False
    with contextlib.ExitStack() as connections:
        try:
            for vol in vols:
                if vol.runtime() is None:
                    continue
                try:
                    answer = _held_call(
                        vol, "hold", HOLD_WAIT + 30, kept=connections, wait=HOLD_WAIT
                    )
                except control.NotAttached:
                    continue
                holds[vol.name] = (vol, answer["hold"])
            with ThreadPoolExecutor(8) as pool:
                frozen = [pool.submit(_freeze, vol, hold_id) for vol, hold_id in holds.values()]
                for future in frozen:
                    future.result()
            yield {name: hold_id for name, (_, hold_id) in holds.items()}
            finished = True
        finally:
            ran_out = []
            for name, (vol, hold_id) in holds.items():
                try:
                    released = control.call(vol.control_socket, "release", timeout=30, hold=hold_id)
                except Exception:  # (every other volume is let go all the same)
                    released = {"released": False}
                if not released["released"]:
                    ran_out.append(name)
    if finished and ran_out:
        raise WrongState(
            f"the I/O of {', '.join(ran_out)} was let go by itself after {HOLD_LEASE:g}s, maybe "
            "before every snapshot was taken: they may not be from one instant; try again"
        )


def _freeze(vol: volumes.Volume, hold_id: str) -> None:
    drain = min(vol.setting("io_timeout") + 5, HOLD_WAIT)  # (a replica silent longer is failed)
    _held_call(vol, "freeze", drain + 30, hold=hold_id, drain=drain, lease=HOLD_LEASE)


def _held_call(
    vol: volumes.Volume,
    op: str,
    timeout: float,
    kept: contextlib.ExitStack | None = None,
    **args: Any,
) -> Any:
    """A hold's control call (``kept``: its connection kept open until that stack closes);
    an error names the volume."""
    try:
        if kept is not None:
            return kept.enter_context(control.kept(vol.control_socket, op, timeout, **args))
        return control.call(vol.control_socket, op, timeout=timeout, **args)
    except control.NotAttached:
        raise
    except LhfsError as exc:
        exc.args = (f"volume {vol.name}: {exc}",)
        raise


def snapshot_list(root: Path, name: str) -> list[dict[str, Any]]:
    """The volume's snapshots: its engine's, or detached those of its freshest healthy
    replica (local, else remote); detached with none to read, refused with why, never an
    empty list (which says "no snapshots")."""
    found = _answering(root, name, info(root, name))
    if found["attached"]:
        return found["snapshots"]
    try:
        layers = _detached_layers(volumes.load(root, name))
    except LhfsError as exc:
        raise WrongState(
            f"the snapshots of volume {name} cannot be listed while it is detached ({exc}): "
            "attach it, or bring a replica of it back"
        ) from None
    return [_snapshot_entry(s) for s in layers if s["name"]]


def _detached_layers(vol: volumes.Volume, remote: bool = True) -> list[dict[str, Any]]:
    """The layers of a detached volume, from its freshest healthy local replica, else (it
    has none, and ``remote``) from its freshest healthy remote one that answers, read over
    a reader session (it can change nothing); ``LhfsError`` when none can be read, saying
    why. (``volume info`` and ``ls`` never ask a host: one that is down would hold them.)"""
    try:
        directory = freshest_local(vol)
    except NotFound:
        if not remote or not any(not r.get("local") for r in vol.replicas):
            raise
    else:
        with ChunkStore.open(directory) as store:
            return store.list_layers()
    from lhfs.wire.client import SyncReplica

    key, best, best_rev, why = vol.key(), None, -1, []
    for replica in vol.replicas:
        if replica.get("local") or replica.get("mode", "RW") != "RW" or not replica.get("address"):
            continue
        try:
            peer = SyncReplica(
                replica["address"], key, timeout=ANSWER_WITHIN, tls_ca=replica.get("tls_ca")
            )
            try:
                revision = peer.call("info").get("revision")
                if type(revision) is not int:  # (what a peer says is checked before use)
                    raise CorruptState(f"it answered a revision of {revision!r}")
                if revision > best_rev:
                    best, best_rev = _peer_layers(peer.call("list_layers")), revision
            finally:
                peer.close()
        except (LhfsError, AttributeError) as exc:
            why.append(f"replica {replica['id']}: {exc}")
    if best is None:
        raise NotFound(
            f"no healthy replica of {vol.name} answered" + (f" ({'; '.join(why)})" if why else "")
        )
    return best


def replica_list(root: Path, name: str) -> list[dict[str, Any]]:
    return _answering(root, name, info(root, name))["replicas"]


def snapshot_remove(
    root: Path, name: str, snapshot: str, progress: control.Progress | None = None
) -> int | None:
    """Remove a snapshot, its chunks coalesced into its child (the longest part: progress
    counts the chunks it copied, on all replicas). Detached, a snapshot only some replicas
    hold (a ``snapshot create`` killed half-way) is removed from those: the number of
    replicas it was on then (None otherwise), for the command to say so."""
    check_name(snapshot, "snapshot name")
    vol = volumes.load(root, name)
    vol.require_not_standby("removing a snapshot")
    if vol.runtime() is None:
        with _detached(vol) as now:
            if now is not None:
                return _snapshot_remove_offline(now, snapshot, progress)

    def ask() -> None:
        control.call_watched(
            vol.control_socket, "snapshot_rm", progress, "snapshot_rm", name=snapshot
        )

    return _engine_or_offline(
        vol, ask, lambda now: _snapshot_remove_offline(now, snapshot, progress)
    )


def _snapshot_remove_offline(
    vol: volumes.Volume, snapshot: str, progress: control.Progress | None
) -> int | None:
    """``snapshot_remove`` on the local replicas of a detached volume (held: ``_detached``)
    that hold the snapshot; recorded (``Volume.removing``) while under way."""
    begun = snapshot in vol.config.get("removing", [])  # (stopped half-way: some have it)
    directories = healthy_local_dirs(vol)
    holding = _holding(directories, snapshot)
    if not holding and not begun:
        raise NotFound(f"volume {vol.name} has no snapshot named {snapshot!r}")
    _remote_missed(vol, "snapshot removal")
    vol.removing(snapshot, begun=True)
    finished = 0  # replicas without it now
    try:
        for n, directory in enumerate(holding):
            with ChunkStore.open(directory) as store:
                for done, total in store.remove_snapshot_steps(snapshot):
                    if progress and total:  # (in percent: each replica holds its own count)
                        progress(100 * (n + done / total) / len(holding), None, None)
            finished += 1
    except BaseException:
        if finished == 0 and not begun:  # (stopped before any replica let it go: kept whole)
            vol.removing(snapshot, begun=False)
        raise
    vol.removing(snapshot, begun=False)
    _note(vol, f"snapshot {snapshot} removed")
    if progress:
        progress(100, None, None)
    return len(holding) if not begun and len(holding) < len(directories) else None


def _holding(directories: list[Path], snapshot: str) -> list[Path]:
    """The replica directories of ``directories`` that hold ``snapshot``."""
    found = []
    for directory in directories:
        with ChunkStore.open(directory) as store:
            if store.has_snapshot(snapshot):
                found.append(directory)
    return found


def snapshot_revert(root: Path, name: str, snapshot: str) -> bool:
    """Revert a detached volume to ``snapshot``; whether its file system record was let go (the
    snapshot is older than the format: ``lhfs mount`` decides from the content again, which
    once refused for ever a volume reverted to before its format)."""
    check_name(snapshot, "snapshot name")
    with _detached(volumes.load(root, name)) as vol:
        if vol is None:
            raise Busy(f"volume {name} is attached: detach it before reverting")
        vol.require_not_standby("a revert")
        taken = _require_snapshot(vol, snapshot)
        _on_every_replica(vol, "revert", snapshot)
        _note(vol, f"reverted to snapshot {snapshot}")
        if taken is not None and vol.filesystem_after(taken):
            vol.forget_filesystem()
            return True
    return False


def _require_snapshot(vol: volumes.Volume, snapshot: str) -> float | None:
    """When ``snapshot`` was taken (seconds since the epoch; None if no local replica says);
    ``NotFound`` if it is not there."""
    taken = None
    for directory in healthy_local_dirs(vol):
        with ChunkStore.open(directory) as store:
            found = [s["created"] for s in store.list_layers() if s["name"] == snapshot]
            if not found:
                raise NotFound(f"volume {vol.name} has no snapshot named {snapshot!r}")
            taken = found[0]
    # (to the second: a time a peer sent may carry a fraction)
    return calendar.timegm(time.strptime(taken[:19], "%Y-%m-%dT%H:%M:%S")) if taken else None


# -- replicas --------------------------------------------------------------------------------


def _attached(vol: volumes.Volume, what: str, doing: str) -> None:
    """Refuse ``doing`` (what the operator asked) on a detached volume: ``what`` runs online.
    A DR standby is attached only once activated, so it is told that, not to attach it."""
    if vol.runtime() is not None:
        return
    if vol.config.get("dr"):
        raise WrongState(
            f"volume {vol.name} is a DR standby: {doing} waits for 'lhfs dr activate "
            f"{vol.name}' ({what} runs online, and a standby is attached only once activated)"
        )
    raise WrongState(f"volume {vol.name} is not attached: {what} runs online")


def replica_add(
    root: Path,
    name: str,
    address: str | None,
    tls_ca: str | None = None,
    disk: str | None = None,
) -> dict[str, Any]:
    """Add a replica (local, under the root or on ``disk``; or the one at ``address``) to an
    attached volume, or to one being restored: the restore is asked to attach it and goes on
    through its engine, which rebuilds the new replica online."""
    vol = volumes.load(root, name)
    restoring = vol.config.get("restoring")
    if vol.runtime() is None and restoring and is_lhfs(restoring["pid"]):
        vol.update(lambda config: config["restoring"].update(attach=True))

        def answered() -> bool:
            now = volumes.load(root, name)
            done = not now.config.get("restoring") or not is_lhfs(restoring["pid"])
            return done or now.runtime() is not None

        wait_for(answered, attachment.ATTACH_TIMEOUT, f"the restore of {name} to attach it")
    _attached(vol, "a rebuild", "adding a replica")
    if disk is not None:
        if address is not None:
            raise InvalidArgument("a replica is local on --disk or elsewhere at --address")
        disk = str(disks.check(disk, disks.placed(vol)))  # (said here; checked again there)
    return control.call(
        vol.control_socket, "replica_add", address=address, tls_ca=tls_ca, disk=disk
    )


def replica_remove(root: Path, name: str, replica_id: str, accept_loss: bool = False) -> list[str]:
    """Remove a replica from a volume, and its directory if it is local; what was left (its
    directory on a disk that is not mounted). ``accept_loss``: see ``_replica_remove_offline``
    (a detached volume only: an attached one's engine serves from that replica, or waits for
    it)."""
    vol = volumes.load(root, name)
    if accept_loss and vol.runtime() is not None:
        raise WrongState(
            f"volume {name} is attached: --accept-loss gives up a replica of a detached volume "
            f"(lhfs volume detach {name} first)"
        )
    if vol.runtime() is not None:

        def ask() -> list[str]:
            answer = control.call(vol.control_socket, "replica_rm", id=replica_id)
            left = answer.get("left") if isinstance(answer, dict) else None
            return [left] if left else []

        return _engine_or_offline(vol, ask, lambda now: _replica_remove_offline(now, replica_id))
    with _detached(vol) as now:
        if now is not None:
            return _replica_remove_offline(now, replica_id, accept_loss)
    return replica_remove(root, name, replica_id, accept_loss)  # (attached meanwhile)


def _replica_remove_offline(
    vol: volumes.Volume, replica_id: str, accept_loss: bool = False
) -> list[str]:
    """``replica_remove`` of a detached volume (held: ``_detached``). The last replica that
    holds every acknowledged write (the last recorded RW, or the one a faulted volume waits
    for) is refused, unless ``accept_loss``: the operator says it is gone for good (its disk
    or host lost), and the next attach salvages the freshest replica that answers, which is
    the only way such a volume can be attached again. A replica left that answers as an
    older copy of itself is still refused until the operator accepts it as it is
    (``replica_accept``): a loss is given up for one replica at a time, by name."""
    entry = vol.replica(replica_id)
    vol.require_not_standby("removing a replica")
    if accept_loss and len(vol.replicas) == 1:  # (nothing would be left to serve)
        raise WrongState(
            f"{replica_id} is the only replica of {vol.name}: giving it up would leave nothing "
            "to serve; bring its own directory back (on another host: 'lhfs replica serve' of "
            "it at its address) and attach again; if an older copy of it answers there, "
            f"'lhfs replica accept {vol.name} {replica_id}' serves that copy as it is; if it is "
            "lost for good, restore the volume from a backup ('lhfs backup restore') or "
            f"remove it ('lhfs volume rm {vol.name}')"
        )
    others = [r for r in vol.replicas if r["id"] != replica_id and r.get("mode", "RW") == "RW"]
    lose = " ('--accept-loss' removes it all the same, losing the writes only it holds)"
    if entry.get("mode", "RW") == "RW" and not others and not accept_loss:
        raise WrongState(f"{replica_id} is the last healthy replica: it cannot be removed{lose}")
    if (vol.config.get("last_rw") or {}).get("id") == replica_id and not accept_loss:
        raise WrongState(
            f"{replica_id} served last before volume {vol.name} faulted and alone holds every "
            f"acknowledged write: the next attach serves from it alone, so it cannot be "
            f"removed{lose}"
        )
    if len(vol.replicas) == 1:  # (of any mode: a volume without replicas is none)
        raise WrongState(volumes.only_replica(vol.name, replica_id))

    def drop(config: dict[str, Any]) -> None:
        config["replicas"] = [r for r in config["replicas"] if r["id"] != replica_id]
        if (config.get("last_rw") or {}).get("id") == replica_id:
            del config["last_rw"]  # (given up: none is waited for any more)

    vol.update(drop)
    left = disks.remove(vol, entry)
    logs.remove(vol.replica_log(replica_id))
    given_up = " given up for lost (--accept-loss)" if accept_loss else ""
    _note(vol, f"replica {replica_id} removed{given_up}" + (f" ({left} left)" if left else ""))
    return [left] if left else []


def _local_revision(vol: volumes.Volume, entry: dict[str, Any]) -> int | None:
    """The revision a local replica's directory holds (None: a replica on another host, or
    a directory that does not open: its attach will say why)."""
    directory = vol.replica_dir(entry)
    if directory is None or not (directory / "volume.json").exists():
        return None
    try:
        with ChunkStore.open(directory) as store:
            return store.revision
    except (LhfsError, OSError):
        return None


def replica_accept(root: Path, name: str, replica_id: str) -> int:
    """Let replica ``replica_id`` of a detached volume serve at the next attach as it is,
    though it answers below the revision recorded for it: an older copy of its directory
    (its host restored from an earlier image), whose newer copy is lost for good. The
    writes after that copy are given up, by the operator and by name; the revision that
    was recorded is returned (said in the volume's log)."""
    vol = volumes.load(root, name)
    if vol.runtime() is not None:
        raise WrongState(
            f"volume {name} is attached: a replica is accepted as it is while its volume is "
            f"detached (lhfs volume detach {name} first)"
        )
    with _detached(vol) as now:
        if now is None:
            return replica_accept(root, name, replica_id)  # (attached meanwhile)
        now.require_not_standby("accepting a replica as it is")
        entry = now.replica(replica_id)
        waited = now.config.get("last_rw") or {}
        found = [
            entry.get("flushed"),
            waited.get("revision") if waited.get("id") == replica_id else None,
        ]
        recorded = max([v for v in found if type(v) is int] or [-1])
        if recorded < 0:
            raise WrongState(
                f"no revision is recorded for replica {replica_id} of {name}: it is not held "
                "back as an older copy, and there is nothing to accept"
            )
        held = _local_revision(now, entry)
        if held is not None and held >= recorded:  # (a typo must not turn the check off)
            raise WrongState(
                f"replica {replica_id} of {name} holds revision {held}, not below the "
                f"{recorded} recorded for it: it is no older copy, and serves as it is"
            )

        def accept(config: dict[str, Any]) -> None:
            for replica in config["replicas"]:
                if replica["id"] == replica_id:
                    replica.pop("flushed", None)
            if (config.get("last_rw") or {}).get("id") == replica_id:
                config["last_rw"].pop("revision", None)

        now.update(accept)
        _note(now, f"replica {replica_id} accepted as it is, below revision {recorded}")
        return recorded


def scrub(root: Path, name: str, progress: control.Progress | None = None) -> dict[str, Any]:
    vol = volumes.load(root, name)
    _attached(vol, "a scrub", "a scrub")
    return control.call_watched(vol.control_socket, "scrub", progress, "scrub")


def replica_state(root: Path, name: str, replica_id: str) -> dict[str, Any] | None:
    """A replica's entry in ``info``, for a command that waits for its rebuild; None while
    the volume's engine neither answers nor is gone (it is stopping, or stopped): ask again.
    ``WrongState`` once the engine is gone (it died, or the volume was detached), since
    nothing rebuilds the replica then and the wait would never end."""
    now = info(root, name)
    replica = next((r for r in now["replicas"] if r["id"] == replica_id), None)
    if replica is None:
        why = None
        if now["attached"]:  # (its first rebuild failed for good: the engine gave it back)
            with contextlib.suppress(LhfsError):
                socket = volumes.load(root, name).control_socket
                why = control.call(socket, "given_back", timeout=ANSWER_WITHIN, id=replica_id)
        if why:
            raise LhfsError(
                f"replica {replica_id}: {why}; it was given back: {name} is as before the add"
            )
        raise NotFound(f"replica {replica_id} is gone from volume {name}")
    if now["state"] == NOT_ANSWERING:
        return None
    if replica["mode"] == "RW" or now["attached"]:
        return replica
    record = volumes.load(root, name).runtime_record()
    if record is not None and volumes.alive(record.get("pid", -1)):
        return None  # (its engine is on its way out: which way, it says once it is gone)
    how = f"the engine of {name} died" if record is not None else f"{name} was detached"
    raise WrongState(
        f"{how} during the rebuild of replica {replica_id}: {replica_id} is kept, not yet RW, "
        "and is rebuilt when the volume is attached again ('lhfs volume attach' or 'lhfs mount')"
    )
