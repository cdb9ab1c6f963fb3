"""DR (standby) volumes: a local volume that follows another volume's backups.

A standby is an ordinary volume whose ``config.json`` carries a ``dr`` section (target, source
volume, polling interval). A follower process (``lhfs dr run``, started in the background by
``dr create`` and ``dr start``) polls the target and brings the volume to the newest complete
backup by writing only the blocks that differ from what the volume holds.

What the volume holds is recorded durably in ``dr-state.json``, one entry per backup block: the
digest of the block it holds, None for zeros. The standby holds one whole backup at all times,
so that it can be activated offline whenever the store is gone: before an increment writes, what
it will overwrite is saved in ``dr-undo`` and ``applying`` is recorded; an increment that does
not finish (corruption, a store error, SIGTERM) is undone before the follower goes on, and one
cut short by a kill is undone by the next start or activation (``recover``). Comparing against
this local record rather than a manifest in the store keeps every increment incremental after
the last restored backup is deleted.

Only corruption stops a follower (a block whose content does not match its digest); a damaged
manifest is passed over (``newest_backup``), and ``dr status`` says so. Everything else
(refused or reset connections, 5xx, a host name that no longer resolves, a full disk) is
retried with capped, jittered backoff for as long as it takes; ``dr status`` shows the last
error and the lag meanwhile.

The standby cannot be attached, snapshotted or backed up. ``dr activate`` stops the follower,
applies the newest complete backup and removes the ``dr`` section: a normal volume remains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backupstore.s3 import RETRY_TIMEOUT, Bucket, Endpoint, Target
from backupstore.store import (
    BackupStore,
    BlockMissing,
    check_slot,
    digest_of,
    order,
    taken_at,
)
from lhfs.backups.backup import (
    create_as_source,
    open_store,
    password_file,
    refuse_image_backups,
    store_password,
)
from lhfs.config import volume as volumes
from lhfs.core import locks, logs
from lhfs.core.durable import atomic_write, fsync_dir
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    NotPermitted,
    UsageError,
    WrongState,
)
from lhfs.core.names import NAME, check_name, check_volume_name
from lhfs.core.procs import LHFS, child_env, is_lhfs, is_pid, wait_for
from lhfs.core.units import rfc3339
from lhfs.store.backing import hole_at
from lhfs.store.chunkstore import ChunkStore
from lhfs.volumes import manage
from lhfs.volumes.standby import (
    LOCK,
    LOG,
    STATE,
    STATUS,
    UNKNOWN,
    follower_pid,
    load_state,
    lock,
    read_status,
    save_state,
    stop,
)
from lhfs.wire.client import parse_address

log = logging.getLogger("lhfs.dr")
OFFLINE_ASK = 10.0  # seconds an offline activation waits for the store to take its marker out


class BackupDeleted(LhfsError):
    """The backup being applied was deleted from the store half-way: not corruption."""


# -- the durable record of what the standby holds --------------------------------------------


def dr_config(vol: volumes.Volume) -> dict[str, Any]:
    """A standby's ``dr`` section of its configuration, once every field it is read for is
    found to be what ``create`` writes: a damaged one is ``CorruptState`` naming the field,
    not an ``AttributeError`` wherever a field is used."""
    config = vol.config.get("dr")
    if not config:
        raise WrongState(f"volume {vol.name} is not a DR standby volume")
    where = f"{vol.dir / 'config.json'}: dr"
    for field in ("target", "volume"):
        if not isinstance(config.get(field), str):
            raise CorruptState(f"{where}.{field} must be a string, not {config.get(field)!r:.60}")
    for field, should, check in (  # (shown, and hints' arguments: never what they cannot be)
        ("target", "an s3://BUCKET/PREFIX target", Target.parse),
        ("volume", "a volume name", check_name),
    ):
        try:
            check(config[field])
        except LhfsError:
            said = f"{config[field]!r:.60}"
            raise CorruptState(f"{where}.{field} must be {should}, not {said}") from None
    for field in ("interval", "retry_max", "created"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise CorruptState(f"{where}.{field} must be a number from 0, not {value!r:.60}")
    for field in (
        "endpoint", "region", "credentials_file", "password_file", "standby_id", "metrics",
    ):  # fmt: skip
        if config.get(field) is not None and not isinstance(config[field], str):
            raise CorruptState(
                f"{where}.{field} must be a string or null, not {config[field]!r:.60}"
            )
    if config.get("encrypted") is not None and not isinstance(config["encrypted"], bool):
        raise CorruptState(f"{where}.encrypted must be true, false or null")
    activating = config.get("activating")
    if activating is not None and not (
        isinstance(activating, dict) and is_pid(activating.get("pid"))
    ):
        raise CorruptState(f"{where}.activating must be a process's record, not {activating!r:.60}")
    return config


def newest_backup(
    store: BackupStore,
    volume: str,
    cache: dict[str, dict[str, Any]],
    passed_over: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """The manifest of the volume's newest complete backup that reads. Manifests never change
    once written, so each is read once and what orders it (``_ORDERED``) is kept in
    ``cache`` until its backup disappears; the whole manifest only for the newest, the one
    the follower compares and applies: a whole manifest is a few dozen bytes per block, and
    a standby of a large volume kept them all for every backup its store retains. A damaged
    one (it fails authentication, a stray object) is passed over, said once in the log:
    whoever can write the bucket must not stop every standby of the volume with it. A
    command passes ``passed_over``: it tells the operator, a line each, instead."""
    names = set(store.complete_names(volume))
    for name in list(cache):
        if name not in names:
            del cache[name]
    whole = None  # (the one whole manifest kept: followed as each is read, never searched)
    for manifest in list(cache.values()):
        if "blocks" in manifest:
            whole = _keep_whole_newest(cache, whole, manifest)
    for name in sorted(names - cache.keys()):
        if _read_into(store, volume, name, cache, passed_over):
            whole = _keep_whole_newest(cache, whole, cache[name])
    while True:
        readable = [manifest for manifest in cache.values() if _DAMAGED not in manifest]
        if not readable:
            return None
        newest = max(readable, key=order)
        if "blocks" in newest:
            return newest
        # (the newest was deleted: the next one down was kept in short, read it whole)
        if _read_into(store, volume, newest["name"], cache, passed_over):
            return cache[newest["name"]]


def _read_into(
    store: BackupStore,
    volume: str,
    name: str,
    cache: dict[str, dict[str, Any]],
    passed_over: Callable[[str], None] | None,
) -> bool:
    """Read backup ``name``'s manifest into ``cache`` whole; False when it is gone (deleted
    since the listing: dropped from ``cache``) or damaged (recorded so, said once)."""
    try:
        cache[name] = store.manifest(volume, name)
        return True
    except NotFound:
        cache.pop(name, None)
    except CorruptState as exc:
        line = f"passed over backup {name} of {volume}: {exc}"
        (passed_over or (lambda text: log.warning("%s", text)))(line)
        cache[name] = {_DAMAGED: str(exc)}
    return False


def _keep_whole_newest(
    cache: dict[str, dict[str, Any]], whole: dict[str, Any] | None, read: dict[str, Any]
) -> dict[str, Any]:
    """Of ``whole`` (the whole manifest ``cache`` keeps, if any) and ``read`` (one just read
    whole into it), the newer, the older cut down to what orders it. Asked of the two alone,
    not of the whole cache: searched for after each read, a follower starting over a store
    of many backups spent time in the square of their number."""
    if whole is None or whole is read:
        return read
    older, newer = sorted((whole, read), key=order)
    cache[older["name"]] = {key: older.get(key) for key in _ORDERED}
    return newer


_ORDERED = ("name", "taken", "started", "created")  # (what ``order`` reads)
_DAMAGED = "damaged"  # (in ``cache``: a manifest that did not read, not read again)


def _not_smaller(
    manifest: dict[str, Any], vol: volumes.Volume, instead: str = "waiting for a newer backup"
) -> None:
    """Refuse a backup smaller than the standby: the backups it grew in were deleted, and a
    volume never shrinks. Not a usage error (the follower waits for a newer one): ``instead``
    says what the refused command does or can do."""
    if manifest["size"] < vol.size:
        raise WrongState(
            f"the newest backup, {manifest['name']} ({manifest['size']} bytes), is smaller "
            f"than the standby ({vol.size} bytes); a volume never shrinks: {instead}"
        )


def apply(
    vol: volumes.Volume,
    store: BackupStore,
    manifest: dict[str, Any],
    progress: Callable[..., None] = lambda *pct: None,
) -> dict[str, Any]:
    """Bring the standby's replicas to ``manifest``, touching only blocks that differ from
    what ``dr-state.json`` says they hold; returns what moved.

    The standby holds one whole backup at all times, so that it can be activated offline
    whenever the store is gone: what the increment overwrites is saved first (``dr-undo``,
    see ``_save_undo``), and an increment that does not finish, for whatever reason (a
    corrupt block, a store that stops answering, SIGTERM, Ctrl-C), is undone before this
    raises. One killed outright leaves ``applying`` in ``dr-state.json``: ``recover``
    undoes it before anything else uses the replicas."""
    started = time.monotonic()
    recover(vol)
    state = load_state(vol)
    size, block = manifest["size"], manifest["block_size"]
    target = manifest["blocks"]
    _not_smaller(manifest, vol)
    if state["block_size"] == block:
        held = list(state["blocks"]) + [None] * (len(target) - len(state["blocks"]))
    else:  # other geometry (or no record): nothing is known
        held = [UNKNOWN] * len(target)
    todo = [i for i, digest in enumerate(target) if held[i] != digest]
    stats: dict[str, Any] = {
        "blocks": len(target), "fetched": 0, "trimmed": 0, "bytes": 0, "written": 0,
    }  # fmt: skip
    dirs = _replica_dirs(vol)
    # (marked read: 'backup rm' and prune leave it alone, a collection keeps its blocks)
    with store.reading(manifest["volume"], manifest["name"], "dr"):
        if not store.has_backup(manifest["volume"], manifest["name"]):
            raise BackupDeleted(f"backup {manifest['name']} was deleted")  # (since its listing)
        if todo:
            _save_undo(vol, dirs, [(i, held[i]) for i in todo], block, size)
            save_state(vol, {**state, "applying": manifest["name"]})
        try:
            if size > vol.size:  # (not undone: the grown range reads as zeros, as it did)
                _grow(vol, dirs, size)
            if todo:
                fetch = [(i, target[i]) for i in todo]
                _write_blocks(dirs, store, fetch, manifest, stats, progress)
        except BaseException as exc:  # (SIGTERM is SystemExit: undone too)
            if todo:
                _undo(vol, dirs)
                why = str(exc) or type(exc).__name__
                log.warning("undid the unfinished increment to %s (%s)", manifest["name"], why)
            if isinstance(exc, BlockMissing) and _deleted(store, manifest):
                raise BackupDeleted(f"backup {manifest['name']} was deleted") from None
            raise
    save_state(
        vol,
        {
            "backup": manifest["name"],
            "created": manifest["created"],
            "size": size,
            "block_size": block,
            "blocks": target,
            "applying": None,
        },
    )
    with contextlib.suppress(FileNotFoundError):
        (vol.dir / UNDO).unlink()
    progress(100.0)
    stats["seconds"] = round(time.monotonic() - started, 3)
    return stats


UNDO = "dr-undo"  # what the increment under way overwrites (see ``_save_undo``)
_UNDO_MAGIC = b"LHDRUND1"
_UNDO_RECORD = struct.Struct("<QII")  # offset, length, bytes that follow (zeros after them)


def _save_undo(
    vol: volumes.Volume,
    dirs: list[Path],
    blocks: list[tuple[int, str | None]],
    block: int,
    size: int,
) -> None:
    """Save durably what the blocks an increment will write (of ``block`` bytes, in a volume
    of ``size``) hold now, read from the first replica (the follower writes them all alike),
    before ``applying`` is recorded. Zeros (a block held as zeros, or past the end before
    the volume grows) are recorded by length only; the record ends with its count, so that
    one cut short is never taken for whole. Costs the increment's size on the local disk
    while it is applied."""
    path = vol.dir / UNDO
    tmp = path.with_name(f".{UNDO}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        with open(tmp, "wb") as out:
            out.write(_UNDO_MAGIC)
            source = ChunkStore.open(dirs[0]) if dirs else None
            try:
                for index, digest in blocks:
                    offset = index * block
                    length = min(block, size - offset)
                    held = max(0, min(length, vol.size - offset))
                    data = b""
                    if digest is not None and source is not None and held:
                        data = bytes(source.read(offset, held))
                        if not data.strip(b"\0"):
                            data = b""
                    out.write(_UNDO_RECORD.pack(offset, length, len(data)))
                    out.write(data)
            finally:
                if source is not None:
                    source.close()
            out.write(struct.pack("<Q", len(blocks)))
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)
        fsync_dir(vol.dir)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _undo_records(path: Path, data: bool) -> Iterator[tuple[int, int, bytes]]:
    """The records of a whole ``dr-undo``, streamed (an increment may be most of the
    volume): offset, length, the bytes held there (zeros after them; without ``data``,
    skipped: b""). ``CorruptState`` when it is cut short or damaged; ``FileNotFoundError``
    when missing."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END) - 8
        f.seek(0)
        if f.read(len(_UNDO_MAGIC)) != _UNDO_MAGIC or end < len(_UNDO_MAGIC):
            raise CorruptState(f"{path} is damaged")
        count = 0
        while f.tell() < end:
            head = f.read(_UNDO_RECORD.size)
            if len(head) != _UNDO_RECORD.size or f.tell() > end:
                raise CorruptState(f"{path} is cut short")
            offset, length, held = _UNDO_RECORD.unpack(head)
            if held > length or f.tell() + held > end:
                raise CorruptState(f"{path} is damaged")
            if data:
                yield offset, length, f.read(held)
            else:
                f.seek(held, os.SEEK_CUR)
                yield offset, length, b""
            count += 1
        if struct.unpack("<Q", f.read(8))[0] != count:
            raise CorruptState(f"{path} is cut short")


def _undo(vol: volumes.Volume, dirs: list[Path]) -> None:
    """Put back what ``dr-undo`` says the replicas held, then record that no increment is
    under way: the standby holds the backup ``dr-state.json`` names again. Redone whole if
    cut short (it writes what was saved, whatever the replicas hold meanwhile). An undo
    record that is missing or damaged leaves every block unknown: nothing whole is claimed,
    and the next increment rewrites them all."""
    state = load_state(vol)
    path = vol.dir / UNDO
    try:
        for _ in _undo_records(path, data=False):  # (whole, before anything is written)
            pass
    except (OSError, CorruptState) as exc:
        log.error("%s cannot be used (%s): every block is rewritten", path, exc)
        state = {**state, "blocks": [UNKNOWN] * len(state["blocks"])}
    else:
        stores = [ChunkStore.open(d) for d in dirs]
        try:
            for local in stores:
                for offset, length, content in _undo_records(path, data=True):
                    if content:  # (only what reads otherwise: thin over an image)
                        local.write_changed(offset, content)
                    rest = min(offset + length, local.size) - offset - len(content)
                    if rest > 0:
                        local.trim(offset + len(content), rest)
        finally:
            for local in stores:
                local.close()
    save_state(vol, {**state, "applying": None})
    with contextlib.suppress(FileNotFoundError):
        (vol.dir / UNDO).unlink()


def recover(vol: volumes.Volume) -> str | None:
    """Undo an increment a kill cut short (``applying`` recorded, the follower gone), so that
    the standby holds its last whole backup again; the caller holds the follower's lock.
    Returns the backup that was being applied (None: nothing to undo). A ``dr-state.json``
    of an older lhfs marks the blocks it was writing ``"?"`` instead: those stay marked."""
    state = load_state(vol)
    applying = state.get("applying")
    if applying is None or UNKNOWN in state["blocks"]:
        with contextlib.suppress(FileNotFoundError):  # (left by a kill before `applying`)
            (vol.dir / UNDO).unlink()
        return None
    log.warning("undoing the increment to %s that was cut short", applying)
    _undo(vol, _replica_dirs(vol))
    return str(applying)


def _deleted(store: BackupStore, manifest: dict[str, Any]) -> bool:
    try:
        store.manifest(manifest["volume"], manifest["name"])
    except NotFound:
        return True
    return False


def _write_blocks(
    dirs: list[Path],
    store: BackupStore,
    todo: list[tuple[int, str | None]],
    manifest: dict[str, Any],
    stats: dict[str, Any],
    progress: Callable[..., None],
) -> None:
    """Trim the blocks that became empty, fetch and write the others (each checked to fit its
    place in ``manifest``), on every replica; the replicas are flushed (closed) before this
    returns or raises. Of a fetched block only the chunks that differ from what the standby
    reads are written (``stats["written"]``, bytes of one replica): one on a backing image
    keeps only what differs from it, however large the blocks."""
    size, block = manifest["size"], manifest["block_size"]
    stores = [ChunkStore.open(d) for d in dirs]
    try:
        for index, digest in todo:
            if digest is None:
                for local in stores:
                    local.trim(index * block, min(block, size - index * block))
                stats["trimmed"] += 1
        fetch = [(i, d) for i, d in todo if d is not None]
        for done, (index, data) in enumerate(store.fetch(fetch), 1):
            check_slot(manifest, index, data, f"backup {manifest['name']}")
            data = data[: size - index * block]
            written = 0
            for local in stores:  # (only the chunks that read otherwise: see write_changed)
                written = local.write_changed(index * block, data)
            stats["written"] += written
            stats["fetched"] += 1
            stats["bytes"] += len(data)
            progress(100 * done / len(fetch), stats["bytes"], len(fetch) * block)
    finally:
        for local in stores:
            local.close()


def _replica_dirs(vol: volumes.Volume) -> list[Path]:
    dirs = [vol.replica_dir(r) for r in vol.replicas]
    return [d for d in dirs if d is not None]


def _grow(vol: volumes.Volume, dirs: list[Path], size: int) -> None:
    """The source volume was expanded: expand the standby first (idempotent on a redo)."""
    if size % vol.chunk_size:
        raise CorruptState(f"the source grew to {size} bytes, not a multiple of {vol.chunk_size}")
    for directory in dirs:
        with ChunkStore.open(directory) as local:
            if local.size < size:
                local.expand(size)
    vol.update(lambda config: config.update(size=size))


# -- the follower's status --------------------------------------------------------------------


class Status:
    """``dr-status.json``: what the follower is doing, for ``dr status``. Not durable (it only
    describes a running process); written whole each time, from any thread."""

    def __init__(self, vol: volumes.Volume) -> None:
        self.path = vol.dir / STATUS
        self._lock = threading.Lock()
        previous = read_status(vol)
        self.data: dict[str, Any] = {
            "pid": os.getpid(),
            "state": "standby",
            "progress": None,
            "applying": None,
            "newest_backup": None,
            "last_error": previous.get("last_error"),
            "last_error_at": previous.get("last_error_at"),
            "recovered_at": previous.get("recovered_at"),
            "last_checked": None,
            "current_at": previous.get("current_at"),
            "last_increment": previous.get("last_increment"),
            # (a backup deleted while it was applied: the standby is not current since)
            "deleted_while_applied": previous.get("deleted_while_applied"),
            # (a store request unanswered for longer than STORE_WAIT_SAID: what, since when)
            "waiting_for_store": None,
        }
        self._progress_written = 0.0
        self._final = False

    def update(self, **fields: Any) -> None:
        """Best effort: a status that cannot be written (a full disk) must not stop the
        follower; the log still says what happens."""
        self._write(fields, final=False)

    def finish(self, **fields: Any) -> None:
        """The last word of a follower: a download thread still retrying after it stopped
        writes nothing over it."""
        self._write(fields, final=True)

    def _write(self, fields: dict[str, Any], final: bool) -> None:
        with self._lock:
            if self._final:
                return
            self._final = final
            self.data.update(fields)
            try:
                atomic_write(self.path, json.dumps(self.data, indent=1).encode())
            except OSError as exc:
                log.warning("could not write %s: %s", self.path, exc)

    def error(self, message: str) -> None:
        self.count(errors=1)
        self.update(state="retrying", last_error=message, last_error_at=_now(), recovered_at=None)

    def recovered(self) -> None:
        """A step went through after an error: the error is shown as past, not as current
        (an operator reading an old error for ever looked for a fault long gone)."""
        if self.data.get("last_error") and not self.data.get("recovered_at"):
            self.update(recovered_at=_now())

    def count(self, **amounts: int) -> None:
        """Add to the follower's running totals (what its metrics count)."""
        with self._lock:
            totals = self.data.setdefault("totals", {})
            for key, amount in amounts.items():
                totals[key] = totals.get(key, 0) + amount

    def progress(self, percent: float, done: int | None = None, total: int | None = None) -> None:
        if percent >= 100 or time.monotonic() - self._progress_written > 0.3:
            self._progress_written = time.monotonic()
            self.update(state="applying", progress=round(percent, 1), progress_bytes=[done, total])


def _now() -> str:
    return rfc3339()


# -- the follower -----------------------------------------------------------------------------


def _stop_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # unwinds through the stores' close(): they flush


def run(root: Path, name: str, metrics: str | None = None) -> int:
    """The follower: poll, apply, repeat, until activation, a signal or corruption. With
    ``metrics`` (or the address recorded at ``dr create``), it serves Prometheus metrics."""
    vol = volumes.load(root, name)
    config = dr_config(vol)
    running = follower_pid(vol)
    if running is not None:  # (a unit started after `dr start`, or twice)
        raise Busy(
            f"a follower of {name} runs already (pid {running}): 'lhfs dr stop {name}' first "
            "to run it here"
        )
    held = lock(vol, wait=5.0)  # a `dr status` may hold it for a moment
    signal.signal(signal.SIGTERM, _stop_signal)
    try:
        recover(vol)  # (a follower killed mid-increment: its standby holds a whole backup again)
    except BaseException:
        os.close(held)
        raise
    status = Status(vol)
    address = metrics or config.get("metrics")
    if address:
        from lhfs.backups.follower_metrics import FollowerCollector
        from lhfs.engine.metrics import serve as serve_metrics

        def view() -> dict[str, Any]:
            return {**status.data, "last_restored_created": load_state(vol).get("created")}

        host, port = serve_metrics(address, FollowerCollector(name, view))
        status.update(metrics=f"{host}:{port}")
        log.info("metrics on http://%s:%d/metrics", host, port)
    # (a standby made before the minimum: never faster than it)
    interval = max(MIN_INTERVAL, config["interval"])
    retry_max = max(interval, config["retry_max"])
    store = follower_store(config, status.error)
    cache: dict[str, dict[str, Any]] = {}
    failures = 0
    status.update()
    log.info("following %s of %s every %ss", config["volume"], config["target"], interval)
    stopping = threading.Event()
    threading.Thread(target=_watch_store, args=(store, status, stopping), daemon=True).start()
    try:
        while True:
            vol = volumes.load(root, name)
            if not vol.config.get("dr"):
                return 0  # activated
            wait = interval
            try:
                _step(vol, store, config["volume"], cache, status)
                status.recovered()
                failures = 0
            except BackupDeleted:
                wait = 0  # deleted under us (the increment was undone): on to the newest
            except (CorruptState, InvalidArgument, UsageError, NotPermitted) as exc:
                # corruption, and a configuration no retry changes (a password for a plain
                # store, none or a wrong one for an encrypted one: the next start reads it)
                said = str(exc)
                if not isinstance(exc, CorruptState):
                    said += f"; once fixed, 'lhfs dr start {name}' follows again"
                status.update(
                    state="failed", last_error=said, last_error_at=_now(), recovered_at=None
                )
                log.error("stopped: %s", said)
                return 1
            except Exception as exc:  # everything else may pass: retry with capped backoff
                failures += 1
                message = str(exc) if isinstance(exc, LhfsError) else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    status.error(message)
                    log.warning("attempt %d failed: %s", failures, message)
                wait = min(retry_max, interval * 2**failures) * random.uniform(0.5, 1.0)
            time.sleep(wait)
    finally:
        stopping.set()
        with contextlib.suppress(Exception):
            failed = status.data["state"] == "failed"
            stopped = {"state": "stopped", "progress": None, "waiting_for_store": None}
            status.finish(**({"waiting_for_store": None} if failed else stopped))
        os.close(held)


STORE_WAIT_SAID = 5.0  # seconds a store request waits before the follower's status says so


def _watch_store(store: BackupStore, status: Status, stopping: threading.Event) -> None:
    """Say in the status when a store request has waited longer than ``STORE_WAIT_SAID``,
    and that it no longer does once it ended. The rest of the status changes only as a
    request ends: a store that takes connections and answers nothing left it saying
    ``standby``, no error, for as long as the request's read timeout and retries last."""
    while not stopping.wait(1.0):
        call = store.bucket.waiting()
        said = status.data.get("waiting_for_store")
        if call is not None and time.monotonic() - call[1] > STORE_WAIT_SAID:
            now = {"request": call[0], "since": rfc3339(call[2])}
            if now != said:
                status.update(waiting_for_store=now)
        elif said is not None:
            status.update(waiting_for_store=None)


def _step(
    vol: volumes.Volume,
    store: BackupStore,
    source: str,
    cache: dict[str, dict[str, Any]],
    status: Status,
) -> None:
    newest = newest_backup(store, source, cache)
    # (damaged manifests, said once in the log, are shown for as long as the store holds
    # them: an operator who only reads `dr status` learns why a newer backup is not applied)
    damaged = {name: m[_DAMAGED] for name, m in cache.items() if _DAMAGED in m}
    status.update(
        last_checked=_now(), newest_backup=newest and newest["name"], passed_over=damaged or None
    )
    if newest is None:
        status.update(state="standby")
        return
    state = load_state(vol)
    if newest["name"] != state["backup"] or UNKNOWN in state["blocks"]:
        _not_smaller(newest, vol)  # (said as the last error; nothing is being applied)
        status.update(state="applying", applying=newest["name"], progress=0.0)
        try:
            stats = apply(vol, store, newest, status.progress)
        except BackupDeleted:
            _given_up(status, newest)
            raise
        log.info("applied %s: %s", newest["name"], json.dumps(stats, default=str))
        status.count(bytes=stats["bytes"], increments=1)
        status.update(last_increment={"backup": newest["name"], **stats}, applying=None)
    lost = status.data.get("deleted_while_applied")
    if isinstance(lost, dict) and order(newest) < order({"name": "", **lost}):
        # The newest backup left is older than the one deleted under it: the standby lacks
        # what its source held then, so it is not current (the lag goes on counting).
        status.update(state="standby", progress=None, applying=None)
    else:
        status.update(
            state="standby",
            progress=None,
            applying=None,
            current_at=time.time(),
            deleted_while_applied=None,
        )
    if status.data.get("marked") != newest["name"]:
        _mark(store, vol, source, newest["name"])
        status.update(marked=newest["name"])


def _given_up(status: Status, manifest: dict[str, Any]) -> None:
    """Say that the backup being applied (``manifest``) was deleted from the store: its
    increment was undone, and the follower goes on with the newest backup left."""
    log.warning(
        "backup %s was deleted from the store while it was applied: the increment was "
        "undone; going on with the newest backup left",
        manifest["name"],
    )
    status.update(
        state="standby",
        applying=None,
        progress=None,
        deleted_while_applied={
            "backup": manifest["name"],
            "taken": taken_at(manifest),
            "started": float(manifest.get("started") or 0.0),
            "at": _now(),
        },
    )


def _mark(store: BackupStore, vol: volumes.Volume, source: str, backup: str) -> None:
    """Tell the store which backup this standby holds (``backup prune`` keeps it: the next
    increment compares with it). Read-only credentials cannot: said in the log, not fatal
    (prune may then delete it, and the next increment reads what it needs in full)."""
    try:
        store.mark_standby(source, _standby_id(vol.config["dr"], vol), vol.name, backup)
    except LhfsError as exc:
        log.warning("could not record in the store that this standby holds %s: %s", backup, exc)


def _standby_id(config: dict[str, Any], vol: volumes.Volume) -> str:
    return str(config.get("standby_id") or vol.name)


# -- commands ---------------------------------------------------------------------------------


def standby_endpoint(config: dict[str, Any]) -> Endpoint:
    """The store a standby follows: the endpoint recorded when it was created (whatever the
    environment of the command at hand says), with the credentials of the credentials file
    it names, which win, else of the environment of the process that runs the follower."""
    env = dict(os.environ)
    if config.get("endpoint"):  # (a standby made before endpoints were recorded: the env's)
        env["AWS_ENDPOINT_URL"] = config["endpoint"]
        env["AWS_REGION"] = config.get("region") or ""
    credentials = config.get("credentials_file")
    try:
        return Endpoint.from_env(env, Path(credentials) if credentials else None)
    except UsageError as exc:
        # (no credentials, say: the standby's own settings and environment, not an argument
        # of the command at hand; exit 1 as its follower's `dr start` does)
        raise LhfsError(str(exc)) from None


def create(
    root: Path,
    name: str,
    url: str,
    source: str,
    replicas: int,
    interval: float,
    retry_max: float,
    credentials_file: Path | None = None,
    retry_timeout: float = RETRY_TIMEOUT,
    metrics: str | None = None,
    on_disks: list[str] | None = None,
    notice: Callable[[str], None] | None = None,
) -> volumes.Volume:
    """Create the standby (empty, sized like the newest backup; its replicas under the root,
    or one on each of ``on_disks``) and start its follower. The endpoint is recorded with it
    (never a secret); so is the credentials file, if named. ``notice``: told of each damaged
    manifest passed over, and why the standby holds its source's backing image's content
    itself (``create_as_source``)."""
    target = Target.parse(url)
    check_volume_name(name)
    check_name(source, "source volume name")
    if not MIN_INTERVAL <= interval <= 86400 or not interval <= retry_max <= 86400:
        raise InvalidArgument(
            f"need {MIN_INTERVAL:.0f} <= --interval <= --retry-max <= 86400 seconds (a "
            "follower lists the store at each interval)"
        )
    if name in volumes.list_names(root):
        raise AlreadyExists(f"volume {name} already exists")
    if metrics is not None:
        parse_address(metrics)
    if credentials_file is not None:
        credentials_file = credentials_file.absolute()
    endpoint = Endpoint.from_env(credentials_file=credentials_file)
    bucket = Bucket(target, deadline=retry_timeout, endpoint=endpoint)
    bucket.ensure()
    store = BackupStore(bucket, password=store_password())
    newest = newest_backup(store, source, {}, notice)
    if newest is None:
        raise NotFound(f"{target} holds no complete backup of volume {source}")
    encrypted = store.keys.encrypted  # (read with the manifests: a password fits it)
    refuse_image_backups(source, str(target), newest)
    size = newest["size"]
    config = {
        "target": str(target),
        "endpoint": endpoint.url,
        "region": endpoint.region,
        "credentials_file": credentials_file and str(credentials_file),
        # (read by the follower, as its credentials are: a password never lands in a file
        # of lhfs's own)
        "password_file": str(password_file()) if password_file() else None,
        # (a plain store's follower is given no password, whatever the environment holds)
        "encrypted": encrypted,
        "volume": source,
        "standby_id": secrets.token_hex(8),  # (its marker in the store: see _mark)
        "interval": interval,
        "retry_max": retry_max,
        "created": time.time(),
        "metrics": metrics,
    }
    extra: dict[str, Any] = {"dr": config}
    vol = create_as_source(root, name, newest, replicas, extra, on_disks, notice)
    image = vol.config.get("backing_image")
    count = len(newest["blocks"])
    try:
        held = [None] * count if image is None else _image_blocks(vol, newest["block_size"], count)
        save_state(  # what the new volume reads: zeros, or its backing image's content
            vol,
            {
                "backup": None,
                "created": None,
                "size": size,
                "block_size": newest["block_size"],
                "blocks": held,
                "applying": None,
            },
        )
        start(root, name)
    except BaseException as exc:
        # A standby whose follower cannot start (its metrics address taken, say) would
        # fail every `dr start` the same way: nothing of it is kept.
        with contextlib.suppress(Exception):
            manage.remove(root, name, volume_id=vol.config.get("volume_id"))
        if isinstance(exc, FollowerExited):
            raise LhfsError(
                f"the DR follower exited at once: {exc.said}; standby {name} was not created"
            ) from None
        raise
    return vol


def _image_blocks(vol: volumes.Volume, block: int, count: int) -> list[str | None]:
    """What each of the ``count`` backup blocks of a new standby made on a backing image holds:
    the image's content there, by its digest (None for zeros, as a manifest names them), read
    from a replica's copy (checked against the image's id when it was made). Its increments
    then fetch and write only the blocks whose content differs from the image's."""
    with ChunkStore.open(_replica_dirs(vol)[0]) as local:
        assert local.backing is not None
        path = local.backing.path
    held: list[str | None] = []
    with open(path, "rb") as image:
        for index in range(count):
            if hole_at(image.fileno(), index * block, (index + 1) * block):
                held.append(None)  # (zeros, not read: a thin image is mostly holes)
                continue
            data = os.pread(image.fileno(), block, index * block)
            zero = not data.strip(b"\0")
            held.append(None if zero else digest_of(data + bytes(block - len(data))))
    return held


def start(root: Path, name: str) -> int:
    """Start the follower in the background (no-op when one runs); returns its pid. One
    start at a time (``START_LOCK``): of starts at once, one started the follower and the
    others' followers found it running and exited, which they said as a failure."""
    vol = volumes.load(root, name)
    held = locks.take(
        vol.dir / START_LOCK,
        START_WAIT,
        f"another 'lhfs dr start {name}'{{pid}} has been starting its follower for "
        f"{START_WAIT:.0f}s: try again",
    )
    try:
        return _start(root, volumes.load(root, name))  # (as the start it waited for left it)
    finally:
        os.close(held)


class FollowerExited(LhfsError):
    """A follower that stopped before it started following; ``said``: its last word."""

    def __init__(self, message: str, said: str = "") -> None:
        super().__init__(message)
        self.said = said


START_LOCK = "dr-start.lock"
START_WAIT = 60.0  # seconds a `dr start` waits for another one (which waits 30 s at most)


def _start(root: Path, vol: volumes.Volume) -> int:
    """``start``, holding its lock."""
    name = vol.name
    config = dr_config(vol)
    running = follower_pid(vol)
    if running:
        return running
    activating = config.get("activating")
    if activating and is_lhfs(activating["pid"]):
        raise Busy(f"volume {name} is being activated (pid {activating['pid']})")
    if activating:  # (cut short: following again drops it, and redoes what it began)
        _activation_over(vol)
    load_state(vol)  # (damaged: said here, not by a follower that stops at once)
    env = child_env(store=True)  # (the secrets it reads from files: not in its environment)
    if config.get("credentials_file"):
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(secret, None)
    if config.get("password_file") or config.get("encrypted") is False:
        env.pop("LHFS_BACKUP_PASSWORD", None)
    with open(vol.dir / LOG, "ab") as log_file:
        proc = subprocess.Popen(
            [LHFS, "--root", str(root), "dr", "run", name, "--log", str(vol.dir / LOG)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
            env=env,
        )
    wait_for(
        lambda: read_status(vol).get("pid") == proc.pid or proc.poll() is not None,
        30,
        "the DR follower to start",
    )
    # Started means it took the lock and said so; one that then stops at once (it met a corrupt
    # block) has started, and `dr status` tells why it stopped.
    if read_status(vol).get("pid") != proc.pid:
        said = logs.last_line(vol.dir / LOG).removeprefix("lhfs: error: ")
        raise FollowerExited(f"the DR follower exited at once: {said} (see {vol.dir / LOG})", said)
    return proc.pid


def stop_following(root: Path, name: str) -> bool:
    """Stop the follower of standby ``name``; whether one was running (a stopped one is left
    stopped, and said to be)."""
    vol = volumes.load(root, name)
    dr_config(vol)
    running = follower_pid(vol) is not None
    os.close(stop(vol))
    return running


def _follow_again(root: Path, name: str, was_following: bool) -> str:
    """After a command that stopped the follower failed: start it again if it ran; what to
    add to the error (nothing if it did not run, or does not start)."""
    if was_following:
        with contextlib.suppress(Exception):
            start(root, name)
            return ", following again"
    return ""


def remove(root: Path, name: str, keep_marker: bool, retry_timeout: float) -> str | None:
    """Delete the standby volume ``name`` and its marker in the store: ``backup prune`` keeps
    the backup a marker names (the standby's next increment reads it), so a standby that is
    gone must not hold that backup for ever. The follower stops first and its lock is held
    until the volume is gone, so that no follower marks again meanwhile. A marker that cannot
    be removed (a store that does not answer, no credentials here, credentials that may not
    delete) keeps the volume as it was, following again if it did, unless ``keep_marker``
    (which leaves the marker: ``dr forget`` removes it later). Returns the target the marker
    was removed from (None: left)."""
    vol = volumes.load(root, name)
    config = dr_config(vol)
    manage.check_removable(vol)
    was_following = follower_pid(vol) is not None
    held, vol, config = _take_over(vol)
    try:
        if not keep_marker:
            try:
                _unmark(config, vol, retry_timeout)
            except LhfsError as exc:
                raise LhfsError(
                    f"its marker as a DR standby in {config['target']} could not be removed "
                    f"({exc}); try again once the store answers, or add --keep-marker and "
                    f"remove the marker later with {forget_hint(name, config)}"
                ) from None
        manage.remove(root, name, follower_stopped=True)
    except BaseException as exc:  # (as activate: left as it was, following again if it did)
        os.close(held)
        again = _follow_again(root, name, was_following and vol.dir.exists())
        if isinstance(exc, LhfsError):
            raise LhfsError(f"volume {name} was kept{again}: {exc}") from None
        raise
    os.close(held)
    return None if keep_marker else config["target"]


def forget(
    root: Path, target: str, volume: str, label: str, marker: str | None, retry_timeout: float
) -> list[str]:
    """Remove from ``target`` the marker of the DR standby ``label`` of ``volume`` (one removed
    with ``volume rm --keep-marker``, or lost with its host): prune stops keeping the backup
    it names, which is returned. Never the marker of a standby of this root that still follows
    there; of several standbys by that name (on other hosts), the one ``marker`` names (the id
    prune shows)."""
    where = Target.parse(target)
    if marker is not None and not NAME.fullmatch(marker):
        raise InvalidArgument(
            f"--id {marker!r} is not a marker's id (16 hex digits as prune shows it, or a "
            "standby's name)"
        )
    following: dict[str, Any] = {}
    vol = None
    with contextlib.suppress(LhfsError, OSError, ValueError):  # (no such volume here)
        vol = volumes.load(root, label)
    if vol is not None and vol.config.get("dr"):
        following = dr_config(vol)  # (damaged: said, naming the field; never guessed at)
    here = None  # the marker of the standby by that name that follows here, if any
    if following.get("volume") == volume and str(Target.parse(following["target"])) == str(where):
        here = str(following.get("standby_id") or label)
    store = open_store(where, retry_timeout)
    marks = [
        m
        for m in store.standby_marks(volume)
        if m["standby"] == label and m["id"] != here and marker in (None, m["id"])
    ]
    if not marks:
        if here is not None and any(m["id"] == here for m in store.standby_marks(volume)):
            raise WrongState(
                f"the marker of standby {label} in {target} is this root's, and {label} still "
                f"follows {volume} here: 'lhfs volume rm {label}' removes both"
            )
        raise NotFound(
            f"{target} holds no marker of a DR standby {label} of {volume}"
            + (f" with id {marker}" if marker else "")
        )
    if len(marks) > 1:
        ids = ", ".join(m["id"] for m in marks)
        raise InvalidArgument(
            f"{len(marks)} standbys named {label} hold markers (ids {ids}): say which with --id"
        )
    store.unmark_standby(volume, marks[0]["id"])
    return [marks[0]["backup"]]


def status(root: Path, name: str) -> dict[str, Any]:
    vol = volumes.load(root, name)
    config = dr_config(vol)
    state = load_state(vol)
    current = read_status(vol)
    running = follower_pid(vol) is not None
    activating = config.get("activating")
    activation = activating and {**activating, "interrupted": not is_lhfs(activating["pid"])}
    if not running and activation and not activation["interrupted"]:
        shown = "activating"
    elif not running:
        shown = "failed" if current.get("state") == "failed" else "stopped"
    elif current.get("state") in ("retrying", "failed"):
        shown = current["state"]
    elif state["backup"] is None:
        shown = "restoring"
    else:
        shown = current.get("state", "standby")
    since = current.get("current_at") or config["created"]
    passed = current.get("passed_over")  # (damaged manifests the last poll passed over)
    # (an increment a kill cut short: undone by the next start or activation)
    cut_short = None if running or shown == "activating" else state.get("applying")
    return {
        "name": name,
        "state": shown,
        "source_volume": config["volume"],
        "target": config["target"],
        "endpoint": config.get("endpoint"),
        "last_restored_backup": state["backup"],
        "last_restored_created": state.get("created"),
        "newest_backup": current.get("newest_backup"),
        "applying": current.get("applying") if running else None,
        "interrupted_increment": cut_short,
        "progress": current.get("progress") if running else None,
        "lag_seconds": round(max(0.0, time.time() - since), 1),
        "last_error": current.get("last_error"),
        "last_error_at": current.get("last_error_at"),
        "last_error_recovered_at": current.get("recovered_at"),  # (None: not since)
        "last_checked": current.get("last_checked"),
        # (a store request unanswered for some seconds: {"request": ..., "since": ...})
        "waiting_for_store": current.get("waiting_for_store") if running else None,
        "last_increment": current.get("last_increment"),
        "passed_over": passed if isinstance(passed, dict) else None,  # (backup -> why)
        # (the backup it was applying when it was deleted from the store: not current since)
        "deleted_while_applied": _deleted_said(current.get("deleted_while_applied")),
        "follower_pid": current.get("pid") if running else None,
        "metrics": current.get("metrics") if running else None,
        "activation": activation or None,  # (one under way, or one a kill cut short)
    }


def _deleted_said(found: Any) -> dict[str, Any] | None:
    """What ``dr-status.json`` says of a backup deleted while it was applied (its name and
    when), or None."""
    if not isinstance(found, dict) or not isinstance(found.get("backup"), str):
        return None
    return {"backup": found["backup"], "at": found.get("at")}


def activate(
    root: Path,
    name: str,
    offline: bool,
    progress: Callable[..., None],
    retry_timeout: float = RETRY_TIMEOUT,
    notice: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Stop following, bring the volume to the newest complete backup (or, ``offline``, keep
    the last one fully restored) and make it a normal volume (``notice``: told of each
    damaged manifest passed over). It reaches the store the standby
    records, whatever this command's environment says; an activation that fails leaves the
    standby as it was: following again if a follower ran, stopped if none did."""
    vol = volumes.load(root, name)
    config = dr_config(vol)
    was_following = follower_pid(vol) is not None
    held, vol, config = _take_over(vol)
    try:
        vol.update(lambda c: c["dr"].update(activating={"pid": os.getpid(), "started": _now()}))
        backup, kept = _activate(root, vol, config, offline, progress, retry_timeout, notice)
    except BaseException as exc:  # (any failure, a full disk or Ctrl-C too)
        _activation_over(vol)
        os.close(held)
        again = _follow_again(root, name, was_following)
        if isinstance(exc, LhfsError):  # still a standby, as it was
            exc.args = (f"{exc} (still a standby{again})",)
            raise exc from None
        raise
    os.close(held)
    return {
        "name": name,
        "backup": backup,
        "marker_removed_from": None if kept else config["target"],
        "marker_kept": kept
        and (
            f"its marker as a DR standby stays in {config['target']} ({kept}): "
            f"{forget_hint(name, config)} removes it"
        ),
    }


def _take_over(vol: volumes.Volume) -> tuple[int, volumes.Volume, dict[str, Any]]:
    """Stop the standby's follower and hold its lock (see ``standby.stop``); the standby and
    its ``dr`` section read again then: another activation or removal may have finished
    while this command waited for the lock. The loser says in one line that the volume is
    not a standby, or not there (the lock let go)."""
    try:
        held = stop(vol)
    except FileNotFoundError:  # (its directory went while this waited: removed)
        raise NotFound(f"no volume named {vol.name!r}: removed meanwhile") from None
    try:
        vol = volumes.load(vol.root, vol.name)
        return held, vol, dr_config(vol)
    except BaseException:
        os.close(held)
        raise


def _activation_over(vol: volumes.Volume) -> None:
    """Take back the record that an activation began (``activating`` in the standby's
    section, written before anything changes: one cut short by a kill leaves it, and ``dr
    status`` then says the standby was partly changed by an activation, and what to run)."""

    def change(config: dict[str, Any]) -> None:
        if config.get("dr"):
            config["dr"].pop("activating", None)

    with contextlib.suppress(Exception):  # (what failed is what is reported)
        vol.update(change)


def forget_hint(name: str, config: dict[str, Any]) -> str:
    """The command that removes the marker a standby left in its store."""
    return f"'lhfs dr forget {name} --target {config['target']} --volume {config['volume']}'"


def _standby_bucket(config: dict[str, Any], deadline: float, **kw: Any) -> Bucket:
    """The bucket a standby follows, at the endpoint it recorded."""
    target = Target.parse(config["target"])
    return Bucket(target, deadline=deadline, endpoint=standby_endpoint(config), **kw)


def _standby_store(config: dict[str, Any], deadline: float, **kw: Any) -> BackupStore:
    """The store a standby follows, as it recorded it (endpoint, password file; no password
    for a plain store, whatever the environment holds for another)."""
    bucket = _standby_bucket(config, deadline, **kw)
    plain = config.get("encrypted") is False
    password = None if plain else store_password(config.get("password_file"))
    return BackupStore(bucket, password=password)


MIN_INTERVAL = 1.0  # seconds between a follower's polls, at least (each lists the store)
FOLLOWER_PATIENCE = "the follower tries again later"
FOLLOWER_DEADLINE = 30.0  # seconds a follower's store call is retried before the step fails


def follower_store(
    config: dict[str, Any], on_retry: Callable[[str], None], deadline: float = FOLLOWER_DEADLINE
) -> BackupStore:
    """The follower's store: a call is retried for ``deadline`` seconds, then the step fails
    and is tried again with backoff; its errors (shown by ``dr status`` and ``dr create``)
    say so, not to pass ``--retry-timeout``, which the follower does not take."""
    return _standby_store(config, deadline, on_retry=on_retry, patience=FOLLOWER_PATIENCE)


def _unmark(config: dict[str, Any], vol: volumes.Volume, deadline: float) -> None:
    """Take the standby's marker out of its store (deleting it needs no password)."""
    store = BackupStore(_standby_bucket(config, deadline))
    store.unmark_standby(config["volume"], _standby_id(config, vol))


def _activate(
    root: Path,
    vol: volumes.Volume,
    config: dict[str, Any],
    offline: bool,
    progress: Callable[..., None],
    retry_timeout: float,
    notice: Callable[[str], None] | None = None,
) -> tuple[str, str | None]:
    """The backup the volume holds once activated, and why its standby marker could not be
    taken out of the store (None: it was). Offline, the store is asked briefly: it may be
    gone."""
    recover(vol)  # (an increment a kill cut short: the last whole backup again)
    state = load_state(vol)
    if offline:
        if state["backup"] is not None and UNKNOWN in state["blocks"]:
            raise WrongState(
                f"volume {vol.name} holds no whole backup: blocks of an increment cut short are "
                f"unknown; it cannot be activated offline: 'lhfs dr start {vol.name}' rewrites "
                "them once the store answers"
            )
        if state["backup"] is None:
            raise WrongState(
                f"volume {vol.name} holds no fully restored backup: it cannot be activated offline"
            )
        backup = state["backup"]
    else:
        store = _standby_store(config, retry_timeout)
        newest = newest_backup(store, config["volume"], {}, notice)
        if newest is None:
            raise NotFound(
                f"{config['target']} holds no backup of {config['volume']}: --offline activates "
                "the last one this standby restored"
            )
        held = state["backup"]
        _not_smaller(
            newest,
            vol,
            f"'lhfs dr activate {vol.name} --offline' activates the last one it restored ({held})"
            if held and UNKNOWN not in state["blocks"]
            else "activate it once a newer backup is made",
        )
        apply(volumes.load(root, vol.name), store, newest, progress)
        backup = newest["name"]
    activated = {**config, "backup": backup, "activated": _now()}

    def change(c: dict[str, Any]) -> None:
        c.pop("dr", None)
        c["activated_from"] = activated

    vol.update(change)
    # (a normal volume now: what only a standby needs goes; its log stays, for `lhfs logs`)
    for leftover in (STATUS, STATE, UNDO, LOCK, START_LOCK):
        with contextlib.suppress(FileNotFoundError):
            (vol.dir / leftover).unlink()
    try:  # (a normal volume now: prune need not keep what its marker names)
        _unmark(config, vol, min(retry_timeout, OFFLINE_ASK) if offline else retry_timeout)
    except LhfsError as exc:
        return backup, str(exc)
    return backup, None
