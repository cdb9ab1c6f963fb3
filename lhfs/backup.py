"""Volumes and the backup store: back a snapshot up, list, delete, restore into a new volume.

A backup always reads a snapshot, never the live head: the volume may go on changing. An
attached volume is snapshotted through its engine and read from one healthy replica process;
a detached one is snapshotted and read on its local replica directories.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from backupstore.s3 import Bucket, Target
from backupstore.store import BLOCK_SIZE, BackupStore

from . import control, manage
from . import volume as volumes
from .errors import InvalidArgument, NotFound
from .replica_client import SyncReplica
from .store import ChunkStore, check_name


def backup_url(target: Target, volume: str, name: str) -> str:
    return f"{target}?{urlencode({'volume': volume, 'backup': name})}"


def parse_backup_url(url: str) -> tuple[Target, str, str]:
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    if "volume" not in query or "backup" not in query:
        raise InvalidArgument(f"not a backup URL: {url!r} (s3://BUCKET/PREFIX?volume=V&backup=B)")
    target = Target.parse(url.split("?", 1)[0])
    return target, query["volume"][0], query["backup"][0]


def fitting_chunk(size: int) -> int:
    """The default 64 KiB chunk, or the largest smaller power of two that divides ``size``
    (a restored volume must take the size of its source, whatever chunks that one used)."""
    chunk = 64 << 10
    while size % chunk:
        chunk //= 2
    return chunk


def open_store(target: Target) -> BackupStore:
    return BackupStore(Bucket(target))


def create(root: Path, name: str, url: str, snapshot: str | None, progress: Any) -> str:
    target = Target.parse(url)
    vol = volumes.load(root, name)
    vol.require_not_standby("a backup")
    if snapshot is None:
        snapshot = manage.snapshot_create(root, name, f"backup-{time.strftime('%Y%m%d-%H%M%S')}")[
            "name"
        ]
    check_name(snapshot, "snapshot name")
    store = open_store(target)
    backup_name = f"{snapshot}-{int(time.time() * 1000) % 10**9}"
    block = BLOCK_SIZE
    if vol.runtime() is not None:
        info = control.call(vol.control_socket, "info")
        address = next(r["address"] for r in info["replicas"] if r["mode"] == "RW")
        replica = SyncReplica(address)
        try:
            store.create(
                name,
                backup_name,
                vol.size,
                lambda i: replica.read_snapshot(snapshot, i * block, block),
                snapshot=snapshot,
                progress=progress,
            )
        finally:
            replica.close()
    else:
        directory = manage.freshest_local(vol)
        with ChunkStore.open(directory) as local:
            local.layer(snapshot)  # NotFound before anything is uploaded
            store.create(
                name,
                backup_name,
                vol.size,
                lambda i: bytes(local.read_snapshot(snapshot, i * block, block)),
                snapshot=snapshot,
                progress=progress,
            )
    return backup_url(target, name, backup_name)


def backup_image(root: Path, name: str, url: str, progress: Any) -> str:
    """Back a backing image up like a volume named ``image-<name>``; when the store already
    holds its blocks, nothing is sent and the backup completes all the same."""
    from .images import get

    target = Target.parse(url)
    info = get(root, name)
    block = BLOCK_SIZE
    backup_name = f"{info['id'].split('-')[0][:16]}-{int(time.time() * 1000) % 10**9}"
    with open(info["path"], "rb") as image:

        def read(index: int) -> bytes:
            data = os.pread(image.fileno(), block, index * block)
            return data + bytes(block - len(data))

        open_store(target).create(
            f"image-{name}", backup_name, info["size"], read, snapshot=info["id"], progress=progress
        )
    return backup_url(target, f"image-{name}", backup_name)


def list_backups(url: str, volume: str | None) -> list[dict[str, Any]]:
    target = Target.parse(url)
    out = []
    for backup in open_store(target).list(volume):
        backup["url"] = backup_url(target, backup["volume"], backup["name"])
        out.append(backup)
    return out


def remove(url: str) -> int:
    target, volume, name = parse_backup_url(url)
    return open_store(target).delete(volume, name)


def restore(root: Path, url: str, new_name: str, replicas: int, progress: Any) -> volumes.Volume:
    target, volume, name = parse_backup_url(url)
    store = open_store(target)
    manifest = store.manifest(volume, name)
    if new_name in volumes.list_names(root):
        raise InvalidArgument(f"volume {new_name} already exists")
    vol = manage.create(
        root, new_name, manifest["size"], fitting_chunk(manifest["size"]), replicas, None
    )
    stores = [ChunkStore.open(vol.replica_dir(r)) for r in vol.replicas]
    block = manifest["block_size"]
    try:

        def write(index: int, data: bytes) -> None:
            for local in stores:
                local.write(index * block, data)

        store.restore(volume, name, write, progress)
    except BaseException:
        for local in stores:
            local.close()
        manage.remove(root, new_name)  # nothing half-restored stays behind
        raise
    for local in stores:
        local.close()
    if not vol.dir.exists():
        raise NotFound(f"volume {new_name} vanished during the restore")
    return vol
