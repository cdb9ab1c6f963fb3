"""Volumes and the backup store: back a snapshot up, list, delete, restore into a new volume.

A backup always reads a snapshot, never the live head: the volume may go on changing. An
attached volume is snapshotted through its engine and read from one healthy replica process
(another one holding the snapshot if that one is lost meanwhile); a detached one is snapshotted
and read on its local replica directories.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlparse

import xxhash

from backupstore.keys import read_password
from backupstore.s3 import RETRY_TIMEOUT, Bucket, Target, check_url_text
from backupstore.store import (
    BackupStats,
    BackupStore,
    Collection,
    check_block_size,
    digest_of,
    snapshot_time,
)
from lhfs.config import volume as volumes
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    ConnectionLost,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    UsageError,
    WrongState,
)
from lhfs.core.names import IMAGE_BACKUPS, check_backup_name, check_name, check_volume_name
from lhfs.core.procs import wait_for
from lhfs.engine import control, housekeeping
from lhfs.store.backing import hole_at
from lhfs.store.chunkstore import ChunkStore
from lhfs.store.layer import pwrite_all
from lhfs.volumes import attachment, images, manage

if TYPE_CHECKING:
    from lhfs.wire.client import SyncReplica

_WRITERS = 4  # restore writes in flight through the engine
_WRITEBACK_EVERY = 64 << 20  # a restore pushes its data to disk in the background this often
_KEPT = 64 << 20  # bytes a restore on a backing image keeps of the image read (not read again)
_SUM = 16  # bytes of a chunk's digest (xxh3-128)
# Seconds a replica a backup reads from may take to answer ``changed_blocks``, which walks the
# chain's chunk maps (on a large volume longer than an I/O timeout); reads answer within that.
CHANGES_TIMEOUT = 60.0
DROP_WAIT = 10.0  # seconds a failed backup waits for the volume to remove its snapshot


def backup_url(target: Target, volume: str, name: str) -> str:
    return f"{target}?{urlencode({'volume': volume, 'backup': name})}"


_FORM = "s3://BUCKET/PREFIX?volume=V&backup=B"


def parse_backup_url(url: str) -> tuple[Target, str, str]:
    """``s3://BUCKET/PREFIX?volume=V&backup=B``, every part checked (one line, exit 2)."""
    check_url_text(url, _FORM)
    parsed = urlparse(url)
    try:
        query = parse_qs(parsed.query, strict_parsing=True)
    except ValueError:
        query = {}
    if (
        set(query) != {"volume", "backup"}
        or any(len(v) != 1 for v in query.values())
        or "#" in url  # (a fragment, which a target refuses too)
    ):
        raise UsageError(f"not a backup URL: {url!r} ({_FORM})")
    target = Target.parse(url.split("?", 1)[0])
    volume = check_name(query["volume"][0], "volume name in the backup URL")
    return target, volume, check_backup_name(query["backup"][0], "backup name in the backup URL")


def _not_an_image_backup(root: Path, volume: str) -> None:
    """Refuse to back up an older volume named ``image-X`` while an image ``X`` is registered:
    both would be kept as the store's volume ``image-X``, and a prune of one would delete the
    other's backups."""
    image = volume.removeprefix(IMAGE_BACKUPS)
    if volume != image and image in {i["name"] for i in images.list_images(root)}:
        raise WrongState(
            f"volume {volume} and backing image {image} would share their backups: rename "
            f"the image ('backing-image rm {image}', then create it again under another name)"
        )


def refuse_image_backups(volume: str, what: str, manifest: dict[str, Any]) -> None:
    """A backing image's backups are kept as those of the volume ``image-<name>``: no volume
    is made from them (a restore, a DR standby), which would be a volume of the image's bytes
    with a chunk size guessed from its size, if any fits. Told apart by the manifest: a
    volume's names its chunk size (a volume of such a name made before they were kept for
    images is backed up and restored as any other)."""
    if volume.startswith(IMAGE_BACKUPS) and manifest.get("chunk_size") is None:
        raise InvalidArgument(
            f"{what}: the backups of {volume} are the backing image "
            f"{volume.removeprefix(IMAGE_BACKUPS)}'s, not a volume's; a backing image is "
            "restored with the system backup that holds it ('lhfs system restore')"
        )


def chunk_for(manifest: dict[str, Any]) -> int:
    """The chunk size of a volume made from a backup: the default 64 KiB, or smaller when the
    size needs it or the source used smaller chunks (the source may grow by one of its own
    chunks, which must stay a whole number of ours)."""
    size = manifest["size"]
    chunk = min(64 << 10, manifest.get("chunk_size") or 64 << 10)
    while size % chunk:
        chunk //= 2
    return chunk


def _backup_name(prefix: str) -> str:
    """A new backup's name: its snapshot (or image), the time, and a random part, so that two
    backups of the same thing started in the same millisecond never share a name (one would
    overwrite the other's manifest)."""
    return f"{prefix}-{int(time.time() * 1000) % 10**9}-{secrets.token_hex(2)}"


_password_file: Path | None = None  # what --password-file named for this process


def use_password_file(path: Path | None) -> None:
    """The password of the stores this process opens comes from ``path`` (``--password-file``)
    rather than from ``$LHFS_BACKUP_PASSWORD``."""
    global _password_file
    _password_file = None if path is None else path.absolute()


def store_password(recorded: str | None = None) -> bytes | None:
    """The password to open a store with: ``--password-file``, else a password file recorded
    for the store (``recorded``: a DR standby's), else ``$LHFS_BACKUP_PASSWORD``, else none."""
    if _password_file is None and recorded:
        return read_password(Path(recorded))
    return read_password(_password_file)


def password_file() -> Path | None:
    return _password_file


def open_store(
    target: Target,
    retry_timeout: float = RETRY_TIMEOUT,
    notice: Callable[[str], None] | None = None,
) -> BackupStore:
    """The store of ``target``, its calls retried for at most ``retry_timeout`` seconds;
    ``notice`` tells the operator what happens meanwhile (see ``BackupStore``)."""
    bucket = Bucket(target, deadline=retry_timeout)
    return BackupStore(bucket, password=store_password(), notice=notice)


def _reader(
    replica: dict[str, Any], key: Any, cas: dict[str, str | None], timeout: float
) -> SyncReplica:
    """A reading connection to an attached volume's replica: by its local socket when this
    host runs it, else by its address (over TLS with its CA, if it has one). It gives up on
    a replica silent for ``timeout`` seconds (the volume's I/O timeout: the engine's own
    deadline for it), rather than wait for TCP to find a cut link dead."""
    from lhfs.wire.client import SyncReplica

    local = replica.get("local_socket")
    address, ca = replica["address"], cas.get(replica["id"])
    return SyncReplica(address, key, timeout=timeout, tls_ca=ca, local=local)


class _Source:
    """Where a backup reads its snapshot: a healthy replica process of an attached volume, or
    the freshest local directory of a detached one. Before anything is read it learns, from
    every healthy replica that answers, the snapshot's layer id there and the replica's
    rebuild count: what the next backup needs to take its changed blocks from the chain.
    An attached volume's replica lost while it is read (its host cut: silent for the volume's
    I/O timeout, or its connection broken) is left for the next one the engine still has RW
    and that holds the snapshot: the snapshot was taken on every replica with I/O drained, so
    each holds the same bytes, and the backup goes on where it was.
    A detached volume is held against an attach (``attachment.exclusive``, by
    ``manage._detached``) until the source is closed: an attach meanwhile found its replica
    directories taken, failed them and rebuilt them for nothing (or, with one replica,
    failed). So a source is made only once the backup reads (``BackupStore.running``: after
    its waits), and the volume's configuration is read again under the lock (a ``replica
    rm`` just before left it opening a directory that was gone)."""

    def __init__(
        self, vol: volumes.Volume, snapshot: str, notice: Callable[[str], None] | None = None
    ) -> None:
        self.snapshot = snapshot
        self.vol = vol
        self.notice = notice
        self.remote: SyncReplica | None = None
        self.readers: list[dict[str, Any]] = []  # (attached: the replicas to read, in order)
        self.local: ChunkStore | None = None
        self.bases: dict[str, dict[str, Any]] = {}
        self.engine: dict[str, Any] | None = None  # (the runtime record of the one read through)
        self.held = contextlib.ExitStack()
        try:
            now = None
            if vol.runtime() is None:  # (read again under its lock, as the last command left it)
                now = self.held.enter_context(manage._detached(vol))
            if now is None:  # attached (maybe meanwhile): read through its replica processes
                self.held.close()
                now = volumes.load(vol.root, vol.name)
            self._open(now, snapshot)
        except BaseException:
            self.held.close()
            raise

    def _open(self, vol: volumes.Volume, snapshot: str) -> None:
        self.engine = vol.runtime()
        if self.engine is not None:
            info = control.call(vol.control_socket, "info")
            healthy = [r for r in info["replicas"] if r["mode"] == "RW"]
            if not healthy:
                raise NotFound(f"volume {vol.name} has no healthy replica to read from")
            self.key, self.timeout = vol.key(), vol.setting("io_timeout")
            self.cas = {r["id"]: r.get("tls_ca") for r in vol.replicas}
            remote = {r["id"] for r in vol.replicas if not r.get("local")}
            # local replicas first: a snapshot is read without crossing a network if it can be
            healthy.sort(key=lambda replica: replica["id"] in remote)
            # (the last replica out of reach, and whether any answered: when none did, their
            # link is what is wrong, not the snapshot; said as "no snapshot" it sent the
            # operator looking for a snapshot that is there)
            lost: tuple[str, ConnectionLost] | None = None
            answered = False
            for replica in healthy:
                try:
                    other = _reader(replica, self.key, self.cas, self.timeout)
                    try:
                        self.bases[replica["id"]] = _base_of(
                            other.call("list_layers"), other.call("info"), snapshot
                        )
                    finally:
                        other.close()
                except ConnectionLost as exc:
                    lost = (replica["id"], exc)
                except LhfsError:
                    answered = True
            self.readers = [r for r in healthy if r["id"] in self.bases]
            if not self.readers and lost is not None and not answered:
                raise ConnectionLost(
                    f"volume {vol.name}: no healthy replica answered; replica {lost[0]}: {lost[1]}"
                )
            if not self.readers:
                raise NotFound(f"volume {vol.name} has no snapshot {snapshot!r}")
            self.replica_id = self.readers[0]["id"]
            try:
                self.remote = _reader(self.readers[0], self.key, self.cas, self.timeout)
            except ConnectionLost as exc:  # (lost since it answered: the next one)
                self._switch(exc)
        else:  # each healthy replica opened once; the freshest is read
            opened: list[tuple[Path, ChunkStore]] = []
            try:
                for directory in manage.healthy_local_dirs(vol):
                    opened.append((directory, ChunkStore.open(directory)))
                for directory, store in opened:
                    with contextlib.suppress(LhfsError):
                        self.bases[directory.name] = _base_of(
                            store.list_layers(), store.info(), snapshot
                        )
                freshest, self.local = max(opened, key=lambda entry: entry[1].revision)
                self.replica_id = freshest.name
            finally:
                for _, store in opened:
                    if store is not self.local:
                        store.close()
        if self.replica_id not in self.bases:
            self.close()
            raise NotFound(f"volume {vol.name} has no snapshot {snapshot!r}")
        self.size = self.bases[self.replica_id]["size"]

    def changed_blocks(self, record: dict[str, Any] | None, block: int) -> list[int] | None:
        """Blocks changed since the recorded base, or None when the chain cannot tell."""
        if self.remote is not None:  # (asked of the replica read from: another one's base)
            return self._remotely(lambda remote: self._changed(record, block), CHANGES_TIMEOUT)
        return self._changed(record, block)

    def _changed(self, record: dict[str, Any] | None, block: int) -> list[int] | None:
        base = (record or {}).get("layers", {}).get(self.replica_id)
        here = self.bases[self.replica_id]
        if not isinstance(base, dict) or base.get("rebuilds") != here["rebuilds"]:
            return None  # unknown, or this replica was rebuilt since: its layers were rewritten
        if self.remote is not None:
            return self.remote.call(
                "changed_blocks", base=base["layer"], top=self.snapshot, block_size=block
            )
        assert self.local is not None
        return self.local.changed_blocks(base["layer"], self.snapshot, block)

    def read(self, index: int, block: int) -> bytes | bytearray:
        """One backup block of the snapshot, zero-padded past its end."""
        length = min(block, self.size - index * block)
        data: bytes | bytearray
        if self.remote is not None:
            data = self._remotely(
                lambda remote: remote.read_snapshot(self.snapshot, index * block, length),
                self.timeout,
            )
        else:
            assert self.local is not None
            data = self.local.read_snapshot(self.snapshot, index * block, length)
        return data if length == block else bytes(data) + bytes(block - length)

    def _remotely(self, ask: Callable[[SyncReplica], Any], timeout: float) -> Any:
        """``ask`` the replica read from, within ``timeout`` seconds of silence; a replica
        lost meanwhile is left for the next one (``_switch``) and that one is asked."""
        while True:
            assert self.remote is not None
            self.remote.settimeout(timeout)
            try:
                return ask(self.remote)
            except ConnectionLost as exc:
                self._switch(exc)

    def _switch(self, error: ConnectionLost) -> None:
        """Read on from the next replica that holds the snapshot and that the engine still
        has RW (one it failed is most likely out of reach too); ``error`` (the lost one's,
        said) if none is left, or the engine is gone (``create`` says so)."""
        lost = self.replica_id
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        self.readers = [r for r in self.readers if r["id"] != lost]
        try:
            replicas = control.call(self.vol.control_socket, "info")["replicas"]
        except LhfsError:  # (detached meanwhile: its replicas end with it)
            raise error from None
        modes = {r["id"]: r["mode"] for r in replicas}
        why = str(error)
        for replica in [r for r in self.readers if modes.get(r["id"]) == "RW"]:
            try:
                self.remote = _reader(replica, self.key, self.cas, self.timeout)
            except LhfsError as exc:  # (that one is gone too: the next)
                why = str(exc)
                continue
            self.replica_id = replica["id"]
            if self.notice is not None:
                self.notice(f"replica {lost} was lost ({error}): reading on from {self.replica_id}")
            return
        also = f" ({why})" if why != str(error) else ""
        raise ConnectionLost(
            f"replica {lost} was lost ({error}), and no other healthy replica holding snapshot "
            f"{self.snapshot} answers{also}"
        )

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.local is not None:
            self.local.close()
        self.held.close()


def _changes(
    source: _Source, record: dict[str, Any] | None, block: int, chunk: int
) -> tuple[list[int] | None, tuple[int, dict[int, set[int]]] | None]:
    """The backup blocks changed since the recorded base, and which of their chunks did (for
    deltas: see ``backupstore.deltas``); asked of the chain at the chunk's granularity when a
    chunk is a small part of a block, else (or when too many changed to list) per block."""
    if chunk * 4 <= block:
        fine = source.changed_blocks(record, chunk)
        if fine is not None:
            ratio = block // chunk
            per_block: dict[int, set[int]] = {}
            for unit in fine:
                per_block.setdefault(unit // ratio, set()).add(unit % ratio)
            return sorted(per_block), (chunk, per_block)
    return source.changed_blocks(record, block), None


def _base_of(layers: list[dict[str, Any]], info: dict[str, Any], snapshot: str) -> dict[str, Any]:
    for layer in layers:
        if snapshot in (layer["name"], layer["id"]):
            size = layer["volume_size"]
            return {
                "layer": layer["id"],
                "size": size,
                "rebuilds": info["rebuilds"],
                "created": layer["created"],  # (orders the backup among the volume's)
            }
    raise NotFound(f"no snapshot {snapshot!r}")


def create(
    root: Path,
    name: str,
    url: str,
    snapshot: str | None,
    progress: Any,
    block_size: int | None = None,
    create_bucket: bool = False,
    retry_timeout: float = RETRY_TIMEOUT,
    notice: Callable[[str], None] | None = None,
    full: bool = False,
) -> tuple[str, BackupStats]:
    """Back a snapshot up (a new one unless named). Incremental from the snapshot chain when
    this volume's last backup to the same target is still there, its snapshot still lies below
    and the replica read from was not rebuilt since: only blocks touching chunks written since
    are read. The volume's configuration keeps, per target, that backup and its snapshot's
    layer id and rebuild count on each replica. ``full``: every block read and sent again
    (see ``BackupStore.create``)."""
    started = time.time()
    target = Target.parse(url)
    vol = volumes.load(root, check_name(name, "volume name"))  # (an older image-* one too)
    _not_an_image_backup(root, name)
    vol.require_not_standby("a backup")
    vol.require_complete("a backup")
    if block_size is not None:
        check_block_size(block_size)
    # Nothing is changed before the input is found good: a named snapshot must exist, and what
    # the store refuses (a bad endpoint, no access, another block size than it records) is
    # said before a snapshot is taken for the backup.
    if snapshot is not None:  # (opened again to be read, once the store's waits are over)
        _Source(vol, check_name(snapshot, "snapshot name")).close()
    held = contextlib.ExitStack()  # (the hold on the snapshot: until its record is saved)
    backup_name, made = None, False
    engine = None  # (the engine the snapshot is read through, if any: its end is said as such)
    with held:
        try:
            store = open_store(target, retry_timeout, notice)
            store.bucket.ensure(create=create_bucket)
            store.check_password()  # (before a snapshot is taken for the backup)
            block = store.block_size(name, block_size)
            taken = started
            if snapshot is None:
                stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
                snapshot = f"backup-{stamp}"
                held.enter_context(housekeeping.hold(vol, snapshot))  # before it exists
                taken = time.time()  # (this host's clock, to the instant: orders the backup)
                manage.snapshot_create(root, name, snapshot, system=True)
                made = True
            else:
                held.enter_context(housekeeping.hold(vol, snapshot))
            backup_name = _backup_name(snapshot)
            with (
                store.running(name, backup_name),  # (its waits first; the volume opened after)
                contextlib.closing(_Source(vol, snapshot, notice)) as source,
            ):
                engine = source.engine
                if not made:  # its layer's time (a replica's clock, to the second), if earlier
                    layer = snapshot_time(source.bases[source.replica_id]["created"])
                    taken = started if layer is None else min(layer, started)
                record = vol.config.get("backups", {}).get(str(target))
                changed, units = (
                    (None, None) if full else _changes(source, record, block, vol.chunk_size)
                )
                base = None if changed is None or record is None else (record["backup"], changed)
                _manifest, stats = store.create(
                    name,
                    backup_name,
                    source.size,
                    source.read,
                    snapshot=snapshot,
                    block_size=block,
                    progress=progress,
                    base=base,
                    extra=_recorded(vol),
                    units=units,
                    taken=taken,
                    full=full,
                )
        except LhfsError as exc:  # (a refusal before the backup began left nothing: as it is)
            failed = exc
            if isinstance(exc, ConnectionLost) and engine:
                failed = _engine_gone(vol, engine) or exc
            if backup_name is not None or failed is not exc:  # what failed, and what it left
                left = _drop_snapshot(vol, snapshot) if made and snapshot else ""
                failed.args = (f"backup of {name} failed: {failed}{left}",)
            if failed is exc:
                raise
            raise failed from None
        done = {
            "backup": backup_name,
            "snapshot": snapshot,
            "layers": source.bases,
            # (what the metrics of an attached volume report of its last backup to the target)
            "timestamp": time.time(),
            "duration": round(time.time() - started, 3),
            "uploaded": stats.uploaded_bytes,
        }
        vol.update(lambda config: config.setdefault("backups", {}).update({str(target): done}))
    return backup_url(target, name, backup_name), stats


def _drop_snapshot(vol: volumes.Volume, snapshot: str) -> str:
    """Remove the snapshot a failed backup took for itself (still held by it: housekeeping
    keeps off), so that a failure leaves no layer in the chain that every read past the head
    pays for; what is left, for the failure's line ("" when nothing). Left alone when another
    process took it over meanwhile (a backup that named it holds it now, or a backup to
    another target recorded it): it is theirs. Crash-safe as any snapshot removal (the
    intent is recorded first and finished by whoever next works on the replicas); a kill
    leaves the snapshot to housekeeping, as does a removal that fails, or waits for a command
    that holds the volume for more than ``DROP_WAIT`` seconds."""
    try:
        with attachment.exclusive(vol, wait=DROP_WAIT, busy="another command{pid} holds it"):
            # (asked under the lock: a backup that names it while this waited takes it over)
            config = volumes.load(vol.root, vol.name).config
            recorded = {str(r.get("snapshot")) for r in (config.get("backups") or {}).values()}
            if housekeeping.holders(config).get(snapshot) != os.getpid() or snapshot in recorded:
                return f"; its snapshot {snapshot} stays: another backup holds it now"
            manage.snapshot_remove(vol.root, vol.name, snapshot)
    except LhfsError as exc:
        return f"; its snapshot {snapshot} stays until housekeeping trims it (not removed: {exc})"
    return ""


def _recorded(vol: volumes.Volume) -> dict[str, Any]:
    """What a volume's manifest records of it beyond its blocks: its chunk size (a volume
    restored from it grows as it does) and, if it stands on one, its backing image's content
    id (a restore puts it back on the image of that content, if the root has one, and
    fetches only what differs from it)."""
    recorded: dict[str, Any] = {"chunk_size": vol.chunk_size}
    image, called = vol.config.get("backing_image"), vol.config.get("backing_image_name")
    if image:
        recorded["backing_image"] = image
        if called:  # (the name it was made from, to say which image a restore lacks)
            recorded["backing_image_name"] = called
    return recorded


def _engine_gone(vol: volumes.Volume, engine: dict[str, Any]) -> LhfsError | None:
    """Why a backup's connection to a replica of an attached volume broke, when the engine
    it read through (``engine``, its runtime record) is gone (its replicas end with it: not
    a fault of the one read): detached meanwhile, detached and attached again (another
    engine now), or died. None while that engine is still the volume's: a replica broke,
    and its own error says so. A detach under way holds the command lock until its engine
    is gone: waited for a few seconds only (``exclusive``'s ``force`` wait, then on without
    it), never minutes before an error that is known already."""
    with contextlib.suppress(LhfsError), attachment.exclusive(vol, force=True):
        pass  # (a detach under way is over, or still under way after a few seconds)
    record = vol.runtime_record()
    if record is None:
        return WrongState(f"volume {vol.name} was detached during the backup")
    if record["pid"] != engine["pid"] and attachment.engine_alive(vol, record):
        return WrongState(f"volume {vol.name} was detached and attached again during the backup")
    if attachment.engine_alive(vol, engine):
        return None
    return WrongState(
        f"the engine of {vol.name} died (the volume crashed: 'lhfs volume info {vol.name}' "
        "says what it left)"
    )


def init_store(
    url: str, encrypt: bool, create_bucket: bool = False, retry_timeout: float = RETRY_TIMEOUT
) -> dict[str, Any]:
    """``lhfs backup init``: make a store's record, encrypted with the password given (the
    first backup makes one too, encrypted when a password is given). A store that has one
    keeps it: asking for the other kind is refused."""
    target = Target.parse(url)
    store = open_store(target, retry_timeout)
    if encrypt and store.password is None:
        raise UsageError(
            "--encrypt needs a password: LHFS_BACKUP_PASSWORD or --password-file (keep it: "
            "without it the backups cannot be read)"
        )
    if not encrypt and store.password is not None:
        raise UsageError(
            "a password is given (LHFS_BACKUP_PASSWORD or --password-file): --encrypt makes an "
            "encrypted store; give none for a plain one"
        )
    store.bucket.ensure(create=create_bucket)
    try:
        made = store.init()
    except InvalidArgument:
        if not encrypt:
            raise
        raise InvalidArgument(
            f"{target} holds a store already, not encrypted: a store stays as it was made; "
            "give another PREFIX for an encrypted one"
        ) from None
    return {"target": str(target), "created": made, "encrypted": store.keys.encrypted}


def check_store(
    url: str, read_data: bool, progress: Any, retry_timeout: float = RETRY_TIMEOUT
) -> dict[str, Any]:
    """``lhfs backup check``: see ``BackupStore.check``."""
    from backupstore import systems

    store = open_store(Target.parse(url), retry_timeout)
    store.bucket.ensure()
    report = store.check(read_data, progress)
    report["problems"] += systems.problems(store)  # (records, and that their parts exist)
    return report


def prune(
    url: str,
    volume: str,
    policy: dict[str, int],
    dry_run: bool,
    retry_timeout: float = RETRY_TIMEOUT,
    root: Path | None = None,
) -> dict[str, Any]:
    """``lhfs backup prune``: see ``BackupStore.prune``. ``root``: where a local volume of
    that name may record one of the removed backups as its base (``released``)."""
    check_name(volume, "volume name")
    for rule, count in policy.items():
        if not 0 <= count <= 100_000:
            raise InvalidArgument(f"--keep-{rule} must be from 0 to 100000")
    target = Target.parse(url)
    store = open_store(target, retry_timeout)
    store.bucket.ensure()
    also = {name: why for name, (why, _) in _system_parts(store, volume).items()}
    report = store.prune(volume, policy, dry_run, also)
    if not report["kept"] and not report["removed"] and not report["damaged"]:
        raise NotFound(f"{url} holds no complete backup of volume {volume}")
    gone = set() if dry_run else {b["name"] for b in report["removed"]}
    report["released"] = release_base(root, target, volume, gone) if root else None
    return report


def list_backups(
    url: str, volume: str | None, retry_timeout: float = RETRY_TIMEOUT
) -> list[dict[str, Any]]:
    target = Target.parse(url)
    if volume is not None:
        check_name(volume, "volume name")
    store = open_store(target, retry_timeout)
    store.bucket.ensure()
    out = []
    for backup in store.list(volume):
        backup["url"] = backup_url(target, backup["volume"], backup["name"])
        out.append(backup)
    return out


def remove(
    url: str, retry_timeout: float = RETRY_TIMEOUT, root: Path | None = None
) -> tuple[Collection, str | None]:
    """Delete a backup, then collect the blocks no other backup uses (deferred while a backup
    runs: the result says so); and the snapshot a local volume under ``root`` no longer keeps
    for it (``release_base``). A missing or wrong password is refused before anything is
    deleted."""
    target, volume, name = parse_backup_url(url)
    store = open_store(target, retry_timeout)
    store.bucket.ensure()
    store.check_password()
    owner = _system_parts(store, volume).get(name)
    if owner is not None and owner[1]:
        raise WrongState(
            f"{url} is part of {owner[0]}, which could not be restored without it: "
            f"'lhfs system rm' removes it with its system backup"
        )
    if owner is not None:
        raise WrongState(f"{url} may be part of {owner[0]}: not removed")
    done = store.delete(volume, name)
    return done, release_base(root, target, volume, {name}) if root else None


def forget(root: Path, name: str, url: str) -> str:
    """``lhfs backup forget``: drop the volume's record of its last backup to ``url`` (a store
    lost whole, or out of reach for good, where ``backup rm`` cannot remove it: see
    ``release_base``); the snapshot it kept, which housekeeping may trim now. Nothing is
    asked of the store. An unknown target is refused, nothing changed."""
    target = Target.parse(url)
    vol = volumes.load(root, check_name(name, "volume name"))
    released: list[str | None] = []

    def drop(config: dict[str, Any]) -> None:
        if not _drop_base(config, target, None, released):
            known = ", ".join(sorted(config.get("backups") or {})) or "none"
            raise NotFound(f"volume {name} records no backup to {target} (its targets: {known})")

    vol.update(drop)
    return released[0]


def release_base(root: Path, target: Target, volume: str, removed: set[str]) -> str | None:
    """Drop the record of the volume ``volume`` under ``root`` of its last backup to
    ``target`` if that backup was just removed; the snapshot it kept (None: none dropped).
    The record is the base of the next incremental backup and keeps its snapshot in the
    chain (``housekeeping.needed``): with its backup gone it is no base (the next backup to
    the target reads the whole volume and sends only the blocks the store lacks), and a
    target no longer used would pin that snapshot for ever. Compared and dropped in one
    configuration update: a backup that finished meanwhile recorded another base, kept."""
    if not removed:  # (a dry run: the configuration is not even rewritten)
        return None
    try:
        vol = volumes.load(root, volume)
    except LhfsError:  # (none here, or another host's: nothing of it to release)
        return None
    released: list[str | None] = []
    try:
        vol.update(lambda config: _drop_base(config, target, removed, released))
    except LhfsError:
        return None
    return released[0] if released else None


def _drop_base(
    config: dict[str, Any], target: Target, removed: set[str] | None, released: list
) -> bool:
    """Drop ``config``'s record of its last backup to ``target`` (only if that backup is one
    of ``removed``, when given), adding the snapshot it kept to ``released``; whether it was
    there to drop."""
    records = config.get("backups") or {}
    record = records.get(str(target))
    if not isinstance(record, dict) or (
        removed is not None and record.get("backup") not in removed
    ):
        return False
    snapshot = record.get("snapshot")
    released.append(snapshot if isinstance(snapshot, str) else None)
    del records[str(target)]
    if not records:
        config.pop("backups", None)
    return True


def _system_parts(store: BackupStore, volume: str) -> dict[str, tuple[str, bool]]:
    """The backups of ``volume`` that system backups name: backup name -> (which one, whether
    it surely does). (They go with their system backup: 'lhfs system rm'.) A system record
    that cannot be read (damaged, or of a newer lhfs) may name any backup written before it:
    those are held too, saying so, and nothing else is (a damaged record blocks only what it
    may need)."""
    from backupstore.systems import listing

    owners: dict[str, tuple[str, bool]] = {}
    unknown = []
    for system in listing(store):
        if system["parts"] is None and system["written"] is not None:
            unknown.append(system)
            continue
        state = {
            "in_progress": " (under way)",
            "interrupted": " (interrupted: 'lhfs backup gc' lets its parts go)",
        }.get(system["state"], "")
        for part in system["parts"] or ():
            if part[0] == volume:
                owners[part[1]] = (f"system backup {system['name']}{state}", True)
    if unknown:
        written = store.complete_written(volume)
        for system in unknown:
            why = (
                f"system backup {system['name']}, whose record cannot be read, so which "
                f"backups it names is unknown ({system['reason']}; 'lhfs system rm "
                f"{store.target}?system={system['name']}' removes that record)"
            )
            for name, when in written.items():
                if when <= system["written"]:
                    owners.setdefault(name, (why, False))
    return owners


def collect(url: str, retry_timeout: float = RETRY_TIMEOUT, strays: bool = False) -> Collection:
    """``lhfs backup gc``: collect unreferenced blocks and sweep the markers of dead backups
    (and the stray objects, with ``strays``); refused, with the reason, while a backup
    runs."""
    store = open_store(Target.parse(url), retry_timeout)
    store.bucket.ensure()
    done = store.collect(sweep=True, strays=strays)
    if done.damaged:
        raise CorruptState(f"not collecting: {done.deferred}")
    if done.deferred:
        raise Busy(f"not collecting now: {done.deferred}; try again once it is done")
    return done


def restore(
    root: Path,
    url: str,
    new_name: str,
    replicas: int,
    progress: Any,
    retry_timeout: float = RETRY_TIMEOUT,
    on_disks: list[str] | None = None,
    backing: dict[str, Any] | None = None,
    kind: str = "restore",
    notice: Callable[[str], None] | None = None,
) -> volumes.Volume:
    """Restore into a new volume (its replicas under the root, or one on each of
    ``on_disks``), marked ``restoring`` until every block is written and flushed (and the
    rebuilds started meanwhile are done); a failed restore removes the volume (nothing
    half-restored stays behind). ``backing``: a registered image (its record) of the content
    the backed up volume stood on: the new volume is made on it and receives only what
    differs from it, as its source held only its changes (blocks the image holds as they
    are are not even fetched). A ``system`` restore (``kind``, also what the backup's
    reader's marker says) chooses it; any other finds it by the content id the manifest
    records, and ``notice`` is told in a line when the root has none: the volume is then
    restored whole."""
    started = time.time()
    target, volume, name = parse_backup_url(url)
    check_volume_name(new_name)
    if not 1 <= replicas <= 16:
        raise InvalidArgument("a volume has 1 to 16 replicas")
    store = open_store(target, retry_timeout)
    store.bucket.ensure()
    manifest = store.manifest(volume, name)
    refuse_image_backups(volume, url, manifest)
    if new_name in volumes.list_names(root):
        raise AlreadyExists(f"volume {new_name} already exists")
    mark: dict[str, Any] = {"restoring": {"backup": url, "pid": os.getpid()}}
    size, chunk = manifest["size"], chunk_for(manifest)
    if backing is None and kind != "system":
        vol = create_as_source(root, new_name, manifest, replicas, mark, on_disks, notice)
    else:  # (the image a system restore chose for it, or none: as it says; it reads the
        # volume's record to tell whether it was made on it: see ``create_on``)
        vol, _ = create_on(root, new_name, size, chunk, replicas, backing, mark, on_disks)
    writer = _RestoreWriter(root, vol, size, manifest["block_size"])
    try:
        store.restore(volume, name, writer.write, progress, writer.held, kind)
        writer.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(Exception):
            if vol.runtime() is not None:
                attachment.detach(root, new_name)
        with contextlib.suppress(Exception):  # (this one: never one made since under its name)
            manage.remove(root, new_name, volume_id=vol.config["volume_id"])
        raise
    restored = {
        "from": url,
        "timestamp": time.time(),
        "duration": round(time.time() - started, 3),
        "bytes": writer.written,
    }

    def done(config: dict[str, Any]) -> None:
        config.pop("restoring", None)
        config["restored"] = restored  # (what its metrics report)

    vol.update(done)
    return vol


def create_as_source(
    root: Path,
    name: str,
    manifest: dict[str, Any],
    replicas: int,
    extra: dict[str, Any],
    on_disks: list[str] | None,
    notice: Callable[[str], None] | None,
) -> volumes.Volume:
    """A new volume ``name`` of the geometry of ``manifest``'s source, made on the root's
    backing image of the content that source stood on, if the root has one (matched by
    content, never by name; never one whose file was modified since it was registered, nor
    one found changed in place as the volume's copy of it is made), else holding it all
    itself, ``notice`` told why in a line. What a restore and a DR standby are made as."""
    backing, why = None, None
    if manifest.get("backing_image"):
        backing, why = images.of_content(
            root, manifest["backing_image"], manifest.get("backing_image_name")
        )
    size, chunk = manifest["size"], chunk_for(manifest)
    vol, changed = create_on(root, name, size, chunk, replicas, backing, extra, on_disks)
    why = changed or why
    if why is not None and notice is not None:
        notice(whole_said(name, why))
    return vol


def create_on(
    root: Path,
    name: str,
    size: int,
    chunk: int,
    replicas: int,
    backing: dict[str, Any] | None,
    extra: dict[str, Any],
    on_disks: list[str] | None,
) -> tuple[volumes.Volume, str | None]:
    """A new volume made on registered image ``backing`` (None: holding everything itself)
    as a restore makes it; if that image's file is found changed in place as the volume's
    copy of it is made (``ImageChanged``: its size and time kept), made whole instead, as
    for an image found modified, and why (else None). One way for every restore: a system
    restore aborted that volume where the others went on whole."""
    if backing is None:
        return manage.create(root, name, size, chunk, replicas, None, extra, on_disks), None
    named = {**extra, "backing_image_name": backing["name"]}  # ('backing-image rm' says so)
    image = Path(backing["path"])
    try:
        made = manage.create(
            root, name, size, chunk, replicas, image, named, on_disks, backing["id"]
        )
        return made, None
    except manage.ImageChanged:
        why = changed_said(backing["name"])
    return manage.create(root, name, size, chunk, replicas, None, extra, on_disks), why


def changed_said(image: str) -> str:
    """Why a volume is restored whole although the root holds its image: its file was found
    changed in place (``create_on``)."""
    return f"its backing image {image}'s file changed since it was registered"


def whole_said(volume: str, why: str) -> str:
    """The line telling that ``volume``, whose source stood on a backing image, is made
    whole (``why``: the root lacks the image), and how to have it on its image instead."""
    return (
        f"volume {volume} holds its backing image's content as its own data: {why}; "
        "register that image ('lhfs backing-image create NAME --from FILE', or 'lhfs system "
        "restore' of a system backup holding it) for a restore to stand on it"
    )


def _changed_runs(
    data: bytes, chunk: int, below: bytes | None, sums: bytes | None = None
) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the runs of whole chunks of ``data`` that differ from what the new
    volume reads there already: ``below``, its backing image's bytes at the same place, or
    zeros (None). A restore skips the others: the new volume reads as zeros where nothing was
    written, and a volume's data is often half empty (a tenth of a restore's time was writing
    zeros); on a backing image, what the volume never changed is the image's. ``sums``: the
    image's bytes there known by their chunks' digests instead (``_chunk_sums``)."""
    zero = bytes(chunk)
    start = None
    for at in range(0, len(data), chunk):
        if sums is not None:
            digest = sums[at // chunk * _SUM : at // chunk * _SUM + _SUM]
            empty = xxhash.xxh3_128_digest(data[at : at + chunk]) == digest
        elif below is None:
            empty = data[at] == 0 and data[at : at + chunk] == zero[: len(data) - at]
        else:
            empty = data[at : at + chunk] == below[at : at + chunk]
        if empty and start is not None:
            yield start, at
            start = None
        elif not empty and start is None:
            start = at
    if start is not None:
        yield start, len(data)


def _chunk_sums(below: bytes, chunk: int) -> bytes:
    """The digests of ``below``'s chunks, one after the other (``_SUM`` bytes each)."""
    view = memoryview(below)
    return b"".join(
        xxhash.xxh3_128_digest(view[at : at + chunk]) for at in range(0, len(below), chunk)
    )


class _RestoreWriter:
    """Where a restore's blocks go: straight into the new volume's replica directories (the
    fast way) until ``lhfs replica add`` asks for the volume (it sets ``attach`` in the
    ``restoring`` mark). Then the replicas are flushed, the volume is attached on a file in
    its directory, and the rest goes through its engine, which rebuilds the added replica
    online while the restore goes on (SCENARIOS.md story 1)."""

    def __init__(self, root: Path, vol: volumes.Volume, size: int, block: int) -> None:
        self.root, self.vol, self.size, self.block = root, vol, size, block
        self.device = vol.dir / "restore.dev"
        dirs = [vol.replica_dir(r) for r in vol.replicas]
        self.stores = [ChunkStore.open(d) for d in dirs if d is not None]
        self.fd = -1
        self.writers: ThreadPoolExecutor | None = None
        self.pending: deque = deque()
        self.checked = time.monotonic()
        self.syncer = ThreadPoolExecutor(1)
        self.syncing: Future | None = None
        self.unsynced = 0
        self.written = 0  # bytes of the backup received
        # the volume's backing image (a replica's copy, checked against its id when it was
        # made): what the volume reads where nothing is written
        image = self.stores[0].backing if self.stores else None
        self.image = -1 if image is None else os.open(image.path, os.O_RDONLY)
        self.image_size = 0 if image is None else image.size
        # what held() read of the image under the blocks to be written (their chunks'
        # digests; None: zeros), so that write() does not read it again (to _KEPT bytes)
        self.seen: dict[int, bytes | None] = {}
        self.kept = 0

    def _below(self, index: int) -> bytes | None:
        """The backing image's bytes under block ``index`` (zeros past its end), or None
        where the volume has no image under it (it reads zeros)."""
        at = index * self.block
        if self.image < 0 or at >= self.image_size:
            return None
        if hole_at(self.image, at, min(at + self.block, self.image_size)):
            return bytes(self.block)
        found = os.pread(self.image, min(self.block, self.image_size - at), at)
        return found + bytes(self.block - len(found))

    def held(self, index: int, digest: str | None) -> bool:
        """Whether the new volume reads block ``index`` (of content ``digest``, None: zeros)
        already: not fetched."""
        below = self._below(index)
        if below is None:
            return digest is None
        if below == bytes(self.block):
            seen = None
        elif digest == digest_of(below):
            return True
        else:
            seen = _chunk_sums(below, self.vol.chunk_size)
        if digest is None and seen is None:
            return True
        if self.kept < _KEPT:
            self.seen[index] = seen
            self.kept += 100 + len(seen or b"")  # (with the dictionary's own share)
        return False

    def write(self, index: int, data: bytes) -> None:
        if self.fd < 0 and time.monotonic() - self.checked > 0.2:
            self.checked = time.monotonic()
            if volumes.load(self.root, self.vol.name).config["restoring"].get("attach"):
                self._attach()
        data = data[: self.size - index * self.block]
        self.written += len(data)
        sums = None
        if index in self.seen:
            below, sums = None, self.seen.pop(index)
            self.kept -= 100 + len(sums or b"")
        else:
            below = self._below(index)
        for start, end in _changed_runs(data, self.vol.chunk_size, below, sums):
            offset, view = index * self.block + start, memoryview(data)[start:end]
            if self.writers is None:
                zeros = (below or sums) is not None and view == bytes(end - start)
                for local in self.stores:  # (zeros over the image: the chunks trimmed)
                    local.trim(offset, end - start) if zeros else local.write(offset, view)
                self._write_back(len(view))
                continue
            self.pending.append(self.writers.submit(pwrite_all, self.fd, view, offset))
            while len(self.pending) > 2 * _WRITERS:
                self.pending.popleft().result()

    def _write_back(self, written: int) -> None:
        """Every 64 MiB, have the disk start on what was written while the restore goes on, so
        that the final flush finds little left (it was a sixth of a restore's time). A failed
        background sync fails the restore."""
        self.unsynced += written
        if self.unsynced < _WRITEBACK_EVERY or (self.syncing and not self.syncing.done()):
            return
        if self.syncing:
            self.syncing.result()
        jobs = [job for job in (local.head.writeback_job() for local in self.stores) if job]
        self.syncing = self.syncer.submit(lambda: [job() for job in jobs])
        self.unsynced = 0

    def _attach(self) -> None:
        self._close_stores()  # flushed: the engine finds every replica at the same revision
        attachment.attach(self.root, self.vol.name, self.device, restoring=True)
        self.fd = os.open(self.device, os.O_RDWR)
        self.writers = ThreadPoolExecutor(_WRITERS)  # the engine serves them at once

    def finish(self) -> None:
        if self.writers is None:
            self.close()
            return
        for future in self.pending:
            future.result()
        os.fsync(self.fd)
        self.close()
        _await_rebuilds(self.vol)
        attachment.detach(self.root, self.vol.name)
        self.device.unlink(missing_ok=True)

    def _close_stores(self) -> None:
        self.syncer.shutdown(wait=True)
        syncing, self.syncing = self.syncing, None
        while self.stores:
            self.stores.pop().close()
        if syncing:
            syncing.result()  # its error, if any (the flush in close reported it too)

    def close(self) -> None:
        self._close_stores()
        if self.image >= 0:
            os.close(self.image)
            self.image = -1
        if self.writers is not None:
            self.writers.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _await_rebuilds(vol: volumes.Volume) -> None:
    """Replicas added during the restore finish their rebuild before the volume detaches."""

    def settled() -> bool:
        info = control.call(vol.control_socket, "info")
        return all(r["mode"] != "WO" for r in info["replicas"])

    wait_for(settled, 24 * 3600, "the rebuilds started during the restore")
