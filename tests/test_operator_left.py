"""What an operator meets, continued again: the commands on a detached volume refuse a crashed
one until it is let go; ``replica ls`` names the disk of a replica waiting for its rebuild; a
damaged replica is set aside only on a disk with room for its rebuild; ``doctor`` compares a
volume's configured size with its local replicas."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import needs_fuse

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
