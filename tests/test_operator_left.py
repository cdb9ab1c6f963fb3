"""What an operator meets, continued again: the commands on a detached volume refuse a crashed
one until it is let go; ``replica ls`` names the disk of a replica waiting for its rebuild; a
damaged replica is set aside only on a disk with room for its rebuild; ``doctor`` compares a
volume's configured size with its local replicas."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import needs_fuse

from lhfs.core.errors import CorruptState
from lhfs.core.procs import wait_for
from lhfs.engine.daemon import check_size
from lhfs.engine.engine import Engine
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import (
    Cli,
    kill_engine,
    one_line,
    read_direct,
    small_disk,
    teardown,
    write_direct,
)

MIB = 1 << 20


def shown_bytes(text: str) -> float:
    """A size as a message shows it (``28.1M``), in bytes."""
    return float(text[:-1]) * 1024 ** "BKMGTP".index(text[-1])


def mounted(point: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(point) for line in f)


# -- a crashed volume ----------------------------------------------------------------------


@needs_fuse
def test_a_crashed_volume_is_changed_only_once_let_go(cli: Cli, tmp_path: Path) -> None:
    """A volume whose engine was killed with its file system mounted: a revert (and every
    other command on a detached volume's replicas) went ahead under the dead engine's mount,
    whose page cache showed content no longer the volume's. Each is refused in one line
    naming what the engine left and ``volume detach``, and changes nothing; once let go, the
    revert is done and the next mount shows the reverted content."""
    cli.run("volume", "create", "c", "--size", "64M", "--replicas", "2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "c", str(mnt))
    (mnt / "f").write_bytes(b"before")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    cli.run("snapshot", "create", "c", "s1")
    (mnt / "f").write_bytes(b"after")
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    kill_engine(cli, "c")
    before = cli.volumes()
    assert before[0]["state"] == "crashed", before
    for args in (
        ("snapshot", "revert", "c", "s1"),
        ("snapshot", "create", "c", "s2"),
        ("snapshot", "rm", "c", "s1"),
        ("volume", "expand", "c", "--size", "128M"),
        ("volume", "checksum", "c"),
        ("replica", "rm", "c", "r2"),
    ):
        line = one_line(cli.run(*args, check=False))
        assert f"volume c crashed (its engine died and left {mnt} mounted, loop device" in line
        assert line.endswith("'lhfs volume detach c' cleans up after it first"), (args, line)
    assert cli.volumes() == before
    assert mounted(mnt)
    cli.run("volume", "detach", "c")
    assert not mounted(mnt)
    cli.run("snapshot", "revert", "c", "s1")
    cli.run("mount", "c", str(mnt))
    try:
        assert (mnt / "f").read_bytes() == b"before"
    finally:
        cli.run("umount", str(mnt))


# -- replica ls ----------------------------------------------------------------------------


@needs_fuse
def test_replica_ls_shows_the_disk_of_a_replica_waiting_for_its_rebuild(
    cli: Cli, tmp_path: Path
) -> None:
    """Two replicas added at once, their rebuilds held (their source stopped): the second
    waits for the first's (shown WO, at 0%; ERR to the engine), and ``replica ls`` showed
    ``-`` for what its directory takes and its disk has free (only RW and WO replicas were
    asked). It shows both, in JSON too."""
    cli.run("volume", "create", "q", "--size", "64M", "--replicas", "1", "--io-timeout", "120")
    cli.run("volume", "attach", "q", "--device", str(tmp_path / "q.dev"))
    source = cli.replica("q", "r1")["pid"]
    os.kill(source, signal.SIGSTOP)  # (the rebuilds wait for it: not a race with them)
    try:
        added = [cli.json("replica", "add", "q", "--no-wait")["id"] for _ in range(2)]
        listing = {r["id"]: r for r in cli.json("replica", "ls", "q")}
        queued = listing[added[1]]
        assert queued["mode"] == "WO" and queued["rebuild_progress"] == 0, queued  # (waiting)
        assert isinstance(queued["disk_free"], int) and queued["disk_free"] > 0, queued
        assert isinstance(queued["disk_bytes"], int), queued
        row = next(
            line.split() for line in cli.run("replica", "ls", "q").stdout.splitlines()
            if line.split()[0] == added[1]
        )  # fmt: skip
        assert row[3] != "-" and row[4] != "-", row
    finally:
        os.kill(source, signal.SIGCONT)
    wait_for(
        lambda: {r["mode"] for r in cli.json("replica", "ls", "q")} == {"RW"}, 180, "both rebuilt"
    )


# -- a damaged replica on a disk without room ----------------------------------------------


@needs_fuse
def test_a_damaged_replica_is_set_aside_only_on_a_disk_with_room_for_its_rebuild(
    cli: Cli, tmp_path: Path
) -> None:
    """r2, on a disk of its own, has a layer cut: its directory was set aside (keeping its
    space) whatever room its disk had left for the rebuild's new copy, which then filled the
    disk. With less room than r1 takes, r2 is kept as it is, ERR saying how much its rebuild
    needs, what its disk has free and what to do; the volume serves from r1. Room made, the
    next attach sets it aside and rebuilds it."""
    with contextlib.ExitStack() as stack:
        d1 = stack.enter_context(small_disk(tmp_path / "d1", 96 * MIB))
        d2 = stack.enter_context(small_disk(tmp_path / "d2", 64 * MIB))
        stack.callback(teardown, cli.root)  # (before the disks go)
        cli.run(
            "volume", "create", "v", "--size", "32M", "--replicas", "2", "--disks", f"{d1},{d2}"
        )
        device = tmp_path / "v.dev"
        cli.run("volume", "attach", "v", "--device", str(device))
        data = os.urandom(24 * MIB)
        write_direct(device, 0, data)
        cli.run("snapshot", "create", "v", "s1")
        r2 = Path(cli.replica("v", "r2")["dir"])
        cli.run("volume", "detach", "v")
        layers = json.loads((r2 / "volume.json").read_text())["layers"]
        (s1,) = [lid for lid, layer in layers.items() if layer["name"] == "s1"]
        os.truncate(r2 / f"{s1}.data", MIB)
        filler = d2 / "filler"
        with open(filler, "wb") as f:  # (16 MiB left free: less than r1's 24 MiB)
            f.truncate(shutil.disk_usage(d2).free - 16 * MIB)
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        free = shutil.disk_usage(d2).free
        cli.run("volume", "attach", "v", "--device", str(device))
        assert read_direct(device, 0, len(data)) == data
        entry = cli.replica("v", "r2")
        assert entry["mode"] == "ERR", entry
        said = re.search(
            r"it is kept as it is, not set aside: its rebuild needs about (\S+) beside it on "
            rf"its disk \({re.escape(str(d2))}\), which has (\S+) free;",
            entry["error"],
        )
        assert said, entry
        need, has = map(shown_bytes, said.groups())
        assert 24 * MIB < need < 32 * MIB and abs(has - free) < MIB, (need, has, free)
        assert "make room there" in entry["error"], entry
        assert "lhfs replica rm v r2, then lhfs replica add v --disk DISK" in entry["error"]
        assert not list(r2.parent.glob("r2.damaged-*")) and (r2 / "volume.json").exists()
        assert shutil.disk_usage(d2).free >= free - MIB  # (nothing written there)
        assert "not set aside" in cli.engine_log("v")
        cli.run("volume", "detach", "v")
        filler.unlink()
        cli.run("volume", "attach", "v", "--device", str(device))
        wait_for(lambda: cli.live("v")["state"] == "healthy", 120, "r2 set aside and rebuilt")
        assert len(list(r2.parent.glob("r2.damaged-*"))) == 1
        cli.run("volume", "detach", "v")


# -- the size check at attach --------------------------------------------------------------


def test_the_configured_size_is_checked_against_what_the_handshake_read(
    tmp_path: Path, replica_factory
) -> None:
    """The attach compares the configured size with what each serving replica holds, as its
    handshake read it: it asked every replica again (a round trip each), and one gone in
    between was let through unchecked. With the replicas gone after the handshake, a size
    larger than theirs is refused all the same, naming both; theirs passes."""
    size = 4 * MIB
    procs = []
    for n in range(2):
        ChunkStore.create(tmp_path / f"r{n}", size, 4096).close()
        procs.append(replica_factory(tmp_path / f"r{n}"))
    config = tmp_path / "config.json"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(size, 4096, nursery, procs[0].key)
            await engine.attach([(f"r{n}", proc.address, False) for n, proc in enumerate(procs)])
            for proc in procs:  # (nothing answers now: only what the handshake read is known)
                proc.stop()
            check_size(engine, size, config)
            with pytest.raises(CorruptState) as refused:
                check_size(engine, 2 * size, config)
            assert str(refused.value) == (
                f"{config}: size must be at most what the replicas hold ({size} bytes: r0), "
                f"not {2 * size}"
            )
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- doctor and the configured size --------------------------------------------------------


def test_doctor_fails_a_configured_size_beyond_what_the_local_replicas_hold(cli: Cli) -> None:
    """``size`` in config.json above what the local replicas hold (edited by hand): doctor
    said every replica was ok, and only the attach found it. Now doctor fails each replica
    recorded RW, naming both sizes and what to do, starting nothing and changing nothing; one
    ERR (it missed an expansion: rebuilt at attach) is not failed for it. Set back as the
    hint says, the replicas pass."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "2")
    path = cli.root / "volumes" / "v" / "config.json"
    config = json.loads(path.read_text())
    config["size"] = 2 * MIB
    config["replicas"][1].update(mode="ERR", error="missed an expansion")
    path.write_text(json.dumps(config))
    before = path.read_bytes()
    result = cli.run("doctor", "v", "--json", check=False)
    assert result.returncode == 1, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    r1, r2 = checks["replica r1"], checks["replica r2"]
    assert r1["status"] == "fail", r1
    directory = cli.root / "volumes" / "v" / "replicas" / "r1"
    assert r1["detail"] == (
        f"local, {directory} holds 1M (1048576 bytes), less than the size {path} says, 2M "
        "(2097152 bytes): the attach is refused"
    ), r1
    assert r1["hint"] == (
        f"set size in {path} back to 1048576 (what the replicas hold), then 'lhfs --root "
        f"{cli.root} volume expand v --size 2097152' if it is to be that large"
    ), r1
    assert r2["status"] != "fail" or "less than the size" not in r2["detail"], r2
    assert "replica r1" in one_line(result)
    assert path.read_bytes() == before and cli.engine_pid("v") is None
    config["size"] = MIB
    path.write_text(json.dumps(config))
    checks = {
        c["check"]: c for c in json.loads(cli.run("doctor", "v", "--json", check=False).stdout)
    }
    assert checks["replica r1"]["status"] == "ok", checks
