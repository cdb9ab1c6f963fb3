"""What an operator meets, continued again: the commands on a detached volume refuse a crashed
one until it is let go; ``replica ls`` names the disk of a replica waiting for its rebuild; a
damaged replica is set aside only on a disk with room for its rebuild; ``doctor`` compares a
volume's configured size with its local replicas."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import needs_fuse

from lhfs.core.procs import wait_for
from lhfs.testing import Cli, kill_engine, one_line


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
