"""Backing images registered under a root: ``lhfs backing-image create/ls/backup``.

An image is kept as ``<root>/backing-images/<name>.img`` with ``<name>.json`` recording its
content id (``xxh3-128-size``): the id, not the name, is what volumes and replicas match on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lhfs.core.durable import atomic_write_json, fsync_dir
from lhfs.core.errors import AlreadyExists, InvalidArgument, NotFound
from lhfs.core.names import check_name
from lhfs.store.backing import content_id, id_size


def images_dir(root: Path) -> Path:
    return Path(root) / "backing-images"


def create(root: Path, name: str, source: Path) -> dict[str, Any]:
    check_name(name, "backing image name")
    if source.exists() and not source.is_file():
        raise InvalidArgument(f"image file {source} is not a regular file")
    if not source.is_file():
        raise NotFound(f"image file {source} does not exist")
    base = images_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (base / f"{name}.json").exists():
        raise AlreadyExists(f"backing image {name} already exists")
    tmp = base / f".{name}.img.tmp"
    shutil.copyfile(source, tmp)
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
    path = images_dir(root) / f"{name}.json"
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


def resolve(root: Path, name_or_file: str) -> Path:
    """A registered image's file, else the path given (an image file imported on the fly)."""
    try:
        return Path(get(root, name_or_file)["path"])
    except NotFound:
        path = Path(name_or_file)
        if path.is_file():
            return path
        raise NotFound(f"no backing image named {name_or_file!r} and no such file") from None
