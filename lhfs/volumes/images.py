"""Backing images registered under a root: ``lhfs backing-image create/ls/backup``.

An image is kept as ``<root>/backing-images/<name>.img`` with ``<name>.json`` recording its
content id (``xxh3-128-size``): the id, not the name, is what volumes and replicas match on.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.durable import atomic_write_json, copy_sparse, fsync_dir
from lhfs.core.errors import AlreadyExists, CorruptState, InvalidArgument, LhfsError, NotFound
from lhfs.core.names import IMAGE_BACKUPS, MAX_IMAGE_NAME, check_name, image_name_fits
from lhfs.store.backing import content_id, id_size


def images_dir(root: Path) -> Path:
    return Path(root) / "backing-images"


def create(root: Path, name: str, source: Path) -> dict[str, Any]:
    check_name(name, "backing image name")
    if (volumes.volumes_dir(root) / (IMAGE_BACKUPS + name)).exists():  # (an older volume)
        raise AlreadyExists(
            f"volume {IMAGE_BACKUPS + name} exists: backing image {name} would share its "
            "backups; choose another name"
        )
    if not image_name_fits(name):
        raise InvalidArgument(
            f"backing image name {name!r} is too long: at most {MAX_IMAGE_NAME} "
            "characters (its backups are kept as the volume image-NAME)"
        )
    if source.exists() and not source.is_file():
        raise InvalidArgument(f"image file {source} is not a regular file")
    if not source.is_file():
        raise NotFound(f"image file {source} does not exist")
    base = images_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (base / f"{name}.json").exists():
        raise AlreadyExists(f"backing image {name} already exists")
    if source.stat().st_size == 0:
        raise InvalidArgument(f"image file {source} is empty: a volume without one reads as zeros")
    tmp = base / f".{name}.img.tmp"
    tmp.unlink(missing_ok=True)  # (a create cut short)
    copy_sparse(source, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    image_id = content_id(tmp)
    os.rename(tmp, base / f"{name}.img")
    fsync_dir(base)
    info = {"name": name, "id": image_id, "size": id_size(image_id), "file": f"{name}.img"}
    atomic_write_json(base / f"{name}.json", info)
    return info


def get(root: Path, name: str) -> dict[str, Any]:
    path = images_dir(root) / f"{check_name(name, 'backing image name')}.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no backing image named {name!r}") from None
    info["path"] = str(images_dir(root) / info["file"])
    return info


def list_images(root: Path) -> list[dict[str, Any]]:
    base = images_dir(root)
    if not base.exists():
        return []
    return [get(root, p.stem) for p in sorted(base.glob("*.json"))]


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
    """Delete a registered image (its record first: then it is gone, whatever is left); the
    volumes made from it, which keep their own copies in their replicas (they need it not)."""
    info = get(root, name)
    base = images_dir(root)
    (base / f"{name}.json").unlink()
    fsync_dir(base)
    (base / info["file"]).unlink(missing_ok=True)
    users = []
    for volume in volumes.list_names(root):
        with contextlib.suppress(LhfsError, OSError, ValueError):
            if volumes.load(root, volume).config.get("backing_image") == info["id"]:
                users.append(volume)
    return users
