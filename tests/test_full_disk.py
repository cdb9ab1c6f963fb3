"""A full disk under the replicas: writes are refused whole ("no space"), nothing taken is
lost, the volume serves on, and it takes writes again once there is room, without a command.
The disks are real small file systems (ext4 on a loop device), filled for real."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lhfs.core.errors import NoSpace
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import (
    Cli,
    fill,
    kill_engine,
    read_direct,
    small_disk,
    teardown,
    write_direct,
)
from tests.conftest import needs_fuse
from tests.test_metrics import scrape, value

MiB = 1 << 20


def test_a_full_disk_refuses_a_write_whole_and_keeps_every_one_it_took(tmp_path: Path) -> None:
    """Random writes and trims into a store on a 24 MiB disk until it has refused 20 of them:
    each refused one changed nothing; every one taken is flushed (its index room was claimed
    with it) and is there after a reopen; a snapshot on the full disk is refused whole, and
    taken once there is room."""
    rng = random.Random(5)
    size = 64 * MiB
    model = bytearray(size)
    with small_disk(tmp_path / "disk", 24 * MiB) as disk:
        path = disk / "r"
        (disk / "spare").write_bytes(bytes(2 * MiB))
        refused = 0
        with ChunkStore.create(path, size, 64 << 10) as store:
            model[: 64 << 10] = rng.randbytes(64 << 10)
            store.write(0, model[: 64 << 10])  # (a chunk it holds, overwritten below)
            for i in range(5000):
                offset = rng.randrange(64 << 10, size - 300_000)
                length = rng.randrange(1, 300_000)
                before = store.read(offset, length)
                try:
                    if rng.random() < 0.1:
                        store.trim(offset, length)
                        model[offset : offset + length] = bytes(length)
                    else:
                        data = rng.randbytes(length)
                        store.write(offset, data)
                        model[offset : offset + length] = data
                except NoSpace:
                    assert store.read(offset, length) == before  # nothing of it landed
                    refused += 1
                    if refused == 20:
                        break
                if i % 16 == 0:
                    store.flush()
            assert refused == 20, "the disk never filled"
            store.flush()
            assert store.read(0, size) == model
            fill(disk / "rest")
            files = sorted(os.listdir(path))
            with pytest.raises(NoSpace, match="no space left on the replica's disk"):
                store.snapshot("s1")
            assert store.list_layers()[-1]["name"] is None  # (the head, unchanged)
            assert [layer["name"] for layer in store.list_layers()] == [None]
            assert sorted(os.listdir(path)) == files  # the new layer's files went again
            store.write(0, b"x" * 4096)  # a chunk it holds: no room needed
            model[0:4096] = b"x" * 4096
            store.flush()
        with ChunkStore.open(path) as store:
            assert store.read(0, size) == model
            (disk / "spare").unlink()
            store.snapshot("s1")
            store.write(size - MiB, b"y" * MiB)
            model[size - MiB :] = b"y" * MiB
            store.flush()
        with ChunkStore.open(path) as store:
            assert store.read(0, size) == model
            assert [layer["name"] for layer in store.list_layers()] == ["s1", None]


def test_flushes_of_taken_writes_go_on_however_many_on_a_full_disk(tmp_path: Path) -> None:
    """Each flush after writes into chunks the head holds adds a batch header to the index: on
    a full disk, 4000 write-and-flush rounds never have a flush refused; once the index room
    claimed ahead is used up, the writes are refused instead (whole), and every one taken is
    there after a reopen."""
    with small_disk(tmp_path / "disk", 16 * MiB) as disk:
        path = disk / "r"
        with ChunkStore.create(path, 4 * MiB, 64 << 10) as store:
            store.write(0, bytes(64 << 10))
            store.flush()
            fill(disk / "rest")
            taken = refused = 0
            for n in range(4000):
                try:
                    store.write(0, n.to_bytes(8, "little"))
                    taken = n
                except NoSpace:
                    refused += 1
                store.flush()
            assert taken > 1000  # (at least the room claimed ahead)
        with ChunkStore.open(path) as store:
            assert store.read(0, 8) == taken.to_bytes(8, "little")


@pytest.fixture
def small_root(tmp_path: Path) -> Iterator[tuple[Cli, Path]]:
    """The lhfs command on a root on a 48 MiB disk."""
    with small_disk(tmp_path / "disk", 48 * MiB) as disk:
        root = disk / "root"
        try:
            yield Cli(root), disk
        finally:
            teardown(root)


def _write_until_refused(device: Path, model: bytearray, offset: int, rng: random.Random) -> int:
    """Write 1 MiB blocks from ``offset`` until the volume answers "no space" (the errno a
    program sees); where it stopped."""
    while True:
        assert offset < len(model), "the disk never filled"
        block = rng.randbytes(MiB)
        try:
            write_direct(device, offset, block, sync=False)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return offset
        model[offset : offset + MiB] = block
        offset += MiB


def _fsync(device: Path) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_a_volume_on_a_full_disk_serves_on_and_takes_writes_again(
    small_root: tuple[Cli, Path], tmp_path: Path
) -> None:
    """Two replicas on one 48 MiB disk: writes fill it until one is answered ENOSPC (not an
    I/O error), the volume serves on (never faulted), what was written reads back and
    flushes; a snapshot is refused with one line; room made, the volume is healthy and takes
    writes with no command; after a kill -9 of the engine and an attach, every write is
    there."""
    cli, disk = small_root
    rng = random.Random(11)
    (disk / "spare").write_bytes(bytes(8 * MiB))
    size = 96 * MiB
    cli.run("volume", "create", "v", "--size", "96M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device), "--metrics", "127.0.0.1:0")
    model = bytearray(size)
    stopped = _write_until_refused(device, model, 0, rng)
    assert stopped >= 8 * MiB
    _fsync(device)  # what it took can be made durable on the full disk
    live = cli.live("v")
    assert live["refused_writes"] >= 1
    assert "no space left on the replica's disk" in live["last_refusal"]["reason"]
    # The two mostly refuse the same write, but the last free blocks may go to the first to
    # ask: the other is then marked ERR, saying why, and the volume is degraded, not faulted.
    for replica in live["replicas"]:
        assert replica["mode"] == "RW" or "no space left" in replica["error"].lower(), replica
    assert live["state"] in ("healthy", "degraded"), live
    metrics = scrape(cli.info("v")["metrics"])
    assert value(metrics, "lhfs_volume_refused_writes_total", volume="v") >= 1
    doctor = json.loads(cli.run("doctor", "v", "--json").stdout)
    warned = {c["check"]: c["detail"] for c in doctor if c["status"] == "warn"}
    assert "no space left" in warned["refused writes"], warned
    assert "the local replicas here may still grow by" in warned["free space"], warned
    shown = cli.run("volume", "info", "v").stdout
    assert "write(s) refused since attach" in shown and " FREE" in shown
    wait_for(  # (a replica busy writing back leaves 'info' unanswered 2 s: unknown, not full)
        lambda: all(r["disk_free"] in range(2 * MiB) for r in cli.live("v")["replicas"]),
        60,
        "each replica to say how little its disk has left",
    )
    assert "write(s) refused by r1, r2: no space left" in cli.engine_log("v")
    assert read_direct(device, 0, stopped) == model[:stopped]
    write_direct(device, 0, b"o" * MiB)  # over what it holds: taken
    model[:MiB] = b"o" * MiB
    fill(disk / "rest")
    result = cli.run("snapshot", "create", "v", "s1", check=False)
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no space left" in result.stderr or "being rebuilt" in result.stderr, result
    assert cli.live("v")["state"] == live["state"]

    (disk / "spare").unlink()
    (disk / "rest").unlink()
    wait_for(lambda: cli.live("v")["state"] == "healthy", 120, "the volume healthy by itself")
    for at in range(stopped, stopped + 2 * MiB, MiB):  # (8 MiB made room for 4 on each)
        model[at : at + MiB] = rng.randbytes(MiB)
        write_direct(device, at, model[at : at + MiB], sync=False)
    _fsync(device)
    cli.run("snapshot", "create", "v", "s1")
    kill_engine(cli, "v")
    cli.run("volume", "attach", "v", "--device", str(device))
    assert read_direct(device, 0, size) == model
    assert cli.live("v")["state"] == "healthy"


@needs_fuse
def test_a_replica_whose_own_disk_is_full_is_rebuilt_once_there_is_room(
    cli: Cli, tmp_path: Path
) -> None:
    """r2 alone on a 32 MiB disk, half of it taken: the writes go on without an error, r2 is
    marked ERR saying its disk is full, the volume degraded; room made there, r2 is rebuilt
    by itself and equals r1."""
    rng = random.Random(3)
    cli.run("volume", "create", "v", "--size", "64M", "--replicas", "2")
    r2 = cli.root / "volumes" / "v" / "replicas" / "r2"
    with small_disk(tmp_path / "r2disk", 32 * MiB) as disk:
        subprocess.run(["cp", "-a", f"{r2}/.", str(disk)], check=True)
        subprocess.run(["mount", "--bind", str(disk), str(r2)], check=True)
        try:
            (disk / "spare").write_bytes(bytes(16 * MiB))
            device = tmp_path / "dev"
            cli.run("volume", "attach", "v", "--device", str(device))
            data = rng.randbytes(24 * MiB)
            for at in range(0, len(data), MiB):
                write_direct(device, at, data[at : at + MiB], sync=False)
            _fsync(device)
            replica = cli.replica("v", "r2")
            assert replica["mode"] == "ERR", replica
            assert "no space left" in replica["error"].lower(), replica
            assert cli.live("v")["state"] == "degraded"
            assert cli.live("v")["refused_writes"] == 0
            (disk / "spare").unlink()
            wait_for(lambda: cli.replica("v", "r2")["mode"] == "RW", 120, "r2 rebuilt")
            assert read_direct(device, 0, len(data)) == data
            cli.run("volume", "detach", "v")
            replicas = cli.root / "volumes" / "v" / "replicas"
            with ChunkStore.open(replicas / "r1") as a, ChunkStore.open(r2) as b:
                assert a.checksum() == b.checksum()
        finally:
            teardown(cli.root)
            subprocess.run(["umount", str(r2)], capture_output=True)
