"""Acknowledged writes are never traded for a replica that answers: an attach serves only a
replica that holds every write the volume acknowledged (one recorded healthy, or the one a
faulted volume waits for), never a stale one because the freshest is unreachable; a faulted
volume's replica set does not change under it; a replica that comes back is the one that left
(its directory's identity, and no older than it last flushed); a rebuild's source removed
mid-way is no failure."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.engine.engine import Engine, Faulted, Recorded
from lhfs.replica.process import ReplicaProcess
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, read_direct, remote_volume, small_disk, write_direct

MIB = 1 << 20
BLOCK = 4096


def port_of(proc: ReplicaProcess) -> int:
    return int(proc.address.rsplit(":", 1)[1])


def recorded(cli: Cli, name: str) -> dict:
    return json.loads((cli.root / "volumes" / name / "config.json").read_text())


def modes(cli: Cli, name: str) -> dict[str, str]:
    return {r["id"]: r["mode"] for r in recorded(cli, name)["replicas"]}


def live_replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


def unreadable(device: Path) -> bool:
    try:
        read_direct(device, 0, BLOCK)
    except OSError:
        return True
    return False


@needs_fuse
def test_attach_never_serves_a_stale_replica_while_the_freshest_is_away(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """r2 on host A, r3 on host B. B is cut: r3 is marked ERR and D2 is written to r2 alone.
    Detached, A is cut and B is back: the attach is refused in one line naming r2 (before: r3
    served D1, "salvaged", and r2 was later rebuilt from it: D2 lost). Once A is back, the
    attach serves D2 and r3 is rebuilt from r2."""
    key, (a, b) = remote_volume(cli, tmp_path, serve, "v", 2)
    device = tmp_path / "v.dev"
    assert all("unbuilt" not in r for r in recorded(cli, "v")["replicas"])  # (both rebuilt)
    d1, d2 = os.urandom(MIB), os.urandom(MIB)
    write_direct(device, 0, d1)
    b.kill()  # host B is cut
    write_direct(device, 0, d2)  # acknowledged by r2 alone
    wait_for(lambda: modes(cli, "v") == {"r2": "RW", "r3": "ERR"}, 30, "r3 recorded ERR")
    cli.run("volume", "detach", "v")
    port_a = port_of(a)
    assert a.stop() == 0  # host A is cut...
    serve(b.dir, key, port_of(b))  # ...and B is back
    line = one_line(cli.run("volume", "attach", "v", "--device", str(device), check=False))
    assert "r2 (recorded healthy) cannot be reached" in line, line
    assert "attach again once it is back" in line, line
    assert modes(cli, "v") == {"r2": "RW", "r3": "ERR"}  # nothing changed
    assert cli.info("v")["attached"] is False
    refused = one_line(cli.run("replica", "rm", "v", "r2", check=False))
    assert "last healthy replica" in refused and "--accept-loss" in refused, refused
    serve(a.dir, key, port_a)  # A is back
    cli.run("volume", "attach", "v", "--device", str(device))
    assert read_direct(device, 0, MIB) == d2
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r3 rebuilt from r2")
    sums = control.call(volumes.load(cli.root, "v").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    cli.run("volume", "detach", "v")


@needs_fuse
def test_attach_never_serves_a_stale_replica_while_the_freshest_ones_disk_is_missing(
    cli: Cli, tmp_path: Path
) -> None:
    """The same with local replicas on disks of their own: r2's disk goes, D2 is written to r1
    alone; detached, r1's disk is not mounted at the next attach (r2's is back): refused,
    naming r1 and why, instead of serving r2's D1."""
    with contextlib.ExitStack() as stack:
        d1, d2 = (stack.enter_context(small_disk(tmp_path / f"d{n}", 24 * MIB)) for n in (1, 2))
        cli.run("volume", "create", "l", "--size", "8M", "--disks", f"{d1},{d2}")
        device = tmp_path / "l.dev"
        cli.run("volume", "attach", "l", "--device", str(device))
        old, new = os.urandom(MIB), os.urandom(MIB)
        write_direct(device, 0, old)
        pid = live_replica(cli, "l", "r2")["pid"]
        os.kill(pid, signal.SIGSTOP)  # (not started again on the disk before it is gone)
        subprocess.run(["umount", "-l", str(d2)], check=True)
        os.kill(pid, signal.SIGKILL)
        write_direct(device, 0, new)  # acknowledged by r1 alone
        wait_for(lambda: modes(cli, "l") == {"r1": "RW", "r2": "ERR"}, 30, "r2 recorded ERR")
        cli.run("volume", "detach", "l")
        subprocess.run(["umount", str(d1)], check=True)  # (r1's disk is not there now...)
        image = d2.with_name("d2.img")  # (...and r2's is, again)
        wait_for(
            lambda: not subprocess.run(["losetup", "-j", str(image)], capture_output=True).stdout,
            30,
            f"{d2} let go",
        )
        subprocess.run(["mount", "-o", "loop", str(image), str(d2)], check=True)
        line = one_line(cli.run("volume", "attach", "l", "--device", str(device), check=False))
        assert "r1 (recorded healthy) cannot be reached" in line, line
        assert f"its disk {d1} is not mounted" in line and "attach again once" in line, line
        assert modes(cli, "l") == {"r1": "RW", "r2": "ERR"}
        subprocess.run(["mount", "-o", "loop", str(d1.with_name("d1.img")), str(d1)], check=True)
        cli.run("volume", "attach", "l", "--device", str(device))
        assert read_direct(device, 0, MIB) == new
        wait_for(lambda: cli.live("l")["state"] == "healthy", 30, "r2 rebuilt from r1")
        cli.run("volume", "detach", "l")


@needs_fuse
def test_a_faulted_volume_keeps_the_replica_it_waits_for(cli: Cli, tmp_path: Path, serve) -> None:
    """A volume whose only replica r2 is away is faulted and waits for r2, durably
    (``last_rw``): ``replica add`` is refused up front (nothing to rebuild from; before, the
    new replica stayed empty and the next attach served its zeros), ``replica rm r2`` is
    refused, attached or not, and the next attach serves r2 alone: refused while r2 is away,
    then r2's data once it is back."""
    key, (far,) = remote_volume(cli, tmp_path, serve, "w", 1)
    device = tmp_path / "w.dev"
    data = os.urandom(MIB)
    write_direct(device, 0, data)
    port = port_of(far)
    far.kill()
    wait_for(lambda: cli.live("w")["state"] == "faulted", 30, "the volume to fault")
    assert recorded(cli, "w")["last_rw"]["id"] == "r2"
    before = recorded(cli, "w")
    for args in ((), ("--address", "127.0.0.1:1")):
        line = one_line(cli.run("replica", "add", "w", *args, check=False))
        assert "volume w is faulted: no healthy replica to rebuild a new one from" in line, line
        assert "it waits for r2" in line, line
    line = one_line(cli.run("replica", "rm", "w", "r2", check=False))
    assert "r2 served last before volume w faulted" in line, line
    after = recorded(cli, "w")
    assert [r["id"] for r in after["replicas"]] == ["r2"], after
    assert after["next_replica"] == before["next_replica"], after
    cli.run("volume", "detach", "w")
    line = one_line(cli.run("replica", "rm", "w", "r2", check=False))  # (detached too)
    assert "r2 served last before volume w faulted" in line, line
    line = one_line(cli.run("volume", "attach", "w", "--device", str(device), check=False))
    assert "r2 (the last replica to serve before the volume faulted) cannot be reached" in line
    serve(far.dir, key, port)
    cli.run("volume", "attach", "w", "--device", str(device))
    assert read_direct(device, 0, MIB) == data
    assert "last_rw" not in recorded(cli, "w")  # (it serves again: nothing waited for)
    assert modes(cli, "w") == {"r2": "RW"}
    cli.run("volume", "detach", "w")


def test_salvage_never_picks_a_replica_that_never_completed_a_rebuild(
    tmp_path: Path, replica_factory
) -> None:
    """Nothing recorded healthy (an older configuration, or one whose record was lost): the
    freshest replica that ever served is salvaged, never one that was added and never rebuilt
    (its revision may be higher: its rebuild's barrier moved it); with only such ones left,
    the attach is refused."""
    size = 4 * MIB
    for name in ("old", "new"):
        ChunkStore.create(tmp_path / name, size, BLOCK).close()
    with ChunkStore.open(tmp_path / "old") as store:
        store.write(0, b"o" * BLOCK)
        store.flush()
    with ChunkStore.open(tmp_path / "new") as store:
        for _ in range(5):  # (fresher by its revision)
            store.write(BLOCK, b"\0" * BLOCK)
        store.flush()
    old, new = replica_factory(tmp_path / "old"), replica_factory(tmp_path / "new")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(size, BLOCK, nursery, old.key, io_timeout=5)
            await engine.attach(
                [
                    Recorded("r1", old.address, trusted=False),
                    Recorded("r2", new.address, trusted=False, built=False),
                ]
            )
            assert [link.mode for link in engine.replicas] == ["RW", "ERR"]
            assert await engine.read(0, BLOCK) == b"o" * BLOCK
            await engine.close()
            alone = Engine(size, BLOCK, nursery, old.key, io_timeout=5)
            with pytest.raises(Faulted, match="r2 never completed a rebuild"):
                await alone.attach([Recorded("r2", new.address, trusted=False, built=False)])
            await alone.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


@needs_fuse
def test_a_faulted_volume_never_revives_from_another_directory_at_its_address(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """The volume faults with r2; at r2's address then answer an old copy of r2's directory
    under another identity, then the same copy under r2's own (older than r2 last flushed):
    neither serves (before: the first that answered did, with old content), each said in
    ``replica ls`` and the log, and the attach after a detach is refused for the same reason.
    r2's own directory back, it serves with every acknowledged write."""
    key, (far,) = remote_volume(cli, tmp_path, serve, "i", 1)
    device = tmp_path / "i.dev"
    write_direct(device, 0, os.urandom(MIB))
    cli.run("volume", "detach", "i")
    copy = tmp_path / "copy"
    shutil.copytree(far.dir, copy)  # an old copy of r2 (the same identity file)
    uid = (far.dir / "id").read_text().strip()
    cli.run("volume", "attach", "i", "--device", str(device))
    data = os.urandom(MIB)
    write_direct(device, 0, data)  # (flushed: r2's revision is above the copy's now)
    port = port_of(far)
    far.kill()
    wait_for(lambda: cli.live("i")["state"] == "faulted", 30, "the volume to fault")
    stranger = "0" * 32
    (copy / "id").write_text(f"{stranger}\n")
    impostor = serve(copy, key, port)
    said = (
        f"answers at its address with another replica's directory (id {stranger}, expected {uid})"
    )
    wait_for(lambda: said in (live_replica(cli, "i", "r2")["rejoin"] or ""), 30, "the refusal")
    assert said in cli.engine_log("i")
    assert cli.live("i")["state"] == "faulted" and unreadable(device)
    assert impostor.stop() == 0
    (copy / "id").write_text(f"{uid}\n")  # the same copy, under r2's own identity
    impostor = serve(copy, key, port)
    older = "answers at its address with an older copy of its directory (revision"
    wait_for(lambda: older in (live_replica(cli, "i", "r2")["rejoin"] or ""), 30, "the refusal")
    assert cli.live("i")["state"] == "faulted" and unreadable(device)
    cli.run("volume", "detach", "i")
    line = one_line(cli.run("volume", "attach", "i", "--device", str(device), check=False))
    assert "r2 (the last replica to serve before the volume faulted)" in line and older in line
    assert impostor.stop() == 0
    (copy / "id").write_text(f"{stranger}\n")
    impostor = serve(copy, key, port)
    line = one_line(cli.run("volume", "attach", "i", "--device", str(device), check=False))
    assert said in line, line
    assert impostor.stop() == 0
    serve(far.dir, key, port)  # r2 itself is back
    cli.run("volume", "attach", "i", "--device", str(device))
    assert read_direct(device, 0, MIB) == data
    cli.run("volume", "detach", "i")


@needs_fuse
def test_removing_a_rebuilds_source_is_no_failure(cli: Cli, tmp_path: Path) -> None:
    """``replica rm`` of the replica a rebuild copies from: the rebuild goes on from another,
    and the log tells of no failure to record the removed replica (before: "could not record
    that replica r1 is ERR" and a traceback ending in NotFound)."""
    cli.run("volume", "create", "s", "--size", "96M", "--replicas", "2")
    device = tmp_path / "s.dev"
    cli.run("volume", "attach", "s", "--device", str(device))
    fd = os.open(device, os.O_RDWR)
    try:
        for offset in range(0, 96 * MIB, 4 * MIB):
            os.pwrite(fd, os.urandom(4 * MIB), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = cli.checksum("s")
    added = cli.run("replica", "add", "s", "--no-wait").stdout.split()[2]
    wait_for(lambda: (live_replica(cli, "s", added)["rebuild_progress"] or 0) > 2, 30, "progress")
    target = live_replica(cli, "s", added)["pid"]
    os.kill(target, signal.SIGSTOP)  # (the rebuild stays under way while its source goes)
    try:
        assert live_replica(cli, "s", added)["mode"] != "RW"
        entry = next(r for r in recorded(cli, "s")["replicas"] if r["id"] == added)
        assert entry.get("unbuilt") is True, entry  # (not RW yet: never salvaged)
        cli.run("replica", "rm", "s", "r1")  # (the rebuild's source: the first healthy one)
    finally:
        os.kill(target, signal.SIGCONT)
    wait_for(lambda: live_replica(cli, "s", added)["mode"] == "RW", 60, "rebuilt from r2")
    log = cli.engine_log("s")
    assert "could not record" not in log and "Traceback" not in log, log
    assert "replica r1 " not in _failures(log), log  # (removed: not failed, not recorded)
    assert cli.checksum("s") == expected
    assert [r["id"] for r in recorded(cli, "s")["replicas"]] == ["r2", added]
    assert "unbuilt" not in recorded(cli, "s")["replicas"][1]  # (its first rebuild completed)
    cli.run("volume", "detach", "s")


def _failures(log: str) -> str:
    """The log's lines that mark a replica failed."""
    return "\n".join(line for line in log.splitlines() if ") failed:" in line)


@needs_fuse
def test_a_replica_is_not_rebuilt_over_another_directory_at_its_address(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """A degraded volume's failed replica r3 comes back as another directory at its address
    (r2's old copy, say): it is not rebuilt over (what it holds is not r3's to lose), and
    stays ERR saying why; r3's own directory back, it is rebuilt."""
    key, (_, b) = remote_volume(cli, tmp_path, serve, "d", 2)
    device = tmp_path / "d.dev"
    uid = (b.dir / "id").read_text().strip()
    port = port_of(b)
    b.kill()
    write_direct(device, 0, os.urandom(MIB))
    wait_for(lambda: modes(cli, "d") == {"r2": "RW", "r3": "ERR"}, 30, "r3 recorded ERR")
    other = tmp_path / "other"
    shutil.copytree(b.dir, other)
    (other / "id").write_text(f"{'1' * 32}\n")
    stranger = serve(other, key, port)
    said = f"answers at its address with another replica's directory (id {'1' * 32}"
    wait_for(lambda: said in (live_replica(cli, "d", "r3")["error"] or ""), 30, "the refusal")
    assert f"expected {uid})" in live_replica(cli, "d", "r3")["error"]
    assert cli.live("d")["state"] == "degraded"
    assert stranger.stop() == 0
    serve(b.dir, key, port)
    wait_for(lambda: cli.live("d")["state"] == "healthy", 30, "r3 rebuilt")
    sums = control.call(volumes.load(cli.root, "d").control_socket, "replica_checksums")
    assert len(set(sums.values())) == 1, sums
    cli.run("volume", "detach", "d")


@needs_fuse
def test_a_replica_lost_for_good_is_given_up_only_by_accept_loss(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """The only replica recorded healthy is gone for good (its host lost): no attach serves
    the volume until the operator gives it up with ``replica rm --accept-loss``, which only
    a detached volume takes; then the freshest replica that answers serves (its data: the
    writes only the lost one held are gone, as said)."""
    key, (a, b) = remote_volume(cli, tmp_path, serve, "w", 2)
    device = tmp_path / "w.dev"
    d1 = os.urandom(MIB)
    write_direct(device, 0, d1)
    b.kill()
    write_direct(device, 0, os.urandom(MIB))  # acknowledged by r2 alone
    wait_for(lambda: modes(cli, "w") == {"r2": "RW", "r3": "ERR"}, 30, "r3 recorded ERR")
    attached = one_line(cli.run("replica", "rm", "w", "r2", "--accept-loss", check=False))
    assert "is attached" in attached and "detach" in attached, attached
    cli.run("volume", "detach", "w")
    assert a.stop() == 0  # host A lost for good
    serve(b.dir, key, port_of(b))
    one_line(cli.run("volume", "attach", "w", "--device", str(device), check=False))
    cli.run("replica", "rm", "w", "r2", "--accept-loss")
    assert list(modes(cli, "w")) == ["r3"]
    cli.run("volume", "attach", "w", "--device", str(device))
    assert read_direct(device, 0, MIB) == d1  # (the older data: what r3 held)
    assert cli.live("w")["state"] == "healthy"
    cli.run("volume", "detach", "w")
