"""Rebuild, backing images by content and scrub, with real processes and a real FUSE device."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, fio_verify, loop_attach, read_direct, write_direct
from lhfs.wire.client import parse_address
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20
CHUNK = 64 << 10


def replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


def write_random(device: Path, size: int, seed: int, chunks: list[int] | None = None) -> None:
    rng = random.Random(seed)
    fd = os.open(device, os.O_RDWR)
    try:
        if chunks is None:
            for offset in range(0, size, MIB):
                os.pwrite(fd, rng.randbytes(MIB), offset)
        else:
            for chunk in chunks:
                os.pwrite(fd, rng.randbytes(CHUNK), chunk * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def offline_checksums(cli: Cli, name: str) -> dict[str, str]:
    vol = volumes.load(cli.root, name)
    out = {}
    for entry in vol.replicas:
        if entry["mode"] == "RW":
            with ChunkStore.open(vol.replica_dir(entry)) as store:
                out[entry["id"]] = store.checksum()
    return out


def test_rebuild_under_fio_verify(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "v", "--size", "128M")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    os.kill(replica(cli, "v", "r2")["pid"], signal.SIGKILL)
    loop = loop_attach(device)
    fio = fio_verify(loop, "64M")
    try:
        wait_for(lambda: cli.live("v")["writes"] > 500, 120, "fio writing")
        added = cli.run("replica", "add", "v")
        assert "is RW" in added.stdout, added.stdout + added.stderr
        out, err = fio.communicate(timeout=600)
        assert fio.returncode == 0 and "verify" not in err.lower(), out + err
    finally:
        if fio.poll() is None:
            fio.kill()
        subprocess.run(["losetup", "-d", loop])
    cli.run("replica", "rm", "v", "r2")
    assert cli.live("v")["state"] == "healthy"
    cli.run("volume", "detach", "v")
    sums = offline_checksums(cli, "v")
    assert set(sums) == {"r1", "r3", "r4"} and len(set(sums.values())) == 1


def test_rebuild_on_a_backing_image_keeps_content(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "base-image.raw"
    image.write_bytes(random.Random(1).randbytes(8 * MIB + 1234))
    cli.run("volume", "create", "bi", "--size", "64M", "--backing-image", str(image))
    device = tmp_path / "dev"
    cli.run("volume", "attach", "bi", "--device", str(device))
    write_random(device, 0, 2, chunks=[5, 200, 201, 700])
    cli.run("snapshot", "create", "bi", "s1")
    write_random(device, 0, 3, chunks=[6, 300])
    before = cli.checksum("bi")
    cli.run("replica", "rm", "bi", "r1")
    cli.run("replica", "add", "bi")
    cli.run("replica", "rm", "bi", "r2")
    assert {r["id"]: r["mode"] for r in cli.live("bi")["replicas"]} == {"r3": "RW", "r4": "RW"}
    assert [cli.checksum("bi") for _ in range(3)] == [before] * 3
    cli.run("volume", "detach", "bi")
    vol = volumes.load(cli.root, "bi")
    metas = {}
    for entry in vol.replicas:
        with ChunkStore.open(vol.replica_dir(entry)) as store:
            metas[entry["id"]] = store.info()["backing_image"]
            assert store.checksum() == before
            assert store.read(0, 4096) == image.read_bytes()[:4096]  # chunk 0: the image's
    assert metas["r3"]["id"] == metas["r4"]["id"]
    assert metas["r3"]["file"] != metas["r4"]["file"]  # the same image under other names


def test_stale_replica_gets_only_what_changed(cli: Cli, tmp_path: Path) -> None:
    size = 64 * MIB
    # (r3 is not rebuilt while attached: it is at the next attach, as after a reboot)
    cli.run("volume", "create", "st", "--size", "64M", "--rejoin-wait", "3600")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "st", "--device", str(device))
    write_random(device, size, 4)
    os.kill(replica(cli, "st", "r3")["pid"], signal.SIGKILL)
    changed = random.Random(5).sample(range(size // CHUNK), size // CHUNK // 100)
    write_random(device, size, 6, chunks=changed)
    cli.run("volume", "detach", "st")
    expected = offline_checksums(cli, "st")["r1"]
    cli.run("volume", "attach", "st", "--device", str(device))  # r3 is stale: rebuilt
    wait_for(lambda: replica(cli, "st", "r3")["mode"] == "RW", 120, "r3 rebuilt")
    stats = replica(cli, "st", "r3")["rebuild_stats"]
    assert len(changed) <= stats["chunks_copied"] <= 2 * len(changed), stats
    assert stats["bytes_copied"] <= 0.02 * size, stats
    assert stats["bytes_relayed"] == 0, stats  # r3 pulled straight from its source
    assert cli.checksum("st") == expected
    cli.run("volume", "detach", "st")
    assert set(offline_checksums(cli, "st").values()) == {expected}


def test_a_killed_local_replica_comes_back_by_itself(cli: Cli, tmp_path: Path) -> None:
    """SCENARIOS.md story 7 with nobody typing a command: a local replica SIGKILLed is started
    again by its engine on its directory and rebuilt with only what changed while it was down.
    One whose process cannot start (its directory replaced by a file) is tried again, backing
    off, with the reason in ``replica ls``, while the volume serves degraded; it comes back
    once it can."""
    size = 64 * MIB
    cli.run("volume", "create", "lr", "--size", "64M", "--replicas", "3")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "lr", "--device", str(device))
    write_random(device, size, 4)
    victim = replica(cli, "lr", "r3")
    os.kill(victim["pid"], signal.SIGKILL)
    changed = random.Random(5).sample(range(size // CHUNK), size // CHUNK // 100)
    write_random(device, size, 6, chunks=changed)  # (before the rejoin wait of 5 s is out)
    waiting = wait_for(
        lambda: (r := replica(cli, "lr", "r3"))["rejoin"] and "rebuilding in" in r["rejoin"] and r,
        30,
        "r3 started again",
    )
    assert waiting["mode"] == "ERR" and waiting["pid"] not in (None, victim["pid"]), waiting
    back = wait_for(lambda: (r := replica(cli, "lr", "r3"))["mode"] == "RW" and r, 60, "r3 back")
    assert back["shared_memory"], back  # (its new local socket, not only its TCP port)
    stats = back["rebuild_stats"]
    assert len(changed) <= stats["chunks_copied"] <= 2 * len(changed), stats
    assert stats["bytes_relayed"] == 0, stats
    assert cli.live("lr")["state"] == "healthy"
    log = cli.engine_log("lr")
    assert "replica r3: its process ended (killed by SIGKILL)" in log

    cli.run("volume", "set", "lr", "--rejoin-wait", "1")  # (no writes to land first any more)
    directory = volumes.load(cli.root, "lr").replica_dir(volumes.load(cli.root, "lr").replica("r3"))
    away = directory.with_name("r3.away")
    directory.rename(away)  # (the running process keeps its open files)
    directory.write_bytes(b"")
    os.kill(back["pid"], signal.SIGKILL)
    write_random(device, size, 7, chunks=changed[:4])  # a write notices
    stuck = wait_for(
        lambda: (
            "did not start again" in (replica(cli, "lr", "r3")["rejoin"] or "")
            and replica(cli, "lr", "r3")
        ),
        30,
        "the failed start shown",
    )
    assert "is not a directory" in stuck["rejoin"] and stuck["mode"] == "ERR", stuck
    assert cli.live("lr")["state"] == "degraded"
    write_random(device, size, 8, chunks=changed[4:8])  # the volume serves meanwhile
    expected = cli.checksum("lr")
    directory.unlink()
    away.rename(directory)
    wait_for(lambda: replica(cli, "lr", "r3")["mode"] == "RW", 90, "r3 back after its start failed")
    assert cli.live("lr")["state"] == "healthy"
    assert cli.checksum("lr") == expected
    cli.run("volume", "detach", "lr")
    assert set(offline_checksums(cli, "lr").values()) == {expected}


def test_a_replica_that_cannot_come_back_is_given_up_after_the_rejoin_limit(
    cli: Cli, tmp_path: Path
) -> None:
    """A local replica whose process cannot start again is tried, backing off, for the volume's
    rejoin limit, then left for the operator with that said in ``replica ls`` and the engine
    log (why it failed logged once, not at every attempt); replacing it makes the volume
    healthy."""
    cli.run("volume", "create", "gl", "--size", "16M", "--replicas", "2", "--rejoin-limit", "10")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "gl", "--device", str(device))
    vol = volumes.load(cli.root, "gl")
    directory = vol.replica_dir(vol.replica("r2"))
    directory.rename(directory.with_name("r2.away"))
    directory.write_bytes(b"")  # (not a directory: its process exits at start)
    os.kill(replica(cli, "gl", "r2")["pid"], signal.SIGKILL)
    write_direct(device, 0, os.urandom(MIB))  # a write notices
    given_up = wait_for(
        lambda: "replace it" in ((r := replica(cli, "gl", "r2"))["rejoin"] or "") and r,
        60,
        "the rejoin limit to pass",
    )
    assert given_up["mode"] == "ERR" and given_up["restarts"] == 0, given_up
    log = cli.engine_log("gl")
    assert "replica r2 is not brought back: away for" in log, log
    assert log.count("replica r2 cannot be brought back yet: its process did not start") == 1
    cli.run("replica", "rm", "gl", "r2")
    cli.run("replica", "add", "gl")
    assert cli.live("gl")["state"] == "healthy"
    cli.run("volume", "detach", "gl")


def gone(pid: int) -> bool:
    """The process ``pid`` has ended and was reaped by its parent."""
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("resumed", [True, False], ids=["stalled", "hung"])
def test_a_stopped_local_replica_comes_back(cli: Cli, tmp_path: Path, resumed: bool) -> None:
    """A local replica that stops answering without dying (SIGSTOP: a process stuck on a disk
    that stalled) is marked ERR within the I/O timeout while writes go on. Stalled a moment,
    it is reconnected once it answers again (its process is not started again); hung, it is
    killed once it has left the rejoiner's connections unanswered twice, and started again on
    its directory. Either way it is rebuilt with what it missed, nobody typing a command."""
    cli.run(
        "volume", "create", "sl", "--size", "32M", "--replicas", "2",
        "--io-timeout", "2", "--rejoin-wait", "1",
    )  # fmt: skip
    device = tmp_path / "dev"
    cli.run("volume", "attach", "sl", "--device", str(device))
    before, during = os.urandom(MIB), os.urandom(MIB)
    write_direct(device, 0, before)
    victim = replica(cli, "sl", "r2")
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        write_direct(device, MIB, during)  # (waits for r2 up to the I/O timeout, then goes on)
        stalled = replica(cli, "sl", "r2")
        assert stalled["mode"] == "ERR" and "no answer within 2s" in stalled["error"], stalled
        if resumed:
            os.kill(victim["pid"], signal.SIGCONT)
        back = wait_for(lambda: (r := replica(cli, "sl", "r2"))["mode"] == "RW" and r, 90, "r2")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGCONT)
    assert back["failures"] == 1 and back["rebuild_stats"]["bytes_copied"] <= 2 * MIB, back
    if resumed:
        assert back["pid"] == victim["pid"] and back["restarts"] == 0, back
    else:
        assert back["pid"] != victim["pid"] and back["restarts"] == 1 and gone(victim["pid"])
        log = cli.engine_log("sl")
        assert f"its process (pid {victim['pid']}) is alive but answers nothing" in log, log
        assert "replica r2: its process ended (killed by SIGKILL)" in log, log
    assert read_direct(device, 0, MIB) == before and read_direct(device, MIB, MIB) == during
    cli.run("volume", "detach", "sl")
    assert len(set(offline_checksums(cli, "sl").values())) == 1


def test_a_given_up_local_replica_holds_no_process(cli: Cli, tmp_path: Path) -> None:
    """A local replica left for the operator after the rejoin limit has no process left
    holding its directory (a stuck one is killed): ``replica inspect`` reads it at once. (Its
    handshakes get the I/O timeout, 5 s: the limit passes before two of them were left
    unanswered, 5 + 1 + 5 s after it failed, after which it would have been killed and started
    again.)"""
    cli.run(
        "volume", "create", "gu", "--size", "16M", "--replicas", "2",
        "--io-timeout", "5", "--rejoin-limit", "10",
    )  # fmt: skip
    device = tmp_path / "dev"
    cli.run("volume", "attach", "gu", "--device", str(device))
    victim = replica(cli, "gu", "r2")
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        write_direct(device, 0, os.urandom(MIB))  # a write notices
        given_up = wait_for(
            lambda: "replace it" in ((r := replica(cli, "gu", "r2"))["rejoin"] or "") and r,
            60,
            "the rejoin limit to pass",
        )
        wait_for(lambda: gone(victim["pid"]), 30, "the stuck process to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGCONT)
    assert given_up["mode"] == "ERR", given_up
    assert replica(cli, "gu", "r2")["pid"] is None
    assert "replica r2: its process is stopped until it is replaced" in cli.engine_log("gu")
    vol = volumes.load(cli.root, "gu")
    inspected = cli.json("replica", "inspect", "--dir", str(vol.replica_dir(vol.replica("r2"))))
    assert inspected["size"] == 16 * MIB, inspected
    cli.run("volume", "detach", "gu")


def test_a_volume_whose_local_replicas_all_died_serves_again_by_itself(
    cli: Cli, tmp_path: Path
) -> None:
    """Every local replica SIGKILLed, one after the other (an out-of-memory killer's sweep):
    the volume faults; the engine starts them again, the one that served last serves again by
    itself, the other is rebuilt from it, and every flushed write is there."""
    cli.run("volume", "create", "all", "--size", "32M", "--replicas", "2", "--rejoin-wait", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "all", "--device", str(device))
    before, during = os.urandom(MIB), os.urandom(MIB)
    write_direct(device, 0, before)
    first, second = cli.live("all")["replicas"]
    os.kill(first["pid"], signal.SIGKILL)
    write_direct(device, MIB, during)  # acknowledged by the second alone
    os.kill(second["pid"], signal.SIGKILL)
    wait_for(lambda: "the last to serve, is back" in cli.engine_log("all"), 60, "revived")
    info = wait_for(lambda: (i := cli.live("all"))["state"] == "healthy" and i, 60, "healthy")
    assert all(r["pid"] not in (first["pid"], second["pid"]) for r in info["replicas"]), info
    assert read_direct(device, 0, MIB) == before and read_direct(device, MIB, MIB) == during
    cli.run("volume", "detach", "all")
    assert len(set(offline_checksums(cli, "all").values())) == 1


def test_kill_target_then_source_mid_rebuild(cli: Cli, tmp_path: Path) -> None:
    # (killed replicas are not rebuilt by themselves within the test: each stays ERR)
    cli.run("volume", "create", "k", "--size", "256M", "--replicas", "3", "--rejoin-wait", "3600")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "k", "--device", str(device))
    write_random(device, 256 * MIB, 7)
    expected = cli.checksum("k")

    added = cli.run("replica", "add", "k", "--no-wait").stdout.split()[2]
    wait_for(lambda: (replica(cli, "k", added)["rebuild_progress"] or 0) > 5, 60, "progress")
    os.kill(replica(cli, "k", added)["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            replica(cli, "k", added)["mode"] == "ERR"
            and replica(cli, "k", added)["rebuild_progress"] is None
        ),
        60,
        "target failed",
    )
    assert "rebuild failed" in replica(cli, "k", added)["error"]
    assert cli.live("k")["state"] == "degraded"
    assert cli.checksum("k") == expected
    cli.run("replica", "rm", "k", added)
    assert cli.live("k")["state"] == "healthy"

    second = cli.run("replica", "add", "k", "--no-wait").stdout.split()[2]
    wait_for(lambda: (replica(cli, "k", second)["rebuild_progress"] or 0) > 5, 60, "progress")
    os.kill(replica(cli, "k", "r1")["pid"], signal.SIGKILL)  # r1 is the rebuild's source
    wait_for(lambda: replica(cli, "k", second)["mode"] == "RW", 120, "rebuilt from another")
    assert replica(cli, "k", "r1")["mode"] == "ERR"
    assert cli.checksum("k") == expected
    cli.run("volume", "detach", "k")
    sums = offline_checksums(cli, "k")
    assert set(sums) == {"r2", "r3", second} and set(sums.values()) == {expected}


def test_a_target_that_cannot_reach_the_source_is_fed_through_the_engine(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A new replica pulls its data straight from the source, by the address the engine knows
    it by. When that address does not work from where the new replica runs (another network;
    here a proxy that stops taking new connections while the engine keeps its own), the engine
    relays the data itself and the rebuild still ends equal."""
    size = 64 * MIB
    cli.run("volume", "create", "n", "--size", "64M", "--replicas", "1")
    cli.run("volume", "key", "n", "--out", str(tmp_path / "n.key"))
    remote = replica_factory(tmp_path / "remote", tmp_path / "n.key")
    proxy = FaultProxy(parse_address(remote.address))
    try:
        device = tmp_path / "dev"
        cli.run("volume", "attach", "n", "--device", str(device))
        write_random(device, size, 11)
        expected = cli.checksum("n")
        far = cli.run("replica", "add", "n", "--address", f"127.0.0.1:{proxy.port}").stdout
        far_id = far.split()[2]
        stats = replica(cli, "n", far_id)["rebuild_stats"]
        assert stats["bytes_copied"] == size and stats["bytes_relayed"] == 0, stats

        cli.run("replica", "rm", "n", "r1")  # the remote replica is now the only source
        proxy.stop()
        near_id = cli.run("replica", "add", "n").stdout.split()[2]
        stats = replica(cli, "n", near_id)["rebuild_stats"]
        assert stats["bytes_copied"] == stats["bytes_relayed"] == size, stats
        assert cli.live("n")["state"] == "healthy"
        assert cli.checksum("n") == expected
        cli.run("volume", "detach", "n")
        vol = volumes.load(cli.root, "n")
        with ChunkStore.open(vol.replica_dir(vol.replica(near_id))) as store:
            assert store.checksum() == expected
    finally:
        proxy.close()


def test_a_rebuild_whose_target_falls_silent_fails_and_is_tried_again(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    """A remote replica coming back takes the engine's new connection, then answers nothing
    (its link stops delivering) before the rebuild asks it anything. The rebuild fails within
    the volume's I/O timeout, saying why, doctor does not call the replica ok meanwhile, and a
    later attempt brings it back; snapshots are taken again. (The rebuild waited for ever:
    ERR at 0.0%, every snapshot refused, doctor "ok ... answers".)"""
    cli.run("volume", "create", "s", "--size", "16M", "--replicas", "1", "--io-timeout", "2")
    cli.run("volume", "set", "s", "--rejoin-wait", "4")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "s", "--device", str(device))
    _remote, proxy, address = proxied_replica("s")
    far = cli.run("replica", "add", "s", "--address", address).stdout.split()[2]

    def now(field: str) -> str:
        return replica(cli, "s", far)[field] or ""

    proxy.hold()  # the link stops delivering: a write leaves the replica ERR
    write_direct(device, 0, os.urandom(MIB))
    wait_for(lambda: "answers again" in now("rejoin"), 30, "the replica to answer again")
    proxy.hold()  # ...and so does the engine's new connection, before the rebuild's hello
    wait_for(lambda: "answered nothing" in now("error"), 30, "the rebuild to fail")
    said = replica(cli, "s", far)
    assert said["mode"] == "ERR" and said["rebuild_progress"] is None, said
    assert f"rebuild failed: replica {far} ({address}) answered nothing for 2s" == said["error"]
    doctor = cli.run("doctor", "s", check=False).stdout
    line = next(line for line in doctor.splitlines() if f"replica {far}" in line)
    assert line.startswith("WARN") and "the engine has it failed: rebuild failed" in line, line
    cli.run("volume", "set", "s", "--rejoin-wait", "0")  # (the hold needed it; no longer)
    wait_for(lambda: replica(cli, "s", far)["mode"] == "RW", 60, "brought back")
    cli.run("snapshot", "create", "s", "after")
    assert cli.live("s")["state"] == "healthy"
    cli.run("volume", "detach", "s")


def test_scrub_finds_and_repairs_bit_rot(cli: Cli, tmp_path: Path) -> None:
    size = 64 * MIB
    cli.run("volume", "create", "rot", "--size", "64M")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "rot", "--device", str(device))
    write_random(device, size, 8)
    cli.run("snapshot", "create", "rot", "s1")
    write_random(device, size, 9, chunks=[1, 2, 3])
    with open(device, "rb") as f:
        content = f.read()
    cli.run("volume", "detach", "rot")
    vol = volumes.load(cli.root, "rot")
    with ChunkStore.open(vol.replica_dir(vol.replica("r2"))) as store:
        data_path = store.layer("s1").data_path
    with open(data_path, "r+b") as f:  # rot inside chunk 500 of r2's snapshot
        f.seek(500 * CHUNK + 77)
        f.write(b"\x00rotten\xff")
    cli.run("volume", "attach", "rot", "--device", str(device))
    found = cli.run("volume", "scrub", "rot", "--json", check=False)
    assert found.returncode == 3  # corruption was found (and is being repaired)
    report = json.loads(found.stdout)
    assert list(report["damaged"]) == ["r2"] and report["repaired"] == ["r2"]
    wait_for(lambda: replica(cli, "rot", "r2")["mode"] == "RW", 120, "r2 repaired")
    assert replica(cli, "rot", "r2")["rebuild_stats"]["chunks_copied"] <= 2
    for _ in range(3):  # reads go round robin: every replica serves some of them
        with open(device, "rb") as f:
            assert f.read() == content
    assert cli.json("volume", "scrub", "rot")["damaged"] == {}
    cli.run("volume", "detach", "rot")


def rot(cli: Cli, volume: str, replica_id: str, layer: str, chunk: int) -> Path:
    """Change bytes inside ``chunk`` of a detached volume's replica's snapshot ``layer``; the
    layer's checksum record."""
    vol = volumes.load(cli.root, volume)
    with ChunkStore.open(vol.replica_dir(vol.replica(replica_id))) as store:
        data_path, sums_path = store.layer(layer).data_path, store.layer(layer).sums_path
    with open(data_path, "r+b") as f:
        f.seek(chunk * CHUNK + 77)
        f.write(os.urandom(9))
    return sums_path


def test_two_replicas_that_disagree_are_not_repaired_in_a_guessed_direction(
    cli: Cli, tmp_path: Path
) -> None:
    """With two replicas, rot recorded as truth (before any checksum of its snapshot was
    recorded) makes them disagree: the scrub says so, repairs nothing and marks nothing (it
    once said "no corruption"). When the other one then rots after its record (elsewhere),
    it is taken out of I/O and held, not rebuilt from the copy no record vouches for (its
    rebuild would copy the disputed chunk too: both then held the rotten bytes), and it stays
    held across a detach and an attach."""
    cli.run("volume", "create", "two", "--size", "32M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "two", "--device", str(device))
    write_random(device, 32 * MIB, 5)
    cli.run("snapshot", "create", "two", "s1")
    cli.run("volume", "detach", "two")
    assert not rot(cli, "two", "r2", "s1", 300).exists()  # (rotten before any record)
    cli.run("volume", "attach", "two", "--device", str(device))
    found = cli.run("volume", "scrub", "two", "--json", check=False)
    assert found.returncode == 3, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert report["disputed"] == {"s1": [300]} and report["damaged"] == {}, report
    assert [r["mode"] for r in cli.live("two")["replicas"]] == ["RW", "RW"]
    said = cli.run("volume", "scrub", "two", check=False).stdout
    assert "snapshot s1: the replicas hold different data at chunk(s) 300" in said, said
    cli.run("volume", "detach", "two")
    assert rot(cli, "two", "r1", "s1", 100).exists()  # (rotten after its record)
    cli.run("volume", "attach", "two", "--device", str(device))
    report = json.loads(cli.run("volume", "scrub", "two", "--json", check=False).stdout)
    assert report["held"] == ["r1"] and report["repaired"] == [], report
    for again in (False, True):
        if again:
            cli.run("volume", "detach", "two")
            cli.run("volume", "attach", "two", "--device", str(device))
        r1 = wait_for(lambda: (r := replica(cli, "two", "r1"))["pid"] is None and r, 30, "r1")
        assert r1["mode"] == "ERR" and "'replica rm' it" in (r1["rejoin"] or ""), r1
        assert r1["rebuild_stats"] is None and cli.live("two")["state"] == "degraded"
    cli.run("volume", "detach", "two")  # (detached, it says so too)
    r1 = next(r for r in cli.json("replica", "ls", "two") if r["id"] == "r1")
    assert "'replica rm' it" in (r1["rejoin"] or ""), r1
    cli.run("volume", "attach", "two", "--device", str(device))
    cli.run("replica", "rm", "two", "r1")
    assert cli.live("two")["state"] == "healthy"
    cli.run("volume", "detach", "two")


def test_a_rotten_backing_image_is_found_by_scrub_and_replaced(cli: Cli, tmp_path: Path) -> None:
    """Bit rot in one replica's copy of the backing image (its size and time unchanged, so
    opening it never rehashes it): the scrub finds it (it said "no corruption" and reads
    served the rotten bytes), and the rebuild that repairs it sends a good copy."""
    image = tmp_path / "base.img"
    image.write_bytes(random.Random(3).randbytes(4 * MIB))
    cli.run("volume", "create", "bi", "--size", "16M", "--replicas", "2",
            "--backing-image", str(image))  # fmt: skip
    expected = cli.checksum("bi")
    vol = volumes.load(cli.root, "bi")
    (copy,) = vol.replica_dir(vol.replica("r2")).glob("*.img")  # type: ignore[union-attr]
    stamp = copy.stat()
    with open(copy, "r+b") as f:
        f.seek(500_000)
        f.write(b"BITROT!!")
    os.utime(copy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    device = tmp_path / "dev"
    cli.run("volume", "attach", "bi", "--device", str(device))
    found = cli.run("volume", "scrub", "bi", "--json", check=False)
    report = json.loads(found.stdout)
    assert found.returncode == 3 and report["repaired"] == ["r2"], report
    assert "backing image" in report["damaged"]["r2"][0], report
    wait_for(lambda: replica(cli, "bi", "r2")["mode"] == "RW", 60, "r2 repaired")
    assert replica(cli, "bi", "r2")["rebuild_stats"]["backing_bytes"] > 0
    for _ in range(3):  # (reads go round the replicas)
        assert cli.checksum("bi") == expected
    assert cli.json("volume", "scrub", "bi")["damaged"] == {}
    cli.run("volume", "detach", "bi")
    assert list(copy.parent.glob("*.rotten")), list(copy.parent.iterdir())


def test_snapshots_a_revert_left_off_the_chain_survive_a_rebuild(cli: Cli, tmp_path: Path) -> None:
    """A revert keeps the newer snapshots, off the chain. A rebuilt replica holds them too,
    with their content and their place (it dropped them: once the replicas that held them
    were replaced they were gone, and until then listed but refused by revert and rm)."""
    cli.run("volume", "create", "br", "--size", "16M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "br", "--device", str(device))
    content = {}
    for name in ("s1", "s2", "s3"):
        write_direct(device, 0, os.urandom(MIB))
        cli.run("snapshot", "create", "br", name)
        content[name] = read_direct(device, 0, 2 * MIB)
    cli.run("volume", "detach", "br")
    cli.run("snapshot", "revert", "br", "s1")  # (s2 and s3 stay, off the chain)
    cli.run("volume", "attach", "br", "--device", str(device))
    write_direct(device, MIB, os.urandom(MIB))
    cli.run("replica", "rm", "br", "r1")
    cli.run("replica", "add", "br")  # r3, rebuilt from r2
    listed = {s["name"]: s["active"] for s in cli.json("snapshot", "ls", "br")}
    assert listed["s2"] is False and listed["s3"] is False, listed
    cli.run("volume", "detach", "br")
    vol = volumes.load(cli.root, "br")
    for replica_id in ("r2", "r3"):
        with ChunkStore.open(vol.replica_dir(vol.replica(replica_id))) as store:  # type: ignore[arg-type]
            parents = {
                layer["name"]: layer["parent"] and store.meta["layers"][layer["parent"]]["name"]
                for layer in store.list_layers()
                if layer["name"]
            }
            assert parents["s2"] == "s1" and parents["s3"] == "s2", (replica_id, parents)
            for name in ("s2", "s3"):
                seen = store.read_snapshot(store.layer(name).id, 0, 2 * MIB)
                assert seen == content[name], (replica_id, name)
    cli.run("snapshot", "revert", "br", "s3")
    cli.run("volume", "attach", "br", "--device", str(device))
    assert read_direct(device, 0, 2 * MIB) == content["s3"]
    cli.run("volume", "detach", "br")


def test_failed_adds_leave_the_engine_and_replicas_alone(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "f", "--size", "64M", "--replicas", "2")
    cli.run("volume", "attach", "f", "--device", str(tmp_path / "dev"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"
    for address, status, message in ((refused, 1, "cannot reach"), ("nonsense", 2, "HOST:PORT")):
        result = cli.run("replica", "add", "f", "--address", address, check=False)
        assert result.returncode == status and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    info = cli.live("f")
    assert info["state"] == "healthy" and [r["id"] for r in info["replicas"]] == ["r1", "r2"]
    assert [r["id"] for r in volumes.load(cli.root, "f").replicas] == ["r1", "r2"]
    os.kill(replica(cli, "f", "r2")["pid"], signal.SIGKILL)
    with open(tmp_path / "dev", "r+b") as f:  # a write notices that r2 is gone
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
    result = cli.run("replica", "rm", "f", "r1", check=False)
    assert result.returncode == 1 and "last healthy replica" in result.stderr
    assert cli.live("f")["state"] == "degraded"
    cli.run("volume", "detach", "f")


def test_two_adds_at_once_a_cancelled_add_and_an_engine_killed_mid_rebuild(
    cli: Cli, tmp_path: Path
) -> None:
    from lhfs.testing import kill_engine, teardown

    cli.run("volume", "create", "t", "--size", "128M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "t", "--device", str(device))
    write_random(device, 128 * MIB, 10)
    expected = cli.checksum("t")

    first = cli.start("replica", "add", "t")
    second = cli.start("replica", "add", "t")
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "is RW" in out, out + err
    assert {r["mode"] for r in cli.live("t")["replicas"]} == {"RW"}
    assert len(cli.live("t")["replicas"]) == 4

    cancelled = cli.run("replica", "add", "t", "--no-wait").stdout.split()[2]
    cli.run("replica", "rm", "t", cancelled)  # cancels its rebuild
    assert cancelled not in [r["id"] for r in cli.live("t")["replicas"]]
    assert not (cli.root / "volumes" / "t" / "replicas" / cancelled).exists()
    assert cli.live("t")["state"] == "healthy"

    interrupted = cli.run("replica", "add", "t", "--no-wait").stdout.split()[2]
    wait_for(lambda: (replica(cli, "t", interrupted)["rebuild_progress"] or 0) > 1, 60, "copy")
    kill_engine(cli, "t")
    teardown(cli.root)
    cli.run("volume", "attach", "t", "--device", str(device))  # the rebuild starts over
    wait_for(lambda: replica(cli, "t", interrupted)["mode"] == "RW", 120, "rebuilt after crash")
    assert cli.live("t")["state"] == "healthy"
    assert cli.checksum("t") == expected
    cli.run("volume", "detach", "t")
    sums = offline_checksums(cli, "t")
    assert set(sums.values()) == {expected}, (sums, expected)


def test_a_remote_replica_that_missed_a_detached_change_is_rebuilt_to_the_volume(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A volume expanded while detached grows its local replicas only: its remote one is
    recorded as having missed it, and the next attach grows it and rebuilds it (before: it
    was trusted at its old size, then failed every write past it for ever). A replica of
    another volume's shape (another chunk size) is refused whole by ``replica add``."""
    cli.run("volume", "create", "x", "--size", "16M", "--replicas", "1")
    device = tmp_path / "x.dev"
    cli.run("volume", "attach", "x", "--device", str(device))
    key = tmp_path / "x.key"
    cli.run("volume", "key", "x", "--out", str(key))
    odd = tmp_path / "odd"
    cli.run("replica", "init", "--dir", str(odd), "--size", "16M", "--chunk-size", "128K",
            "--key-file", str(key))  # fmt: skip
    served = replica_factory(odd, key)
    result = cli.run("replica", "add", "x", "--address", served.address, check=False)
    assert result.returncode == 1 and "its chunk size is 131072" in result.stderr, result.stderr
    assert [r["id"] for r in cli.json("replica", "ls", "x")] == ["r1"]
    remote = replica_factory(tmp_path / "remote", key)
    assert cli.json("replica", "add", "x", "--address", remote.address)["id"] == "r2"
    before = os.urandom(MIB)
    write_direct(device, 0, before)
    cli.run("volume", "detach", "x")
    expanded = cli.run("volume", "expand", "x", "--size", "32M").stdout
    assert "expanded" in expanded, expanded
    missed = cli.replica("x", "r2")
    assert missed["mode"] == "ERR" and "missed an expand" in missed["error"], missed
    cli.run("volume", "attach", "x", "--device", str(device))
    wait_for(lambda: cli.live("x")["state"] == "healthy", 60, "r2 rebuilt at the new size")
    after = os.urandom(MIB)
    write_direct(device, 24 * MIB, after)  # (past the old size: every replica takes it)
    assert cli.live("x")["state"] == "healthy"
    assert read_direct(device, 0, MIB) == before and read_direct(device, 24 * MIB, MIB) == after
    cli.run("volume", "detach", "x")
    assert remote.stop() == 0
    vol = volumes.load(cli.root, "x")
    with (
        ChunkStore.open(tmp_path / "remote") as far,
        ChunkStore.open(
            vol.replica_dir(vol.replica("r1"))  # type: ignore[arg-type]
        ) as near,
    ):
        assert far.size == 32 * MIB and far.checksum() == near.checksum()


def test_a_wiped_last_replica_never_serves_as_the_volume(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A volume whose only replica is remote faults when that replica dies; if it comes back
    with its directory wiped it answers, but holds no volume: the volume stays faulted and
    says why, instead of showing healthy between I/O errors (there is no copy left)."""
    import shutil

    from lhfs.replica.process import ReplicaProcess

    cli.run("volume", "create", "g", "--size", "16M", "--replicas", "1", "--rejoin-wait", "1")
    device = tmp_path / "g.dev"
    cli.run("volume", "attach", "g", "--device", str(device))
    key = tmp_path / "g.key"
    cli.run("volume", "key", "g", "--out", str(key))
    remote = replica_factory(tmp_path / "remote", key)
    cli.run("replica", "add", "g", "--address", remote.address)
    cli.run("replica", "rm", "g", "r1")
    port = int(remote.address.rsplit(":", 1)[1])
    remote.kill()
    wait_for(lambda: cli.live("g")["state"] == "faulted", 30, "the volume to fault")
    shutil.rmtree(tmp_path / "remote")
    (tmp_path / "remote").mkdir()
    wiped = ReplicaProcess(tmp_path / "remote", key, port=port)
    try:
        held = wait_for(
            lambda: "holds no volume" in ((r := replica(cli, "g", "r2"))["rejoin"] or "") and r,
            60,
            "the wiped replica to be seen for what it is",
        )
        assert held["mode"] == "ERR" and cli.live("g")["state"] == "faulted", held
        assert "no copy of the volume is left" in cli.engine_log("g")
    finally:
        cli.run("volume", "detach", "g", "--force")
        wiped.stop()


def test_a_replica_found_of_another_shape_when_it_comes_back_is_given_up_at_once(
    cli: Cli, tmp_path: Path, proxied_replica, replica_factory
) -> None:
    """A remote replica that answers again holding another volume's shape (another chunk
    size: its directory was made again) cannot be rebuilt: it is given up at once with the
    reason, not retried with a rebuild snapshot each time until the rejoin limit."""
    cli.run("volume", "create", "s", "--size", "16M", "--replicas", "1")
    cli.run("volume", "set", "s", "--rejoin-wait", "0")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "s", "--device", str(device))
    remote, proxy, address = proxied_replica("s")
    cli.run("replica", "add", "s", "--address", address)
    remote.stop()
    write_direct(device, 0, os.urandom(MIB))  # (r2 fails on it)
    wait_for(lambda: replica(cli, "s", "r2")["mode"] == "ERR", 30, "r2 marked ERR")
    odd = tmp_path / "odd"
    cli.run("replica", "init", "--dir", str(odd), "--size", "16M", "--chunk-size", "128K",
            "--key-file", str(tmp_path / "s.key"))  # fmt: skip
    proxy.upstream = parse_address(replica_factory(odd, tmp_path / "s.key").address)
    wait_for(lambda: "replace it" in (replica(cli, "s", "r2")["rejoin"] or ""), 60, "given up")
    assert "its chunk size is 131072" in replica(cli, "s", "r2")["rejoin"]
    layers = cli.json("snapshot", "ls", "s")
    assert len([layer for layer in layers if "rebuild" in str(layer)]) <= 1, layers
    assert cli.live("s")["state"] == "degraded"
    cli.run("replica", "rm", "s", "r2")
    assert cli.live("s")["state"] == "healthy"
    cli.run("volume", "detach", "s")
