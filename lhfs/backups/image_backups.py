"""A backing image's backups: ``lhfs backing-image backup`` and ``backing-image restore``.

A store keeps an image's backups as those of the volume ``image-<name>`` (``IMAGE_BACKUPS``:
no new volume is named so), each manifest naming the image's content id where a volume's
names its snapshot, and no chunk size (a volume's always does: that is how the two are told
apart). A restore writes the image to a scratch file under the root, checks it against that
id, then registers it as ``backing-image create`` does (``images.create``: copied in crash-
safely, known by content); a ``system restore`` restores the images of a system backup so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from backupstore.s3 import RETRY_TIMEOUT, Target
from backupstore.store import BackupStore
from lhfs.backups.backup import _backup_name, backup_url, open_store, parse_backup_url
from lhfs.core.errors import AlreadyExists, CorruptState, NotFound
from lhfs.core.names import IMAGE_BACKUPS, check_backup_name
from lhfs.store.backing import IMAGE_ID, content_id, id_size
from lhfs.volumes import images


def backup(
    root: Path,
    name: str,
    url: str,
    progress: Any,
    create_bucket: bool = False,
    retry_timeout: float = RETRY_TIMEOUT,
    full: bool = False,
    notice: Callable[[str], None] | None = None,
) -> str:
    """Back a backing image up like a volume named ``image-<name>``; when the store already
    holds its blocks, nothing is sent and the backup completes all the same."""
    info = images.verified(root, name)  # (never a changed file under the old id)
    target = Target.parse(url)
    store = open_store(target, retry_timeout, notice)
    store.bucket.ensure(create=create_bucket)
    backup_name = _backup_name(info["id"].split("-")[0][:16])
    volume = IMAGE_BACKUPS + name
    with open(info["path"], "rb") as image:

        def read(index: int, block: int) -> bytes:
            data = os.pread(image.fileno(), block, index * block)
            return data + bytes(block - len(data))

        store.create(
            volume,
            backup_name,
            info["size"],
            read,
            snapshot=info["id"],
            progress=progress,
            full=full,
        )
    return backup_url(target, volume, backup_name)


def restore_into(
    root: Path,
    store: BackupStore,
    url: str,
    name: str,
    progress: Callable[..., None],
    image_id: str | None = None,
    kind: str = "system",
    steps: Callable[[str, int, int], None] | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A backing image's backup into the root's images, as ``name``; its content id checked
    against the one it was backed up with (and ``image_id``, the one its system backup
    names, which its volumes are matched on: before anything is fetched). ``kind``: who
    reads the backup, as its reader's marker says; ``steps(what, done, total)``: how far
    each step after the fetch went (``checking`` what was written, then ``images.create``'s:
    an image may be large); ``manifest``: the backup's, when the caller read it already
    (read once: the store could change it between two reads)."""
    _, volume, backup_name = parse_backup_url(url)
    if manifest is None:
        manifest = store.manifest(volume, backup_name)
    backed_up = image_of(manifest, volume)
    if image_id is not None and backed_up != image_id:
        raise CorruptState(
            f"backing image {name}: its backup holds {backed_up}, its system backup names "
            f"{image_id}"
        )
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = images.restore_scratch(root, name)  # (a killed restore's: cleared later)
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, manifest["size"])

            def write(index: int, data: bytes) -> None:
                at = index * manifest["block_size"]
                os.pwrite(fd, data[: manifest["size"] - at], at)

            store.restore(volume, backup_name, write, progress, kind=kind, manifest=manifest)
            os.fsync(fd)
        finally:
            os.close(fd)
        checking = partial(steps, "checking") if steps else None
        if content_id(scratch, checking) != backed_up:
            raise CorruptState(
                f"backing image {name}: the restored content is not the backed up one"
            )
        # (checked above: not read again)
        return images.create(root, name, scratch, steps, take=True, known=backed_up)
    finally:
        scratch.unlink(missing_ok=True)


def restore(
    root: Path,
    name: str,
    url: str,
    as_name: str | None = None,
    backup_name: str | None = None,
    progress: Callable[..., None] = lambda *pct: None,
    retry_timeout: float = RETRY_TIMEOUT,
    notice: Callable[[str], None] | None = None,
    steps: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """``lhfs backing-image restore``: the backup of image ``name`` (its newest complete
    one, or ``backup_name``) in the store at ``url``, registered under the root as
    ``as_name`` (else ``name``). Refused before anything is fetched when that name is taken,
    or when the root holds that content already under another name (a volume restored from a
    backup of ``name`` stands on that one, matched by content): registering it again would
    only give it a second name. ``progress(percent, done, total)``: the fetch; ``steps``: the
    steps after it (see ``restore_into``); ``notice``: told of each damaged manifest passed
    over."""
    from lhfs.backups.dr import newest_backup

    target = Target.parse(url)
    images.check_image_name(name)
    new = images.check_image_name(as_name or name)
    if backup_name is not None:
        check_backup_name(backup_name, "backup name")
    _name_free(root, new)
    store = open_store(target, retry_timeout, notice)
    store.bucket.ensure()
    volume = IMAGE_BACKUPS + name
    if backup_name is None:
        manifest = newest_backup(store, volume, {}, notice)
        if manifest is None:
            raise NotFound(f"{target} holds no backup of backing image {name}")
    else:
        try:
            manifest = store.manifest(volume, backup_name)
        except NotFound:
            raise NotFound(
                f"{target} holds no backup {backup_name} of backing image {name} ('lhfs backup "
                f"ls --target {target} --volume {volume}' lists them)"
            ) from None
    if manifest.get("chunk_size") is not None:  # (an older volume of that name)
        raise NotFound(
            f"{target} holds no backup of backing image {name}: the backups of {volume} are "
            "a volume's ('lhfs backup restore' restores them)"
        )
    image_id = image_of(manifest, volume)
    found = images.list_images(root)
    same = [i for i in found if i.get("id") == image_id and i["changed"] is not True]
    if same:
        raise AlreadyExists(
            f"backing image {same[0]['name']} under {root} holds that content already "
            f"({image_id}): volumes restored from backups made on {name} stand on it"
        )
    _name_free(root, new)  # (again: the store may have taken a while)
    info = restore_into(
        root,
        store,
        backup_url(target, volume, manifest["name"]),
        new,
        progress,
        kind="image",  # (its content checked against the id its manifest names)
        steps=steps,
        manifest=manifest,
    )
    return {**info, "backup": manifest["name"], "from": name}


def image_of(manifest: dict[str, Any], volume: str) -> str:
    """The content id a backing image's backup was made of, as its manifest names it, and
    of the size the manifest says: ``CorruptState`` before anything is fetched otherwise.
    Why the size: the scratch file is made that size and hashed whole before its content is
    compared, so a manifest of a huge size (its blocks nulls) cost as much for nothing."""
    image_id = manifest.get("snapshot")
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise CorruptState(
            f"the manifest of backup {manifest['name']} of {volume} names no image content id: "
            "not a backing image's backup"
        )
    if manifest["size"] != id_size(image_id):
        raise CorruptState(
            f"the manifest of backup {manifest['name']} of {volume} says {manifest['size']} "
            f"bytes, its image content id {image_id} {id_size(image_id)}: one of them was changed"
        )
    return image_id


def _name_free(root: Path, name: str) -> None:
    """Refuse a name a new image may not take (``images.name_free``), before anything is
    fetched, saying how to restore it all the same; ``images.create`` refuses it again under
    its lock."""
    try:
        images.name_free(root, name)
    except AlreadyExists as exc:
        raise AlreadyExists(f"{exc}: restore it under another name (--as NEWNAME)") from None
