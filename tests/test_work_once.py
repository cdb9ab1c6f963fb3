"""Work done once, and off the I/O path: a restore onto a backing image reads each of the
image's blocks once (and none of its holes); a ``backup rm`` asks the store once whether the
backup is there; a same-size ``volume expand`` does not run a grow tool again where it found
nothing to use; the engine records the replicas' revisions off its event loop."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import trio
from conftest import needs_fuse

from backupstore.s3 import Bucket
from lhfs.backups import backup
from lhfs.config import volume as volumes
from lhfs.core import locks
from lhfs.core.errors import NotFound
from lhfs.engine.daemon import Daemon
from lhfs.engine.engine import RW
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli
from lhfs.volumes import images, mount

MIB = 1 << 20
CHUNK = 64 << 10


def test_a_restore_onto_a_backing_image_reads_each_of_its_blocks_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which blocks the new volume holds already is asked of the image before any is written:
    what that read found is what the writes compare with (the image was read twice); and
    the image's holes are not read at all (a thin image's zeros cost as much as data)."""
    rng = random.Random(5)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(3 * MIB))
    os.truncate(raw, 4 * MIB)  # (its last MiB a hole: zeros that are never read)
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
    assert sorted(read) == [(0, MIB), (MIB, MIB), (2 * MIB, MIB)], read


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


def _logged(tmp_path: Path, *tools: str) -> tuple[dict[str, str], Path]:
    """An environment whose ``tools`` log their arguments to the returned file (then run)."""
    wrapped, log = tmp_path / "logged", tmp_path / "tools.log"
    wrapped.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        assert real is not None, f"{tool} is missing: tools/setup-system.sh installs it"
        (wrapped / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
        (wrapped / tool).chmod(0o755)
    log.touch()
    return {"PATH": f"{wrapped}:{os.environ['PATH']}"}, log


def _grown(log: Path) -> list[str]:
    """The grow tools' runs in ``log`` that grow (not those that only ask a size)."""
    return [line for line in log.read_text().splitlines() if " -n " not in f"{line} "]


@needs_fuse
def test_a_same_size_expand_leaves_a_tail_its_ext4_cannot_use(cli: Cli, tmp_path: Path) -> None:
    """A mount records the device size at which resize2fs found nothing to use in the few
    blocks past its ext4 (GROW_TRIED): a same-size ``volume expand`` of the mounted volume
    says there is nothing to do (it ran resize2fs again, or said to run it, at every run)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "g", "--size", "128M", "--replicas", "1")
    cli.run("mount", "g", str(mnt), "--fs", "ext4")
    cli.run("umount", str(mnt))
    size = str(128 * MIB + CHUNK)
    cli.run("volume", "expand", "g", "--size", size)
    tried = cli.root / "volumes" / "g" / mount.GROW_TRIED
    try:
        for _ in range(3):  # (resize2fs may take a block or so first)
            cli.run("mount", "g", str(mnt))
            if tried.exists():
                break
            cli.run("umount", str(mnt))
        assert tried.exists()
        env, log = _logged(tmp_path, "resize2fs")
        said = Cli(cli.root, env).run("volume", "expand", "g", "--size", size).stdout
        assert said == "g is already 128.1M: nothing to do\n", said
        assert _grown(log) == []
    finally:
        cli.run("umount", str(mnt), check=False)


@needs_fuse
def test_a_same_size_expand_records_a_tail_its_xfs_cannot_use(cli: Cli, tmp_path: Path) -> None:
    """An expansion whose xfs_growfs found nothing to use in the few blocks past its xfs
    records it (GROW_TRIED, as a mount does for an ext4): a same-size ``volume expand`` does
    not run xfs_growfs again."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "g", "--size", "320M", "--replicas", "1")
    cli.run("mount", "g", str(mnt), "--fs", "xfs")
    env, log = _logged(tmp_path, "xfs_growfs")
    logged = Cli(cli.root, env)
    try:
        size = str(320 * MIB + CHUNK)
        done = logged.json("volume", "expand", "g", "--size", size)
        assert done["changed"] and done["filesystem"] is None and not done["todo"], done
        assert len(_grown(log)) == 1, log.read_text()
        assert (cli.root / "volumes" / "g" / mount.GROW_TRIED).exists()
        for _ in range(2):
            said = logged.run("volume", "expand", "g", "--size", size).stdout
            assert said == "g is already 320.1M: nothing to do\n", said
        assert len(_grown(log)) == 1, log.read_text()
    finally:
        cli.run("umount", str(mnt), check=False)


def test_the_engine_records_the_replicas_revisions_off_its_event_loop(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic record of what each replica holds durably is written in a thread: the
    event loop runs on while the write waits (here: for the configuration's lock, as for a
    slow root disk). What it writes is what the replicas hold once it may write (a revision
    that moved meanwhile is not written older), and the engine's configuration takes it."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    vol = volumes.load(cli.root, "v")
    daemon = Daemon(vol, cli.root / "dev")
    links = [SimpleNamespace(id=r["id"], mode=RW, synced=5) for r in vol.replicas]
    daemon.engine = SimpleNamespace(replicas=links)  # type: ignore[assignment]

    def flushed() -> list[int | None]:
        return [r.get("flushed") for r in volumes.load(cli.root, "v").replicas]

    writing = threading.Event()  # (the thread is in the update: it waits for the lock)
    update = volumes.Volume.update

    def told(self: volumes.Volume, change: Any) -> Any:
        writing.set()
        return update(self, change)

    monkeypatch.setattr(volumes.Volume, "update", told)

    async def main() -> None:
        lock = locks.open_lock(vol.dir / "config.lock")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(daemon.keep_revisions_aside)
                    # (the loop runs on while the write waits for the lock)
                    assert await trio.to_thread.run_sync(writing.wait, 5)
                    assert flushed() == [None, None]
                    links[0].synced = 9
                    os.close(lock)  # (let go: the write goes on)
                    lock = -1
        finally:
            if lock >= 0:
                os.close(lock)

    trio.run(main)
    assert flushed() == [9, 5]
    assert daemon.vol.config == volumes.load(cli.root, "v").config
    assert daemon._flushed_changes(daemon.vol.config) == {}
