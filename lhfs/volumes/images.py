"""Backing images registered under a root: ``lhfs backing-image create/ls/backup``.

An image is kept as ``<root>/backing-images/<name>.img`` with ``<name>.json`` recording its
content id (``xxh3-128-size``): the id, not the name, is what volumes and replicas match on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core import locks
from lhfs.core.durable import atomic_write_json, copy_sparse, fsync_dir
from lhfs.core.errors import AlreadyExists, CorruptState, InvalidArgument, LhfsError, NotFound
from lhfs.core.names import IMAGE_BACKUPS, MAX_IMAGE_NAME, check_name, image_name_fits
from lhfs.core.procs import alive, here
from lhfs.store.backing import IMAGE_ID, content_id, id_size


def images_dir(root: Path) -> Path:
    return Path(root) / "backing-images"


def name_held(root: Path, name: str, doing: str) -> contextlib.AbstractContextManager[None]:
    """Hold image name ``name`` for the block (``backing-images/.NAME.lock``, as volumes
    hold theirs): two creates of one name at once once shared their temporary file, and one
    printed the id of the other's image over a file holding the other's bytes."""
    check_name(name, "backing image name")
    base = images_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return locks.name_held(base / f".{name}.lock", f"backing image {name}", doing)


def _clear_cut_short(root: Path, name: str | None = None) -> None:
    """Delete the temporary files (``.NAME.img.PID.tmp``) of creates that were cut short:
    those of ``name`` (its name is held: no create of it runs), else those of dead processes
    (a create under way keeps its own). An older lhfs's (``.NAME.img.tmp``) are over."""
    for tmp in images_dir(root).glob(".*.tmp"):
        pid: str | None = None
        if tmp.name.endswith(".img.tmp"):
            image = tmp.name[1 : -len(".img.tmp")]
        else:
            image, _, pid = tmp.name[1 : -len(".tmp")].rpartition(".img.")
            if not image or not pid.isdigit():
                continue  # (not a create's)
        if image == name if name is not None else pid is None or not alive(int(pid)):
            tmp.unlink(missing_ok=True)


RESTORE_SCRATCH = ".restore-image-"  # ROOT/.restore-image-NAME.PID-HERE-HEX.tmp: see below


def restore_scratch(root: Path, name: str) -> Path:
    """Where a restore writes image ``name`` before it registers it (``images.create``): a
    file of the image's size under the root, named with the restoring process's pid and
    where that pid means something (``procs.here``: this boot, this PID namespace), so that
    one a killed restore left is known as such and cleared (``_clear_restore_scratch``)."""
    return Path(root) / f"{RESTORE_SCRATCH}{name}.{os.getpid()}-{here()}-{secrets.token_hex(4)}.tmp"


def _clear_restore_scratch(root: Path) -> None:
    """Delete the scratch files of image restores whose process is gone (a ``system
    restore`` killed during an image: only its ``finally`` removed the file, as large as the
    image). A live one's stays (a pid reused since counts as live: kept, never wrongly
    deleted, until that process ends too), and so does one of another boot or PID namespace
    (a restore in a container sharing the root: its pid means nothing here)."""
    for scratch in Path(root).glob(f"{RESTORE_SCRATCH}*.tmp"):
        owner, where, *_ = [*scratch.name.removesuffix(".tmp").rpartition(".")[2].split("-"), ""]
        if owner.isdigit() and where == here() and not alive(int(owner)):
            scratch.unlink(missing_ok=True)


def check_image_name(name: str) -> str:
    """A backing image's name, checked (exit 2): a name, short enough for its backups to be
    named (the volume ``image-NAME``)."""
    check_name(name, "backing image name")
    if not image_name_fits(name):
        raise InvalidArgument(
            f"backing image name {name!r} is too long: at most {MAX_IMAGE_NAME} "
            "characters (its backups are kept as the volume image-NAME)"
        )
    return name


def name_free(root: Path, name: str) -> None:
    """Refuse (exit 1) a name a new image may not take: one a registered image holds (or a
    damaged record), or one whose backups an older volume ``image-NAME`` would share."""
    if (volumes.volumes_dir(root) / (IMAGE_BACKUPS + name)).exists():  # (an older volume)
        raise AlreadyExists(
            f"volume {IMAGE_BACKUPS + name} exists: backing image {name} would share its "
            "backups; choose another name"
        )
    if (images_dir(root) / f"{name}.json").exists():
        raise AlreadyExists(f"backing image {name} already exists")


def create(
    root: Path,
    name: str,
    source: Path,
    progress: Callable[[str, int, int], None] | None = None,
    take: bool = False,
    known: str | None = None,
) -> dict[str, Any]:
    """Register ``source`` as backing image ``name``, copied in (or linked to a registered
    image of the same content) and hashed; ``progress(what, done, total)`` is told how far
    each step (``copying``, ``hashing``) went. ``take``: ``source`` is a file of lhfs's own
    under the root, on the disk already (a restore's scratch file), moved in rather than
    copied where it is on the same file system: an image restored was written twice;
    ``known``, its content id as already checked by reading it whole (not read again: an
    image restored was read three times, to check it, to look for its content among those
    registered, and to register it)."""
    check_image_name(name)
    name_free(root, name)
    if source.exists() and not source.is_file():
        raise InvalidArgument(f"image file {source} is not a regular file")
    if not source.is_file():
        raise NotFound(f"image file {source} does not exist")
    if source.stat().st_size == 0:
        raise InvalidArgument(f"image file {source} is empty: a volume without one reads as zeros")
    base = images_dir(root)
    with name_held(root, name, "created"):
        if (base / f"{name}.json").exists():
            raise AlreadyExists(f"backing image {name} already exists")
        _clear_cut_short(root, name)
        tmp = base / f".{name}.img.{os.getpid()}.tmp"
        try:
            hashing = partial(progress, "hashing") if progress else None
            image_id = _link_same(root, source, tmp, hashing, known if take else None)
            if image_id is None and not (take and _moved(source, tmp)):  # (copied in)
                copy_sparse(source, tmp, partial(progress, "copying") if progress else None)
            if image_id is None:  # (content no other name holds)
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                image_id = known if take and known else content_id(tmp, hashing)
            os.rename(tmp, base / f"{name}.img")
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(base)
        info = {"name": name, "id": image_id, "size": id_size(image_id), "file": f"{name}.img"}
        atomic_write_json(base / f"{name}.json", {**info, **_file_stat(base / f"{name}.img")})
    return info


def _moved(source: Path, tmp: Path) -> bool:
    """Move ``source`` to ``tmp``; False (nothing done) when they are on two file systems."""
    try:
        os.rename(source, tmp)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return False
    return True


def _link_same(
    root: Path,
    source: Path,
    tmp: Path,
    progress: Callable[[int, int], None] | None = None,
    known: str | None = None,
) -> str | None:
    """Make ``tmp`` a link to the file of a registered image holding the content of
    ``source``, and return that content's id; None when no image holds it (nothing made).
    One content registered under several names is kept once: each name is a link to one
    file, which stays as long as a name links it (``remove`` of one keeps it for the
    others). Only an image of the same size costs a read of ``source`` (none when its id is
    ``known``); one whose file was modified since it was registered is not linked to."""
    size = source.stat().st_size
    same = []
    for record in sorted(images_dir(root).glob("*.json")):
        with contextlib.suppress(CorruptState, InvalidArgument, NotFound):
            info = get(root, record.stem)
            if info["size"] == size and _changed(info) is not True:
                same.append(info)
    if not same:
        return None
    wanted = known or content_id(source, progress)
    for info in same:
        if info["id"] != wanted:
            continue
        if _changed(info) is None and content_id(Path(info["path"])) != wanted:
            continue  # (registered before its file's stamp was kept: read to be sure)
        try:
            os.link(info["path"], tmp)
        except FileNotFoundError:  # (removed meanwhile)
            continue
        if _changed({**info, "path": tmp}) is not True:  # (the file linked is the one read)
            return wanted
        tmp.unlink()
    return None


def _file_stat(path: Path) -> dict[str, int]:
    """What ``ls`` compares an image's file with, cheaply (no read): its size and time of
    last change as registered. A file written since says so; its content is checked (read
    whole) only where it is used (``verified``)."""
    found = path.stat()
    return {"file_bytes": found.st_size, "file_mtime_ns": found.st_mtime_ns}


def _changed(info: dict[str, Any]) -> bool | None:
    """Whether a registered image's file was modified since it was registered (size or
    time of last change differ, or it is gone); None for one registered before lhfs kept
    them (not known without reading it)."""
    recorded = {key: info.get(key) for key in ("file_bytes", "file_mtime_ns")}
    if not all(type(value) is int for value in recorded.values()):
        return None
    try:
        return _file_stat(Path(info["path"])) != recorded
    except OSError:
        return True


def get(root: Path, name: str) -> dict[str, Any]:
    """The record of image ``name``, with ``path``: its file's. A record that is not what
    lhfs writes is refused in one line (``CorruptState``) naming it and the field: its
    ``file`` becomes a path, its ``id`` what volumes are matched on."""
    path = images_dir(root) / f"{check_name(name, 'backing image name')}.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no backing image named {name!r}") from None
    except (OSError, ValueError) as exc:
        raise CorruptState(f"{path} is damaged: {exc}") from None
    if not isinstance(info, dict):
        raise CorruptState(f"{path} is damaged: not a JSON object")
    if info.get("file") != f"{name}.img":
        raise CorruptState(f"{path}: file must be {name}.img, not {info.get('file')!r:.60}")
    image_id = info.get("id")
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise CorruptState(f"{path}: id must be an image id, not {image_id!r:.60}")
    info.update(name=name, size=id_size(image_id), path=str(images_dir(root) / info["file"]))
    return info


def list_images(root: Path) -> list[dict[str, Any]]:
    """Every registered image; one whose record is damaged as its name and ``error`` (for
    ``ls`` to show and ``rm`` to clear), never a failure of the whole list. The files of
    creates and image restores cut short are cleared on the way."""
    base = images_dir(root)
    if Path(root).is_dir():
        _clear_restore_scratch(root)
    if not base.exists():
        return []
    _clear_cut_short(root)
    found = []
    for record in sorted(base.glob("*.json")):
        try:
            info = get(root, record.stem)
        except (CorruptState, InvalidArgument) as exc:
            found.append({"name": record.stem, "error": str(exc)})
            continue
        found.append({**info, "changed": _changed(info)})
    return found


def of_content(
    root: Path, image_id: str, named: str | None = None, lacking: str | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """The registered image a volume restored from a backup is made on, when its source
    stood on the image of content ``image_id``: matched by content, never by name (the one
    ``named``, its source's image's name, when that holds the content, else the first by
    name), and never one whose file changed since it was registered (what it holds is not
    what its id says). None, and why in words, when the root has none: the volume is then
    restored whole (``lacking``: the words when the root holds no image of that content at
    all, a caller that knows more than this root saying where else it looked). The one rule
    of every restore: ``backup restore``, a DR standby, each volume of a system restore."""
    same = [i for i in list_images(root) if i.get("id") == image_id]
    usable = [i for i in same if i["changed"] is not True]
    if usable:
        return next((i for i in usable if i["name"] == named), usable[0]), None
    called = f"{named} ({image_id})" if named else image_id
    if same:
        return None, (
            f"its backing image {called} is under {root} as {same[0]['name']}, whose file "
            "was modified since it was registered"
        )
    return None, lacking or f"its backing image {called} is not under {root}"


def resolve(root: Path, name_or_file: str) -> tuple[Path, str | None]:
    """A registered image's file and its recorded id, else the path given (an image file
    imported on the fly) and None."""
    try:
        info = get(root, name_or_file)
        return Path(info["path"]), info["id"]
    except (NotFound, InvalidArgument):  # (not a name an image may have: a file's path)
        path = Path(name_or_file)
        if path.is_file():
            if path.stat().st_size == 0:
                raise InvalidArgument(f"image file {path} is empty") from None
            return path, None
        raise NotFound(f"no backing image named {name_or_file!r} and no such file") from None


def verified(root: Path, name: str) -> dict[str, Any]:
    """``get``, once the file is found to hold the content its id says (read whole): a file
    changed since it was registered is refused, not used under the old id."""
    info = get(root, name)
    found = content_id(Path(info["path"]))
    if found != info["id"]:
        raise CorruptState(
            f"backing image {name}'s file {info['path']} changed since it was registered "
            f"(it was {info['id']}, it is {found}): register it again under another name"
        )
    return info


def remove(root: Path, name: str) -> list[str]:
    """Delete a registered image (its record first: then it is gone, whatever is left), or
    the record of one that is damaged; the volumes made from it, which keep their own copies
    in their replicas (they need it not)."""
    base = images_dir(root)
    with name_held(root, name, "removed"):
        try:
            image_id = get(root, name)["id"]
        except CorruptState:
            image_id = None  # (its record is damaged: removed all the same)
        (base / f"{name}.json").unlink()
        fsync_dir(base)
        (base / f"{name}.img").unlink(missing_ok=True)
        _clear_cut_short(root, name)
    return users(root, {name: image_id}).get(name, []) if image_id else []


def users(root: Path, ids: dict[str, str]) -> dict[str, list[str]]:
    """The volumes made from each image of ``ids`` (name: content id), by image name: a
    volume records its image's content id and the name it was made from (one made from
    another image or a raw file of the same content is not this one's; one whose record
    does not say, made before it did, matches by content)."""
    found: dict[str, list[str]] = {}
    for volume in volumes.list_names(root) if ids else []:
        with contextlib.suppress(LhfsError, OSError, ValueError):
            config = volumes.load(root, volume).config
            for name, image_id in ids.items():
                if config.get("backing_image") != image_id:
                    continue
                if config.get("backing_image_name", name) == name:
                    found.setdefault(name, []).append(volume)
    return found
