"""The chunk store: one replica's copy of a volume as a copy-on-write chain of layers.

Vocabulary:
- *chunk*: the unit of copy-on-write, checksums and rebuild; a power of two per volume.
- *layer*: a set of chunks (``layer.Layer``). The *head* is the one writable layer; *snapshots*
  are immutable layers; the optional *backing image* sits under the bottom snapshot.
- *chain*: the head and its ancestors. Layers form a tree (a revert starts a new head on an old
  snapshot and the newer snapshots stay), but only the head's chain is the volume's content.
- *revision*: a counter bumped by every write and trim and made durable by ``flush``; after a
  crash the replica with the highest revision holds the freshest data.

Reads resolve each chunk through ``_top``, a map chunk -> topmost layer of the chain holding it,
so a read costs the same with three layers or three thousand, and memory follows the chunks
written, never the volume size. The store is synchronous and single-threaded: its caller (the
replica server's event loop) never runs two of its methods at once, which is why no per-chunk
locks are needed. Long operations (``remove_snapshot_steps``) are generators that the caller runs
step by step, interleaved with I/O.

Durability: data is fdatasync'ed before the index batch that points at it; metadata
(``volume.json``: size, layers, names, backing image) is replaced atomically, and checked whole
on open (``check_meta``) before any of it is used. Files of layers the metadata does not name are
removed on open only where a crash of a known operation leaves them: a layer created and not yet
recorded (its files empty), or one whose removal was recorded (``removed``) and not finished.
Any other is refused (``_sweep``): the metadata lost a layer, and deleting its files on that
word alone would lose its data for good.
A change of the metadata is saved before the store's memory takes it (``_commit_meta``): one
that could not be saved (a full disk) leaves the store as it was, in memory as on disk.
A full disk refuses a write or a flush whole (``NoSpace``): the space is claimed first.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import logging
import os
import re
import resource
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from lhfs.core.durable import atomic_write_json, copy_sparse, fsync_dir
from lhfs.core.errors import (
    AlreadyExists,
    BackingImageMismatch,
    Busy,
    CorruptState,
    DamagedLayers,
    DamagedMeta,
    InvalidArgument,
    LhfsError,
    NoSpace,
    NotFound,
    StorageError,
)
from lhfs.core.names import check_name
from lhfs.core.units import MAX_SIZE, TIME_RE, format_sizes, rfc3339
from lhfs.store.backing import IMAGE_ID, BackingImage, content_id, file_stamp, id_size
from lhfs.store.layer import (
    ABSENT,
    CUT_DIGEST,
    DATA,
    LAYER_ID,
    LAYER_SUFFIXES,
    ZERO,
    Layer,
    layer_file,
    no_room,
    pread_into,
    punch_hole,
    pwrite_all,
    reserve,
    write_data,
)

log = logging.getLogger("lhfs.store")

META = "volume.json"
FORMAT = 1
MIN_CHUNK = 1
MAX_CHUNK = 64 << 20
# what may be in a replica directory before its volume is made (an engine's session epoch,
# the directory's identity: both kept by the replica process that serves it)
_MAY_PRECEDE = {"epoch", "lock", ".epoch.tmp", "id", ".id.tmp"}
_LAYER_FILE_RE = re.compile(rf"({LAYER_ID.pattern})\.({'|'.join(LAYER_SUFFIXES)})")
_VOLUME_ID = re.compile(r"[0-9a-f]{32}")  # a volume key's id, hex (``VolumeKey.id_hex``)
_MAX_COUNT = (1 << 64) - 1  # revisions are unsigned 64-bit numbers in the index log


def check_geometry(size: int, chunk_size: int) -> None:
    if chunk_size < MIN_CHUNK or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise InvalidArgument(f"chunk size {chunk_size} is not a power of two up to 64M")
    if size <= 0 or size % chunk_size:
        raise InvalidArgument(
            f"size {size} is not a positive multiple of the chunk size {chunk_size}"
        )
    if size > MAX_SIZE:
        raise InvalidArgument(f"size {size} is more than the largest size lhfs handles (1P)")


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Return ``meta``, read from ``path`` (a volume.json), if lhfs could have written it.

    The file is data on disk like any other: damaged, edited by hand or planted by someone who
    may write the replica directory but must reach nothing outside it. Layer ids and the backing
    image's file name become paths, sizes become work, so every field is checked here, before
    anything uses one: a bad file is refused in one line (``CorruptState`` naming the field),
    never a traceback or a file opened outside the directory. Fields the store reads with a
    default may be missing (``revision``, ``rebuilds``, ``volume_id``, ``backing`` and its
    ``stamp``): a replica made before volume keys has no ``volume_id``, one never rebuilt no
    ``rebuilds``.
    """

    def bad(field: str, should: str, value: Any) -> CorruptState:
        return DamagedMeta(f"{path}: {field} must be {should}, not {value!r:.60}")

    def count(field: str) -> None:
        value = meta.get(field, 0)
        if type(value) is not int or not 0 <= value <= _MAX_COUNT:  # (bool is not a number)
            raise bad(field, "an integer from 0 to 2**64-1", value)

    def geometry(field: str, size: Any, chunk_size: Any) -> None:
        for name, value in ((field, size), ("chunk_size", chunk_size)):
            if type(value) is not int:
                raise bad(name, "an integer", value)
        try:
            check_geometry(size, chunk_size)
        except InvalidArgument as exc:
            raise DamagedMeta(f"{path}: {field}: {exc}") from None

    def layer_id(field: str, value: Any) -> str:
        if not isinstance(value, str) or not LAYER_ID.fullmatch(value):
            raise bad(field, "a layer id (16 hex digits)", value)
        return value

    def plain_name(field: str, value: Any, should: str) -> str:
        try:
            return check_name(value)
        except InvalidArgument:
            raise bad(field, should, value) from None

    if not isinstance(meta, dict):
        raise DamagedMeta(f"{path} is not a JSON object")
    form = meta.get("format")
    if type(form) is int and form > FORMAT:  # (a newer lhfs's: not damage, never set aside)
        raise CorruptState(f"{path} has format {form}, newer than this lhfs's: upgrade lhfs")
    if type(form) is not int or form != FORMAT:
        raise DamagedMeta(f"{path} has unknown format {form!r:.60}")
    size = meta.get("size")
    geometry("size", size, meta.get("chunk_size"))
    count("revision")
    count("rebuilds")
    removed = meta.get("removed", [])
    if not isinstance(removed, list) or not all(
        isinstance(lid, str) and LAYER_ID.fullmatch(lid) for lid in removed
    ):
        raise bad("removed", "a list of layer ids", removed)
    volume_id = meta.get("volume_id")
    if volume_id is not None and not (
        isinstance(volume_id, str) and _VOLUME_ID.fullmatch(volume_id)
    ):
        raise bad("volume_id", "a volume's id (32 hex digits) or null", volume_id)

    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise bad("layers", "an object of one or more layers", layers)
    names: set[str] = set()
    for key, info in layers.items():
        field = f"layers.{layer_id('a key of layers', key)}"
        if not isinstance(info, dict):
            raise bad(field, "an object", info)
        for key_needed in ("name", "parent"):  # (null, or a value: read as info[...] later)
            if key_needed not in info:
                raise bad(f"{field}.{key_needed}", "present (null or a value)", None)
        name = info.get("name")
        if name is not None:
            plain_name(f"{field}.name", name, "a snapshot name or null")
            if name in names:
                raise bad(f"{field}.name", "unique", name)
            names.add(name)
        parent = info.get("parent")
        if parent is not None and layer_id(f"{field}.parent", parent) not in layers:
            raise bad(f"{field}.parent", "a layer or null", parent)
        if not isinstance(info.get("created"), str) or not TIME_RE.fullmatch(info["created"]):
            raise bad(f"{field}.created", "a UTC time (RFC 3339)", info.get("created"))
        geometry(f"{field}.size", info.get("size"), meta["chunk_size"])
        if info["size"] > size:  # (a volume never shrinks: no layer is larger than it)
            raise bad(f"{field}.size", f"at most the volume's size {size}", info["size"])
    if layer_id("head", meta.get("head")) not in layers:
        raise bad("head", "a layer", meta["head"])
    ends: set[str] = set()  # layers whose chain of parents ends
    for key in layers:
        trail: dict[str, None] = {}  # (a dict: long chains are looked up in at C speed)
        while key is not None and key not in ends:
            if key in trail:
                raise DamagedMeta(f"{path}: the parents of layers.{key} lead back to it")
            trail[key] = None
            key = layers[key]["parent"]
        ends.update(trail)

    backing = meta.get("backing")
    if backing is not None:
        if not isinstance(backing, dict):
            raise bad("backing", "an object or null", backing)
        plain_name("backing.file", backing.get("file"), "a file name inside the directory")
        image_id = backing.get("id")
        if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
            raise bad("backing.id", "a backing image id (<xxh3-128 hex>-<size>)", image_id)
        if id_size(image_id) > size:
            raise bad("backing.id", f"of an image no larger than the volume ({size})", image_id)
        stamp = backing.get("stamp")
        if stamp is not None and not (
            isinstance(stamp, list) and len(stamp) == 3 and all(type(n) is int for n in stamp)
        ):
            raise bad("backing.stamp", "three integers or null", stamp)
    return meta


def _check_image(path: Path) -> None:
    """Refuse a backing image that cannot be read, naming it, before a replica directory is
    made for it (the copy failing half-way left a directory holding only its lock). Opened
    without waiting: a FIFO would block the open for ever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"backing image {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot read backing image {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LhfsError(f"backing image {path} is not a regular file")
    finally:
        os.close(fd)


def check_fits(directory: Path, size: int) -> None:
    """Refuse a volume size that the file system under ``directory`` cannot hold as one file
    (ext4: 16 TiB with 4 KiB blocks): a layer's data file is as large as the volume, and the
    first write past the limit would fail it. Probed with a sparse file, said with the limit."""
    largest = largest_file(directory, size)
    if largest < size:
        wanted, most = format_sizes(size, largest)
        raise InvalidArgument(
            f"a volume of {wanted} does not fit: the file system under {directory} "
            f"holds files of at most {most}"
        )


def largest_file(directory: Path, up_to: int = 1 << 50) -> int:
    """The size of the largest file the file system under ``directory`` holds, to the 4 KiB,
    at most ``up_to`` (a sparse probe file: nothing is written)."""
    fd, probe = tempfile.mkstemp(prefix=".size-probe-", suffix=".tmp", dir=directory)
    try:
        try:
            os.ftruncate(fd, up_to)
            return up_to
        except OSError as exc:
            if exc.errno not in (errno.EFBIG, errno.EINVAL):
                raise
        low, high = 0, up_to
        while high - low > 4096:
            middle = (low + high) // 2 // 4096 * 4096
            try:
                os.ftruncate(fd, middle)
                low = middle
            except OSError:
                high = middle
        return low
    finally:
        os.close(fd)
        os.unlink(probe)


def disk_bytes(directory: Path) -> int:
    """The space a replica directory really takes on its disk (its files are sparse)."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _now() -> str:
    return rfc3339()


def _raise_fd_limit() -> None:
    """Long chains open one descriptor per layer touched; allow as many as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _replica_meta(directory: Path) -> dict[str, Any]:
    """A replica directory's ``volume.json`` as it reads, read only ({} when it does not
    read: the replica's start says why). For what a command tells of a directory without
    opening it (which takes the replica's lock); each field is checked by its reader."""
    try:
        meta = json.loads((directory / "volume.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def replica_volume_id(directory: Path) -> str | None:
    """The identity of the volume a replica directory belongs to, as its ``volume.json``
    records it (None when it records none, or does not read: the replica's start says why)."""
    known = _replica_meta(directory).get("volume_id")
    return str(known) if known else None


def replica_size(directory: Path) -> int | None:
    """The size a replica directory holds, as its ``volume.json`` records it (None when it
    records none that is a size, or does not read: the replica's start says why)."""
    size = _replica_meta(directory).get("size")
    return size if type(size) is int and size > 0 else None


class ChunkStore:
    """A replica directory opened for I/O; see the module docstring."""

    def __init__(self, directory: Path, meta: dict[str, Any], lock_fd: int) -> None:
        self.dir = directory
        self.meta = meta
        self._lock_fd = lock_fd
        self.size: int = meta["size"]
        self.chunk_size: int = meta["chunk_size"]
        self.revision: int = meta.get("revision", 0)
        self.layers: dict[str, Layer] = {}
        self.backing: BackingImage | None = None
        self.chain: list[Layer] = []  # head first
        self._top: dict[int, Layer] = {}
        self.operation: dict[str, Any] | None = None  # a long operation under way, for status
        # While a rebuild fills the layers below the head, a partial write to a chunk the head
        # lacks cannot copy the chunk up (what is below is not there yet): it lands as is and
        # its byte ranges are kept here until ``rebuild_finish`` merges them over the synced
        # content. None when no rebuild is under way.
        self.partial: dict[int, list[tuple[int, int]]] | None = None
        # Chunks ``write_changed`` gave back to what is below their layer: their data is
        # freed (a hole punched) only once the index no longer names them (``flush``), as a
        # crash between the two must never leave the index naming a chunk of zeros there.
        self._freed: list[tuple[Layer, int]] = []

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        size: int,
        chunk_size: int,
        backing_image: Path | None = None,
        backing_name: str = "backing.img",
        volume_id: str | None = None,
    ) -> ChunkStore:
        """Initialise an empty replica directory; ``backing_image`` is copied in, then verified.
        ``volume_id`` records which volume the replica belongs to (its key's identity): a
        replica process refuses the key of any other."""
        check_geometry(size, chunk_size)
        directory = Path(directory)
        if (directory / META).exists():
            raise AlreadyExists(f"{directory} already holds a volume")
        if not str(directory) or str(directory) == ".":
            raise InvalidArgument("a replica directory must be named")
        if directory.is_dir() and set(os.listdir(directory)) - _MAY_PRECEDE:
            raise InvalidArgument(
                f"{directory} is not empty: a replica is made in a new or empty directory"
            )
        existing = directory
        while not existing.is_dir():  # (probed before anything is made)
            existing = existing.parent
        check_fits(existing, size)
        if backing_image is not None:  # (a path mistyped is said before anything is made)
            _check_image(Path(backing_image))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = lock_directory(directory)
        try:
            backing = None
            if backing_image is not None:
                local = directory / check_name(backing_name, "backing image file name")
                if Path(backing_image).resolve() != local.resolve():
                    copy_sparse(Path(backing_image), local)
                fd = os.open(local, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                image_id = content_id(local)
                if id_size(image_id) > size:
                    local.unlink()
                    raise InvalidArgument(
                        f"the backing image ({id_size(image_id)} bytes) is larger than the volume"
                    )
                backing = {"id": image_id, "file": local.name, "stamp": file_stamp(local)}
            head = secrets.token_hex(8)
            Layer.create(directory, head, chunk_size)
            meta = {
                "format": FORMAT,
                "size": size,
                "chunk_size": chunk_size,
                "backing": backing,
                "layers": {head: {"name": None, "parent": None, "created": _now(), "size": size}},
                "head": head,
                "revision": 0,
                "volume_id": volume_id,
                "removed": [],
            }
            atomic_write_json(directory / META, meta)
        except BaseException:
            os.close(lock_fd)
            raise
        os.close(lock_fd)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: Path) -> ChunkStore:
        """Open a replica directory exclusively, check it, and build the chunk map."""
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.exists():
            raise NotFound(f"{directory} holds no volume")
        lock_fd = lock_directory(directory)
        try:
            try:
                meta = json.loads(meta_path.read_text())
            except (ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
                raise DamagedMeta(f"{meta_path} is damaged: {exc}") from None
            store = cls(directory, check_meta(meta, meta_path), lock_fd)
            store._load()
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    @classmethod
    def set_aside_rotten_backing(
        cls, directory: Path, before: Callable[[str], None] | None = None
    ) -> str | None:
        """Let go of the copy of the backing image of the replica in ``directory`` (no process
        serves it) if its file no longer holds the image's content (bit rot, a stray write),
        as ``backing_drop`` does for one a scrub found: set aside as ``<file>.rotten``, the
        replica holding none, so that a rebuild sends a good copy. Why: such a replica cannot
        be opened (``BackingImageMismatch``), so no scrub or rebuild could ever repair it.
        ``before`` is told the file's name once it is known rotten, before it is let go (the
        caller records that first). The file's name if it was set aside, else None."""
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.exists():
            return None
        lock_fd = lock_directory(directory)
        try:
            try:
                meta = check_meta(json.loads(meta_path.read_text()), meta_path)
            except (ValueError, RecursionError) as exc:
                raise CorruptState(f"{meta_path} is damaged: {exc}") from None
            backing = meta.get("backing")
            if not backing:
                return None
            path, chunk_size = directory / backing["file"], meta["chunk_size"]
            try:
                image, _ = BackingImage.verify_and_open(
                    path, backing["id"], backing.get("stamp"), chunk_size
                )
            except BackingImageMismatch:
                image = BackingImage(path, backing["id"], chunk_size)
            else:
                image.close()
                return None
            store = cls(directory, meta, lock_fd)
            store.backing = image
            try:
                if before is not None:
                    before(path.name)
                store.backing_drop()
            finally:
                image.close()
            return path.name
        finally:
            os.close(lock_fd)

    def _load(self) -> None:
        _raise_fd_limit()
        self._sweep()
        backing = self.meta.get("backing")
        if backing:
            self.backing, stamp = BackingImage.verify_and_open(
                self.dir / backing["file"], backing["id"], backing.get("stamp"), self.chunk_size
            )
            if stamp != backing.get("stamp"):
                meta = self._meta_copy()
                meta["backing"]["stamp"] = stamp
                with contextlib.suppress(NoSpace):  # (only spares the next open a hashing)
                    self._commit_meta(meta)
        for layer_id in self.meta["layers"]:
            layer = Layer.load(self.dir, layer_id, self.chunk_size)
            self.layers[layer_id] = layer
            self.revision = max(self.revision, layer.revision)
            if layer.needs_compaction():
                with contextlib.suppress(OSError):  # (a full disk: the log is replayed as is)
                    layer.compact()
        self._build_chain()

    def _sweep(self) -> None:
        """Delete the files an interrupted operation left: temporary files, the files of a
        layer created and not yet recorded (``_new_layers`` records new layers before anything
        is written into them: their files are empty), and those of layers whose removal was
        recorded (``_record_removal``). The files of any other layer the metadata does not name
        are refused, in one line naming them, nothing deleted: the metadata lost that layer
        (edited, damaged, replaced by an older copy), and its data may be the volume's. Metadata
        without the record (an older lhfs's) is swept as that lhfs did."""
        known = set(self.meta["layers"])
        removed = set(self.meta.get("removed", []))
        # (metadata an lhfs from before the record wrote: a removal it cut short left files
        # it named nowhere, which it swept at the next open, as this one does for it)
        legacy = "removed" not in self.meta
        left: dict[str, list[str]] = {}
        stale = []
        for entry in sorted(os.listdir(self.dir)):
            match = _LAYER_FILE_RE.fullmatch(entry)
            if entry.startswith(".") and entry.endswith((".tmp", ".upload")):
                stale.append(entry)
            elif match and match.group(1) not in known:
                left.setdefault(match.group(1), []).append(entry)
        strange = []
        for layer_id, files in left.items():
            empty = all(os.stat(self.dir / f, follow_symlinks=False).st_size == 0 for f in files)
            if layer_id in removed or empty or legacy:
                stale += files
            else:
                strange += files
        if strange:
            raise DamagedLayers(
                f"{self.dir}: {', '.join(strange)} belong to no layer of {META} and to no "
                f"removal it recorded ({META} damaged or replaced?): nothing was deleted; move "
                "them out of the directory to open the replica without them"
            )
        for entry in stale:
            os.unlink(self.dir / entry)
        if stale:
            fsync_dir(self.dir)

    def _record_removal(self, meta: dict[str, Any], layer_ids: list[str]) -> None:
        """Record in ``meta`` (before it is committed) that the files of ``layer_ids`` go
        next, so that an open after a crash before they went deletes them (``_sweep``). The
        earlier record is kept for layers whose files are still there (a removal that failed)."""
        earlier = [
            lid
            for lid in self.meta.get("removed", [])
            if lid not in layer_ids
            and any(layer_file(self.dir, lid, s).exists() for s in LAYER_SUFFIXES)
        ]
        meta["removed"] = [*layer_ids, *earlier]

    def _build_chain(self) -> None:
        self.chain = [self.layers[lid] for lid in self._ancestry(self.meta["head"])]
        self._top = {}
        for layer in reversed(self.chain):  # the nearest layer last: it wins
            self._top.update(dict.fromkeys(layer.index, layer))

    def _ancestry(self, layer_id: str | None) -> list[str]:
        out = []
        while layer_id is not None:
            if layer_id in out or layer_id not in self.meta["layers"]:
                raise CorruptState(f"{self.dir / META}: broken layer chain at {layer_id}")
            out.append(layer_id)
            layer_id = self.meta["layers"][layer_id]["parent"]
        return out

    def close(self) -> None:
        """Flush and release everything; the store object is unusable afterwards."""
        if self._lock_fd < 0:
            return
        self.flush()
        for layer in self.layers.values():
            layer.close()
        if self.backing:
            self.backing.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def head(self) -> Layer:
        return self.chain[0]

    @property
    def volume_id(self) -> str | None:
        """The identity of the volume this replica belongs to (None: made before keys)."""
        return self.meta.get("volume_id")

    def set_volume_id(self, volume_id: str) -> None:
        meta = self._meta_copy()
        meta["volume_id"] = volume_id
        self._commit_meta(meta)

    def _meta_copy(self) -> dict[str, Any]:
        """A copy of the metadata to change and pass to ``_commit_meta``."""
        meta = copy.deepcopy(self.meta)
        meta["revision"] = self.revision
        meta["size"] = self.size
        return meta

    def _commit_meta(self, meta: dict[str, Any]) -> None:
        """Save ``meta`` durably, then make it the store's. Callers change the rest of their
        state only after this returned: a save that fails (a full disk, where a snapshot or a
        backup's system snapshot still needs a block for the new file) then leaves the store
        as it was, where changing memory first would leave it unlike its own disk."""
        meta.setdefault("removed", [])  # (its presence says removals are recorded: _sweep)
        with no_room("its metadata"):
            atomic_write_json(self.dir / META, meta, sync_dir=False)
        self.meta = meta
        try:
            fsync_dir(self.dir)
        except OSError as exc:
            # The new file is in place (every open reads it): failing now would leave memory
            # unlike it. Only its durability across a power cut waits for the next sync.
            log.warning("metadata of %s saved but its directory not synced: %s", self.dir, exc)

    def _new_layers(self, meta: dict[str, Any], layer_ids: list[str]) -> list[Layer]:
        """Create the files of new layers, then commit ``meta`` naming them; if either fails,
        the files go again and nothing changed."""
        made: list[Layer] = []
        try:
            with no_room("a new layer"):
                for layer_id in layer_ids:
                    made.append(Layer.create(self.dir, layer_id, self.chunk_size))
                fsync_dir(self.dir)
            self._commit_meta(meta)
        except BaseException:
            for layer in made:
                layer.remove_files()
            raise
        return made

    # -- I/O ----------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside the volume (size {self.size})"
            )

    def _source(self, chunk: int) -> int:
        """The descriptor holding the chunk's current bytes, or -1 when it reads as zeros."""
        layer = self._top.get(chunk)
        if layer is not None:
            return layer.fd if layer.index[chunk] == DATA else -1
        if self.backing is not None and chunk < self.backing.nchunks:
            return self.backing.fd
        return -1

    def _is_backing(self, fd: int) -> bool:
        """Whether ``fd`` is the backing image's, whose file may end inside its last chunk
        (the rest reads as zeros); a layer's never does (``Layer.check_data``)."""
        return self.backing is not None and fd == self.backing.fd

    def read(self, offset: int, length: int) -> bytearray:
        """The volume's bytes at ``offset``; neighbouring chunks from one layer are one pread."""
        out = bytearray(length)
        self.read_into(offset, memoryview(out), zeroed=True)
        return out

    def read_into(self, offset: int, out: memoryview, zeroed: bool = False) -> None:
        """Fill ``out`` with the volume's bytes at ``offset`` (an engine's shared buffer, say);
        ``zeroed`` says that ``out`` holds zeros already, so unwritten ranges are left as
        they are."""
        length = len(out)
        self._check_range(offset, length)
        cs = self.chunk_size
        if self.partial:
            out[:] = self._read_rebuilding(offset, length)
            return
        if length and offset // cs == (offset + length - 1) // cs:  # the common case
            fd = self._source(offset // cs)
            if fd >= 0:
                n = os.preadv(fd, [out], offset)
                if n < length:
                    pread_into(fd, out[n:], offset + n, self._is_backing(fd))
            elif not zeroed:
                out[:] = bytes(length)
            return
        self._read_runs(offset, out, self._source, zeroed)

    def _read_runs(
        self, offset: int, view: memoryview, source: Callable[[int], int], zeroed: bool = True
    ) -> None:
        """Fill ``view`` with the bytes at ``offset``, one pread per run of neighbouring chunks
        that ``source`` finds in the same descriptor (-1: zeros). Few large reads instead of one
        per chunk: a backup reads 2 MiB blocks, and each read returned to the interpreter costs
        a hand-over of its lock when another thread is busy."""
        cs = self.chunk_size

        def fill(fd: int, start: int, end: int) -> None:
            if fd >= 0:
                pread_into(fd, view[start - offset : end - offset], start, self._is_backing(fd))
            elif not zeroed:
                view[start - offset : end - offset] = bytes(end - start)

        run_fd, run_at = source(offset // cs), offset  # each chunk's source is asked once
        for chunk in range(offset // cs + 1, -(-(offset + len(view)) // cs)):
            fd = source(chunk)
            if fd != run_fd:
                fill(run_fd, run_at, chunk * cs)
                run_fd, run_at = fd, chunk * cs
        fill(run_fd, run_at, offset + len(view))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write into the head; a partial write to a chunk the head lacks copies it up first.

        A chunk enters the head whole: its first write in this layer is always a full chunk, so
        bytes a crash left in the data file outside the index are never exposed.
        """
        view = memoryview(data)
        length = len(view)
        self._check_range(offset, length)
        head = self.head
        cs = self.chunk_size
        chunk, within = divmod(offset, cs)
        if within + length <= cs and self.partial is None and head.index.get(chunk) == DATA:
            if not head.flush_room:
                head.claim_index(0)  # (the next flush's batch header)
            write_data(head.fd, view, offset)  # (most writes: inside a chunk the head holds)
            self.revision += 1
            return
        if length:
            self._claim(offset, length, "a write")
        run_start = 0
        run_new: list[int] = []
        pos = 0
        while pos < length:
            chunk, within = divmod(offset + pos, cs)
            n = min(cs - within, length - pos)
            if head.index.get(chunk) == DATA or n == cs:
                if head.index.get(chunk) != DATA:
                    run_new.append(chunk)
                if self.partial is not None and chunk in self.partial:
                    _add_range(self.partial[chunk], within, within + n)
            elif self.partial is not None and chunk not in head.index:
                self.partial[chunk] = [(within, within + n)]
                run_new.append(chunk)
                if os.fstat(head.fd).st_size < (chunk + 1) * cs:
                    # (the index will hold the chunk: its file holds it whole, as every
                    # layer's does, see ``Layer.check_data``; the rest is merged at the end)
                    os.ftruncate(head.fd, (chunk + 1) * cs)
            else:
                self._write_run(view, offset, run_start, pos, run_new)
                merged = self.read(chunk * cs, cs)
                merged[within : within + n] = view[pos : pos + n]
                write_data(head.fd, merged, chunk * cs)
                head.set(chunk, DATA)
                self._top[chunk] = head
                run_start = pos + n
                run_new = []
            pos += n
        self._write_run(view, offset, run_start, length, run_new)
        self.revision += 1

    def _claim(self, offset: int, length: int, what: str) -> None:
        """Claim the head's disk space for each chunk of a range it does not hold yet (a chunk
        enters the head whole), before a byte is written: a full disk then refuses the request
        whole (``NoSpace``), where failing half-way would leave this replica unlike the others.
        The index entries the chunks will need are claimed too (``Layer.claim_index``)."""
        cs = self.chunk_size
        head = self.head
        get = head.index.get
        fresh = [c for c in range(offset // cs, (offset + length - 1) // cs + 1) if get(c) != DATA]
        if not fresh:  # (a write over chunks the head holds: most of them)
            if not head.flush_room:
                head.claim_index(0)
            return
        head.claim_index(len(fresh))
        runs: list[list[int]] = []  # [first chunk, count]
        for chunk in fresh:
            if runs and sum(runs[-1]) == chunk:
                runs[-1][1] += 1
            else:
                runs.append([chunk, 1])
        try:
            for first, n in runs:
                reserve(head.fd, first * cs, n * cs, what)
        except NoSpace:
            # Give back what this request claimed, but for chunks a rebuild wrote in part
            # (``partial``): their bytes are in the file, not yet in the index.
            for chunk in fresh:
                if self.partial is None or chunk not in self.partial:
                    punch_hole(head.fd, chunk * cs, cs)
            raise

    def _write_run(
        self, view: memoryview, offset: int, start: int, end: int, new_chunks: list[int]
    ) -> None:
        if end > start:
            head = self.head
            write_data(head.fd, view[start:end], offset + start)
            for chunk in new_chunks:
                head.set(chunk, DATA)
                self._top[chunk] = head

    def trim(self, offset: int, length: int) -> None:
        """Make a range read as zeros and free the head's space for whole chunks in it."""
        self._check_range(offset, length)
        cs = self.chunk_size
        head = self.head
        pos = offset
        end = offset + length
        if length:
            head.claim_index((end - 1) // cs - offset // cs + 1)
        for chunk in {offset // cs, (end - 1) // cs} if length else ():
            start, stop = max(offset, chunk * cs), min(end, (chunk + 1) * cs)
            if stop - start < cs and self._trim_writes(chunk):  # (zeros are written there)
                self._claim(start, stop - start, "a trim")
        while pos < end:
            chunk, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            if n < cs:
                if self._trim_writes(chunk):
                    self.write(pos, bytes(n))
            elif self.partial is not None or self._visible_below(chunk):
                if self.partial is not None:
                    self.partial.pop(chunk, None)
                head.set(chunk, ZERO)
                self._top[chunk] = head
                punch_hole(head.fd, chunk * cs, cs)
            elif chunk in head.index:
                head.set(chunk, ABSENT)
                self._resolve(chunk)
                punch_hole(head.fd, chunk * cs, cs)
            pos += n
        self.revision += 1

    def write_changed(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Make the volume read ``data`` at ``offset``, touching only the chunks that read
        otherwise now; the bytes written. A whole chunk that the layers below the head (or
        the backing image) hold as ``data`` has it is given back to them (the head's copy
        goes), and zeros are trimmed. What a DR increment writes with: its blocks are far
        larger than the chunks that changed in them, and a standby on a backing image must
        hold only what differs from the image, as its source and a restore on it do."""
        view = memoryview(data)
        if self.partial is not None:  # (being rebuilt: nothing below is settled)
            self.write(offset, view)
            return len(view)
        now = memoryview(self.read(offset, len(view)))
        cs = self.chunk_size
        written = pos = 0
        run = None  # where a run of pieces to write begins
        while pos < len(view):
            chunk, within = divmod(offset + pos, cs)
            n = min(cs - within, len(view) - pos)
            piece = view[pos : pos + n]
            write = False
            if piece == now[pos : pos + n]:
                pass
            elif n == cs and chunk in self.head.index and piece == self._below_head(chunk):
                self.head.claim_index(1)
                self.head.set(chunk, ABSENT)
                self._resolve(chunk)
                self._freed.append((self.head, chunk))  # (its space: see ``flush``)
                self.revision += 1
            elif piece == bytes(n):
                self.trim(offset + pos, n)
            else:
                write = True
            if write and run is None:
                run = pos
            elif not write and run is not None:
                self.write(offset + run, view[run:pos])
                written += pos - run
                run = None
            pos += n
        if run is not None:
            self.write(offset + run, view[run:])
            written += len(view) - run
        return written

    def _trim_writes(self, chunk: int) -> bool:
        """Whether trimming part of ``chunk`` writes zeros into it (there is data to hide)."""
        return self._source(chunk) >= 0 or self.partial is not None

    def _visible_below(self, chunk: int) -> bool:
        """Whether a layer under the head (or the backing image) shows data for ``chunk``."""
        top = self._top.get(chunk)
        if top is None:
            return self.backing is not None and self.backing.covers(chunk)
        if top is not self.head:
            return top.index[chunk] == DATA
        for layer in self.chain[1:]:
            state = layer.index.get(chunk)
            if state is not None:
                return state == DATA
        return self.backing is not None and self.backing.covers(chunk)

    def _resolve(self, chunk: int) -> None:
        """Recompute the topmost layer of the chain holding ``chunk``."""
        for layer in self.chain:
            if chunk in layer.index:
                self._top[chunk] = layer
                return
        self._top.pop(chunk, None)

    def _below_head(self, chunk: int) -> bytes:
        for layer in self.chain[1:]:
            state = layer.index.get(chunk)
            if state is not None:
                return layer.read_chunk(chunk) if state == DATA else bytes(self.chunk_size)
        if self.backing is not None:
            return self.backing.read_chunk(chunk)
        return bytes(self.chunk_size)

    def _merged_partial(self, chunk: int) -> bytearray:
        """A partially written head chunk over what is below it now."""
        merged = bytearray(self._below_head(chunk))
        own = self.head.read_chunk(chunk)
        for start, end in self.partial[chunk]:
            merged[start:end] = own[start:end]
        return merged

    def _read_rebuilding(self, offset: int, length: int) -> bytearray:
        out = bytearray()
        cs = self.chunk_size
        pos = offset
        while pos < offset + length:
            chunk, within = divmod(pos, cs)
            n = min(cs - within, offset + length - pos)
            if chunk in self.partial:
                out += self._merged_partial(chunk)[within : within + n]
            else:
                partial, self.partial = self.partial, None
                try:
                    out += self.read(pos, n)
                finally:
                    self.partial = partial
            pos += n
        return out

    def flush(self) -> None:
        """Make every write so far durable: data first, then the index batches naming it."""
        for layer in self.layers.values():
            if layer.pending or layer is self.head:
                layer.sync_data()
                layer.commit(self.revision if layer is self.head else layer.revision)
        freed, self._freed = self._freed, []
        for layer, chunk in freed:  # (named by no index now, unless written again since)
            if self.layers.get(layer.id) is layer and chunk not in layer.index:
                punch_hole(layer.fd, chunk * self.chunk_size, self.chunk_size)

    # -- snapshots ----------------------------------------------------------------------------

    def _snapshot_id(self, name: str) -> str:
        for layer_id, info in self.meta["layers"].items():
            if info["name"] == name:
                return layer_id
        raise NotFound(f"no snapshot named {name!r}")

    def snapshot(self, name: str) -> dict[str, Any]:
        """Freeze the head as snapshot ``name`` and start a new empty head on it (no data copy)."""
        check_name(name, "snapshot name")
        if any(info["name"] == name for info in self.meta["layers"].values()):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        self.flush()
        old = self.head
        new_id = secrets.token_hex(8)
        meta = self._meta_copy()
        layers = meta["layers"]
        layers[old.id].update(name=name, created=_now(), size=self.size)
        layers[new_id] = {"name": None, "parent": old.id, "created": _now(), "size": self.size}
        meta["head"] = new_id
        new = self._new_layers(meta, [new_id])[0]
        new.revision = self.revision
        self.layers[new_id] = new
        self.chain.insert(0, new)
        if old.needs_compaction():
            with contextlib.suppress(OSError):  # (the snapshot is made; a full disk: later)
                old.compact()
        return self._layer_info(old.id)

    def has_snapshot(self, name: str) -> bool:
        return any(info["name"] == name for info in self.meta["layers"].values())

    def remove_snapshot(self, name: str) -> None:
        """Remove a snapshot, coalescing its chunks into its children (content unchanged)."""
        for _ in self.remove_snapshot_steps(name):
            pass

    def remove_snapshot_steps(self, name: str, batch: int = 64) -> Iterator[tuple[int, int]]:
        """``remove_snapshot`` as a generator yielding (chunks done, chunks total) between steps.

        Between two steps the caller may run writes and trims: each step decides per chunk, at
        that moment, whether the child already holds it. Every copy preserves the child's content
        (the child read that chunk through to this snapshot anyway), so a crash at any point
        leaves a valid chain and running the removal again finishes it. So does a full disk
        (``NoSpace``, raised before a chunk is copied): the content is as it was, the chain
        not shorter yet.
        """
        sid = self._snapshot_id(name)
        snap = self.layers[sid]
        children = [
            self.layers[lid] for lid, i in self.meta["layers"].items() if i["parent"] == sid
        ]
        items = sorted(snap.index.items())
        total = len(items) * len(children)
        done = 0
        self.operation = {"op": "remove_snapshot", "snapshot": name, "done": 0, "total": total}
        try:
            yield done, total
            for child in children:
                child.claim_index(len(items))  # (a flush after it never lacks room)
                child.drop_sums()
                for i, (chunk, state) in enumerate(items):
                    if chunk not in child.index:
                        if state == DATA:
                            at = chunk * self.chunk_size
                            reserve(child.fd, at, self.chunk_size, "removing a snapshot")
                            write_data(child.fd, snap.read_chunk(chunk), at)
                        child.set(chunk, state)
                        if child in self.chain and self._top.get(chunk) is snap:
                            self._top[chunk] = child
                    done += 1
                    if (i + 1) % batch == 0:
                        self.operation["done"] = done
                        yield done, total
                child.sync_data()
                child.commit(self.revision if child is self.head else child.revision)
            self.flush()
            meta = self._meta_copy()
            parent = meta["layers"][sid]["parent"]
            for child in children:
                meta["layers"][child.id]["parent"] = parent
            del meta["layers"][sid]
            self._record_removal(meta, [sid])
            self._commit_meta(meta)
            del self.layers[sid]
            if snap in self.chain:
                self.chain.remove(snap)
                for chunk in snap.index:
                    if self._top.get(chunk) is snap:
                        self._resolve(chunk)
            snap.remove_files()
            self.operation["done"] = total
            yield total, total
        finally:
            self.operation = None

    def revert(self, name: str) -> None:
        """Discard the head and start a fresh empty head on snapshot ``name``."""
        sid = self._snapshot_id(name)
        self.flush()
        old = self.head
        new_id = secrets.token_hex(8)
        meta = self._meta_copy()
        layers = meta["layers"]
        layers[new_id] = {"name": None, "parent": sid, "created": _now(), "size": self.size}
        del layers[old.id]
        self._record_removal(meta, [old.id])
        meta["head"] = new_id
        meta["revision"] = self.revision + 1
        new = self._new_layers(meta, [new_id])[0]
        self.revision += 1
        new.revision = self.revision
        del self.layers[old.id]
        old.remove_files()
        self.layers[new_id] = new
        self._build_chain()

    def expand(self, size: int) -> None:
        """Grow the volume; the new range reads as zeros."""
        check_geometry(size, self.chunk_size)
        if size < self.size:
            raise InvalidArgument(f"cannot shrink the volume from {self.size} to {size} bytes")
        check_fits(self.dir, size)
        self.flush()
        meta = self._meta_copy()
        meta["size"] = size
        meta["layers"][self.head.id]["size"] = size
        self._commit_meta(meta)
        self.size = size

    # -- inspection ---------------------------------------------------------------------------

    def _layer_info(self, layer_id: str) -> dict[str, Any]:
        info = self.meta["layers"][layer_id]
        layer = self.layers[layer_id]
        return {
            "id": layer_id,
            "name": info["name"],
            "parent": info["parent"],
            "created": info["created"],
            "volume_size": info.get("size", self.size),
            "kind": "head" if layer_id == self.meta["head"] else "snapshot",
            "active": layer in self.chain,
            "chunks": len(layer.index),
            "size": layer.data_bytes(),
        }

    def list_layers(self) -> list[dict[str, Any]]:
        """Every layer: the chain oldest first (head last), then snapshots off the chain."""
        on_chain = [self._layer_info(layer.id) for layer in reversed(self.chain)]
        off_chain = [
            self._layer_info(lid)
            for lid in self.meta["layers"]
            if self.layers[lid] not in self.chain
        ]
        return on_chain + sorted(off_chain, key=lambda i: i["created"])

    def info(self) -> dict[str, Any]:
        backing = self.meta.get("backing")
        return {
            "size": self.size,
            "chunk_size": self.chunk_size,
            "revision": self.revision,
            "head": self.head.id,
            "backing_image": backing and {"id": backing["id"], "file": backing["file"]},
            "layers": len(self.layers),
            "operation": self.operation,
            "rebuilds": self.meta.get("rebuilds", 0),
            # the snapshot names of the chain, oldest first: what the engine compares across
            # replicas (their layer ids differ) before it serves them as equals
            "chain": [self.meta["layers"][layer.id]["name"] for layer in reversed(self.chain[1:])],
            "disk_bytes": disk_bytes(self.dir),
            "disk_free": shutil.disk_usage(self.dir).free,  # (what its disk has left)
        }

    def is_blank(self) -> bool:
        """Whether the volume reads as zeros everywhere (nothing written, no backing image):
        the only state in which ``lhfs mount`` may create a filesystem without a record."""
        if self.backing is not None:
            return False
        return not any(layer.index[c] == DATA for c, layer in self._top.items())

    def changed_blocks(self, base_id: str, top: str, block_size: int) -> list[int] | None:
        """Blocks of ``block_size`` bytes that may differ between layer ``base_id`` and the
        later snapshot ``top`` (see ``changed_blocks_job``), found here and now."""
        return self.changed_blocks_job(base_id, top, block_size)()

    def changed_blocks_job(
        self, base_id: str, top: str, block_size: int, limit: int | None = None
    ) -> Callable[[], list[int] | None]:
        """A job, safe to run in another thread, giving the blocks of ``block_size`` bytes that
        may differ between layer ``base_id`` and the later snapshot ``top``: those touching a
        chunk held by any layer above the base, up to ``top``, and those past the base's size.
        None when the base is not below ``top`` (it was removed, or the volume reverted past
        it), or when more than ``limit`` blocks changed: then everything must be read.

        The layers are resolved here, on the caller's thread; they are snapshots, whose
        indexes only a snapshot removal changes (the caller keeps one from running meanwhile).
        Layer ids are this replica's own: a caller keeps one per replica."""
        if block_size <= 0 or block_size & (block_size - 1):
            raise InvalidArgument(f"block size {block_size} is not a power of two")
        top_layer = self.layer(top)
        if top_layer is self.head:
            raise InvalidArgument("changed blocks are counted up to a snapshot, not the head")
        ancestry = self._ancestry(top_layer.id)
        if base_id not in ancestry:
            return lambda: None
        indexes = [self.layers[lid].index for lid in ancestry[: ancestry.index(base_id)]]
        base_size = self.meta["layers"][base_id]["size"]
        top_size = self.meta["layers"][ancestry[0]]["size"]
        cs = self.chunk_size

        def job() -> list[int] | None:
            blocks: set[int] = set()
            if top_size != base_size:
                first = min(base_size, top_size) // block_size
                blocks.update(range(first, -(-top_size // block_size)))
            for index in indexes:
                for chunk in index:
                    first = chunk * cs // block_size
                    blocks.update(range(first, ((chunk + 1) * cs - 1) // block_size + 1))
                if limit is not None and len(blocks) > limit:
                    return None
            return sorted(blocks)

        return job

    def layer(self, layer_id: str) -> Layer:
        """A layer by id, or a snapshot by name (replicas share names, not ids)."""
        if layer_id in self.layers:
            return self.layers[layer_id]
        for lid, info in self.meta["layers"].items():
            if info["name"] == layer_id:
                return self.layers[lid]
        raise NotFound(f"no layer {layer_id!r}")

    def layer_sums(
        self, layer_id: str, fresh: bool = False, first: int = 0, span: int | None = None
    ) -> list[tuple[int, int, bytes]]:
        """Per-chunk checksums of a layer, computed here and now (see ``sums_job``)."""
        return self.sums_job(layer_id, fresh, first, span)()

    def sums_job(
        self, layer_id: str, fresh: bool = False, first: int = 0, span: int | None = None
    ) -> Callable[[], list[tuple[int, int, bytes]]]:
        """A job giving per-chunk checksums of a layer (``"backing"`` for the backing image),
        in chunk order; with ``span``, only those of chunks ``first`` to ``first + span - 1``
        (a page of a walk over a large layer, served without sorting all the others).

        Immutable layers keep theirs in a file, so a rebuild asking again is cheap; ``fresh``
        recomputes them from the bytes on disk (what a scrub and a rebuild target need: the
        recorded sums say what the data was, the fresh ones what it is now).

        The job may run in another thread (hashing a large layer takes minutes), so the layer
        is resolved and its file opened here, on the caller's thread, where the chain changes;
        the head, which writes change under a thread's feet, is hashed here at once.
        """
        backing, layer, current = self.backing, None, None
        if layer_id != "backing":
            layer = self.layer(layer_id)
            layer.open()
            if layer is self.head:
                current = {c: (st, d) for c, st, d in layer.compute_sums()}
        elif backing is None:
            raise NotFound("this volume has no backing image")

        def job() -> list[tuple[int, int, bytes]]:
            if current is not None:
                sums = current
            elif layer is not None:
                sums = layer.sums(fresh)
            else:
                assert backing is not None
                sums = backing.sums()
            chunks = sorted(sums) if span is None else range(first, first + span)
            return [(c, *sums[c]) for c in chunks if c in sums]

        return job

    def verify_job(self, layer_id: str) -> Callable[[], list[int]]:
        """A job, safe to run in another thread, that lists the chunks of a snapshot whose
        bytes no longer match their recorded checksum, or are no longer there (its data file
        was cut since the replica opened: a record made since would match), resolved here, as
        in ``sums_job``."""
        layer = self.layer(layer_id)
        if layer is self.head:
            raise InvalidArgument("the head changes with every write: only snapshots are verified")
        layer.open()

        def job() -> list[int]:
            recorded = {c: (s, d) for c, s, d in layer.cached_sums()}
            return [
                c
                for c, s, d in layer.compute_sums()
                if recorded.get(c) != (s, d) or d == CUT_DIGEST
            ]

        return job

    # -- rebuild target -----------------------------------------------------------------------

    def rebuild_begin(
        self,
        names: list[str],
        revision: int,
        times: list[str] | None = None,
        branches: list[tuple[str, str | None, str]] | None = None,
    ) -> dict[str, Any]:
        """Reshape this replica's chain to the source's snapshot names (bottom-up, the last one
        the rebuild's barrier) and start an empty head in partial mode. ``times``: when the
        source's snapshots were taken, kept here too (a snapshot's time is the operator's to
        read, and once the source is gone this replica is the only one to tell it).
        ``branches``: the source's snapshots off the chain (a revert keeps the newer ones),
        ``(name, parent name, time)``, each parent a snapshot named before it or on the chain:
        shaped here too, so that a rebuilt replica does not lose them.

        Layers already here under those names are kept: their chunks are compared, not sent
        again. The old head becomes the first missing layer (for a replica that comes back, it
        holds most of what that layer should hold). Everything else here is dropped.
        """
        branches = branches or []
        for name in [*names, *(b[0] for b in branches)]:
            check_name(name, "snapshot name")
        known: set[str | None] = {None, *names}
        for name, parent, _when in branches:
            if parent not in known or name in known:
                raise InvalidArgument(
                    f"snapshot {name} off the chain: no parent {parent} before it"
                )
            known.add(name)
        self.flush()
        meta = self._meta_copy()
        layers = meta["layers"]
        by_name = {info["name"]: lid for lid, info in layers.items() if info["name"]}
        old_head = self.head.id
        missing = [n for n in names if n not in by_name]
        if missing:
            by_name[missing[0]] = old_head
            layers[old_head]["name"] = missing[0]
        every = [*names, *(b[0] for b in branches)]
        keep = {by_name[n] for n in every if n in by_name}
        for name in every:
            if name not in by_name:
                lid = secrets.token_hex(8)
                layers[lid] = {"name": name, "created": _now(), "size": self.size}
                by_name[name] = lid
        created = [by_name[n] for n in every if by_name[n] not in keep]
        keep.update(created)
        head = secrets.token_hex(8)
        parent = None
        for name in names:
            layers[by_name[name]]["parent"] = parent
            parent = by_name[name]
        layers[head] = {"name": None, "parent": parent, "created": _now(), "size": self.size}
        for name, when in zip(names, times or (), strict=False):
            layers[by_name[name]]["created"] = when
        for name, parent, when in branches:
            layers[by_name[name]].update(parent=parent and by_name[parent], created=when)
        dropped = [lid for lid in layers if lid not in keep and lid != head]
        for lid in dropped:
            del layers[lid]
        self._record_removal(meta, dropped)
        meta["head"] = head
        meta["rebuilds"] = meta.get("rebuilds", 0) + 1  # kept layers may be rewritten
        meta["revision"] = revision
        for layer in self._new_layers(meta, [*created, head]):
            self.layers[layer.id] = layer
        self.revision = revision
        self.layers[head].revision = revision
        for lid in dropped:
            self.layers.pop(lid).remove_files()
        self._build_chain()
        self.partial = {}
        return {"layers": len(names), "branches": len(branches)}

    def write_layer_run(
        self, layer_id: str, first: int, states: bytes, data: bytes | memoryview
    ) -> None:
        """Set neighbouring chunks of an immutable layer as the rebuild source has them:
        ``states`` has one byte per chunk, ``data`` the bytes of the DATA ones, in order."""
        if self.partial is None:
            raise InvalidArgument("layer chunks can only be written during a rebuild")
        layer = self.layer(layer_id)
        if layer is self.head:
            raise InvalidArgument("the head is not rebuilt chunk by chunk")
        cs = self.chunk_size
        if first < 0 or first + len(states) > self.size // cs:
            raise InvalidArgument(f"chunks {first}+{len(states)} are outside the volume")
        if len(data) != cs * sum(1 for s in states if s == DATA):
            raise InvalidArgument("layer run data does not match its states")
        if any(state not in (ABSENT, DATA, ZERO) for state in states):
            raise InvalidArgument("unknown chunk state in a layer run")
        view = memoryview(data)
        all_data = all(state == DATA for state in states)
        if all_data:  # the common case: one write for the whole run, not cut in pieces
            # (an immutable layer takes no small writes later: see layer.DATA_PIECE)
            pwrite_all(layer.fd, view, first * cs)
        pos = 0
        for k, state in enumerate(states):
            chunk = first + k
            if state == DATA:
                piece = view[pos : pos + cs]
                if not all_data:
                    pwrite_all(layer.fd, piece, chunk * cs)
                layer.record_sum(chunk, DATA, piece)
                pos += cs
            else:
                punch_hole(layer.fd, chunk * cs, cs)
                layer.record_sum(chunk, state)
            layer.set(chunk, state)
            self._resolve(chunk)

    def rebuild_finish(self) -> None:
        """The layers below are complete: merge partially written head chunks over them."""
        if self.partial is None:
            raise InvalidArgument("no rebuild is under way")
        for chunk in sorted(self.partial):
            write_data(self.head.fd, self._merged_partial(chunk), chunk * self.chunk_size)
        self.partial = None
        self.flush()
        for layer in self.chain[1:]:  # the checksums kept up to date during the copy, once
            layer.save_sums()  # the data they describe is durable

    def _check_image(self, image_id: str) -> int:
        size = id_size(image_id)
        if not 0 < size <= self.size:
            raise InvalidArgument(
                f"a backing image of {size} bytes does not fit a volume of {self.size} bytes"
            )
        return size

    def backing_upload(self, image_id: str, chunk: int, data: bytes) -> None:
        """Receive a run of chunks of a backing image this replica lacks, from chunk ``chunk``
        on (rebuild onto a new disk)."""
        size = self._check_image(image_id)
        cs = self.chunk_size
        if chunk < 0 or chunk * cs + len(data) > -(-size // cs) * cs:
            raise InvalidArgument(f"chunks {chunk}+ ({len(data)} bytes) are not in the image")
        path = self.dir / ".backing.upload"
        fresh = os.O_TRUNC if chunk == 0 else 0  # (an upload starts at 0: nothing older stays)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | fresh, 0o600)
        view, zeros = memoryview(data)[: max(0, size - chunk * cs)], bytes(cs)
        try:  # (chunks of zeros are left holes: the copy stays as sparse as the image)
            for at in range(0, len(view), cs):
                piece = view[at : at + cs]
                if piece != zeros[: len(piece)]:
                    pwrite_all(fd, piece, chunk * cs + at)
        finally:
            os.close(fd)

    def backing_commit(self, image_id: str) -> None:
        """Adopt the uploaded image if its content is ``image_id``; refuse it otherwise."""
        self.backing_verify_job(image_id)()
        self.backing_adopt(image_id)

    def backing_verify_job(self, image_id: str) -> Callable[[], None]:
        """A job, safe to run in another thread (it reads the whole image), that makes the
        upload durable and checks it hashes to ``image_id``; a mismatch removes the upload."""
        size = self._check_image(image_id)
        upload = self.dir / ".backing.upload"

        def job() -> None:
            fd = os.open(upload, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            found = content_id(upload)
            if found != image_id:
                upload.unlink()
                raise BackingImageMismatch(
                    f"uploaded backing image is {found}, expected {image_id}"
                )

        return job

    def backing_check_job(self) -> Callable[[], str | None]:
        """A job, safe to run in another thread (it reads the whole image), giving the content
        id of what the backing image file holds now (None without an image). Bit rot changes
        neither its size nor its time, so opening it never rehashes it: a scrub asks this."""
        backing = self.backing
        return (lambda: None) if backing is None else (lambda: content_id(backing.path))

    def backing_drop(self) -> None:
        """Let go of a backing image found rotten (``backing_check_job``): its file is kept
        aside for a look (``<file>.rotten``) and the replica has none, so that the rebuild
        that repairs it sends a good one (with one recorded it would trust the rotten file)."""
        backing = self.backing
        if backing is None:
            return
        meta = self._meta_copy()
        meta["backing"] = None
        self._commit_meta(meta)
        self.backing = None
        backing.close()
        os.replace(backing.path, backing.path.with_name(backing.path.name + ".rotten"))
        fsync_dir(self.dir)

    def backing_adopt(self, image_id: str, file_name: str = "backing.img") -> None:
        """Make the verified upload this replica's backing image (see ``backing_verify_job``)."""
        upload = self.dir / ".backing.upload"
        if not upload.exists() or upload.stat().st_size != id_size(image_id):
            raise InvalidArgument("no verified backing image upload to adopt")
        local = self.dir / check_name(file_name, "backing image file name")
        new = not local.exists()
        os.rename(upload, local)
        fsync_dir(self.dir)
        meta = self._meta_copy()
        meta["backing"] = {"id": image_id, "file": local.name, "stamp": file_stamp(local)}
        try:
            self._commit_meta(meta)
        except BaseException:
            if new:
                os.rename(local, upload)  # (so that adopting it can be asked again)
            raise
        if self.backing is not None:
            self.backing.close()
        self.backing = BackingImage(local, image_id, self.chunk_size)

    def read_snapshot(self, layer_id: str, offset: int, length: int) -> bytearray:
        """The content a snapshot (or any layer) shows, through its own chain: what a backup
        of that snapshot reads while the volume goes on changing above it."""
        self._check_range(offset, length)
        chain = [self.layers[lid] for lid in self._ancestry(self.layer(layer_id).id)]

        def source(chunk: int) -> int:
            for layer in chain:
                state = layer.index.get(chunk)
                if state is not None:
                    return layer.fd if state == DATA else -1
            if self.backing is not None and self.backing.covers(chunk):
                return self.backing.fd
            return -1

        out = bytearray(length)
        self._read_runs(offset, memoryview(out), source)
        return out

    def writeback_job(self, layer_id: str) -> Callable[[], None] | None:
        return self.layer(layer_id).writeback_job()

    def read_layer_run(self, layer_id: str, first: int, count: int) -> tuple[bytes, bytes]:
        """Neighbouring chunks as a layer (or ``"backing"``) stores them: one state byte per
        chunk (``ABSENT`` if not held) and the bytes of the DATA ones, in order."""
        cs = self.chunk_size
        if count < 1 or first < 0 or first + count > -(-self.size // cs):
            raise InvalidArgument(f"chunks {first}+{count} are not a run inside the volume")
        if layer_id == "backing":
            if self.backing is None:
                raise NotFound("this volume has no backing image")
            states = bytes(DATA if self.backing.covers(first + k) else ABSENT for k in range(count))
            held = sum(1 for s in states if s == DATA)
            return states, bytes(self.backing.read_run(first, held)) if held else b""
        layer = self.layer(layer_id)
        states = bytes(layer.index.get(first + k, ABSENT) for k in range(count))
        if DATA not in states:
            return states, b""
        # (up to the last DATA chunk: the file may end before the chunks past it)
        run = layer.read_run(first, states.rindex(DATA) + 1)
        if all(s == DATA for s in states):
            return states, run
        return states, b"".join(
            run[k * cs : (k + 1) * cs] for k, s in enumerate(states) if s == DATA
        )

    def checksum(self) -> str:
        """xxh3-128 of the whole logical content of the volume, hex."""
        digest = xxhash.xxh3_128()
        for piece in self.content():
            digest.update(piece)
        return digest.hexdigest()

    def content(self) -> Iterator[bytes | bytearray]:
        """The volume's logical content in pieces of a few MiB, read as the iteration reaches
        them (a caller may serve other requests between pieces)."""
        step = max(self.chunk_size, 4 << 20)
        size = self.size
        for offset in range(0, size, step):
            yield self.read(offset, min(step, size - offset))


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    """Insert [start, end) into a list of disjoint ranges, merging what touches."""
    keep = []
    for a, b in ranges:
        if b < start or a > end:
            keep.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    keep.append((start, end))
    ranges[:] = sorted(keep)


def damaged_aside(directory: Path) -> Path:
    """Where a damaged replica directory is set aside, beside itself: ``<dir>.damaged-<time>``
    (the time to the second, and a random suffix for two in one second), for the local
    engine and a replica on another host alike, so that the operator meets one name."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    return directory.with_name(f"{directory.name}.damaged-{stamp}")


def lock_directory(directory: Path) -> int:
    """Hold the directory exclusively: two processes writing one replica would corrupt it
    (a replica served damaged holds it too: ``ReplicaServer``)."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"{directory} is in use by another lhfs process") from None
    return fd
