"""Local replicas on disks of their own: real ext4 file systems on loop devices, one per
replica, lost and mounted again for real."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, read_direct, small_disk, write_direct

pytestmark = needs_fuse
MIB = 1 << 20


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[list[Path]]:
    """Four mounted file systems of 64 MiB (unmounted at the end, whatever the test did)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(small_disk(tmp_path / f"d{n}", 64 * MIB)) for n in range(4)]


def replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


def lose(cli: Cli, replica_id: str, disk: Path) -> None:
    """The disk under a replica goes: its process (held meanwhile, so that it is not started
    again on the disk before it is gone) and the disk's file system both."""
    pid = replica(cli, "v", replica_id)["pid"]
    os.kill(pid, signal.SIGSTOP)
    subprocess.run(["umount", "-l", str(disk)], check=True)
    os.kill(pid, signal.SIGKILL)
    image = disk.with_name(disk.name + ".img")
    wait_for(  # (the file system is let go once its last user is gone: its loop device too)
        lambda: (
            not subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
        ),
        30,
        f"{disk} to be let go",
    )


def test_replicas_on_their_own_disks_outlive_a_lost_disk(
    cli: Cli, tmp_path: Path, disks: list[Path]
) -> None:
    """Three replicas on three disks. One disk is lost (its replica's process gone, the disk
    unmounted): the volume serves on, and the replica is not started again on the empty
    mount point (which would rebuild it onto the root's disk) but waits, saying why; mounted
    again, it comes back by itself with what it missed. A disk lost for good is replaced with
    ``replica rm`` and ``replica add --disk``; ``volume rm`` removes what lhfs put on them."""
    d1, d2, d3, d4 = disks
    cli.run("volume", "create", "v", "--size", "32M", "--disks", f"{d1},{d2},{d3}")
    vol = volumes.load(cli.root, "v")
    placed = {r["id"]: vol.replica_dir(r) for r in vol.replicas}
    for (replica_id, directory), disk in zip(sorted(placed.items()), (d1, d2, d3), strict=True):
        assert directory is not None and directory.is_relative_to(disk), (replica_id, directory)
        assert (directory / "volume.json").exists()
    listed = cli.json("replica", "ls", "v")
    assert [r["disk"] for r in listed] == [str(d1), str(d2), str(d3)], listed
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    before = os.urandom(8 * MIB)
    write_direct(device, 0, before)

    lose(cli, "r2", d2)
    during = os.urandom(MIB)
    write_direct(device, 8 * MIB, during)  # (the volume serves on, degraded)
    waiting = wait_for(
        lambda: "is not mounted" in ((r := replica(cli, "v", "r2"))["rejoin"] or "") and r,
        30,
        "r2 to wait for its disk",
    )
    assert waiting["mode"] == "ERR" and waiting["pid"] is None, waiting
    assert list(d2.iterdir()) == []  # nothing made on the root's disk in its place
    assert cli.live("v")["state"] == "degraded"
    assert "its disk " + str(d2) + " is not mounted" in cli.engine_log("v")
    doctor = cli.run("doctor", "v", check=False)
    assert doctor.returncode == 1 and f"disk {d2} is not mounted" in doctor.stdout, doctor.stdout

    image = d2.with_name(d2.name + ".img")
    subprocess.run(["mount", "-o", "loop", str(image), str(d2)], check=True)
    back = wait_for(lambda: (r := replica(cli, "v", "r2"))["mode"] == "RW" and r, 60, "r2 back")
    assert back["rebuild_stats"]["bytes_copied"] <= 4 * MIB, back["rebuild_stats"]
    assert back["restarts"] == 1, back
    assert cli.replica("v", "r2")["dir"] == str(placed["r2"])

    lose(cli, "r3", d3)  # for good: its replica is replaced by one on d4
    line = one_line(cli.run("replica", "add", "v", "--disk", str(d1), check=False), 2)
    assert "the file system replica r1 is on" in line, line
    line = one_line(cli.run("replica", "add", "v", "--disk", str(d3), check=False), 2)
    assert "is not a mount point" in line, line
    line = one_line(cli.run("replica", "add", "v", "--disk", str(d4), check=False), 1)
    assert "the disk of replica r3" in line and "is not mounted" in line, line  # (d4 may be it)
    removed = cli.run("replica", "rm", "v", "r3").stdout
    assert "left, to remove by hand once its disk is back" in removed, removed
    added = cli.json("replica", "add", "v", "--disk", str(d4))
    assert cli.live("v")["state"] == "healthy"
    assert read_direct(device, 0, 8 * MIB) == before
    assert read_direct(device, 8 * MIB, MIB) == during
    cli.run("volume", "detach", "v")
    vol = volumes.load(cli.root, "v")
    sums = set()
    for entry in vol.replicas:
        directory = vol.replica_dir(entry)
        assert directory is not None
        with ChunkStore.open(directory) as store:
            sums.add(store.checksum())
    assert len(sums) == 1 and added["id"] == "r4"
    assert vol.replica_dir(vol.replica("r4")).is_relative_to(d4)  # type: ignore[union-attr]
    subprocess.run(["umount", str(d4)], check=True)  # (detached: shown as the attach finds it)
    r4 = next(r for r in cli.json("replica", "ls", "v") if r["id"] == "r4")
    assert r4["mode"] == "ERR" and f"its disk {d4} is not mounted" in r4["error"], r4
    subprocess.run(
        ["mount", "-o", "loop", str(d4.with_name(d4.name + ".img")), str(d4)], check=True
    )
    cli.run("volume", "rm", "v")
    for disk in (d1, d2, d4):
        assert list((disk / "lhfs").iterdir()) == [], disk


def test_disks_are_checked_before_anything_is_made(
    cli: Cli, tmp_path: Path, disks: list[Path]
) -> None:
    """A disk that is not mounted (its mount point is a plain directory), one named twice,
    fewer disks than replicas: each refused in one line, nothing made on any disk or under the
    root."""
    d1, d2, d3, _ = disks
    plain = tmp_path / "not-mounted"
    plain.mkdir()
    cases = [
        ((f"{d1},{plain}",), 2, "is not a mount point: is its disk mounted?"),
        ((f"{d1},{d1}",), 2, "the file system replica r1 is on"),
        ((f"{d1},{d2}", "--replicas", "3"), 2, "2 disks for 3 replicas"),
        ((f"{d1},{tmp_path / 'nowhere'}",), 1, "is not a directory"),
        ((f"{d1},",), 2, "not a list of disks"),
    ]
    for args, status, message in cases:
        result = cli.run("volume", "create", "v", "--size", "16M", "--disks", *args, check=False)
        line = one_line(result, status)
        assert message in line, (args, line)
        assert cli.json("volume", "ls") == []
        assert not (d1 / "lhfs").exists() or list((d1 / "lhfs").iterdir()) == []
        assert list(plain.iterdir()) == []
    # a disk others can write to: what they put there as <disk>/lhfs is not used
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d2 / "lhfs").symlink_to(elsewhere)
    for message in ("is not a directory but a link", "another user's"):
        result = cli.run("volume", "create", "v", "--size", "16M", "--disks", f"{d1},{d2}",
                         check=False)  # fmt: skip
        assert message in one_line(result, 1), result.stderr
        assert list(elsewhere.iterdir()) == [] and cli.json("volume", "ls") == []
        assert list((d1 / "lhfs").iterdir()) == []
        if (d2 / "lhfs").is_symlink():  # (then: a directory of another user)
            (d2 / "lhfs").unlink()
            (d2 / "lhfs").mkdir()
            os.chown(d2 / "lhfs", 65534, 65534)
    os.chmod(d3, 0o777)  # (anyone could rename what lhfs makes there)
    result = cli.run("volume", "create", "v", "--size", "16M", "--disks", f"{d1},{d3}", check=False)
    assert "may be written by others" in one_line(result, 1), result.stderr
    assert not (d3 / "lhfs").exists() and cli.json("volume", "ls") == []


def test_restores_and_standbys_put_their_replicas_on_disks(
    cli: Cli, tmp_path: Path, disks: list[Path], s3_endpoint: str
) -> None:
    """``backup restore --disks`` restores straight onto a replica per disk, and a DR standby
    made with ``--disks`` follows onto its disk; a restore whose disks are refused makes
    nothing."""
    d1, d2, d3, _ = disks
    cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
    device = tmp_path / "src.dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    write_direct(device, 0, os.urandom(4 * MIB))
    cli.run("volume", "detach", "src")
    url = cli.backup("src", "s3://disks/p")
    result = cli.run("backup", "restore", url, "bad", "--disks", f"{d1},{d1}", check=False)
    assert "the file system replica r1 is on" in one_line(result, 2)
    assert [v["name"] for v in cli.json("volume", "ls")] == ["src"]
    cli.run("backup", "restore", url, "copy", "--disks", f"{d1},{d2}", "--quiet")
    restored = cli.json("replica", "ls", "copy")
    assert [r["disk"] for r in restored] == [str(d1), str(d2)], restored
    assert all(Path(r["dir"]).is_relative_to(d) for r, d in zip(restored, (d1, d2), strict=True))
    assert cli.checksum("copy") == cli.checksum("src")
    cli.run(
        "dr", "create", "standby", "--target", "s3://disks/p", "--volume", "src",
        "--disks", str(d3), "--interval", "1", "--quiet",
    )  # fmt: skip
    cli.dr_restored("standby", url)
    assert [r["disk"] for r in cli.json("replica", "ls", "standby")] == [str(d3)]
    assert cli.checksum("standby") == cli.checksum("src")
    cli.run("volume", "rm", "standby")
    assert list((d3 / "lhfs").iterdir()) == []
