"""The background process of an attached volume: replicas, engine, FUSE device, control socket.

``lhfs volume attach`` starts it (``lhfs engine-run``, not for direct use) in a session of its
own and waits for its first line on stdout: ``ready`` once the device serves I/O, or
``error: <message>``. Local replicas are child processes that get SIGTERM if this process dies,
so a killed engine never leaves a replica directory locked. One ``trio.run`` owns the engine, the
control socket and the FUSE loop; SIGTERM or a ``detach`` request ends the FUSE loop, then
the engine flushes, the device is unmounted and the replicas stop. SIGTERM is refused while a
loop device is bound to the device file (see ``_watch_signals``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

from lhfs.config import disks
from lhfs.config import volume as volumes
from lhfs.core import locks, logs
from lhfs.core.durable import atomic_write_json, drop_device, fsync_dir
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    DamagedLayers,
    DamagedMeta,
    InvalidArgument,
    LhfsError,
    NoAnswer,
    NotFound,
    StorageError,
    WrongState,
    WrongVolume,
    is_refusal,
    sole,
)
from lhfs.core.mounts import loops_backed_by, mounted_at
from lhfs.core.names import check_name
from lhfs.core.units import format_sizes
from lhfs.engine import control, housekeeping
from lhfs.engine.engine import ERR, RW, Engine, Recorded, ReplicaLink
from lhfs.engine.frontend import VolumeFile
from lhfs.engine.fusedev import BUFFER, POOL_SLOTS, FuseChannel
from lhfs.engine.hold import IoHold
from lhfs.engine.metrics import IoStats, VolumeCollector
from lhfs.engine.metrics import serve as serve_metrics
from lhfs.engine.rebuild import (
    SourceError,
    Stranger,
    WrongShape,
    fit,
    rebuild,
    rebuild_need,
)
from lhfs.engine.rejoin import Rejoiner
from lhfs.engine.scrub import scrub
from lhfs.replica.process import ReplicaProcess
from lhfs.store.chunkstore import ChunkStore, damaged_aside, disk_bytes
from lhfs.wire import shm, tls
from lhfs.wire.client import ReplicaClient, parse_address
from lhfs.wire.protocol import READER

log = logging.getLogger("lhfs.daemon")
DISKS_EVERY = 15.0  # seconds between two questions to the replicas about their disks
TERM_WAIT = 10.0  # seconds a replica process told to stop may take before it is killed
KILL_WAIT = 30.0  # seconds a killed replica process may take to go
STOP_FLUSH = 60.0  # seconds a refused SIGTERM spends flushing what is mounted on the device
_KEEP = object()  # (``Daemon._waiting_for``: the record stays as it is)


def disks_every() -> float:
    """Seconds between two questions to the replicas about their disks, which also record the
    revisions they hold: ``$LHFS_DISKS_EVERY`` (0.1 to 3600) or 15 s. Sooner tells a full disk
    and moves the older-copy check's record sooner, for a write of ``config.json`` each time;
    a value out of range, or no number, is the default, said in the log (an engine must not
    fail to attach over it)."""
    given = os.environ.get("LHFS_DISKS_EVERY")
    if given is None:
        return DISKS_EVERY
    try:
        value = float(given)
    except ValueError:
        value = -1.0
    if 0.1 <= value <= 3600:  # (NaN fails both comparisons)
        return value
    log.warning(
        "LHFS_DISKS_EVERY=%.20r is not 0.1 to 3600 seconds: the default %g s is used",
        given,
        DISKS_EVERY,
    )
    return DISKS_EVERY


class Daemon:
    def __init__(self, vol: volumes.Volume, device: Path, metrics: str | None = None) -> None:
        self.vol = vol
        self.device = device
        self.processes: dict[str, ReplicaProcess] = {}
        self.engine: Engine | None = None
        self.nursery: trio.Nursery | None = None
        self._rebuilds: dict[str, _Rebuild] = {}  # replica id -> its rebuild under way
        # replicas added by ``replica add`` that have not served yet (by this engine, or by
        # an earlier one: ``unbuilt`` in the configuration), and those given back since (their
        # id -> why), for the ``replica add`` that waits on them
        self._adding: set[str] = set()
        self.given_back: dict[str, str] = {}
        # local replicas whose rotten backing image copy was set aside at start -> why
        self.rotten: dict[str, str] = {}
        self._stopping = False
        self.left_bound: list[str] = []  # loop devices still bound to the device at its end
        self.channel = FuseChannel(device)
        self.key = vol.key()
        self.rejoiner: Rejoiner | None = None
        self.io_hold: IoHold | None = None
        self.stats = IoStats()
        self.metrics_address = metrics
        self.device_made = False
        self.last_scrub: dict[str, Any] | None = None
        # a scrub compares each snapshot across the replicas: none is removed meanwhile (a
        # removal half done is two different layers, and one gone fails the scrub)
        self._scrubbing = False
        self._layers = trio.Lock()
        # long operations under way ("checksum", "scrub", "snapshot_rm") -> bytes done and
        # total, for the progress of the command that asked (control op "progress")
        self.tasks: dict[str, dict[str, int]] = {}
        self._housekeeping = False
        self._housekeep_again = False
        # replica -> (what its directory takes, what its disk has free), as last asked
        self.disks: dict[str, tuple[int | None, int | None]] = {}
        self._probing: dict[str, threading.Lock] = {}  # replica -> held while its disk is read
        self.not_started: dict[str, str] = {}  # local replica -> why its process did not start
        self._damaged: dict[str, str] = {}  # local replica -> why its directory was set aside
        self.no_room: dict[str, str] = {}  # ...why it was not: no room for its rebuild

    # -- replicas -----------------------------------------------------------------------------

    def start_local_replicas(self) -> None:
        """Start one ``replica serve`` per local replica. One that does not start is left ERR,
        for the rejoiner to start again (``restart``)."""
        failed: list[tuple[dict[str, Any], Path]] = []
        for replica in self.vol.replicas:
            directory = self.vol.replica_dir(replica)
            if directory is None:
                continue
            replica["address"] = None
            if replica.get("held"):  # (a scrub held it: it neither serves nor holds its lock)
                continue
            try:
                disks.ready(self.vol, replica)
            except LhfsError as exc:
                log.error("replica %s did not start: %s", replica["id"], exc)
                self.not_started[replica["id"]] = f"its process did not start: {exc}"
                continue
            if not self._start_local(replica, directory):
                failed.append((replica, directory))
        for replica, directory in failed:
            # (a damaged directory is set aside only once another replica recorded RW has
            # started here: never the last copy, nor one set aside on the word of a record)
            serving = [
                r
                for r in self.vol.replicas
                if r is not replica and r["id"] in self.processes and r.get("mode", RW) == RW
            ]
            if serving and self._set_aside_damaged(replica["id"], directory):
                replica.update(mode=ERR, error=self._damaged[replica["id"]])
                self._start_local(replica, directory)

    def _start_local(self, replica: dict[str, Any], directory: Path) -> bool:
        """Start the process of one local replica (again once its rotten backing image is set
        aside, while another replica is recorded RW); whether it started."""
        for _attempt in range(2):
            proc = self._spawn(replica["id"], directory)
            try:
                replica["address"] = proc.wait_ready()
            except (RuntimeError, TimeoutError) as exc:
                log.error("replica %s did not start: %s", replica["id"], exc)
                self.not_started[replica["id"]] = f"its process did not start: {exc}"
                proc.stop()
                others = [r for r in self.vol.replicas if r is not replica]
                if any(r.get("mode", RW) == RW for r in others) and self._set_aside(
                    replica["id"], directory
                ):
                    continue
                return False
            self.processes[replica["id"]] = proc
            self.not_started.pop(replica["id"], None)
            return True
        return False

    def _set_aside(self, replica_id: str, directory: Path) -> bool:
        """A local replica whose process did not start: if that is because its copy of the
        backing image no longer holds the image's content (``BackingImageMismatch``: bit rot,
        a stray write), the copy is set aside as ``<file>.rotten`` and the replica is to be
        rebuilt with a good one (``rotten_backing``), as a scrub's find is; whether it was.
        Why: such a replica cannot open, so it was retried until the rejoin limit and no
        scrub ever saw it. Callers ask only while another replica can send a good copy. The
        configuration says the replica is failed and its image to be replaced *before* the copy
        is let go: a replica without its image opens, and an engine killed in between would
        otherwise find it recorded RW and serve zeros where the image's content belongs."""

        def record(name: str) -> None:
            self.rotten[replica_id] = (
                f"its copy of the backing image was rotten (set aside as {name}.rotten): "
                "rebuilt with a good one"
            )
            why = self.rotten[replica_id]
            # (through a volume of its own: this one's configuration in memory holds this
            # run's replica addresses, not yet published, which a reload here would drop)
            volumes.load(self.vol.root, self.vol.name).update(
                lambda c: _set_replica(c, replica_id, mode=ERR, error=why, rotten_backing=True)
            )

        try:
            name = ChunkStore.set_aside_rotten_backing(directory, before=record)
        except (LhfsError, OSError) as exc:
            log.warning("replica %s: its backing image could not be checked: %s", replica_id, exc)
            return False
        if name is None:
            return False
        log.error("replica %s: %s", replica_id, self.rotten[replica_id])
        return True

    def _set_aside_damaged(self, replica_id: str, directory: Path) -> bool:
        """A local replica whose process did not start: if that is because its layer files are
        not what its metadata says (``DamagedLayers``: a data file cut, layer files the
        metadata lost) or its metadata is not lhfs's (``DamagedMeta``: ``volume.json`` does
        not parse, a field out of range), the whole directory is set aside, kept for a look
        (the layer files of a damaged ``volume.json`` with it), and the replica is served
        empty, to be rebuilt from one that serves (callers ask only while one does); whether
        it was. Why: it can never open, so it stayed ERR until the operator replaced it. The
        configuration says it is failed *before* the directory goes, as for a rotten image."""
        try:
            ChunkStore.open(directory).close()
        except (DamagedLayers, DamagedMeta) as exc:  # (what is damaged, not what to do of it)
            damage = str(exc).split(": nothing was deleted")[0]
        except (LhfsError, OSError):
            return False
        else:
            return False
        if not self._room_for_rebuild(replica_id, directory, damage):
            return False
        aside = damaged_aside(directory)
        why = f"its directory was damaged ({damage}): set aside as {aside}, rebuilt"
        self._damaged[replica_id] = why
        volumes.load(self.vol.root, self.vol.name).update(
            lambda c: _set_replica(c, replica_id, mode=ERR, error=why)
        )
        try:
            os.rename(directory, aside)
            fsync_dir(directory.parent)
        except OSError as exc:
            kept = f"its directory is damaged ({damage}); it could not be set aside: {exc}"
            volumes.load(self.vol.root, self.vol.name).update(
                lambda c: _set_replica(c, replica_id, mode=ERR, error=kept)
            )
            log.warning("replica %s: %s", replica_id, kept)
            return False
        log.error("replica %s: %s", replica_id, why)
        return True

    def _room_for_rebuild(self, replica_id: str, directory: Path, damage: str) -> bool:
        """Whether the disk of damaged local replica ``replica_id`` has room for its rebuild
        beside its directory set aside (which keeps its space): else it is kept as it is,
        ERR with how much is needed and what to do (kept in ``no_room`` too). Why: set
        aside on a disk without that room, its rebuild filled the disk (the root's, maybe,
        which every volume shares) and failed, the damaged copy still taking its space."""
        need = self._rebuild_bytes(replica_id)
        try:
            free = shutil.disk_usage(directory.parent).free
        except OSError:  # (its disk went: the set-aside fails and says so)
            return True
        if free >= need:
            return True
        entry = self.vol.replica(replica_id)
        disk = entry.get("disk") or f"the root's, {self.vol.root}"
        shown_need, shown_free = format_sizes(need, free)
        why = (
            f"its directory is damaged ({damage}); it is kept as it is, not set aside: its "
            f"rebuild needs about {shown_need} beside it on its disk ({disk}), which has "
            f"{shown_free} free; make room there (it is set aside and rebuilt once there "
            f"is), or replace it: lhfs replica rm {self.vol.name} {replica_id}, then lhfs "
            f"replica add {self.vol.name} --disk DISK (a disk with room)"
        )
        self.not_started[replica_id] = self.no_room[replica_id] = why  # (shown while away)
        log.error("replica %s: %s", replica_id, why)
        volumes.load(self.vol.root, self.vol.name).update(
            lambda c: _set_replica(c, replica_id, mode=ERR, error=why)
        )
        return False

    def _rebuild_bytes(self, replica_id: str) -> int:
        """What the rebuild of ``replica_id`` needs on its disk (``rebuild_need``), from what
        each replica that serves takes (a local one's directory, read; another's last
        answer, ``disks``)."""
        known = []
        for replica in self.vol.replicas:
            if replica["id"] == replica_id or replica.get("mode", RW) != RW:
                continue
            held = self.disks.get(replica["id"], (None, None))[0]
            home = self.vol.replica_dir(replica)
            if home is not None and home.is_dir():
                with contextlib.suppress(OSError):
                    held = disk_bytes(home)
            if held is not None:
                known.append(held)
        return rebuild_need(known, self.vol.size)

    def _spawn(self, replica_id: str, directory: Path) -> ReplicaProcess:
        """The ``replica serve`` of a local replica, starting (``wait_ready`` says when it
        serves). Started from the main thread: see ``procs.die_with_parent``."""
        return ReplicaProcess(
            directory,
            self.vol.key_path,
            log=self.vol.replica_log(replica_id),
            tied_to_parent=True,
            wait=False,
            local=_local_name(replica_id),
        )

    async def restart(self, link: ReplicaLink, kill: bool) -> bool:
        """Start the process of local replica ``link`` again if it has exited, on the same
        directory (which holds everything it acknowledged): the rejoiner then reconnects and
        rebuilds it; whether it was started. One still running is left to answer (a stalled one
        may yet) unless ``kill``: it left the rejoiner's last attempts unanswered, so it is
        killed first. Whatever fails is an ``LhfsError``, for the rejoiner to try again later."""
        old = self.processes.get(link.id)
        if old is not None and old.proc.poll() is None:
            if not kill:
                return False
            log.warning(
                "replica %s: its process (pid %d) is alive but answers nothing; killing it",
                link.id,
                old.proc.pid,
            )
            await _end(old, term_first=False)
            if self.processes.get(link.id) is not old or link not in self.engine.replicas:
                raise WrongState("the replica was removed")
        if self._stopping:
            raise WrongState("the volume is detaching")
        replica = self.vol.replica(link.id)
        directory = self.vol.replica_dir(replica)
        if old is not None:
            if self.processes.get(link.id) is old:
                del self.processes[link.id]
            log.warning("replica %s: its process ended (%s)", link.id, _ended(old.stop()))
        disks.ready(self.vol, replica)  # (a disk that is not mounted: not there, not rebuilt)
        try:
            proc = self._spawn(link.id, directory)
        except OSError as exc:  # (no memory to fork, no descriptors left)
            raise LhfsError(f"its process could not be started again: {exc}") from None
        self.processes[link.id] = proc  # (removing the replica meanwhile stops it: ``_forget``)
        try:
            address = await trio.to_thread.run_sync(proc.wait_ready)
            if self.processes.get(link.id) is not proc or self._stopping:
                raise WrongState("the replica was removed, or the volume is detaching")
            self.engine.local_names.pop(link.address, None)
            self.engine.local_names[address] = proc.local
            link.address = address
            link.restarts += 1
            self.vol.update(lambda c: _set_replica(c, link.id, address=address))
            return True
        except BaseException as exc:
            if self.processes.get(link.id) is proc:
                del self.processes[link.id]
            with trio.CancelScope(shield=True):  # (not on the event loop: it may take 30 s)
                await trio.to_thread.run_sync(proc.stop)
            if isinstance(exc, (RuntimeError, TimeoutError, OSError)):
                others = [r for r in self.engine.replicas if r is not link]
                serving = isinstance(exc, RuntimeError) and any(r.mode == RW for r in others)
                if serving and await trio.to_thread.run_sync(self._set_aside, link.id, directory):
                    link.rotten_backing = True  # (the next start opens: rebuilt with one)
                    raise LhfsError(f"{self.rotten[link.id]}; it is started again") from None
                self.no_room.pop(link.id, None)
                if serving and await trio.to_thread.run_sync(
                    self._set_aside_damaged, link.id, directory
                ):  # (its layer files damaged while it ran: started anew, rebuilt)
                    raise LhfsError(f"{self._damaged[link.id]}; it is started again") from None
                if link.id in self.no_room:  # (damaged, and no room to rebuild it beside)
                    raise LhfsError(self.no_room[link.id]) from None
                raise LhfsError(f"its process did not start again: {exc}") from None
            raise

    async def give_up(self, link: ReplicaLink) -> None:
        """The rejoiner gave ``link`` up: a local one's process that still runs (stuck, or
        failing its rebuilds) is stopped, so that it holds neither its directory (``replica
        inspect``) nor memory while it waits for the operator. One stuck in the kernel that
        does not die stays listed, and is reaped when it ends or at detach."""
        proc = self.processes.get(link.id)
        if proc is None:
            return
        with contextlib.suppress(LhfsError):
            if proc.proc.poll() is None:
                await _end(proc, term_first=True)
            if self.processes.get(link.id) is proc:
                del self.processes[link.id]
                proc.stop()  # (it has exited: this only closes its files)
                log.warning("replica %s: its process is stopped until it is replaced", link.id)

    def rejoin_settings(self) -> tuple[float, float]:
        return self.vol.setting("rejoin_wait"), self.vol.setting("rejoin_limit")

    def stop_local_replicas(self) -> None:
        for proc in self.processes.values():
            proc.stop()

    def _record_epoch(self, epoch: int) -> None:
        """Keep the engine's newest epoch (a replica that records it and is away at the next
        attach must not find that attach's engine older than itself: it would refuse it as
        another engine's, and fault a healthy volume)."""
        try:
            self.vol.update(lambda c: c.update(epoch=max(int(c.get("epoch", 0)), epoch)))
        except OSError as exc:  # (no session without it: the attempt fails, and is retried)
            raise StorageError(f"cannot keep the session epoch: {exc.strerror}") from None

    def _record_mode(self, link: ReplicaLink) -> None:
        """Keep a replica's mode and error, and a scrub's verdicts on it (held; a rotten
        backing image to replace), in the configuration: the next attach honours them. A new
        replica's first rebuild done, it is one that served (``unbuilt`` let go). And the
        volume's own state: faulted, the replica it waits for (``last_rw``: the next attach
        trusts it alone; with the revision it last flushed, to tell an older copy), let go
        once a replica serves again."""
        try:
            replica = self.vol.replica(link.id)
        except NotFound:  # (removed meanwhile: nothing of it to keep)
            return
        values: dict[str, Any] = {"mode": link.mode, "error": link.error}
        if link.uid is not None:  # (what it is: ``replica add`` knows it by that when it is away)
            values["uid"] = link.uid
        if link.held is not None:  # (never let go here: a link of a new attach knows none yet)
            values["held"] = link.held
        if link.rotten_backing or link.mode == RW:  # (let go once rebuilt with a good one)
            values["rotten_backing"] = link.rotten_backing or None
        built = link.mode == RW and "unbuilt" in replica
        waiting = self._waiting_for()
        if (
            all(replica.get(key) == value for key, value in values.items())
            and not built
            and (waiting is _KEEP or self.vol.config.get("last_rw") == waiting)
            and not self._flushed_changes(self.vol.config)
        ):
            return

        def change(config: dict[str, Any]) -> None:
            for entry in config["replicas"]:
                if entry["id"] == link.id:
                    entry.update(values)
                    if built:
                        entry.pop("unbuilt", None)
            if waiting is None:
                config.pop("last_rw", None)
            elif waiting is not _KEEP:
                config["last_rw"] = waiting
            self._keep_flushed(config)

        self.vol.update(change)

    def _flushed_changes(self, config: dict[str, Any]) -> dict[str, int | None]:
        """What each replica's ``flushed`` should say now, where it says otherwise: the
        revision a serving replica last said it holds durably (an answer to a flush); none for
        one being rebuilt, or rebuilt and not flushed since (it took its source's revision,
        perhaps below its own); a failed one's kept (it is trusted for nothing while it is
        failed). The next attach serves no replica below it (a host back on an older copy of
        its directory would serve old data, and the others be rebuilt from it)."""
        links = {link.id: link for link in self.engine.replicas}
        out: dict[str, int | None] = {}
        for entry in config["replicas"]:
            link = links.get(entry["id"])
            if link is None or link.mode == ERR:
                continue
            value = link.synced if link.mode == RW and link.synced >= 0 else None
            if entry.get("flushed") != value:
                out[entry["id"]] = value
        return out

    def _keep_flushed(self, config: dict[str, Any]) -> None:
        """Record ``_flushed_changes`` in ``config`` (being changed under its lock)."""
        changes = self._flushed_changes(config)
        for entry in config["replicas"]:
            if entry["id"] in changes:
                if changes[entry["id"]] is None:
                    entry.pop("flushed", None)
                else:
                    entry["flushed"] = changes[entry["id"]]

    def keep_revisions(self) -> None:
        """Record the revisions the serving replicas hold durably (``_flushed_changes``), if
        they moved: at attach, every ``DISKS_EVERY`` seconds while the volume is written (in a
        thread: ``keep_revisions_aside``), and at detach, never per write. A record that
        cannot be written is logged: the one before stays, older, which only checks less."""
        if self.engine is None or not self._flushed_changes(self.vol.config):
            return
        try:
            self.vol.update(self._keep_flushed)
        except (LhfsError, OSError) as exc:
            log.warning("could not record the replicas' revisions: %s", exc)

    async def keep_revisions_aside(self) -> None:
        """``keep_revisions`` with its durable write (an fsync of the file and one of its
        directory) in a worker thread: a slow root disk must not stall I/O. The write is
        ordered with every other write of the configuration by its lock, which a thread holds
        as another process would (``flock``: each holder opens it), and what it records is
        computed under that lock from the replicas as they are then: a record written later
        is never an older one. It changes a copy of the volume, never the configuration the
        engine reads meanwhile; that one takes what was written unless it was reloaded
        meanwhile (by an update on the event loop: newer, or one record behind, which the
        next call writes again)."""
        if self.engine is None or not self._flushed_changes(self.vol.config):
            return
        before = self.vol.config
        aside = volumes.Volume(self.vol.root, self.vol.name, before)
        try:
            await trio.to_thread.run_sync(aside.update, self._keep_flushed)
        except (LhfsError, OSError) as exc:
            log.warning("could not record the replicas' revisions: %s", exc)
            return
        if self.vol.config is before:
            self.vol.config = aside.config

    def _waiting_for(self) -> dict[str, Any] | object | None:
        """What ``last_rw`` should say now: the replica a faulted volume waits for, None once
        a replica serves, ``_KEEP`` in between (an attach choosing, replica by replica)."""
        engine = self.engine
        if any(r.mode == RW for r in engine.replicas):
            return None
        last = next((r for r in engine.replicas if r.id == engine.last_rw), None)
        if last is None:
            return _KEEP
        return {"id": last.id, "revision": last.synced}

    # -- control requests ---------------------------------------------------------------------

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        engine = self.engine
        assert engine is not None
        if op == "info":
            info = engine.info()
            info["device"] = str(self.device)
            info["pid"] = os.getpid()
            for replica in info["replicas"]:
                proc = self.processes.get(replica["id"])
                replica["pid"] = proc.proc.pid if proc else None
            info["snapshots"] = []
            with trio.move_on_after(5):  # (a busy replica must not make the engine look dead)
                with contextlib.suppress(LhfsError):
                    info["snapshots"] = await engine.call_one("list_layers")
            await self._disk_usage(info["replicas"])
            return info
        if op == "flush":
            await engine.flush()
            return None
        if op in ("hold", "freeze", "release"):  # (snapshots at one instant: engine.hold)
            holds = self.io_hold
            assert holds is not None
            if op == "hold":  # (held while its asker keeps the connection: control.Kept)
                hold_id = await holds.prepare(args.get("wait"))
                return control.Kept({"hold": hold_id}, lambda: holds.abandon(hold_id))
            hold = str(args.get("hold"))
            if op == "release":
                return {"released": holds.release(hold)}
            await holds.freeze(hold, args.get("drain"), args.get("lease"))
            return None
        if op == "snapshot":
            name = check_name(str(args.get("name")), "snapshot name")
            if name in await self._snapshot_names():  # refused here: nothing is sent
                raise AlreadyExists(f"snapshot {name!r} already exists")
            if args.get("hold") is None:
                taken = await engine.snapshot(name)
            else:  # inside a hold: I/O is held and the hold owns ``structural``
                assert self.io_hold is not None
                async with self.io_hold.inside(str(args["hold"])):
                    taken = await engine.snapshot(name, held=True)
            log.info("snapshot %s taken", name)
            if housekeeping.is_system(name):
                self.housekeep()
            return taken
        if op == "snapshot_rm":
            name = check_name(str(args.get("name")), "snapshot name")
            config = volumes.load(self.vol.root, self.vol.name).config
            again = name in config.get("removing", [])  # (cut short: some replicas lack it)
            if not again and name not in await self._snapshot_names():
                raise NotFound(f"volume {self.vol.name} has no snapshot named {name!r}")
            if self._scrubbing:
                raise Busy(
                    f"a scrub of volume {self.vol.name} is under way: snapshot {name} is not "
                    "removed; try again once it is done ('lhfs volume scrub' says when)"
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_removal, nursery.cancel_scope)
                try:
                    await self.remove_snapshot(name, again=again)
                finally:
                    nursery.cancel_scope.cancel()
                    self.tasks.pop("snapshot_rm", None)
            log.info("snapshot %s removed", name)
            return None
        if op == "expand":
            size = args.get("size")
            if type(size) is not int or size < engine.size:
                raise InvalidArgument(f"cannot shrink volume {self.vol.name} to {size} bytes")
            if size % engine.chunk_size:
                raise InvalidArgument(
                    f"size {size} is not a multiple of the chunk size {engine.chunk_size}"
                )
            old = engine.size
            await engine.expand(size)
            self.vol.update(lambda config: config.update(size=engine.size))
            self.channel.invalidate_attributes()
            if engine.size != old:
                log.info("expanded from %d to %d bytes", old, engine.size)
            return None
        if op == "settings":  # (recorded by the caller; applied here at once)
            before = self.vol.settings()
            self.vol.config.setdefault("settings", {}).update(
                {key: float(value) for key, value in args.items() if key in volumes.SETTINGS}
            )
            changed = volumes.changed_settings(before, self.vol.settings())
            if changed:
                log.info("settings changed: %s", changed)
            engine.io_timeout = self.vol.setting("io_timeout")
            self.housekeep()
            return {key: self.vol.setting(key) for key in volumes.SETTINGS}
        if op == "checksum":
            return await self._checksum()
        if op == "progress":
            return self.tasks.get(str(args.get("task")))
        if op == "list_layers":
            return await engine.call_one(op)
        if op == "blank":
            return await engine.call_one("is_blank")
        if op == "replica_add":
            disk = args.get("disk")
            if disk is not None and not isinstance(disk, str):
                raise InvalidArgument("a disk is the path of a mount point")
            added = await self.add_replica(args.get("address"), args.get("tls_ca"), disk)
            where = f"local, {disk or 'under the root'}"
            where = added["address"] if args.get("address") else where
            log.info("replica %s added (%s): it is rebuilt", added["id"], where)
            return added
        if op == "given_back":  # (why an added replica was given back, if it was)
            return self.given_back.get(str(args.get("id")))
        if op == "replica_rm":
            left = await self.remove_replica(str(args["id"]))
            log.info("replica %s removed%s", args["id"], f" ({left} left)" if left else "")
            return {"left": left}
        if op == "scrub":
            task = self.tasks["scrub"] = {"done": 0, "total": 0}
            try:
                async with self._layers:  # (after a removal under way)
                    self._scrubbing = True
                    report = await scrub(engine, task)
            finally:
                self.tasks.pop("scrub", None)
                if self._scrubbing:
                    self._scrubbing = False
                    self.housekeep()  # (what it held back)
            for link in engine.replicas:  # (held: a local one's process stops, as given up)
                if link.id in report["held"]:
                    self.nursery.start_soon(self.give_up, link)
            self.last_scrub = {"finished": time.time(), "damaged": report["damaged"]}
            return report
        if op == "replica_checksums":
            out = {}
            for link in engine.replicas:
                if link.mode == RW:
                    out[link.id] = await link.client.call("checksum")
            return out
        if op == "detach":  # letting go always works: a faulted volume is let go all the same
            flushed, error = True, None
            try:
                await engine.flush()
            except LhfsError as exc:
                flushed, error = False, str(exc)
                log.warning("detaching without a final flush: %s", exc)
            else:
                log.info("detaching: the final flush reached the replicas")
            self.stop()
            return {"state": engine.state, "flushed": flushed, "error": error}
        raise InvalidArgument(f"unknown control operation {op!r}")

    def housekeep(self) -> None:
        """Coalesce surplus system snapshots away in the background (see ``housekeeping``);
        asked while it runs, it runs once more after."""
        if self._housekeeping:
            self._housekeep_again = True
            return
        assert self.nursery is not None
        self._housekeeping = True
        self.nursery.start_soon(self._housekeep)

    async def _housekeep(self) -> None:
        try:
            while True:
                self._housekeep_again = False
                await self._housekeep_once()
                if not self._housekeep_again:
                    return
        finally:
            self._housekeeping = False

    async def remove_snapshot(self, name: str, again: bool = False) -> None:
        """Remove a snapshot on every replica, the intent recorded once it begins
        (``removing``): an engine stopped half-way (kill -9) leaves some replicas with it and
        some without, and their chains apart for good; the next engine finishes it
        (``again``: where it is left). Refused by every replica, nothing changed: the record
        goes (a refused removal is never carried out later), except that, finishing one, a
        refusal other than "no such snapshot" (an older replica's "done already") keeps it."""
        assert self.engine is not None
        try:
            async with self._layers:  # (not while a scrub compares the snapshots)
                await self.engine.remove_snapshot(
                    name, missing_ok=again, begin=lambda: self.vol.removing(name, begun=True)
                )
        except LhfsError as exc:
            if is_refusal(exc) and (not again or isinstance(exc, NotFound)):
                self.vol.removing(name, begun=False)
                if again:
                    return
            raise
        self.vol.removing(name, begun=False)

    async def _housekeep_once(self) -> None:
        engine = self.engine
        assert engine is not None
        begun = volumes.load(self.vol.root, self.vol.name).config.get("removing", [])
        for name in begun:  # (by an earlier engine, or a command, stopped half-way)
            if self._stopping or self._rebuilds or self._scrubbing:
                return  # (a rebuild's end, a scrub's, asks again)
            try:
                await self.remove_snapshot(name, again=True)
                log.info("snapshot %s removed: an earlier engine stopped half-way through", name)
            except LhfsError as exc:  # (tried again at the next housekeeping)
                log.warning("snapshot %s, whose removal was begun, not removed yet: %s", name, exc)
        keep = int(self.vol.setting("system_snapshots"))
        try:
            layers = await engine.call_one("list_layers")
        except LhfsError:
            return
        names = [layer["name"] for layer in layers if layer["active"] and layer["name"]]
        while not (self._stopping or self._rebuilds or self._scrubbing):  # (their ends ask again)
            # the configuration is read after the chain: a backup records its hold before it
            # takes its snapshot, so a snapshot listed above that a backup holds shows here
            config = volumes.load(self.vol.root, self.vol.name).config
            doomed = housekeeping.surplus(names, keep, housekeeping.needed(config))
            if not doomed:
                return
            try:
                await self.remove_snapshot(doomed[0])
            except LhfsError as exc:
                log.warning("housekeeping: system snapshot %s not removed: %s", doomed[0], exc)
                return
            log.info("housekeeping: removed system snapshot %s (%d kept)", doomed[0], keep)
            names.remove(doomed[0])

    async def _checksum(self) -> str:
        """xxh3-128 of the volume as the engine reads it, a few MiB at a time (with the
        volume's other I/O served in between), the bytes done kept for 'progress'."""
        engine = self.engine
        digest = xxhash.xxh3_128()
        step = 4 << 20
        task = self.tasks["checksum"] = {"done": 0, "total": engine.size}
        try:
            for offset in range(0, engine.size, step):
                digest.update(await engine.read(offset, min(step, engine.size - offset)))
                task["done"] = min(offset + step, engine.size)
        finally:
            self.tasks.pop("checksum", None)
        return digest.hexdigest()

    async def _watch_removal(self, scope: trio.CancelScope) -> None:
        """The progress of a snapshot removal, as the replicas doing it report it."""
        chunk = self.engine.chunk_size
        while not scope.cancel_called:
            done = total = 0
            for link in list(self.engine.replicas):
                if link.mode != RW or link.client is None or link.client.broken:
                    continue
                with trio.move_on_after(2), contextlib.suppress(LhfsError):
                    operation = (await link.client.info()).get("operation") or {}
                    if operation.get("op") == "remove_snapshot":
                        done += int(operation["done"])
                        total += int(operation["total"])
            if total:
                self.tasks["snapshot_rm"] = {"done": done * chunk, "total": total * chunk}
            await trio.sleep(0.3)

    async def _disk_usage(self, replicas: list[dict[str, Any]]) -> None:
        """What each replica's directory takes on its disk and what that disk has free,
        asked of all at once (a replica that does not answer within 2 s is left unknown);
        kept in ``disks`` for the metrics. Asked of every replica connected, ERR ones too: a
        replica waiting for its rebuild is ERR, and its disk is what its rebuild fills (only
        RW and WO ones were asked, and it showed nothing). A local one that cannot say (not
        initialised yet, as an added one waiting for its first rebuild is; its process
        ended: a full disk, say) is read from its directory here."""
        links = {link.id: link for link in self.engine.replicas}

        async def ask(replica: dict[str, Any]) -> None:
            replica["disk_bytes"] = replica["disk_free"] = None
            link = links.get(replica["id"])
            client = None if link is None else link.client
            with trio.move_on_after(2), contextlib.suppress(LhfsError, OSError):
                if client is not None and not client.broken:
                    with contextlib.suppress(LhfsError):
                        answer = await client.info()
                        replica["disk_bytes"] = answer.get("disk_bytes")
                        replica["disk_free"] = answer.get("disk_free")
                if replica["disk_free"] is None and link is not None and link.local:
                    replica["disk_bytes"], replica["disk_free"] = await trio.to_thread.run_sync(
                        self._directory_usage, replica["id"], abandon_on_cancel=True
                    )  # (a hung disk: given up after the 2 s)
            self.disks[replica["id"]] = (replica["disk_bytes"], replica["disk_free"])

        async with trio.open_nursery() as nursery:
            for replica in replicas:
                nursery.start_soon(ask, replica)

    def _directory_usage(self, replica_id: str) -> tuple[int | None, int | None]:
        """What local replica ``replica_id``'s directory takes and its disk has free, read
        from the directory (None, None when it is not there: a disk not mounted, or while
        the previous reading of it still runs). One reading per replica at a time: on a hung
        disk each one given up after its 2 s stayed blocked in its thread, and a new one
        started every round, threads without end."""
        probing = self._probing.setdefault(replica_id, threading.Lock())
        if not probing.acquire(blocking=False):
            return None, None
        try:
            directory = self.vol.replica_dir(self.vol.replica(replica_id))
            if directory is None or not directory.is_dir():
                return None, None
            return disk_bytes(directory), shutil.disk_usage(directory).free
        finally:
            probing.release()

    async def _snapshot_names(self) -> set[str]:
        layers = await self.engine.call_one("list_layers")
        return {layer["name"] for layer in layers if layer["name"]}

    # -- replica set changes ------------------------------------------------------------------

    def start_rebuild(self, link: ReplicaLink) -> None:
        """Rebuild ``link`` in the background; whatever happens, the engine keeps running. One
        a scrub held (``held``) is not: the operator decides."""
        if link.held is not None:
            link.rejoin = link.held
            return

        async def run() -> None:
            await self.rebuild_over(link)  # (one still unwinding must not end this one's)
            if link not in self.engine.replicas:  # (removed meanwhile)
                return
            shape = None  # another volume's shape: retrying cannot help
            final = None  # why an added replica that never served is given back
            with trio.CancelScope() as scope:
                entry = self._rebuilds[link.id] = _Rebuild(scope)
                try:
                    await rebuild(self.engine, link)
                except WrongShape as exc:
                    shape = f"not brought back: {exc}; replace it"
                    if link.id in self._adding:
                        final = f"rebuild failed: {exc}"
                    else:
                        log.error("replica %s is %s", link.id, shape)
                except Stranger as exc:  # (until the operator acts: said once, not each time)
                    if link.stranger != str(exc):
                        link.stranger = str(exc)
                        log.error(
                            "%s: it is neither rebuilt over nor served from; put its own "
                            "directory back there (it is brought back by itself), or replace "
                            "it: lhfs replica rm %s %s, then lhfs replica add",
                            exc,
                            self.vol.name,
                            link.id,
                        )
                except LhfsError as exc:
                    log.warning("rebuild of %s failed: %s", link.id, exc)
                    if link.id in self._adding and _cannot_retry(exc):
                        final = f"rebuild failed: {exc}"
                except Exception:
                    log.exception("rebuild of %s failed", link.id)
                    if link.mode != ERR:
                        self.engine.fail(link, "rebuild failed (internal error, see engine.log)")
                finally:
                    if self._rebuilds.get(link.id) is entry:
                        del self._rebuilds[link.id]
                    entry.over.set()
                    if not self._stopping:  # (its barrier is a system snapshot, failed or not)
                        self.housekeep()
                    if link.mode == RW:
                        self._adding.discard(link.id)
                        link.stranger = None
                    else:
                        link.rebuild_progress = None
                        if link not in self.engine.replicas:
                            self._adding.discard(link.id)
                        elif final is not None:
                            await self._give_back(link, final)
                        elif shape is not None:
                            link.rejoin = shape
                            self.nursery.start_soon(self.give_up, link)
                        else:  # (failed while ERR: not told)
                            self.rejoiner.watch(link)

        self.nursery.start_soon(run)

    async def _give_back(self, link: ReplicaLink, reason: str) -> None:
        """An added replica whose first rebuild failed for a reason that trying again cannot
        change (its target refused: a directory not empty, no room, another volume's) is
        removed, as if never added, rather than kept ERR and retried for ever, each attempt
        a barrier snapshot more; why is kept for the ``replica add`` that waits on it. No
        checkpoint before it leaves ``engine.replicas``: nobody sees it failed but kept."""
        self._adding.discard(link.id)
        self.given_back[link.id] = reason
        log.warning("replica %s is given back: %s", link.id, reason)
        with contextlib.suppress(LhfsError):
            left = await self.remove_replica(link.id)
            if left is None:  # (a directory left, on a disk away, would take the id again)
                self.vol.update(lambda c: _give_back_id(c, link.id))

    async def add_replica(
        self, address: str | None, tls_ca: str | None = None, disk: str | None = None
    ) -> dict[str, Any]:
        """A new local replica (under the volume's directory, or on ``disk``), or the ``replica
        serve`` at ``address`` (over TLS with the CA ``tls_ca``); rebuilt online. Refused
        on a faulted volume, before anything changes: it would stay empty, nothing to rebuild
        it from (and was once served, zeros, by the next attach)."""
        engine = self.engine
        if engine.state == "faulted":
            waits = f" (it waits for {engine.last_rw}, which served last)" if engine.last_rw else ""
            raise WrongState(
                f"volume {self.vol.name} is faulted: no healthy replica to rebuild a new one "
                f"from{waits}; nothing was added"
            )
        if disk is not None:
            if address is not None:
                raise InvalidArgument("a replica is local on --disk or elsewhere at --address")
            disk = str(disks.check(disk, disks.placed(self.vol)))
        if tls_ca is not None:
            if address is None:
                raise InvalidArgument("TLS is for replicas on other hosts: give --address too")
            tls.client_context(tls_ca)
        if address is not None:
            if parse_address(address)[1] == 0:
                raise InvalidArgument(f"{address}: port 0 names no replica; give its port")
            same = next((r for r in engine.replicas if r.address == address), None)
            if same is not None:
                raise AlreadyExists(f"{address} is replica {same.id} of this volume already")
            engine.tls_cas.pop(address, None)  # (a removed replica's: this add says its own)
        remote = address is not None
        holder: dict[str, str] = {}

        def allocate(config: dict[str, Any]) -> None:
            replica_id = f"r{config['next_replica']}"
            config["next_replica"] += 1
            config["replicas"].append(
                {
                    "id": replica_id,
                    "local": address is None,
                    "address": address,
                    "mode": ERR,
                    "error": "being added",
                    "tls_ca": tls_ca,
                    "unbuilt": True,  # (until its first rebuild completes: never salvaged)
                }
                | ({"disk": disk} if disk else {})
            )
            holder["id"] = replica_id

        self.vol.update(allocate)
        replica_id = holder["id"]
        link: ReplicaLink | None = None
        try:
            if address is None:
                directory = disks.make(self.vol, self.vol.replica(replica_id))
                proc = self._spawn(replica_id, directory)
                self.processes[replica_id] = proc
                try:
                    address = await trio.to_thread.run_sync(proc.wait_ready)
                except (RuntimeError, TimeoutError) as exc:
                    raise LhfsError(f"the new replica process did not start: {exc}") from None
                engine.local_names[address] = proc.local
            link = ReplicaLink(
                replica_id, address, mode=ERR, error="rebuild: preparing", local=not remote
            )
            link.failed_at = trio.current_time()  # (not serving yet: ``rejoin_limit`` counts)
            if tls_ca:
                engine.tls_cas[address] = tls_ca
            if remote:  # (it may be one of the volume's already)
                link.uid = await self._identify(address)
            link.client = await self.engine.connect(address)
            with trio.move_on_after(engine.io_timeout) as waited:
                hello = await link.client.call("hello")
                if hello.get("damaged"):  # (not known as this volume's: never set aside)
                    raise LhfsError(
                        f"{address} serves a damaged directory ({str(hello['damaged'])[:400]}):"
                        " serve an empty directory there; it was left untouched"
                    )
                if hello["initialised"]:
                    await fit(engine, link.client)  # (another volume's shape: refused, whole)
            if waited.cancelled_caught:
                raise NoAnswer(f"replica {address} answered nothing for {engine.io_timeout:.0f}s")
        except BaseException as exc:
            if tls_ca and address:  # (a CA that failed is not the address's for the next add)
                engine.tls_cas.pop(address, None)
            if link is not None and link.client is not None:  # (a session held: let it go)
                with trio.CancelScope(shield=True):
                    await link.client.aclose()
            home = self.vol.replica_dir(self.vol.replica(replica_id))
            await self._forget(replica_id)
            if home is None or not home.exists():  # (a directory left would take the id again)
                self.vol.update(lambda c: _give_back_id(c, replica_id))
            if isinstance(exc, AlreadyExists):
                raise AlreadyExists(f"cannot add replica: {exc}") from None
            if isinstance(exc, WrongVolume):
                raise WrongVolume(
                    f"cannot add replica: {self.named(exc)}; it was left untouched"
                ) from None
            if isinstance(exc, LhfsError):
                raise LhfsError(f"cannot add replica: {exc}") from None
            raise
        assert link is not None
        self.vol.update(lambda c: _set_replica(c, replica_id, address=address))
        engine.replicas.append(link)
        link.rebuild_progress = 0.0
        self._adding.add(replica_id)
        self.given_back.pop(replica_id, None)  # (an id given back is taken again)
        self.start_rebuild(link)
        return {"id": replica_id, "address": address}

    async def _identify(self, address: str) -> str | None:
        """What the replica at ``address`` is (its directory's identity), refused if it is one
        of this volume's already, reached by another address (a host has several; ``localhost``
        and ``127.0.0.1`` are one): taken twice, its two sessions would fence each other for
        ever. Asked in a reader session, which fences nothing. None from an older lhfs."""
        engine = self.engine
        ca = engine.tls_cas.get(address)
        reader = await ReplicaClient.connect(
            address, self.nursery, self.key, role=READER, tls_ca=ca
        )
        uid = None
        try:
            with trio.move_on_after(engine.io_timeout) as waited:
                uid = (await reader.call("hello")).get("uid")
        finally:
            await reader.aclose()
        if waited.cancelled_caught:
            raise NoAnswer(f"replica {address} answered nothing for {engine.io_timeout:.0f}s")
        recorded = {r["id"]: r.get("uid") for r in self.vol.replicas}  # (those away too)
        for link in engine.replicas:
            if uid is not None and uid in (link.uid, recorded.get(link.id)):
                raise AlreadyExists(
                    f"{address} is replica {link.id} of this volume already, reached as "
                    f"{link.address}"
                )
        return uid

    async def rebuild_over(self, link: ReplicaLink) -> None:
        """Return once no rebuild of ``link`` is under way (one that failed may still be
        unwinding: the rejoiner must not bring it back, nor a rebuild start, before)."""
        entry = self._rebuilds.get(link.id)
        if entry is not None:
            await entry.over.wait()

    def remote(self, link: ReplicaLink) -> bool:
        """A replica on another host (the engine does not run its process)."""
        try:
            return not self.vol.replica(link.id).get("local")
        except LhfsError:
            return False

    def named(self, exc: WrongVolume) -> str:
        """A replica of another volume refused, naming that volume as this root knows it."""
        return exc.naming(volumes.named_by_id(self.vol.root, exc.volume_id))

    async def remove_replica(self, replica_id: str) -> str | None:
        """Remove a replica (refused for the last healthy one); what was left of it (its
        directory on a disk that is not mounted)."""
        engine = self.engine
        link = next((r for r in engine.replicas if r.id == replica_id), None)
        self.vol.replica(replica_id)  # NotFound for an unknown id
        if link is not None and link.mode == RW and sum(r.mode == RW for r in engine.replicas) == 1:
            raise WrongState(f"{replica_id} is the last healthy replica: it cannot be removed")
        if engine.state == "faulted" and replica_id == engine.last_rw:
            raise WrongState(
                f"{replica_id} served last before volume {self.vol.name} faulted and alone holds "
                "every acknowledged write: the volume waits for it to come back, so it cannot "
                "be removed"
            )
        if all(r["id"] == replica_id for r in self.vol.replicas):
            raise WrongState(volumes.only_replica(self.vol.name, replica_id))
        if replica_id in self._rebuilds:
            self._rebuilds[replica_id].scope.cancel()
        if link is not None:
            engine.replicas.remove(link)
            if link.client is not None:
                await link.client.aclose()
        left = await self._forget(replica_id)
        logs.remove(self.vol.replica_log(replica_id))  # (its process is stopped: nothing writes)
        return left

    async def _forget(self, replica_id: str) -> str | None:
        proc = self.processes.pop(replica_id, None)
        if proc is not None:
            await trio.to_thread.run_sync(proc.stop)
        entry = self.vol.replica(replica_id)
        self.vol.update(
            lambda c: c.update(replicas=[r for r in c["replicas"] if r["id"] != replica_id])
        )
        return disks.remove(self.vol, entry)

    def stop(self) -> None:
        """End the FUSE loop; its device is unmounted unless a loop device is bound to it
        (see ``left_bound``)."""
        if not self._stopping:
            self._stopping = True
            self.channel.stop(unmount=not loops_backed_by(self.device))

    # -- main ---------------------------------------------------------------------------------

    async def serve(self, announce: Any) -> None:
        # Memory shared with the local replicas (``lhfs.wire.shm``); LHFS_SHARED_MEMORY=off
        # keeps every replica on its socket (to compare, or to rule the path out).
        pool = device = None
        if os.environ.get("LHFS_SHARED_MEMORY", "on") != "off":
            pool = shm.Region(f"lhfs-{self.vol.name}", POOL_SLOTS, BUFFER)
            self.channel.share(pool)
            device = self.channel.open()  # local replicas answer reads on it
        try:
            await self._serve(announce, pool, device)
        finally:
            if pool is not None:
                pool.close()

    async def _serve(self, announce: Any, pool: shm.Region | None, device: int | None) -> None:
        async with trio.open_nursery() as nursery:
            self.engine = Engine(
                self.vol.size,
                self.vol.chunk_size,
                nursery,
                self.key,
                on_mode_change=self._record_mode,
                io_timeout=self.vol.setting("io_timeout"),
                epoch=self.vol.config.get("epoch", 0),
                pool=pool,
                device=device,
            )
            self.rejoiner = Rejoiner(self.engine, nursery, self)
            self.io_hold = IoHold(self.engine, nursery)
            self.engine.on_failed = self.rejoiner.watch
            self.engine.on_epoch = self._record_epoch
            self.engine.named = self.named
            self.engine.volume = self.vol.name
            self.engine.local_names = {p.address: p.local for p in self.processes.values()}
            self.engine.tls_cas = {
                r["address"]: r["tls_ca"] for r in self.vol.replicas if r.get("tls_ca")
            }
            addresses = {r["id"]: r["address"] for r in self.vol.replicas if r.get("local")}

            def publish(config: dict[str, Any]) -> None:  # this run's replica ports
                for entry in config["replicas"]:
                    entry["address"] = addresses.get(entry["id"], entry.get("address"))
                    if entry["id"] in self.rotten:  # (trusted for nothing: rebuilt at once)
                        entry.update(mode=ERR, error=self.rotten[entry["id"]], rotten_backing=True)

            self.vol.update(publish)
            self.nursery = nursery
            await self.engine.attach(
                self._recorded(),
                held={r["id"] for r in self.vol.replicas if r.get("held")},
                removing=self.vol.config.get("removing", []),
            )
            epoch = self.engine.epoch
            self.vol.update(lambda config: config.update(epoch=epoch))
            check_size(self.engine, self.vol.size, self.vol.dir / "config.json")
            await self._finish_expansion()
            with contextlib.suppress(LhfsError):  # (its answers: what each holds durably)
                await self.engine.flush()
            self.keep_revisions()
            for link in self.engine.replicas:
                entry = self.vol.replica(link.id)  # (a scrub's verdicts, kept across attaches)
                link.held, link.rotten_backing = (
                    entry.get("held"),
                    bool(entry.get("rotten_backing")),
                )
                if entry.get("unbuilt"):  # (added, never built: given back as its adder would)
                    self._adding.add(link.id)
                if link.mode != ERR:
                    continue
                link.failed_at = trio.current_time()  # (not serving: ``rejoin_limit`` counts)
                if link.held is not None:
                    link.rejoin = link.held
                    continue
                if link.client is not None and not link.client.broken:
                    self.start_rebuild(link)  # stale but reachable
                else:  # unreachable, or its process did not start: brought back
                    self.rejoiner.watch(link)
            await nursery.start(control.serve, self.vol.control_socket, self.handle)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._watch_disks)
            nursery.start_soon(self.engine.run)
            metrics = self._serve_metrics()  # (first: an address taken leaves no mount behind)
            self.channel.mount()
            try:
                atomic_write_json(
                    self.vol.runtime_path,
                    {
                        "pid": os.getpid(),
                        "device": str(self.device),
                        # (made by the attach: removed again by the detach)
                        "device_made": self.device_made,
                        "started": time.time(),
                        "metrics": metrics,
                    },
                )
                announce("ready")
                self.housekeep()
                await VolumeFile(self.engine, self.channel, self.stats).serve()
            finally:
                # A loop device still bound (a file system on it, perhaps): the device is left
                # mounted, dead, and the runtime record kept, as a killed engine leaves them.
                # Unmounted, the loop device would name no file lhfs knows: 'lhfs umount' said
                # its mount point was no volume's, and 'volume rm' went on under it.
                self.left_bound = loops_backed_by(self.device)
                self.channel.close(unmount=not self.left_bound)
            await self.engine.close()
            self.keep_revisions()
            nursery.cancel_scope.cancel()

    def _recorded(self) -> list[Recorded]:
        """The replicas as the configuration has them, for the attach to choose from. Trusted,
        as holding every acknowledged write: the replica a faulted volume waited for
        (``last_rw``) alone, if it did; else those recorded RW (a WO one was cut off
        mid-rebuild)."""
        last = self.vol.config.get("last_rw") or {}
        ids = {r["id"] for r in self.vol.replicas}
        waiting = last.get("id") if last.get("id") in ids else None  # (one removed: no record)
        if waiting is not None:
            log.warning(
                "the volume was faulted, waiting for replica %s: it alone may serve", waiting
            )
        records = []
        for r in self.vol.replicas:
            trusted = (r["id"] == waiting) if waiting else (r.get("mode") == RW)
            synced = max(
                int(last.get("revision", -1)) if r["id"] == waiting else -1,
                r.get("flushed", -1) if trusted else -1,  # (none in an older configuration)
            )
            records.append(
                Recorded(
                    r["id"],
                    r.get("address") or "",
                    trusted=trusted,
                    built=not r.get("unbuilt"),
                    uid=r.get("uid"),
                    synced=synced,
                    waited_for=r["id"] == waiting,
                    away=self.not_started.get(r["id"]),
                    local=bool(r.get("local")),
                )
            )
        return records

    async def _finish_expansion(self) -> None:
        """An online expansion records the new size in the configuration once every replica
        has it: an engine killed in between leaves the replicas larger than ``config.json``
        says (some of them, if it died half-way through). The engine serves the largest size
        a replica has; here every replica is brought to it and the configuration records it,
        so that a detached ``volume ls`` and ``lhfs doctor`` say the size the volume has.
        Only ever larger: a volume never shrinks."""
        engine, recorded = self.engine, self.vol.size
        if engine.size <= recorded:
            return
        log.warning(
            "the replicas hold %d bytes, the configuration said %d (an expansion cut short): "
            "the volume is %d bytes",
            engine.size,
            recorded,
            engine.size,
        )
        try:
            await engine.expand(engine.size)  # (one that had it already: nothing changes)
        except LhfsError as exc:  # (one that failed it is rebuilt, to that size)
            log.warning("not every replica could be grown to %d bytes: %s", engine.size, exc)
        self.vol.update(lambda config: config.update(size=max(config["size"], engine.size)))

    def _serve_metrics(self) -> str | None:
        """Serve Prometheus metrics on the address given at attach; the address bound."""
        if not self.metrics_address:
            return None
        collector = VolumeCollector(self.vol.name, self.stats, self.metrics_view)
        host, port = serve_metrics(self.metrics_address, collector)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return f"{host}:{port}"

    def metrics_view(self) -> dict[str, Any]:
        """What the metrics say beyond I/O counters (read from the scraping thread: the
        engine's state, its replicas, the last scrub, the last backups and the restore)."""
        assert self.engine is not None
        view = self.engine.info()
        for replica in view["replicas"]:
            replica["disk_bytes"], replica["disk_free"] = self.disks.get(replica["id"], (None,) * 2)
        view["scrub"] = self.last_scrub
        with contextlib.suppress(LhfsError, OSError, ValueError):
            config = volumes.load(self.vol.root, self.vol.name).config
            view["backups"] = [
                {"target": target, **record} for target, record in config.get("backups", {}).items()
            ]
            view["restored"] = config.get("restored")
        return view

    async def _watch_disks(self) -> None:
        """Ask the replicas about their disks every ``DISKS_EVERY`` seconds (``disks_every``),
        so that the metrics show a disk filling up before writes are refused (a scrape never
        waits for a replica: it reads the last answers)."""
        assert self.engine is not None
        every = disks_every()
        while True:
            try:
                await self._disk_usage([{"id": link.id} for link in self.engine.replicas])
            except Exception as exc:  # (a replica's odd answer must not end the engine)
                log.warning("could not ask the replicas about their disks: %s", exc)
            await self.keep_revisions_aside()
            await trio.sleep(every)

    async def _watch_signals(self) -> None:
        """SIGTERM or SIGINT ends the engine, unless a loop device is bound to its device
        file: a file system may sit on it with writes in flight (a service stop whose
        ``lhfs umount`` found it busy signals what is left), and an engine that ended under
        it would leave it mounted on a dead device, its unsynced writes lost. It then flushes
        what is on top and refuses, in one log line; ``lhfs umount`` or ``volume detach
        --force`` lets go, and only SIGKILL ends it at once."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                loops = await self._let_idle_loops_go(loops_backed_by(self.device))
                if not loops:
                    self.stop()
                    return
                await self._refuse_to_end(signal.Signals(signum).name, loops)

    async def _let_idle_loops_go(self, loops: list[str]) -> list[str]:
        """Free ``loops`` if none is mounted here (a service's file system unmounted by the
        system meanwhile, a loop device left over): nothing sits on them but, perhaps, a
        holder, for which the kernel frees it when it closes (``losetup -d`` then only
        marks it). What is still bound after that is returned: the engine stays for it.
        Without this, a bound loop device nothing used made every shutdown wait for its
        SIGKILL."""
        if not loops or any(mounted_at(loop) for loop in loops):
            return loops
        for loop in loops:
            await trio.run_process(["losetup", "-d", loop], capture_stderr=True, check=False)
        with trio.move_on_after(2):
            while loops_backed_by(self.device):
                await trio.sleep(0.1)
        return loops_backed_by(self.device)

    async def _refuse_to_end(self, name: str, loops: list[str]) -> None:
        """Flush the file systems mounted on ``loops`` (``sync -f``: their dirty pages come
        here as writes, served meanwhile) and the engine, and say why the engine stays."""
        mounts = [point for loop in loops for point in mounted_at(loop)]
        with trio.move_on_after(STOP_FLUSH):
            for point in mounts:  # (in a thread let go at the limit: a hung syncfs never ends)
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(_syncfs, point, abandon_on_cancel=True)
            with contextlib.suppress(LhfsError):
                await self.engine.flush()
        held = ", ".join(loops) + (f" (mounted at {', '.join(mounts)})" if mounts else "")
        log.warning(
            "%s refused: %s is in use by %s; flushed, the engine stays: 'lhfs umount' "
            "lets go of it, or 'lhfs volume detach --force %s' (only SIGKILL ends it now)",
            name,
            self.device,
            held,
            self.vol.name,
        )


def _syncfs(point: str) -> None:
    """Write out the dirty pages of the file system mounted at ``point`` (syncfs(2)): they
    come to the engine as writes, served while this waits."""
    import ctypes

    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {point} failed")
    finally:
        os.close(fd)


class AttachGone(LhfsError):
    """The ``volume attach`` that started the engine left before it read the status line."""


def run(
    root: Path,
    name: str,
    device: Path,
    metrics: str | None = None,
    log_file: Path | None = None,
    device_made: bool = False,
) -> int:
    """Entry point of ``lhfs engine-run``: stdout carries exactly one status line."""
    logs.setup(log_file)
    out = sys.stdout

    def announce(line: str) -> None:
        """Say the one status line; an attach that is gone (killed before it read it) ends
        the engine in one log line: nobody would know the volume is attached."""
        try:
            out.write(line + "\n")
            out.flush()
        except BrokenPipeError:
            raise AttachGone("the attach that started the engine is gone (killed?)") from None
        finally:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    daemon = None
    try:
        vol = volumes.load(root, name)
        # One engine per volume, for as long as it lives: a second one would salvage other
        # replicas than the first and serve another volume under the same name (its
        # descriptor stays open until the process ends: the kernel lets go then).
        locks.take(vol.engine_lock, 0, f"volume {name} is served by another engine already")
        daemon = Daemon(vol, device, metrics)
        daemon.device_made = device_made
        daemon.start_local_replicas()
        if not daemon.processes and not any(
            not r.get("local") and r.get("address") for r in vol.replicas
        ):
            why = "; ".join(f"{rid}: {text}" for rid, text in daemon.not_started.items())
            raise NotFound(
                "no replica of the volume could be started ("
                + (why or "see the replica logs")
                + ")"
            )
        try:
            trio.run(daemon.serve, announce)
        except BaseExceptionGroup as group:  # (what failed in a task: reported as itself)
            raise sole(group) from None
        if daemon.left_bound:
            log.warning(
                "the engine ends with %s still bound to %s: left as a crashed engine's, for "
                "'lhfs umount' or 'lhfs volume detach %s' to clean up",
                ", ".join(daemon.left_bound),
                device,
                name,
            )
            return 1
        log.info("detached: the engine ends")
        return 0
    except AttachGone as exc:
        log.error("%s: the engine ends", exc)
        return 1
    except LhfsError as exc:
        log.error("%s", exc)
        if not out.closed:
            with contextlib.suppress(AttachGone):
                announce(f"error: {exc}")
        return 1
    except Exception as exc:
        log.exception("engine failed")
        with contextlib.suppress(AttachGone):
            announce(f"error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if daemon is not None:
            daemon.stop_local_replicas()
            if not daemon.left_bound:
                daemon.vol.runtime_path.unlink(missing_ok=True)
            daemon.vol.control_socket.unlink(missing_ok=True)
        if device_made and not (daemon is not None and daemon.left_bound):
            drop_device(device)


async def _end(proc: ReplicaProcess, term_first: bool) -> None:
    """End ``proc`` and wait, on the event loop, until it is gone: with ``term_first``,
    SIGTERM (and SIGCONT: a stopped process heeds nothing else), then SIGKILL after
    ``TERM_WAIT``; else SIGKILL at once (a stuck process may never heed SIGTERM).
    ``LhfsError`` if it does not die (stuck in the kernel)."""
    steps = [(signal.SIGTERM, TERM_WAIT)] if term_first else []
    for sig, patience in [*steps, (signal.SIGKILL, KILL_WAIT)]:
        with contextlib.suppress(ProcessLookupError):
            proc.proc.send_signal(sig)
            if sig == signal.SIGTERM:
                proc.proc.send_signal(signal.SIGCONT)
        with trio.move_on_after(patience):
            while proc.proc.poll() is None:
                await trio.sleep(0.05)
        if proc.proc.returncode is not None:
            return
    raise LhfsError(f"its process (pid {proc.proc.pid}) does not die when killed")


def _local_name(replica_id: str) -> str:
    """The local socket of a replica this engine starts (unique on the host)."""
    return f"lhfs-{os.getpid()}-{replica_id}-{secrets.token_hex(4)}"


@dataclass
class _Rebuild:
    scope: trio.CancelScope  # (``replica rm`` cancels it)
    over: trio.Event = field(default_factory=trio.Event)


def _ended(status: int) -> str:
    """How a process ended, from its return code, in words."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def check_size(engine: Engine, size: int, config: Path) -> None:
    """Refuse a configuration (``config``) that says the volume is larger (``size``) than a
    replica that serves it holds (``size`` edited by hand: lhfs records a size once every
    replica has it): the engine would serve past the replicas' end, and the first write there
    would fault the volume. A replica that missed an expansion is ERR, never one that serves.
    Each serving replica's size is the one the attach's handshake read (it answered: it
    serves), not asked again: a round trip less per replica at every attach."""
    for link in engine.replicas:
        if link.mode == RW and link.attached_size is not None and link.attached_size < size:
            raise CorruptState(
                f"{config}: size must be at most what the replicas hold "
                f"({link.attached_size} bytes: {link.id}), not {size}"
            )


def _cannot_retry(exc: LhfsError) -> bool:
    """Whether a rebuild failed for a reason that trying again cannot change: the target
    refused what it was asked (its directory is not empty, its disk is full or read-only,
    it is another volume's or of another shape), as opposed to a lost connection, a silent
    peer or a source that failed (``SourceError``, whatever its kind), which a later attempt
    may get past."""
    if isinstance(exc, SourceError):
        return False
    return isinstance(exc, (InvalidArgument, StorageError, WrongVolume))


def _give_back_id(config: dict[str, Any], replica_id: str) -> None:
    """A refused ``replica add`` changes nothing: its id is given back unless another add has
    taken the next one since."""
    if f"r{config['next_replica'] - 1}" == replica_id:
        config["next_replica"] -= 1


def _set_replica(config: dict[str, Any], replica_id: str, **values: Any) -> None:
    for entry in config["replicas"]:
        if entry["id"] == replica_id:
            entry.update(values)
