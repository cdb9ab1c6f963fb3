"""Backups as objects: content-addressed blocks, one manifest per backup, written last.

Layout under ``s3://BUCKET/PREFIX``:

    lhfs-store.json                     the store's record: its keys (see ``keys``)
    blocks/<2 hex>/<name>               a block, zstd-compressed or raw; its name is the
                                        xxh3-128 of its content (a keyed hash of it, encrypted)
    volumes/<volume>/volume.meta        the volume's backup settings: its block size
    volumes/<volume>/<backup>.json      the manifest: size, block size, one digest per block
    volumes/<volume>/<backup>.running   a backup in progress (refreshed while it runs)
    standbys/<volume>/<id>.json         the backup a DR standby of the volume last restored
                                        (``prune`` keeps it)
    locks/collect-<token>               a collection in progress (refreshed while it runs)
    locks/read/<volume>/<backup>/<token>
                                        a restore (or a DR increment) reading a backup

A backup writes its ``.running`` marker first, its blocks next (skipping those the store already
has), its manifest last, then drops the marker: a manifest exists only for a complete backup.

Deleting a backup removes its manifest and then collects the blocks no manifest references.
Backups reuse blocks they find in the store, so a collection and a backup must never overlap.
The two markers are the lock: a collection writes its marker *then* looks for running backups
(and deletes nothing if there is one); a backup writes its marker *then* waits until no
collection marker is left. Whichever comes second sees the other (S3 lists are consistent
after a write), so a block is never deleted under a backup that reuses it. Markers are
refreshed by a heartbeat thread whatever their owner is busy with; one not refreshed for ten
minutes (twice the longest a single call retries) belongs to a process that died and no longer
holds the other side back; so does at once one written on this host since its last boot
(every marker records its host name, boot id and pid) whose process is gone: a killed ``backup
rm`` held every backup to its store for ten minutes. Ages are measured against the server's
clock (the time of the asker's own marker), so a skewed local clock cannot make a live marker
look dead.

A restore marks the backup it reads the same way (``reading``), before it reads the manifest:
``backup rm`` and prune leave a backup being read alone, and a collection defers while a
reader's backup has no manifest any more (deleted before the reader was seen), so a restore
never loses its blocks half-way and reads as a damaged store.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import xxhash
import zstandard

from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    WrongState,
)
from lhfs.core.names import BACKUP_NAME, NAME
from lhfs.core.procs import alive, boot_id, pid_namespace
from lhfs.core.units import MAX_SIZE, check_chunk_size, format_size, rfc3339
from lhfs.store.backing import IMAGE_ID, id_size

from . import deltas, parse_json
from .keys import RECORD, StoreKeys
from .s3 import NOT_CONFIRMED, AccessDenied, Bucket, Target

FORMAT = 1  # of the records this lhfs writes (manifests, a volume's record): newer ones refused
NEWER = "written by a newer lhfs"  # (what says so, where a record of a newer FORMAT is refused)
_UPGRADE = ": upgrade lhfs"  # (what such a refusal ends with)

BLOCK_SIZE = 2 << 20
MIN_BLOCK = 4 << 10
MAX_BLOCK = 16 << 20  # what one replica read may return
STALE = 600.0  # a marker not refreshed for this long belongs to a dead process
HEARTBEAT = 30.0
_LIST_OVER = 64  # a full backup of more blocks than this lists the store's blocks once...
_NESTED_UPTO = 1000  # the objects a new store's prefix is searched for another store's record
_LIST_UPTO = 20_000  # ...if it holds at most this many (20 listing requests)
_WAIT_NOTICE = 60.0  # a backup held back by a collection says so again this often
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")  # a host name read from a marker, shown as it is
_META = "x-amz-meta-lhfs-compression"
# The most lhfs reads of an object of each kind (see ``Bucket.get``; a manifest's bound is
# ``manifest_limit``): whoever can write the bucket decides what is in it, and an object
# larger than lhfs writes is refused as not lhfs's rather than read into memory.
SMALL_OBJECT = 1 << 20  # the store's record, volume.meta, a standby's mark, a marker
_BLOCK_OBJECT = MAX_BLOCK + (64 << 10)  # a block (a delta is smaller) with its seal


log = logging.getLogger("lhfs.backupstore")
_DIGEST = re.compile(r"[0-9a-f]{32}")  # (matched whole: ``fullmatch``)
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # (what ``rfc3339`` writes)
_INDEX = re.compile(r"0|[1-9][0-9]{0,11}")  # a block's index, as a key of ``deltas``
_LAST_TIME = 1e11  # seconds since the epoch (the year 5138): later than any backup starts


class BlockMissing(CorruptState):
    """A block a manifest names is not in the store."""


class BackupRemoved(LhfsError):
    """The backup being restored was deleted from the store half-way: not damage (its
    blocks went with it)."""


_READERS = "locks/read"  # locks/read/<volume>/<backup>/<token>: a backup being read
# what a reader's marker may say it is (anything else is shown as "a restore")
_READ_KINDS = {
    "restore": "a restore",
    "system": "a system restore",
    "dr": "a DR standby's increment",
    "image": "a backing image restore",
}


def check_block_size(size: int) -> None:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise InvalidArgument("the backup block size must be a power of two from 4K to 16M")


def digest_of(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def slot_lengths(manifest: dict[str, Any], index: int) -> tuple[int, ...]:
    """The lengths block ``index`` of a backup may have: its block size (every block is
    padded to it), or for the last one what is left of the volume (read short by an lhfs
    from before the padding). A stored block of another length (the right digest of other
    content, named by a manifest someone who can write the bucket changed) would be written
    over its neighbours' places, or leave part of its own unwritten."""
    block, size = manifest["block_size"], manifest["size"]
    last = index == len(manifest["blocks"]) - 1
    return (block, size - index * block) if last else (block,)


def check_slot(manifest: dict[str, Any], index: int, data: bytes, what: str) -> None:
    """Refuse block ``index`` of a backup (``what``) that does not fit its place."""
    if len(data) not in slot_lengths(manifest, index):
        raise CorruptState(
            f"block {index} of {what} is {len(data)} bytes, not the {manifest['block_size']} "
            "of its backup's blocks: the manifest names another backup's block (written by "
            "someone who can write the bucket); restore another backup"
        )


@dataclass
class BackupStats:
    blocks: int = 0
    read: int = 0  # blocks read from the volume (the others were unchanged since the base)
    uploaded: int = 0
    uploaded_bytes: int = 0
    reused: int = 0
    deltas: int = 0  # blocks stored as a delta on their base block (see ``deltas``)
    found: set[str] = field(default_factory=set)  # reused because a HEAD found them


class BackupStore:
    """The backups of one target."""

    def __init__(
        self,
        bucket: Bucket,
        workers: int = 8,
        password: bytes | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self.target = bucket.target
        self.workers = workers
        self.password = password
        # what the operator is told while the work goes on (a command shows it on stderr)
        self.notice = notice or (lambda text: log.warning("%s", text))
        self._keys: StoreKeys | None = None
        # digest -> recipe, of the blocks stored as deltas, from every manifest read
        self._recipes: dict[str, dict[str, Any]] = {}
        self._block_sizes: dict[str, int] = {}  # recorded ones: they never change
        self._meta_damage: dict[str, str] = {}  # volume: why its volume.meta does not read
        self._marked: set[tuple[str, str]] = set()  # (volume, backup) marked here: ``running``

    # -- the store's keys -----------------------------------------------------------------------

    @property
    def keys(self) -> StoreKeys:
        """The store's keys, from its record (read once)."""
        if self._keys is None:
            found = self.bucket.get(self.target.key(RECORD), SMALL_OBJECT)
            if found is None:
                raise NotFound(
                    f"{self.target} has no store record ({RECORD}): it holds no lhfs backups, "
                    "or the record was deleted"
                )
            self._keys = StoreKeys.open(found[0], self.password, str(self.target))
        return self._keys

    def check_password(self) -> None:
        """Open the store's record if it has one: an encrypted store refuses a missing or
        wrong password here. None yet is fine (the first backup makes it)."""
        with contextlib.suppress(NotFound):
            _ = self.keys

    def init(self) -> bool:
        """Make the store's record if it has none: encrypted when a password was given. True
        when this call made it. Two at once agree on one (a conditional write; the loser
        reads the winner's)."""
        if self._keys is not None:  # (its record was read already: it has one)
            return False
        key = self.target.key(RECORD)
        found = self.bucket.get(key, SMALL_OBJECT)
        if found is None:
            self._refuse_nested()
            keys, record = StoreKeys.new(self.password)
            if self.bucket.put_new(key, record):
                # (a store that ignored the condition: who won)
                found = self.bucket.get(key, SMALL_OBJECT)
                if found is not None and found[0] == record:
                    self._keys = keys
                    return True
            found = self.bucket.get(key, SMALL_OBJECT)
            if found is None:
                raise CorruptState(f"{key} in {self.target} vanished as it was written")
        self._keys = StoreKeys.open(found[0], self.password, str(self.target))
        return False

    def _refuse_nested(self) -> None:
        """Refuse to make a store inside another (a prefix below one holding a record) or
        around one (a record below this prefix, looked for when it holds at most
        ``_NESTED_UPTO`` objects): each would take the other's objects for strays, which
        ``backup gc --strays`` deletes. One HEAD per parent prefix and one listing; only
        when a store is made."""
        parts = self.target.prefix.split("/") if self.target.prefix else []
        for depth in range(len(parts)):
            outer = "/".join(parts[:depth])
            try:
                found = self.bucket.exists("/".join(p for p in (outer, RECORD) if p))
            except AccessDenied:  # (credentials for this prefix only: nothing to see there)
                self.notice(
                    f"could not look for a store at {Target(self.target.bucket, outer)} "
                    "(access denied): a store inside another is not refused there"
                )
                continue
            if found:
                raise AlreadyExists(
                    f"{self.target} lies inside the store {Target(self.target.bucket, outer)}: "
                    "a store's prefix may not lie inside another's (choose a prefix beside it)"
                )
        own = self.target.key(RECORD)  # (a first backup beside this one may have made it)
        base = self.target.prefix + "/" if self.target.prefix else ""
        for obj in self.bucket.list_upto(base, _NESTED_UPTO) or []:
            if obj.object_name != own and obj.object_name.endswith("/" + RECORD):
                inner = obj.object_name.removesuffix("/" + RECORD)
                raise AlreadyExists(
                    f"{self.target} holds the store s3://{self.target.bucket}/{_shown(inner)}: "
                    "a store's prefix may not hold another's (choose a prefix beside it)"
                )

    def put_sealed(self, relative: str, payload: bytes) -> None:
        self.bucket.put(self.target.key(relative), self.keys.seal(relative, payload))

    def get_sealed(self, relative: str, limit: int = SMALL_OBJECT) -> bytes | None:
        """What ``put_sealed`` stored under ``relative``, authenticated; None when nothing is
        there. ``limit``: the most an object of its kind can weigh."""
        found = self.bucket.get(self.target.key(relative), limit)
        return None if found is None else self.keys.unseal(relative, found[0])

    # -- blocks -------------------------------------------------------------------------------

    def _block_key(self, digest: str) -> str:
        name = self.keys.block_name(digest)
        return self.target.key("blocks", name[:2], name)

    def put_block(
        self, data: bytes, digest: str, present: set[str] | None = None, ask: bool = True
    ) -> int:
        """Store a block unless the store has it; the bytes sent (0 when it was there).
        ``present``, the store's blocks from one listing, saves asking for each: a block added
        since by another backup is merely sent again (same name, same bytes). Without
        ``present`` the store is asked, unless ``ask`` is False: the block is then sent as it
        is (new content, which asking would nearly always find missing)."""
        key = self._block_key(digest)
        if present is not None:
            if key.rsplit("/", 1)[1] in present:
                return 0
        elif ask and self.bucket.exists(key):
            return 0
        packed = zstandard.ZstdCompressor(level=3).compress(data)
        method = "zstd"
        if len(packed) >= len(data):
            packed, method = data, "none"
        if self.keys.encrypted:
            sealed = self.keys.seal_block(key.rsplit("/", 1)[1], method, packed)
            self.bucket.put(key, sealed)
            return len(sealed)
        self.bucket.put(key, packed, {"lhfs-compression": method})
        return len(packed)

    def get_block(self, digest: str) -> bytes:
        """A block's bytes, checked against its digest: a mismatch is corruption, never data.
        A block a manifest read before names by a recipe is rebuilt from its base and its
        delta (see ``deltas``)."""
        recipe = self._recipes.get(digest)
        if recipe is None:
            return self._get_object(digest)
        what = f"block {digest} in {self.target}"
        data = deltas.apply(
            self._get_object(recipe["base"]), self._get_object(recipe["delta"]), what
        )
        if digest_of(data) != digest:
            raise CorruptState(f"{what}, rebuilt from its delta, does not match its checksum")
        return data

    def _get_object(self, digest: str) -> bytes:
        """A stored object (a block, a delta), checked against its digest."""
        key = self._block_key(digest)
        found = self.bucket.get(key, _BLOCK_OBJECT)
        if found is None:
            raise BlockMissing(f"block {digest} is missing from {self.target}")
        body, meta = found
        if self.keys.encrypted:
            method, body = self.keys.unseal_block(key.rsplit("/", 1)[1], body)
        else:
            method = meta.get(_META, "none")
        data = _decompress(body, f"block {digest} in {self.target}") if method == "zstd" else body
        if digest_of(data) != digest:
            raise CorruptState(f"block {digest} in {self.target} does not match its checksum")
        return data

    # -- backups ------------------------------------------------------------------------------

    def _key(self, volume: str, name: str, suffix: str) -> str:
        return self.target.key(_relative(volume, name, suffix))

    @staticmethod
    def _meta_relative(volume: str) -> str:
        return f"volumes/{volume}/volume.meta"

    def block_size(self, volume: str, wanted: int | None) -> int:
        """The block size of the volume's backups, fixed by its first complete backup:
        ``wanted`` (or the default) for a new volume; an error if it asks for another later."""
        return self._settings(volume, wanted)[0]

    def _settings(self, volume: str, wanted: int | None) -> tuple[int, bool]:
        """``block_size`` and whether ``volume.meta`` already records it. A damaged one
        records nothing: the block size is that of the volume's backups (each manifest
        authenticated on its own), and the backup writes it again."""
        size, damage = self._recorded(volume)
        if damage is not None:
            size = self._backups_block_size(volume)
        if size is not None:
            if wanted is not None and wanted != size:
                raise InvalidArgument(
                    f"the backups of {volume} in {self.target} use {format_size(size)} blocks; "
                    "the block size cannot change"
                )
            return size, damage is None
        size = wanted or BLOCK_SIZE
        check_block_size(size)
        return size, False

    def _recorded(self, volume: str) -> tuple[int | None, str | None]:
        """The block size ``volume.meta`` records (None: none yet), or why it cannot be read
        (``(None, reason)``: it fails authentication, does not parse, is larger than lhfs
        writes one). Its damage is its own: every manifest is sealed and names its block
        size, so the volume's backups read without it (one damaged ``volume.meta`` made
        every backup of its volume unreadable, each said damaged for it). One written by a
        newer lhfs is refused (``CorruptState``): what else it records is unknown."""
        if volume in self._block_sizes or volume in self._meta_damage:
            return self._block_sizes.get(volume), self._meta_damage.get(volume)
        relative = self._meta_relative(volume)
        try:
            found = self.get_sealed(relative)
            if found is None:
                return None, None
            try:
                meta = parse_json(found)
            except ValueError:
                meta = None
            _not_newer(meta, f"{relative} in {self.target}")
            size = meta.get("block_size") if isinstance(meta, dict) else None
            if not _passes(check_block_size, size):
                raise CorruptState(f"{relative} in {self.target} cannot be parsed")
        except CorruptState as exc:
            if NEWER in str(exc):
                raise
            self._meta_damage[volume] = str(exc)
            return None, str(exc)
        self._block_sizes[volume] = size
        return size, None

    def _backups_block_size(self, volume: str) -> int | None:
        """The block size of the volume's newest backup that reads (None: none reads), for a
        volume whose ``volume.meta`` is damaged."""
        listed = self._manifest_objects(volume)
        for name, _ in sorted(listed, key=lambda item: item[1].last_modified, reverse=True):
            with contextlib.suppress(NotFound, CorruptState):
                return int(self.manifest(volume, name)["block_size"])
        return None

    def create(
        self,
        volume: str,
        name: str,
        size: int,
        read_block: Callable[[int, int], bytes | bytearray],
        snapshot: str | None = None,
        block_size: int | None = None,
        progress: Callable[..., None] = lambda *pct: None,
        base: tuple[str, list[int]] | None = None,
        extra: dict[str, Any] | None = None,
        units: tuple[int, dict[int, set[int]]] | None = None,
        taken: float | None = None,
        full: bool = False,
    ) -> tuple[dict[str, Any], BackupStats]:
        """Back a volume's content up block by block; returns the manifest and what moved.

        ``read_block(index, block_size)`` reads a block of the snapshot. With ``base`` (an
        earlier backup of the same volume and the blocks changed since its snapshot, taken from
        the snapshot chain), only the changed blocks are read; the others keep the base's
        digests. Without it, or when the base is gone, every block is read (and only those the
        store lacks are sent). With ``units`` too (a unit size and, per changed block, the
        indexes of its units that changed), a block changed in few units is stored as a delta
        on its base block (see ``deltas``). ``taken``: when the snapshot was taken (seconds
        since the epoch; the start when not given, never later), what orders a volume's
        backups (see ``order``). ``full``: every block is read and sent, whatever the store
        holds: content-addressed, a block sent again under its name repairs one that is
        missing or damaged there (``check`` names the backups that need it)."""
        self.bucket.ensure()  # (the caller may have made it, with --create-bucket)
        self.init()
        block_size, recorded = self._settings(volume, block_size)
        started = time.time()
        taken = started if taken is None else min(taken, started)
        with self.running(volume, name):
            count = -(-size // block_size)
            previous, changed, recipes, base_unit = self._base(
                volume, None if full else base, size, block_size, units
            )
            if full:  # (known present: none, however sure a manifest or a HEAD is of it)
                known: set[str] = set()
            elif previous:
                known = {d for d in previous if d}
            else:
                known = self._latest_digests(volume)
            # digests that the store holds only as a recipe (a delta on a base): reused by
            # naming the recipe again, never as whole objects
            carried = {previous[i]: r for i, r in recipes.items()}
            known -= carried.keys()
            # new deltas only in the unit of the base's (a recipe adds to its units)
            usable = units is not None and base_unit in (None, units[0])
            unit, fine = units if usable and units is not None else (0, None)
            out_recipes: dict[int, dict[str, Any]] = {}
            # An increment reads only blocks the chain says were written since its base: new
            # content, nearly always missing from the store. It sends them without asking
            # (a round trip per block, about a seventh of a small increment's time, or a
            # listing of the store), and still reuses any whose content its base names.
            ask = not previous and not full
            present = self._present() if ask and count > _LIST_OVER else None
            stats = BackupStats(blocks=count)
            # Known by its digest: comparing the hash costs a tenth of scanning every byte.
            empty = digest_of(bytes(block_size))
            digests: list[str | None] = [None] * count
            with _uploads(self.workers) as pool:
                pending: deque = deque()
                for index in range(count):
                    if index < len(previous) and index not in changed:
                        digests[index] = previous[index]
                        if index in recipes:
                            out_recipes[index] = recipes[index]
                    else:
                        data = read_block(index, block_size)
                        stats.read += 1
                        digest = digest_of(data)
                        if digest != empty:  # an empty block is stored as null
                            digests[index] = digest
                            recipe = None
                            if digest not in known and digest not in carried and fine:
                                recipe = deltas.plan(
                                    index, previous, recipes, fine.get(index), unit, block_size
                                )
                            if digest in known:
                                stats.reused += 1
                            elif digest in carried:
                                out_recipes[index] = carried[digest]
                                stats.reused += 1
                            elif recipe is not None:
                                payload = deltas.pack(data, unit, recipe["units"])
                                recipe["delta"] = digest_of(payload)
                                out_recipes[index] = carried[digest] = recipe
                                stats.deltas += 1
                                pending.append(
                                    (
                                        recipe["delta"],
                                        pool.submit(
                                            self.put_block, payload, recipe["delta"], None, False
                                        ),
                                    )
                                )
                            else:
                                known.add(digest)
                                pending.append(
                                    (
                                        digest,
                                        pool.submit(self.put_block, data, digest, present, ask),
                                    )
                                )
                        # A window, not batches: the oldest upload is awaited while the
                        # rest go on (waiting for a whole batch left the workers idle).
                        while len(pending) > 2 * self.workers:
                            self._settle(pending, stats, 1)
                    done = min(size, (index + 1) * block_size)
                    progress(100 * (index + 1) / count, done, size)
                self._settle(pending, stats, len(pending))
            self._recheck(stats.found)
            manifest = {
                "format": FORMAT,
                "volume": volume,
                "name": name,
                "snapshot": snapshot,
                "created": rfc3339(started),
                "started": started,  # orders backups made within the same second
                "taken": taken,  # orders a volume's backups (see ``order``)
                "size": size,
                "block_size": block_size,
                "blocks": digests,
                **(extra or {}),
            }
            if out_recipes:  # (those carried from the base alone: in the base's unit)
                manifest["delta_unit"] = unit or base_unit
                manifest["deltas"] = {str(i): r for i, r in sorted(out_recipes.items())}
            self.put_sealed(_relative(volume, name, "json"), json.dumps(manifest).encode())
            if not recorded:  # the first complete backup fixes the block size
                meta = {"format": FORMAT, "block_size": block_size}
                self.put_sealed(self._meta_relative(volume), json.dumps(meta).encode())
                damage = self._meta_damage.pop(volume, None)
                self._block_sizes[volume] = block_size
                if damage is not None:
                    self.notice(
                        f"{damage}: written again with the block size of the backups of "
                        f"{volume} ({format_size(block_size)})"
                    )
        progress(100.0, size, size)
        return manifest, stats

    @contextlib.contextmanager
    def running(self, volume: str, name: str) -> Iterator[None]:
        """Backup ``name`` of ``volume`` marked under way for the block, once no collection
        runs (its marker keeps new ones off the blocks it reuses). A caller opens what it
        reads inside, once the wait is over: a collection may run for hours, and a detached
        volume is held against an attach for as long as it is open (every attach of it
        failed after five minutes behind a backup that only waited). ``create`` inside the
        block marks it no second time."""
        if (volume, name) in self._marked:
            yield
            return
        with Marker(self.bucket, self._key(volume, name, "running"), told=self.notice) as marker:
            self._await_collections(marker.key)
            self._marked.add((volume, name))
            try:
                yield
            finally:
                self._marked.discard((volume, name))

    @contextlib.contextmanager
    def reading(self, volume: str, name: str, kind: str = "restore") -> Iterator[None]:
        """Backup ``name`` of ``volume`` marked read for the block (``kind``: by a
        ``restore``, a ``system`` restore, a ``dr`` increment): ``delete`` refuses it, prune
        keeps it, and a collection defers while its manifest is gone. Written before the
        reader reads the manifest: a removal that did not see the marker deleted the manifest
        first (the reader finds it gone) or is seen by its collection. An ordinary write,
        refreshed and judged dead as every other marker (no conditional write needed).
        Credentials that may only read the store (a restore needs no more) read it unmarked,
        saying so."""
        key = self.target.key(_READERS, volume, name, secrets.token_hex(8))
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(
                    Marker(self.bucket, key, about={"reading": kind}, told=self.notice)
                )
            except AccessDenied as exc:  # (any other refusal fails the restore: no guard)
                self.notice(
                    f"backup {name} of volume {volume} is read without its marker ({exc}): "
                    "a removal meanwhile is not held back"
                )
            yield

    def has_backup(self, volume: str, name: str) -> bool:
        """Whether the backup's manifest is in the store (not read)."""
        return self.bucket.exists(self._key(volume, name, "json"))

    def readers(
        self, volume: str | None = None, name: str | None = None, own: str | None = None
    ) -> list[tuple[str, str, Any]]:
        """``(volume, backup, marker)`` of the live readers (see ``reading``) of the store,
        of ``volume``, or of its backup ``name``, from one listing; "live" by the server's
        clock (the time of ``own``, a marker of the asker's, else of a probe written now:
        only when there are markers to judge)."""
        base = self.target.key(_READERS) + "/"
        prefix = base + "".join(f"{part}/" for part in (volume, name) if part is not None)
        found = []
        for obj in self.bucket.list(prefix):
            parsed = _reader(obj.object_name[len(base) :])
            if parsed is not None:
                found.append((*parsed, obj))
        if not found:
            return []
        now = self._server_now(own)
        return [(vol, backup, obj) for vol, backup, obj in found if self.fresh(obj, now)]

    def reader_of(self, backups: Iterable[tuple[str, str]]) -> str | None:
        """Who reads one of ``backups`` (``(volume, backup)``), for a line, as ``delete``
        says it, from one listing of the readers' markers; None while none is read."""
        wanted = set(backups)
        for vol, name, obj in self.readers() if wanted else ():
            if (vol, name) in wanted:
                return self._reader_said(vol, name, obj)
        return None

    def _server_now(self, own: str | None) -> float:
        """The server's time now: that of ``own`` (a marker this process keeps), or of a probe
        written and removed here (a skewed local clock must not judge a live marker dead)."""
        asked = time.monotonic()
        if own is None:
            own = self.target.key("locks", f"probe-{secrets.token_hex(8)}")
            self.bucket.put(own, b"")
            try:
                return self.bucket.modified(own)
            finally:
                self.bucket.delete(own)
        return self.bucket.modified(own) - (time.monotonic() - asked)

    def _reader_said(self, vol: str, name: str, obj: Any) -> str:
        """Who reads backup ``name`` of ``vol`` (its marker ``obj``), for a line: what kind of
        reader and, as its marker says, its pid, host and start."""
        kind = _READ_KINDS.get(self._about(obj.object_name).get("reading"), "a restore")
        return f"{kind} of backup {name} of volume {vol}{self._whose(obj.object_name)}"

    def _recheck(self, found: set[str]) -> None:
        """Blocks reused only because a HEAD found them (not named by a manifest this backup
        read) are checked once more before the manifest names them: a cheap second guard
        besides the collection lock."""
        missing = [d for d in found if not self.bucket.exists(self._block_key(d))]
        if missing:
            raise CorruptState(
                f"{len(missing)} block(s) vanished during the backup; run the backup again"
            )

    def _base(
        self,
        volume: str,
        base: tuple[str, list[int]] | None,
        size: int,
        block_size: int,
        units: tuple[int, dict[int, set[int]]] | None = None,
    ) -> tuple[list[str | None], set[int], dict[int, dict[str, Any]], int | None]:
        """The base backup's digests, the blocks to read anyway, the base's recipes (of its
        blocks stored as deltas) and their unit; ``([], set(), {}, None)`` for a full read.
        Called once the collection lock is held: the base's blocks cannot vanish now."""
        if base is None:
            return [], set(), {}, None
        try:
            manifest = self.manifest(volume, base[0])
        except NotFound:  # the previous backup is gone: read everything
            return [], set(), {}, None
        except CorruptState as exc:  # damaged: its digests cannot be trusted, nor reused
            self.notice(f"the previous backup cannot be read ({exc}): reading the whole volume")
            return [], set(), {}, None
        if manifest["block_size"] != block_size:
            return [], set(), {}, None
        previous = manifest["blocks"]
        changed = set(base[1])
        recipes = {int(i): r for i, r in manifest.get("deltas", {}).items()}
        if manifest["size"] != size:  # a grown volume: its old last block and all after it
            grown = range(max(0, len(previous) - 1), -(-size // block_size))
            changed.update(grown)
            if units:  # (no delta for those: their units are not all known)
                for index in grown:
                    units[1].pop(index, None)
        return previous, changed, recipes, manifest.get("delta_unit")

    def _present(self) -> set[str] | None:
        """The digests of every block in the store when there are few enough to list in a
        handful of requests (cheaper than one HEAD per block of a large backup), else None."""
        found = self.bucket.list_upto(self.target.key("blocks") + "/", _LIST_UPTO)
        if found is None:
            return None
        prefix = self.target.key("blocks") + "/"
        names = (obj.object_name[len(prefix) :] for obj in found)
        return {name.rsplit("/", 1)[1] for name in names if is_block_key(name)}

    def _await_collections(self, own: str) -> None:
        """Wait until no collection runs (this backup's marker, ``own``, keeps new ones from
        deleting), saying at once and every minute what it waits for: the marker of a
        collection whose process was killed holds backups back until it is stale, ten minutes
        later, and a silent wait that long looks like a hang. Not bounded by the retry
        timeout: a live collection may take longer, and the store answers meanwhile."""
        began = time.monotonic()
        told = None
        while True:
            live = self._live(self.target.key("locks") + "/", own, _collecting)
            if not live:
                return
            if told is None or time.monotonic() - told >= _WAIT_NOTICE:
                waited = None if told is None else time.monotonic() - began
                self.notice(self._collection_wait(live, waited))
                told = time.monotonic()
            time.sleep(0.5)

    def _collection_wait(self, live: list[Any], waited: float | None) -> str:
        """What a backup held back by the collections of ``live`` (their markers) waits for,
        and for how long already (None: it has just begun)."""
        marker = live[0]
        refreshed = marker.last_modified.timestamp()
        more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
        still = "waiting" if waited is None else f"still waiting ({waited:.0f} s so far)"
        return (
            f"{still} for a collection of unreferenced blocks to finish{more}: "
            f"s3://{self.target.bucket}/{_shown(marker.object_name)}"
            f"{self._whose(marker.object_name)}, "
            f"last refreshed {rfc3339(refreshed)}; if its process died, it counts as dead at "
            f"{rfc3339(refreshed + STALE)} and the backup goes on then"
        )

    def _whose(self, key: str) -> str:
        """Who runs the collection of the marker ``key`` and since when, as its marker says
        (written by whoever can write the bucket: only what has the form lhfs writes)."""
        about = self._about(key)
        pid, host, started = about.get("pid"), about.get("host"), about.get("started")
        said = []
        if _is_int(pid, 1, 1 << 31) and isinstance(host, str) and _HOST.fullmatch(host):
            said.append(f"pid {pid} on {host}")
        if type(started) in (int, float) and 0 < started < _LAST_TIME:
            said.append(f"started {rfc3339(started)}")
        return f" ({', '.join(said)})" if said else ""

    @staticmethod
    def _settle(pending: deque, stats: BackupStats, count: int) -> None:
        """Wait for the ``count`` oldest uploads and count what they did."""
        for _ in range(count):
            digest, future = pending.popleft()
            sent = future.result()
            if sent:
                stats.uploaded += 1
                stats.uploaded_bytes += sent
            else:
                stats.reused += 1
                stats.found.add(digest)

    def _latest_digests(self, volume: str) -> set[str]:
        """The objects of the volume's most recently written manifest that reads (a damaged
        one is passed over): known present, no HEAD needed (any complete backup's would do;
        the newest shares the most). A block it holds as a delta is not among them: a full
        backup stores it whole again."""
        listed = self._manifest_objects(volume)
        for name, _ in sorted(listed, key=lambda item: item[1].last_modified, reverse=True):
            try:
                return stored_objects(self.manifest(volume, name))
            except (NotFound, CorruptState):  # deleted since the listing, or damaged
                continue
        return set()

    def manifest(self, volume: str, name: str) -> dict[str, Any]:
        """A backup's manifest, authenticated (see ``keys``) and checked."""
        # (the volume's block size is checked against its record, itself authenticated; none
        # yet: the first backup's process died between writing its manifest and the record;
        # none that reads: the manifest, authenticated on its own, is read all the same)
        recorded, _ = self._recorded(volume)
        limit = manifest_limit(recorded or MIN_BLOCK)
        found = self.get_sealed(_relative(volume, name, "json"), limit)
        if found is None:
            raise NotFound(f"no backup {name!r} of volume {volume!r} in {self.target}")
        try:
            manifest = parse_json(found)
        except ValueError:
            manifest = None
        if (  # an earlier lhfs wrote carried deltas under unit 0; their unit was the chunk size
            isinstance(manifest, dict)
            and manifest.get("delta_unit") == 0
            and manifest.get("deltas")
            and isinstance(manifest.get("chunk_size"), int)
        ):
            manifest["delta_unit"] = manifest["chunk_size"]
        _not_newer(manifest, f"the manifest of backup {name} of {volume}")
        bad = _bad_field(manifest, volume, name)
        if bad is not None:
            raise CorruptState(
                f"the manifest of backup {name} of {volume} cannot be parsed (its {bad})"
            )
        for index, recipe in manifest.get("deltas", {}).items():
            self._recipes[manifest["blocks"][int(index)]] = recipe
        if recorded not in (None, manifest["block_size"]):
            raise CorruptState(
                f"backup {name} of {volume} has {manifest['block_size']}-byte blocks but the "
                f"volume's record says {recorded}: one of them was changed"
            )
        return manifest

    def _listed(
        self, volume: str | None = None
    ) -> tuple[list[tuple[Any, str, str, str]], list[Any]]:
        """The objects under ``volumes/`` (or those of ``volume``), from one listing: each
        of a kind lhfs writes as ``(object, volume, backup, kind)`` (``kind``: ``json``,
        ``running`` or ``meta``), and the strays, which lhfs never writes (another name,
        another depth: ``volumes/V/notes.txt``, ``volumes/V/a b.json``): no backup, and
        nothing a command about backups could name. They are said by ``check`` and removed
        by ``collect(sweep=True)`` (``backup gc``)."""
        prefix = self.target.key("volumes") + "/"
        ours, strays = [], []
        for obj in self.bucket.list(prefix + (f"{volume}/" if volume else "")):
            found = _ours(obj.object_name[len(prefix) :])
            if found is None:
                strays.append(obj)
            else:
                ours.append((obj, *found))
        return ours, strays

    def _manifest_objects(self, volume: str) -> list[tuple[str, Any]]:
        """(name, listed object) of the volume's complete backups, from one listing."""
        return [(name, obj) for obj, _, name, kind in self._listed(volume)[0] if kind == "json"]

    def complete_names(self, volume: str) -> list[str]:
        """Names of the volume's complete backups, from one listing (no manifest is read)."""
        return [name for name, _ in self._manifest_objects(volume)]

    def complete_written(self, volume: str) -> dict[str, float]:
        """When each of the volume's complete backups was written, by the server's clock (one
        listing): a system record whose content is unknown (damaged) can only name backups
        written before it, and that is the one thing known of it."""
        return {name: obj.last_modified.timestamp() for name, obj in self._manifest_objects(volume)}

    def complete_backups(self) -> set[tuple[str, str]]:
        """``(volume, backup)`` of every complete backup (its manifest is there), from one
        listing: whether a system backup's parts all still exist."""
        return {(vol, name) for _, vol, name, kind in self._listed()[0] if kind == "json"}

    def _each_manifest(
        self, wanted: list[tuple[str, str]], take: Callable[[dict[str, Any]], Any]
    ) -> Iterator[tuple[tuple[str, str], Any, str | None]]:
        """``(pair, take(manifest), None)`` for each ``(volume, backup)`` pair whose manifest
        reads, ``(pair, None, why)`` for each damaged one (it fails authentication, does not
        parse): one damaged manifest must not stop every command that reads them all, each
        of which says what it does about it. Those deleted since they were listed are left
        out. Read in parallel, but only ``2 * workers`` at a time, and each manifest is
        dropped as soon as ``take`` has kept what the caller needs of it (a summary, the
        names of its blocks): a store keeping many backups of a large volume would
        otherwise hold every manifest, each a few dozen bytes per block, at once."""

        def read(pair: tuple[str, str]) -> tuple[Any, str | None] | None:
            try:
                return take(self.manifest(*pair)), None
            except NotFound:
                return None
            except CorruptState as exc:
                return None, str(exc)

        if wanted:  # a record that does not open fails the command, not each manifest
            self.keys  # noqa: B018
        window = 2 * self.workers
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            for index, pair in enumerate(wanted, 1):
                pending.append((pair, pool.submit(read, pair)))
                while len(pending) >= window or (pending and index == len(wanted)):
                    done, future = pending.popleft()
                    found = future.result()
                    if found is not None:
                        yield (done, *found)

    def list(self, volume: str | None = None) -> list[dict[str, Any]]:
        """Backups, oldest first, each once: ``complete`` (its manifest exists), ``in_progress``
        (its marker is fresh), ``interrupted`` (a marker that its process stopped
        refreshing, and no manifest: ``lhfs backup gc`` removes it), ``damaged`` (a
        manifest that cannot be read, ``reason`` says why: ``lhfs backup rm`` removes it) or
        ``newer`` (one a newer lhfs wrote: read by upgrading lhfs)."""
        complete: dict[tuple[str, str], Any] = {}
        markers = {}
        for obj, vol, name, kind in self._listed(volume)[0]:
            if kind == "json":
                complete[(vol, name)] = obj
            elif kind == "running":
                markers[(vol, name)] = obj
        # (by this host's clock: what it shows is advice; collection asks the server's clock)
        now = time.time()
        out = []
        for (vol, name), obj in markers.items():
            if (vol, name) in complete:
                continue  # finished, its marker not removed yet (or never: gc removes it)
            state = "in_progress" if self.fresh(obj, now) else "interrupted"
            out.append(_unread(vol, name, state, obj))
        for (vol, name), summary, reason in self._each_manifest(list(complete), _summary):
            if reason is None:
                out.append({"volume": vol, "name": name, **summary})
            else:
                state = "newer" if NEWER in reason else "damaged"
                out.append(_unread(vol, name, state, complete[(vol, name)], reason))
        return sorted(out, key=order)

    def fresh(self, obj: Any, now: float) -> bool:
        """Whether the marker ``obj`` is of a process that may live: refreshed within
        ``STALE`` of ``now``, and not of this host's boot with its process gone."""
        if now - obj.last_modified.timestamp() >= STALE:
            return False
        return not died_here(self._about(obj.object_name))

    def _about(self, key: str) -> dict[str, Any]:
        """What the marker ``key`` says of itself ({} when it is gone or not lhfs's)."""
        try:
            found = self.bucket.get(key, SMALL_OBJECT)
            about = parse_json(found[0]) if found else {}
        except (CorruptState, ValueError, NotFound):
            return {}
        return about if isinstance(about, dict) else {}

    def restore(
        self,
        volume: str,
        name: str,
        write_block: Callable[[int, bytes], None],
        progress: Callable[..., None] = lambda *pct: None,
        held: Callable[[int, str | None], bool] | None = None,
        kind: str = "restore",
        manifest: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Fetch every block, check it, hand it to ``write_block``, but for the blocks the
        new volume holds already: ``held(index, digest)`` says which (by default the empty
        ones, null in a manifest: a new volume reads as zeros). An empty block that is not
        held (a volume on a backing image reads the image there) is handed over as zeros,
        unfetched. A block the volume holds in several places is fetched once and written
        to each of them. The backup is marked read meanwhile (``reading``; ``kind`` says by
        what), so that no removal takes its blocks away half-way; one that nonetheless went
        (removed by an lhfs that does not look for readers, or by hand) is said to be gone,
        not taken for damage. ``manifest``: the backup's, when the caller read it already
        (with ``manifest``): used as it is, not read again (the caller decided on the one it
        read; a second read could find another, the store changed meanwhile)."""
        if manifest is not None and manifest.get("name") != name:
            raise ValueError(f"the manifest given is of backup {manifest.get('name')}, not {name}")
        with self.reading(volume, name, kind):
            try:
                return self._restore(volume, name, write_block, progress, held, manifest)
            except BlockMissing as exc:
                if self.bucket.exists(self._key(volume, name, "json")):
                    raise
                raise BackupRemoved(
                    f"backup {name} of volume {volume} was removed from {self.target} during "
                    f"the restore ({exc} with it); the store is not damaged"
                ) from None

    def _restore(
        self,
        volume: str,
        name: str,
        write_block: Callable[[int, bytes], None],
        progress: Callable[..., None],
        held: Callable[[int, str | None], bool] | None,
        manifest: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """``restore``, the backup marked read."""
        if manifest is None:
            manifest = self.manifest(volume, name)
        block = manifest["block_size"]
        places: dict[str, list[int]] = {}
        empty: list[int] = []
        for index, digest in enumerate(manifest["blocks"]):
            if held(index, digest) if held is not None else digest is None:
                continue
            if digest:
                places.setdefault(digest, []).append(index)
            else:
                empty.append(index)
        total = sum(len(indexes) for indexes in places.values()) + len(empty)
        done = 0
        for index in empty:
            write_block(index, bytes(block))
            done += 1
            progress(100 * done / max(1, total), done * block, total * block)
        by_first = {indexes[0]: indexes for indexes in places.values()}
        for first, data in self.fetch((indexes[0], d) for d, indexes in places.items()):
            for index in by_first[first]:
                check_slot(manifest, index, data, f"backup {name} of volume {volume}")
                write_block(index, data)
                done += 1
            progress(100 * done / max(1, total), done * block, total * block)
        return manifest

    def fetch(
        self, items: Iterable[tuple[int, str]], keep_going: bool = False
    ) -> Iterator[tuple[int, Any]]:
        """``(index, data)`` for each ``(index, digest)``, in order, each checked; fetched in
        parallel with at most twice as many blocks in memory as there are workers. With
        ``keep_going``, a block that is corrupt or missing is given as its error instead of
        raising it (a check lists them all).

        Left early (an error, a stop signal), it drops the queued fetches and does not wait
        for those under way: a slow or hanging store must not hold up a caller that stops."""
        pool = ThreadPoolExecutor(self.workers)
        window: deque = deque()

        def get(digest: str) -> Any:
            try:
                return self.get_block(digest)
            except CorruptState as exc:
                if keep_going:
                    return exc
                raise

        try:
            for index, digest in items:
                window.append((index, pool.submit(get, digest)))
                if len(window) >= 2 * self.workers:
                    first, future = window.popleft()
                    yield first, future.result()
            while window:
                first, future = window.popleft()
                yield first, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- DR standbys and retention --------------------------------------------------------------

    def mark_standby(self, volume: str, standby: str, label: str, backup: str) -> None:
        """Record that the DR standby ``standby`` (an id; ``label`` its name, for people) holds
        ``backup`` of ``volume``: prune keeps that backup, which its next increment reads."""
        record = {"standby": label, "backup": backup, "at": rfc3339()}
        self.put_sealed(f"standbys/{volume}/{standby}.json", json.dumps(record).encode())

    def unmark_standby(self, volume: str, standby: str) -> None:
        self.bucket.delete(self.target.key(f"standbys/{volume}/{standby}.json"))

    def standby_marks(self, volume: str) -> list[dict[str, Any]]:
        """What the DR standbys of ``volume`` recorded (each authenticated)."""
        prefix = self.target.key("standbys", volume) + "/"
        out = []
        for obj in self.bucket.list(prefix):
            relative = f"standbys/{volume}/{obj.object_name[len(prefix) :]}"
            found = self.get_sealed(relative)
            if found is None:  # (removed since the listing)
                continue
            try:
                record = parse_json(found)
                out.append(
                    {
                        "id": relative.rsplit("/", 1)[1].removesuffix(".json"),
                        "standby": str(record["standby"]),
                        "backup": str(record["backup"]),
                    }
                )
            except (ValueError, KeyError, TypeError):
                raise CorruptState(f"{relative} in {self.target} cannot be parsed") from None
        return out

    def prune(
        self,
        volume: str,
        policy: dict[str, int],
        dry_run: bool = False,
        also: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Delete the backups of ``volume`` that ``policy`` does not keep (see ``retention``),
        never the newest, one a DR standby recorded or one of ``also`` (name: why, e.g. the
        parts of system backups), then collect unreferenced blocks. ``dry_run``: only say
        what would go."""
        from .retention import keep

        if not any(policy.values()):
            raise InvalidArgument(
                "no --keep-* rule keeps anything (none given, or each 0): prune refuses to "
                "delete every backup"
            )
        names = self.complete_names(volume)
        backups, damaged = [], {}
        for (_, name), backup, reason in self._each_manifest(
            [(volume, name) for name in names],
            lambda m: {"time": taken_at(m), "created": m["created"]},
        ):
            if reason is None:
                backups.append({"name": name, **backup})
            else:
                damaged[(volume, name)] = reason
        kept = keep(backups, policy)
        present = {b["name"] for b in backups}
        for mark in self.standby_marks(volume):
            if mark["backup"] in present:
                kept.setdefault(mark["backup"], []).append(
                    f"DR standby {mark['standby']} (marker {mark['id']})"
                )
        for name, why in (also or {}).items():
            if name in present:
                kept.setdefault(name, []).append(why)
        for vol, name, obj in self.readers(volume):  # (one listing; usually none)
            if name in present:
                kept.setdefault(name, []).append(f"being read: {self._reader_said(vol, name, obj)}")
        doomed = sorted(
            (b for b in backups if b["name"] not in kept), key=lambda b: (b["time"], b["name"])
        )
        report: dict[str, Any] = {
            "volume": volume,
            "kept": [
                {"name": b["name"], "created": b["created"], "reasons": kept[b["name"]]}
                for b in sorted(backups, key=lambda b: (b["time"], b["name"]))
                if b["name"] in kept
            ],
            "removed": [{"name": b["name"], "created": b["created"]} for b in doomed],
            # (neither kept nor removed: what they hold is unknown; 'backup rm' removes one)
            "damaged": [{"name": n, "reason": why} for (_, n), why in sorted(damaged.items())],
            "dry_run": dry_run,
            "collected": 0,
            "deferred": None,
        }
        if dry_run:
            return report
        for backup in doomed:
            self.forget(volume, backup["name"])
        if doomed:
            done = self.collect()
            report.update(collected=done.removed, deferred=done.deferred)
        return report

    def delete(self, volume: str, name: str) -> Collection:
        """Delete one backup, then collect unreferenced blocks (see ``collect``); ``Busy``
        while a restore reads it (see ``reading``), nothing deleted. A backup not there
        may be one whose removal was cut short after its manifest went: what to run then
        is said."""
        if not self.has_backup(volume, name):
            raise NotFound(
                f"no backup {name!r} of volume {volume!r} in {self.target} (if a 'backup rm' "
                f"of it was cut short, 'lhfs backup gc --target {self.target}' collects the "
                "blocks it left)"
            )
        read = self.readers(volume, name)
        if read:
            raise Busy(
                f"{self._reader_said(*read[0])} is under way: backup {name} not removed; "
                "try again once it is done"
            )
        # (not ``forget``: it would ask again whether the manifest is there; one removed
        # meanwhile by another 'backup rm' is gone all the same, and its blocks are kept
        # from the collection while a restore reads them, whatever this one saw)
        self.bucket.delete(self._key(volume, name, "json"))
        return self.collect()

    def forget(self, volume: str, name: str) -> None:
        """Delete one backup's manifest (its blocks wait for a collection); NotFound if the
        store has no such backup. Not read first: a damaged one is deleted all the same."""
        key = self._key(volume, name, "json")
        if not self.bucket.exists(key):
            raise NotFound(f"no backup {name!r} of volume {volume!r} in {self.target}")
        self.bucket.delete(key)

    def collect(self, sweep: bool = False, strays: bool = False) -> Collection:
        """Delete the blocks no complete backup references; nothing while a backup runs (the
        result says which, and the blocks wait for the next collection). With ``sweep``, also
        remove the markers of backups whose process died (``interrupted`` in ``list``); with
        ``strays`` too, the stray objects (kept otherwise, and named in the result: an
        object lhfs does not know may be someone's, or a newer lhfs's)."""
        with self._collection_marker() as marker:
            running = self._running(marker.key)
            if running:
                return Collection(0, running)
            listed, found = self._listed()
            complete = [(vol, name) for _, vol, name, kind in listed if kind == "json"]
            # (one set of every block still referenced: as large as the store's distinct
            # blocks, which a collection must know; the manifests are read one by one)
            referenced: set[str] = set()
            damaged: dict[tuple[str, str], str] = {}
            for pair, needed, reason in self._each_manifest(complete, stored_objects):
                if reason is None:
                    referenced.update(self.keys.block_name(d) for d in needed)
                else:
                    damaged[pair] = reason
            if damaged:  # the blocks a damaged manifest names are unknown: none may go
                return Collection(0, self._unknown_blocks(damaged), damaged=damaged)
            running = self._running(marker.key)  # a second look, now that the work is known
            if running:
                return Collection(0, running)
            # a reader of a backup whose manifest went (its blocks are not among those kept)
            listed_names = set(complete)
            gone = [r for r in self.readers(own=marker.key) if r[:2] not in listed_names]
            if gone:
                return Collection(
                    0,
                    f"{self._reader_said(*gone[0])} is under way and its backup was removed "
                    f"(or its process died: its marker counts for {STALE / 60:.0f} minutes "
                    "after its last sign of life)",
                )
            # a stray named as a manifest or a marker may be a backup this lhfs does not know
            # (a newer lhfs's name, a copy): the blocks it needs are unknown, none may go
            unknown = [o for o in found if o.object_name.endswith((".json", ".running"))]
            if unknown and not (sweep and strays):
                url = f"s3://{self.target.bucket}/{_shown(unknown[0].object_name)}"
                reason = (
                    f"stray object {url} may be a backup this lhfs does not know (a newer "
                    "lhfs's, or a copy): the blocks it needs are unknown; 'lhfs backup gc "
                    f"--target {self.target} --strays' removes it, and then collects"
                )
                return Collection(0, reason, damaged={("", url): reason})
            removed = 0
            blocks, odd = self._blocks()
            found += odd
            inner = [o.object_name for o in found if o.object_name.endswith("/" + RECORD)]
            if sweep and strays and inner:  # (made before stores inside others were refused)
                raise WrongState(
                    f"{self.target} holds the store s3://{self.target.bucket}/"
                    f"{_shown(inner[0].removesuffix('/' + RECORD))}, whose objects are strays "
                    "here: --strays would delete it (move one of the stores, or drop --strays)"
                )
            for obj in blocks:
                if obj.object_name.rsplit("/", 1)[1] not in referenced:
                    self.bucket.delete(obj.object_name)
                    removed += 1
            swept = 0
            if sweep:  # markers of dead backups: listed again, the fresh ones kept (a backup
                # whose heartbeat came back since the first look is alive after all)
                for obj in found if strays else []:  # (nothing lhfs writes nor reads)
                    self.bucket.delete(obj.object_name)
                now = self.bucket.modified(marker.key)
                for kind in ("volumes", "systems"):  # (a dead system backup's too)
                    for obj in self.bucket.list(self.target.key(kind) + "/"):
                        if obj.object_name.endswith(".running") and not self.fresh(obj, now):
                            self.bucket.delete(obj.object_name)
                            swept += 1
                base = self.target.key(_READERS) + "/"  # (and a dead restore's)
                for obj in self.bucket.list(base):
                    if _reader(obj.object_name[len(base) :]) and not self.fresh(obj, now):
                        self.bucket.delete(obj.object_name)
                        swept += 1
            urls = [f"s3://{self.target.bucket}/{_shown(o.object_name)}" for o in found]
            gone = sweep and strays
            return Collection(removed, None, swept, strays=urls, strays_removed=gone)

    def _unknown_blocks(self, damaged: dict[tuple[str, str], str]) -> str:
        """Why a collection deletes nothing while ``damaged`` manifests are in the store. One
        that a newer lhfs wrote is said first, and is no damage: it is a valid backup, which
        only an upgrade lets this host read (to be told to delete it would lose it)."""
        newer = {pair: reason for pair, reason in damaged.items() if NEWER in reason}
        (vol, name), reason = min((newer or damaged).items())
        others = len(damaged) - 1
        more = f" (and {others} more: 'lhfs backup ls' shows them)" if others else ""
        if newer:
            return (
                f"{reason.removesuffix(_UPGRADE)}{more}; this lhfs cannot collect this "
                "store: upgrade lhfs to collect"
            )
        url = f"{self.target}?{urlencode({'volume': vol, 'backup': name})}"
        return (
            f"{reason}{more}; the blocks a damaged manifest names are unknown, so none is "
            f"deleted until it is removed ('lhfs backup rm {url}')"
        )

    def _collection_marker(self) -> Marker:
        """The marker of a collection, saying who runs it and since when (for a backup it
        holds back to tell the operator)."""
        key = self.target.key("locks", f"collect-{secrets.token_hex(8)}")
        return Marker(self.bucket, key)

    def _running(self, own: str) -> str | None:
        """What running backup holds collection back, if any (None: none)."""
        prefix = self.target.key("volumes") + "/"

        def marker(key: str) -> bool:  # (a stray named so is no backup: it holds nothing)
            found = _ours(key[len(prefix) :])
            return found is not None and found[2] == "running"

        live = self._live(prefix, own, marker)
        if not live:
            return None
        vol, name, _ = _parts(live[0].object_name)
        more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
        return (
            f"backup {name} of volume {vol} is running{more} (or its process died: its marker "
            f"counts for {STALE / 60:.0f} minutes after its last sign of life)"
        )

    def _live(self, prefix: str, own: str, match: Callable[[str], bool]) -> list[Any]:
        """The fresh markers (other than ``own``) matching ``match`` under ``prefix``;
        "fresh" by the server's clock, read from the time of ``own`` (only when there are
        others: usually there are none, and a round trip is saved). That time is taken back
        by however long its asking took after the listing (retries, or a heartbeat rewriting
        ``own`` meanwhile): an age may come out too young, never too old."""
        others = [
            obj
            for obj in self.bucket.list(prefix)
            if obj.object_name != own and match(obj.object_name)
        ]
        if not others:
            return []
        listed = time.monotonic()
        now = self.bucket.modified(own) - (time.monotonic() - listed)
        return [obj for obj in others if self.fresh(obj, now)]

    def check(
        self, read_data: bool = False, progress: Callable[..., None] = lambda *pct: None
    ) -> dict[str, Any]:
        """Prove the store sound: its record opens, every manifest and ``volume.meta``
        authenticates and parses, every block a manifest names exists; with ``read_data``,
        every such block is fetched and checked against its digest. Changes nothing. The
        report lists each problem in a line (``problems``), empty when sound."""
        problems: list[str] = []
        self.keys  # noqa: B018 - a record that does not open is the first thing to say
        listed, strays = self._listed()
        stored_blocks, odd = self._blocks()
        strays += odd
        manifests: dict[tuple[str, str], dict[str, Any]] = {}
        for _, vol, name, kind in listed:
            try:
                if kind == "json":
                    manifests[(vol, name)] = self.manifest(vol, name)
                elif kind == "meta" and self._recorded(vol)[1] is not None:
                    problems.append(
                        f"{self._recorded(vol)[1]}: the backups of {vol} read without it (each "
                        "manifest is authenticated on its own); the next backup of "
                        f"{vol} to {self.target} writes it again"
                    )
            except (CorruptState, NotFound) as exc:
                problems.append(str(exc))
        for obj in strays:
            problems.append(
                f"stray object s3://{self.target.bucket}/{_shown(obj.object_name)}: not an "
                f"object lhfs writes, nor needs; 'lhfs backup gc --target {self.target} "
                "--strays' removes it"
            )
        wanted: dict[str, str] = {}  # object name -> digest, of every object a backup needs
        # digest -> every backup naming it (a bad block is reported with all it breaks)
        users: dict[str, set[tuple[str, str]]] = {}
        blocks: dict[str, tuple[int, set[str]]] = {}  # block digest -> size, objects it needs
        fits: dict[str, set[int]] = {}  # block digest -> the lengths every place it has allows
        for (vol, name), manifest in manifests.items():
            recipes = manifest.get("deltas", {})
            for index, digest in enumerate(manifest["blocks"]):
                if digest:
                    recipe = recipes.get(str(index))
                    parts = {recipe["base"], recipe["delta"]} if recipe else {digest}
                    blocks[digest] = (manifest["block_size"], parts)
                    allowed = set(slot_lengths(manifest, index))
                    fits[digest] = fits.get(digest, allowed) & allowed
                    for used in {digest, *parts}:
                        users.setdefault(used, set()).add((vol, name))
                    for part in parts:
                        wanted[self.keys.block_name(part)] = part
        # name -> size, of every block object (those no backup names: a note, see below)
        stored = {obj.object_name.rsplit("/", 1)[1]: obj.size or 0 for obj in stored_blocks}
        missing = {wanted[name] for name in set(wanted) - stored.keys()}
        broken: set[tuple[str, str]] = set()  # backups that cannot be restored whole
        for digest in sorted(missing):
            problems.append(f"block {digest} is missing ({_named(users[digest])})")
            broken |= users[digest]
        read = 0
        if read_data:  # every block whose objects are there, rebuilt and verified
            present = [
                (d, size) for d, (size, parts) in sorted(blocks.items()) if not parts & missing
            ]
            total = sum(size for _, size in present)
            done = 0
            items = ((n, digest) for n, (digest, _) in enumerate(present))
            for n, result in self.fetch(items, keep_going=True):
                digest, size = present[n]
                done += size
                if isinstance(result, CorruptState):
                    problems.append(f"{result} ({_named(users[digest])})")
                    broken |= users[digest]
                elif len(result) not in fits[digest]:  # (a manifest names another's block)
                    problems.append(
                        f"block {digest} is {len(result)} bytes, not the block size of every "
                        f"backup naming it ({_named(users[digest])}): a manifest was changed "
                        "by someone who can write the bucket; 'lhfs backup rm' those that "
                        "should not name it"
                    )
                    broken |= users[digest]
                else:
                    read += 1
                progress(100 * done / max(1, total), done, total)
        progress(100.0, None, None)
        return {
            "target": str(self.target),
            "encrypted": self.keys.encrypted,
            "backups": len(manifests),
            "blocks": len(wanted),
            "blocks_read": read,
            # (left by a removal cut short, or sent by a backup under way: 'backup gc')
            "unreferenced_blocks": len(stored.keys() - set(wanted)),
            "unreferenced_bytes": sum(stored[n] for n in stored.keys() - set(wanted)),
            "problems": problems,
            # (a full backup of each of their volumes sends every block of it again)
            "broken_backups": [{"volume": v, "backup": n} for v, n in sorted(broken)],
        }

    def _blocks(self) -> tuple[list[Any], list[Any]]:
        """The block objects under ``blocks/``, from one listing, and the strays there: any
        other object (a note, another store whose prefix lies inside this one, a newer
        lhfs's object) is no block of this store, and only ``--strays`` deletes it."""
        prefix = self.target.key("blocks") + "/"
        blocks, strays = [], []
        for obj in self.bucket.list(prefix):
            (blocks if is_block_key(obj.object_name[len(prefix) :]) else strays).append(obj)
        return blocks, strays

    def block_count(self) -> int:
        return len(self._blocks()[0])


def _named(users: set[tuple[str, str]]) -> str:
    """The backups of ``users`` (volume, backup), for a problem's line."""
    return "named by " + ", ".join(f"backup {name} of {vol}" for vol, name in sorted(users))


def writer() -> dict[str, Any]:
    """Who writes a marker, as it records: a marker of this host since its boot, in this PID
    namespace, whose pid is gone is dead at once (``died_here``); any other only once stale."""
    return {
        "host": socket.gethostname(),
        "boot": boot_id(),
        "pidns": pid_namespace(),
        "pid": os.getpid(),
    }


def died_here(about: dict[str, Any]) -> bool:
    """Whether a marker's writer (``about``: its body) ran on this host since its last boot,
    in this PID namespace, and its process is gone. Gone as ``procs.alive`` says, never as
    ``/proc`` alone shows it: under ``hidepid`` a live process of another user has no entry
    there, and its backup's marker was swept (a pid reused since counts as alive: only ever
    too careful)."""
    here = writer()
    if None in (here["boot"], here["pidns"]) or any(
        about.get(key) != here[key] for key in ("host", "boot", "pidns")
    ):
        return False
    pid = about.get("pid")
    return _is_int(pid, 1, 1 << 31) and not alive(pid)


def _is_int(value: Any, low: int, high: int) -> bool:
    """An integer of JSON (not a float, nor true or false) from ``low`` to ``high``."""
    return type(value) is int and low <= value <= high


def _passes(check: Callable[[int], None], value: Any) -> bool:
    """Whether ``value`` is an integer that ``check`` accepts."""
    if type(value) is not int:
        return False
    try:
        check(value)
    except InvalidArgument:
        return False
    return True


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _not_newer(record: Any, what: str) -> None:
    """Refuse a record (a manifest, a volume's record) that a newer lhfs wrote, saying so:
    called damaged, its reader would be told to distrust a store that is fine, and to
    upgrade nothing (``format`` says what a reader must know to read it)."""
    found = record.get("format") if isinstance(record, dict) else None
    if type(found) is int and found > FORMAT:
        raise CorruptState(f"{what} was {NEWER} (format {found}){_UPGRADE}")


def _bad_field(manifest: Any, volume: str, name: str) -> str | None:
    """The first field of a manifest that is not what lhfs writes, or None when all are.
    Every field a reader uses is checked here, once, for its type and range: anyone who can
    read a plain store's MAC key can seal a manifest, and a wrong type must be refused here in
    one line, not fail as a traceback where the field is used (nor pass ``backup check``)."""
    if not isinstance(manifest, dict):
        return "JSON"
    m = manifest.get
    size, block_size, blocks = m("size"), m("block_size"), m("blocks")
    snapshot, created, started = m("snapshot"), m("created"), m("started", 0.0)
    chunk_size, unit, recipes = m("chunk_size"), m("delta_unit"), m("deltas", {})
    if not _is_int(m("format"), FORMAT, FORMAT):
        return "format"
    if (m("volume"), m("name")) != (volume, name):
        return "volume and name"
    if snapshot is not None and not isinstance(snapshot, str):
        return "snapshot"
    if _stamp(created) is None:  # (a real date: taken_at may read it)
        return "created"
    if type(started) not in (int, float) or not 0 <= started < _LAST_TIME:
        return "started"  # (not in the first manifests lhfs wrote)
    # seconds since the epoch; the first manifests that had it said it as RFC 3339 (a real
    # date); those before snapshots' times were recorded have none
    if "taken" in manifest and not (_is_time(m("taken")) or _stamp(m("taken")) is not None):
        return "taken"
    if not _is_int(size, 0, MAX_SIZE):
        return "size"
    if not _passes(check_block_size, block_size):
        return "block_size"
    # (the source volume's; a backing image's backups have none)
    if "chunk_size" in manifest and not (
        _passes(check_chunk_size, chunk_size) and size % chunk_size == 0
    ):
        return "chunk_size"
    # (the content id of the backing image the source volume stood on; none in older
    # manifests, nor of a volume made on no image: restored whole)
    image = m("backing_image")
    if image is not None and not (
        isinstance(image, str) and IMAGE_ID.fullmatch(image) and 0 < id_size(image) <= size
    ):
        return "backing_image"
    called = m("backing_image_name")  # (the name it was made from: only said, never matched)
    if called is not None and not (image and isinstance(called, str) and NAME.fullmatch(called)):
        return "backing_image_name"
    if not isinstance(blocks, list) or len(blocks) != -(-size // block_size):
        return "blocks"
    if not all(digest is None or _is_digest(digest) for digest in blocks):
        return "blocks"
    if recipes and not (_passes(check_chunk_size, unit) and 4 * unit <= block_size):
        return "delta_unit"
    if not isinstance(recipes, dict) or not all(
        _INDEX.fullmatch(index)
        and int(index) < len(blocks)
        and blocks[int(index)] is not None
        and deltas.valid(recipe, block_size, unit, _is_digest)
        for index, recipe in recipes.items()
    ):
        return "deltas"
    return None


def manifest_limit(block_size: int) -> int:
    """The most a manifest of ``block_size`` blocks can weigh, so that no manifest lhfs wrote
    is ever refused: one of a volume of the largest size lhfs handles (``MAX_SIZE``), every
    block named (36 bytes of JSON) and stored as a delta (its recipe, some 120 bytes, and up
    to a quarter of the block's units of 4 KiB or more, 6 bytes each), with room to spare.
    It is large (some 650 GB for 2 MiB blocks): it stops only the absurd."""
    blocks = -(-MAX_SIZE // block_size)
    return SMALL_OBJECT + blocks * (200 + 8 * (block_size // (16 << 10)))


def _decompress(frame: bytes, what: str) -> bytes:
    """A stored object's zstd frame, decompressed into at most ``MAX_BLOCK`` bytes: no block
    (nor delta) is larger. A frame names the size it decompresses to, and the decompressor
    would take that much memory at once (32 KB of zeros claim a gigabyte), so a larger claim
    is refused before anything is decompressed, and a frame that names none is decompressed
    into a bounded buffer. Either way it is a corrupt block, never an exhausted host."""
    try:
        if zstandard.frame_content_size(frame) > MAX_BLOCK:
            raise CorruptState(
                f"{what} cannot be decompressed: it claims more than {format_size(MAX_BLOCK)}, "
                "the largest a block can be"
            )
        return zstandard.ZstdDecompressor().decompress(frame, max_output_size=MAX_BLOCK)
    except zstandard.ZstdError:
        raise CorruptState(f"{what} cannot be decompressed") from None


def stored_objects(manifest: dict[str, Any]) -> set[str]:
    """The digests of the objects a backup needs: its whole blocks, and the base and delta of
    each block it stores as a delta."""
    recipes = manifest.get("deltas", {})
    whole = {d for i, d in enumerate(manifest["blocks"]) if d and str(i) not in recipes}
    return whole | {r[key] for r in recipes.values() for key in ("base", "delta")}


def _relative(volume: str, name: str, suffix: str) -> str:
    """A backup's object under the store's prefix (what its seal is bound to)."""
    return f"volumes/{volume}/{name}.{suffix}"


@contextlib.contextmanager
def _uploads(workers: int) -> Iterator[ThreadPoolExecutor]:
    """The pool of a backup's uploads. Left on an error, it drops those not started yet,
    which would each wait for a store that is gone in turn; those under way give up with the
    first one that did (see ``Bucket._call``)."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def is_block_key(relative: str) -> bool:
    """Whether ``relative`` (a key under ``blocks/``) is shaped as lhfs names a block:
    ``<first two characters>/<32 lowercase hex digits>`` (a digest, or in an encrypted store
    its keyed name), nothing else."""
    first, _, name = relative.partition("/")
    return _DIGEST.fullmatch(name) is not None and first == name[:2]


def _collecting(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("collect-")


@dataclass
class Collection:
    """What a collection did: blocks removed, or why it deferred (a backup runs, or damaged
    manifests, ``damaged``, name blocks nobody can know), and the markers of dead backups
    and the stray objects it swept."""

    removed: int
    deferred: str | None = None
    swept: int = 0
    damaged: dict[tuple[str, str], str] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)  # stray objects found
    strays_removed: bool = False  # whether they were removed (``collect(sweep, strays)``)


def _ours(relative: str) -> tuple[str, str, str] | None:
    """``(volume, backup, kind)`` of an object under ``volumes/`` (``relative`` to it) of a
    kind lhfs writes there (``volume.meta``: backup ``""``, kind ``meta``), else None: a
    stray. Backup names as lhfs makes them (a snapshot's name and a suffix: up to
    ``MAX_BACKUP_NAME``)."""
    vol, _, leaf = relative.partition("/")
    name, _, kind = leaf.rpartition(".")
    if not NAME.fullmatch(vol) or "/" in leaf:
        return None
    if leaf == "volume.meta":
        return vol, "", "meta"
    if kind in ("json", "running") and BACKUP_NAME.fullmatch(name):
        return vol, name, kind
    return None


def _reader(relative: str) -> tuple[str, str] | None:
    """``(volume, backup)`` of a reader's marker (``relative`` to ``locks/read/``), else None:
    not one lhfs writes, and it holds nothing back."""
    parts = relative.split("/")
    if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{16}", parts[2]):
        return None
    if not NAME.fullmatch(parts[0]) or not BACKUP_NAME.fullmatch(parts[1]):
        return None
    return parts[0], parts[1]


def _parts(key: str) -> tuple[str, str, str]:
    """(volume, backup, kind) of an object under ``volumes/``."""
    vol, leaf = key.split("/")[-2:]
    name, _, kind = leaf.rpartition(".")
    return vol, name, kind


def _shown(key: str) -> str:
    """A key from a listing (whoever can write the bucket names it), fit for a terminal:
    printable ASCII as it is, anything else escaped (``\\x1b``)."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode() for c in key)


def _is_time(value: Any) -> bool:
    """Seconds since the epoch, as lhfs writes them."""
    return type(value) in (int, float) and 0 <= value < _LAST_TIME


def _stamp(value: Any) -> float | None:
    """An RFC 3339 time as ``rfc3339`` writes it, in seconds since the epoch; None when it is
    not one, or not a real date (2024-02-30)."""
    if not isinstance(value, str) or not _CREATED.fullmatch(value):
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return None


def snapshot_time(created: Any) -> float | None:
    """A snapshot layer's ``created`` (RFC 3339, maybe with fractions of a second or an
    offset: its first 19 characters are read) in seconds since the epoch; None when it is
    not a real date."""
    if not isinstance(created, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, OverflowError):
        return None


def taken_at(backup: dict[str, Any]) -> float:
    """When a backup's content was the volume's (seconds since the epoch): its snapshot's
    time. Not when its upload began: a backup of an older snapshot, or a system backup's part
    uploaded minutes after its snapshot, is older than a backup started before it of a later
    snapshot, and a DR standby or ``--keep-last`` taking it for the newest would go back in
    time. Manifests written before snapshots' times were recorded: their start. Never
    raises (0.0 when nothing reads)."""
    taken, started = backup.get("taken"), backup.get("started")
    if _is_time(taken):
        return float(taken)
    stamp = _stamp(taken)
    if stamp is not None:
        return stamp
    if _is_time(started) and started:
        return float(started)
    return _stamp(backup.get("created")) or 0.0


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``list`` shows of a complete backup: its manifest's fields but the block list,
    which is counted (the manifest itself is not kept)."""
    return {
        "state": "complete",
        "snapshot": manifest.get("snapshot"),
        "created": manifest["created"],
        "started": manifest.get("started", 0.0),
        "taken": taken_at(manifest),
        "size": manifest["size"],
        "blocks": sum(1 for d in manifest["blocks"] if d),
        "reason": None,
    }


def _unread(vol: str, name: str, state: str, obj: Any, reason: str | None = None) -> dict:
    """A ``list`` entry of a backup whose manifest is not read (none yet, or damaged): its
    times are those of its listed object."""
    return {
        "volume": vol,
        "name": name,
        "state": state,
        "snapshot": None,
        "created": obj.last_modified.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "started": obj.last_modified.timestamp(),
        "taken": None,
        "size": None,
        "blocks": None,
        "reason": reason,
    }


def order(backup: dict[str, Any]) -> tuple:
    """Oldest first: by the snapshot's time (see ``taken_at``), then by when each started."""
    started = backup.get("started")
    return (taken_at(backup), float(started) if _is_time(started) else 0.0, backup["name"])


class Marker:
    """An object saying "running" for as long as a ``with`` block lasts: written on entry,
    rewritten every ``HEARTBEAT`` seconds by a thread (whatever the block is waiting on),
    deleted on exit, also when the block fails. It may say what the work has made so far
    (``note``), for others to leave alone while it runs."""

    def __init__(
        self,
        bucket: Bucket,
        key: str,
        claim: str | None = None,
        about: dict[str, Any] | None = None,
        told: Callable[[str], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self.key = key
        # (when the block succeeded, a marker left behind is told here, not raised: the work
        # is done all the same)
        self.told = told
        self.claim = claim  # (what it marks, when only one may run: see ``_claim``)
        # (its age says only the beat; ``about``: what else it says from the start)
        self._body: dict[str, Any] = {"started": time.time(), **writer(), **(about or {})}
        self._lock = threading.Lock()  # (a beat never writes back an older body than a note)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self) -> None:
        with self._lock:
            body = json.dumps({**self._body, "refreshed": time.time()}).encode()
            self.bucket.put(self.key, body)

    def note(self, **fields: Any) -> None:
        """Say ``fields`` in the marker from now on (written at once)."""
        self._body.update(fields)
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self._write()
            except Exception as exc:  # the next beat tries again; the owner goes on
                log.warning("could not refresh %s: %s", self.key, exc)

    def __enter__(self) -> Marker:
        if self.claim is None:
            self._write()
        else:
            self._claim()
        self._thread.start()
        return self

    def _claim(self) -> None:
        """Write the marker only if no live one is there (``AlreadyExists`` otherwise): by a
        conditional write, read back with a token of its own (a store that ignores the
        condition overwrites: the token says who won). A stale one (its process died) is
        taken over: at once when it is of this host's boot and PID namespace and its process
        is gone (``died_here``, as every other marker is judged), else once ``STALE``."""
        token = secrets.token_hex(8)
        self._body["owner"] = token
        body = json.dumps({**self._body, "refreshed": time.time()}).encode()
        if not self.bucket.put_new(self.key, body) and self._owner() != token:
            # (not ours: a retried PUT whose first try landed finds its own token above)
            if not died_here(self._found()):
                age = self._age()
                if age < STALE:
                    raise AlreadyExists(
                        f"{self.claim} is under way (its marker {self.key}, refreshed "
                        f"{age:.0f}s ago): if its process is gone (on another host), the "
                        f"marker expires in {STALE - age:.0f}s, then a new one takes it over "
                        "and 'lhfs backup gc' removes it"
                    )
            self._write()  # (its process died: taken over)
        if self._owner() != token:
            raise AlreadyExists(f"{self.claim} is under way (its marker {self.key})")

    def _found(self) -> dict[str, Any]:
        """The marker's body as it is now ({}: none there, or not one lhfs writes)."""
        found = self.bucket.get(self.key, SMALL_OBJECT)
        try:
            body = parse_json(found[0]) if found else {}
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _owner(self) -> str | None:
        """The token in the marker as it is now (None: none there, or not one of ours)."""
        owner = self._found().get("owner")
        return owner if isinstance(owner, str) else None

    def _age(self) -> float:
        """How long ago the marker was last written, by the server's clock (a probe written
        now tells its time): a host whose clock runs ahead must not take a live one over."""
        probe = f"{self.key}.probe-{secrets.token_hex(4)}"
        self.bucket.put(probe, b"")
        try:
            now = self.bucket.modified(probe)
        finally:
            self.bucket.delete(probe)
        try:
            return now - self.bucket.modified(self.key)
        except LhfsError:  # (gone meanwhile: as good as stale; the read-back decides)
            return STALE

    def __exit__(
        self, kind: type[BaseException] | None, failure: BaseException | None, *tb: object
    ) -> None:
        self._stop.set()
        self._thread.join()  # a beat in flight must not write the marker back after this
        try:
            self.bucket.delete(self.key)
        except Exception as error:
            if NOT_CONFIRMED in str(error):  # (its DELETE may land later: not said undone)
                left = f"its marker {self.key} may stay (the store did not answer its removal)"
                left += ": if it does, it counts"
            else:
                left = f"its marker {self.key} could not be removed ({error}): it counts"
            left += (
                f" as running until this process ends (on other hosts, for {STALE / 60:.0f} "
                "minutes), then 'lhfs backup gc' removes it"
            )
            if isinstance(failure, LhfsError):  # the block's own failure, and what it left
                failure.args = (f"{failure}; {left}",)
                return
            if kind is not None:  # (not one a command reports in a line: logged)
                log.warning("%s", left)
                return
            if self.told is not None:
                self.told(left)
                return
            raise LhfsError(left) from None
