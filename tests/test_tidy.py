"""Small mends: a restore onto a backing image reads each of the image's blocks once; a
``backup rm`` asks the store once whether the backup is there."""

from __future__ import annotations

import os
import random
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from backupstore.s3 import Bucket
from lhfs.backups import backup
from lhfs.core.errors import NotFound
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli
from lhfs.volumes import images

MIB = 1 << 20
CHUNK = 64 << 10


def test_a_restore_onto_a_backing_image_reads_each_of_its_blocks_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which blocks the new volume holds already is asked of the image before any is written:
    what that read found is what the writes compare with (the image was read twice)."""
    rng = random.Random(5)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(3 * MIB) + bytes(MIB))  # (its last MiB zeros)
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    # data over the image, zeros over it, data over its zeros, data past it
    writes = {
        MIB + CHUNK: rng.randbytes(CHUNK),
        2 * MIB: bytes(CHUNK),
        3 * MIB + CHUNK: rng.randbytes(CHUNK),
        5 * MIB: rng.randbytes(CHUNK),
    }
    (directory,) = [Path(r["dir"]) for r in cli.info("a")["replicas"]]
    with ChunkStore.open(directory) as store:
        for offset, data in writes.items():
            store.write(offset, data)
        store.flush()
    checksum = cli.checksum("a")
    url = cli.run(
        "backup", "create", "a", "--target", "s3://tidy/p", "--block-size", "1M",
        "--create-bucket", "--quiet",
    ).stdout.split()[-1]  # fmt: skip

    reads: list[tuple[int, int, int]] = []
    pread = os.pread

    def counted(fd: int, length: int, offset: int) -> bytes:
        reads.append((os.fstat(fd).st_ino, offset, length))
        return pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counted)
    backup.restore(cli.root, url, "b", 1, lambda *a: None, backing=images.get(cli.root, "base"))
    monkeypatch.undo()

    assert cli.checksum("b") == checksum
    (restored,) = [Path(r["dir"]) for r in cli.info("b")["replicas"]]
    with ChunkStore.open(restored) as store:
        assert store.backing is not None
        image = os.stat(store.backing.path).st_ino
        assert {c for layer in store.chain for c in layer.index} == {o // CHUNK for o in writes}
    # (the image's content hashed as the volume is made: in reads of 4 MiB)
    read = [(offset, length) for ino, offset, length in reads if ino == image and length == MIB]
    assert sorted(read) == [(0, MIB), (MIB, MIB), (2 * MIB, MIB), (3 * MIB, MIB)], read


def test_backup_rm_asks_once_whether_the_backup_is_there(
    cli: Cli, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``backup rm`` looks for the manifest once before it deletes it (it asked twice)."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    url = cli.backup("v", "s3://tidy-rm/p")
    name = parse_qs(urlparse(url).query)["backup"][0]
    asked: list[str] = []
    exists = Bucket.exists

    def counted(self: Bucket, key: str) -> bool:
        asked.append(key)
        return exists(self, key)

    monkeypatch.setattr(Bucket, "exists", counted)
    backup.remove(url)
    assert len([key for key in asked if key.endswith(f"/{name}.json")]) == 1, asked
    monkeypatch.undo()
    assert cli.json("backup", "ls", "--target", "s3://tidy-rm/p") == []
    with pytest.raises(NotFound, match="backup gc"):
        backup.remove(url)
