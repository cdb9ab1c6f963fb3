"""System backups: every volume and backing image of a root as one whole, against a real S3
server; restored under other roots; interrupted by SIGKILL."""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.errors import Busy
from lhfs.core.procs import wait_for
from lhfs.core.units import rfc3339
from lhfs.engine import control
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, read_direct, teardown, write_at, write_direct
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


def test_a_system_backup_completes_and_restores_equal(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://system-backups/p"
    rng = random.Random(11)
    for n, name in enumerate(("base1", "base2")):
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(rng.randbytes(3 * MIB + n * 4096))
        cli.run("backing-image", "create", name, "--from", str(raw))
    # one image is in the store already: its part must complete at once all the same
    cli.run("backing-image", "backup", "base1", "--target", target, "--create-bucket", "--quiet")
    cli.run("volume", "create", "a", "--size", "16M", "--replicas", "2", "--backing-image", "base1")
    cli.run("volume", "create", "b", "--size", "16M", "--replicas", "1", "--io-timeout", "12")
    cli.run("volume", "create", "c", "--size", "64M", "--replicas", "1")
    device = tmp_path / "a.dev"
    cli.run("volume", "attach", "a", "--device", str(device))  # backed up while attached
    write_at(device, 5 * MIB, rng.randbytes(2 * MIB))
    cli.run("volume", "attach", "b", "--device", str(tmp_path / "b.dev"))
    write_at(tmp_path / "b.dev", 0, rng.randbytes(MIB))
    cli.run("volume", "detach", "b")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "c", str(mnt))
    (mnt / "file").write_bytes(b"kept" * 1000)
    cli.run("umount", str(mnt))
    cli.backup("b", target)
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "b", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    sums = {v: cli.checksum(v) for v in ("a", "b", "c")}

    result = cli.run("system", "backup", "--target", target, "--name", "sys1")
    url = result.stdout.strip().splitlines()[-1]
    assert url == f"{target}?system=sys1"
    assert "skipped standby (a DR standby" in result.stdout
    lines = result.stderr.splitlines()
    for part in ("volume a", "volume b", "volume c", "image base1", "image base2"):
        mine = [line for line in lines if line.startswith(f"{part}: ")]
        assert sum(" 100% " in line for line in mine) == 1, (part, lines)
    listed = cli.json("system", "ls", "--target", target)
    assert [(s["name"], s["state"]) for s in listed] == [("sys1", "complete")]
    assert listed[0]["volumes"] == ["a", "b", "c"] and listed[0]["images"] == ["base1", "base2"]
    cli.run("volume", "detach", "a")

    other = Cli(tmp_path / "root2")
    try:
        done = other.json("system", "restore", url, "--quiet")
        assert done["volumes"] == ["a", "b", "c"] and done["images"] == ["base1", "base2"]
        assert {v: other.checksum(v) for v in ("a", "b", "c")} == sums
        assert other.info("b")["settings"]["io_timeout"] == 12
        assert other.info("c")["filesystem"] == cli.info("c")["filesystem"]
        images = {i["name"]: i["id"] for i in other.json("backing-image", "ls")}
        assert images == {i["name"]: i["id"] for i in cli.json("backing-image", "ls")}
        other.run("mount", "c", str(mnt))
        try:
            assert (mnt / "file").read_bytes() == b"kept" * 1000  # mounted, not formatted
        finally:
            other.run("umount", str(mnt))
        before = other.volumes()
        again = other.run("system", "restore", url, "--quiet", check=False)
        assert again.returncode == 1 and "already exist" in again.stderr
        assert again.stderr.count("\n") == 1 and other.volumes() == before
    finally:
        teardown(other.root)
    third = Cli(tmp_path / "root3")
    try:
        for names in ("b,b", "b,", ""):  # (refused before anything is made)
            refused = third.run("system", "restore", url, "--volumes", names, check=False)
            said = {"": "--volumes is empty", "b,": "an empty volume name: 'b,'"}.get(
                names, "names each volume once"
            )
            assert refused.returncode == 2 and said in refused.stderr
            assert third.json("volume", "ls") == []
        done = third.json("system", "restore", url, "--volumes", "b", "--quiet")
        assert done["volumes"] == ["b"] and done["images"] == []
        assert [v["name"] for v in third.json("volume", "ls")] == ["b"]
        assert third.checksum("b") == sums["b"]
    finally:
        teardown(third.root)
    # prune keeps a system backup's parts: b's backup before it goes, its part stays
    cli.run("dr", "stop", "standby")
    cli.backup("b", target)
    pruned = cli.json("backup", "prune", "--target", target, "--volume", "b", "--keep-last", "1")
    assert len(pruned["removed"]) == 1 and len(pruned["kept"]) == 2
    assert any("system backup sys1" in k["reasons"] for k in pruned["kept"])
    part = next(k for k in pruned["kept"] if "system backup sys1" in k["reasons"])
    part_url = f"{target}?volume=b&backup={part['name']}"
    refused = cli.run("backup", "rm", part_url, check=False)  # (the system backup needs it)
    assert refused.returncode == 1 and "part of system backup sys1" in refused.stderr
    removed = cli.json("system", "rm", url)
    assert len(removed["removed_backups"]) == 5
    assert cli.json("system", "ls", "--target", target) == []
    assert cli.json("backup", "check", "--target", target)["problems"] == []


def test_a_system_backup_takes_every_volume_at_one_instant(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A writer puts a counter into volume a, then the same into volume b, each write answered
    before the next (an application keeping its log on one volume and its data on another):
    in each of three system backups taken while it writes, b holds a's counter or the one
    before, never a later one (snapshotted one after the other, b would run ahead)."""
    target = "s3://system-instant/p"
    devices = {name: tmp_path / f"{name}.dev" for name in ("a", "b")}
    for name, device in devices.items():
        cli.run("volume", "create", name, "--size", "16M", "--replicas", "1")
        cli.run("volume", "attach", name, "--device", str(device))
    stop = threading.Event()
    written = [0]
    failed: list[OSError] = []

    def writer() -> None:
        fds = [os.open(devices[name], os.O_RDWR | os.O_DIRECT) for name in ("a", "b")]
        buf = mmap.mmap(-1, 4096)
        try:
            while not stop.is_set():
                buf[:8] = (written[0] + 1).to_bytes(8, "little")
                for fd in fds:
                    os.pwritev(fd, [buf], 0)
                written[0] += 1
        except OSError as exc:
            failed.append(exc)
        finally:
            for fd in fds:
                os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: written[0] > 100 or failed, 30, "the writer under way")
        urls = []
        for n in range(3):
            bucket = ("--create-bucket",) if n == 0 else ()
            result = cli.run("system", "backup", "--target", target, "--name", f"s{n}", *bucket)
            urls.append(result.stdout.strip().splitlines()[-1])
            seen = written[0]
            wait_for(lambda seen=seen: written[0] > seen + 100 or failed, 30, "more writes")
    finally:
        stop.set()
        thread.join()
    assert not failed, failed
    for name in ("a", "b"):  # each hold released, then its connection closed: no warning
        assert "the command that took it has gone" not in cli.engine_log(name)
    for n, url in enumerate(urls):
        other = Cli(tmp_path / f"root{n}")
        try:
            other.run("system", "restore", url, "--quiet")
            counters = {}
            for name in ("a", "b"):
                replica = other.root / "volumes" / name / "replicas" / "r1"
                with ChunkStore.open(replica) as store:
                    counters[name] = int.from_bytes(store.read(0, 8), "little")
            assert counters["a"] > 0, counters
            assert counters["a"] - 1 <= counters["b"] <= counters["a"], counters
        finally:
            teardown(other.root)


def test_a_hold_nobody_lets_go_ends_by_itself(cli: Cli, tmp_path: Path) -> None:
    """The hold a system backup puts on a volume's I/O is a lease: one whose command is stuck
    (it keeps its connection, and never releases) ends by itself, and the write that waited
    behind it goes through."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    sock = volumes.load(cli.root, "v").control_socket
    with control.kept(sock, "hold", wait=10) as answer:
        hold = answer["hold"]
        with pytest.raises(Busy, match="held already"):
            control.call(sock, "hold", wait=10)
        control.call(sock, "freeze", hold=hold, drain=10, lease=2)
        frozen = time.monotonic()
        done: list[float] = []

        def write() -> None:
            write_direct(device, 0, b"w" * 4096)
            done.append(time.monotonic())

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(30)
        assert done and done[0] - frozen >= 1.5, (done, frozen)  # (held until the lease ran out)
        assert control.call(sock, "release", hold=hold) == {"released": False}
    log = cli.engine_log("v")
    assert "ended by itself: nobody let it go within 2s" in log
    assert "the command that took it has gone" not in log  # (released first, then closed)
    assert read_direct(device, 0, 4096) == b"w" * 4096


HOLDER = """
import sys
from pathlib import Path
from lhfs.config import volume as volumes
from lhfs.engine import control
from lhfs.volumes import manage
root, stage = Path(sys.argv[1]), sys.argv[2]
vol = volumes.load(root, "v")
if stage == "frozen":
    held = manage.io_held([vol])
else:
    held = control.kept(vol.control_socket, "hold", wait=10)
with held as answer:
    print(answer, flush=True)
    sys.stdin.read()  # (until it is killed)
"""


def write_and_tell(device: Path, data: bytes, done: list[float]) -> None:
    write_direct(device, 0, data)
    done.append(time.monotonic())


def test_a_hold_whose_command_was_killed_ends_at_once(cli: Cli, tmp_path: Path) -> None:
    """A system backup killed while it holds a volume lets it go at once, not at the end of
    the hold's lease (10 minutes for a prepared one): killed after preparing (the volume's
    structural lock taken), a snapshot is taken right after; killed while the volume's I/O is
    frozen, the write that waited goes through. Its connection closing ends the hold."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    gone = "ended: the command that took it has gone"
    for n, stage in enumerate(("prepared", "frozen"), 1):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(cli.root), stage],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        data = (stage.encode() * 4096)[:4096]
        done: list[float] = []
        thread = threading.Thread(target=write_and_tell, args=(device, data, done))
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip()  # (held)
            thread.start()
            if stage == "frozen":
                thread.join(1)
                assert not done, "a write went through a frozen volume"
            killed = time.monotonic()
            holder.kill()
            wait_for(lambda n=n: cli.engine_log("v").count(gone) == n, 10, "the hold to end")
            thread.join(10)
            assert done and done[0] - killed < 10, (done, killed)
        finally:
            holder.kill()
            holder.communicate()  # (reaped, its pipes closed)
            if thread.ident:  # (started)
                thread.join(60)
        assert read_direct(device, 0, 4096) == data
        cli.run("snapshot", "create", "v", f"after-{stage}", timeout=20)


def test_an_interrupted_system_backup_leaves_nothing_that_looks_complete(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A system backup killed half-way never looks complete; while it runs, the parts it has
    finished are kept like those of a complete one (a prune of their volume, or a ``backup
    rm``, would leave it unrestorable)."""
    target = "s3://system-killed/p"
    for name, size in (("x", 2), ("y", 24)):
        cli.run("volume", "create", name, "--size", "32M", "--replicas", "1")
        cli.run("volume", "attach", name, "--device", str(tmp_path / f"{name}.dev"))
        write_at(tmp_path / f"{name}.dev", 0, os.urandom(size * MIB))
        cli.run("volume", "detach", name)
    cli.run("backup", "init", "--target", target, "--create-bucket")
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 512 << 10  # per connection: the uploads take many seconds
    try:
        slow = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
        began = time.time()
        run = slow.start("system", "backup", "--target", target, "--name", "sys2")
        assert run.stderr is not None
        for line in run.stderr:  # (read as it comes: a line read late would be stale)
            if line.startswith("volume x: ") and "100%" in line:
                break
        proxy.rate = 200  # (each answer now takes a second or two)
        assert run.poll() is None, "the system backup ended before its second part"

        def listed_so_far() -> list:
            (running,) = cli.json("system", "ls", "--target", target)
            return running["parts"]

        wait_for(listed_so_far, 60, "the first part to be listed in the marker")
        run.send_signal(signal.SIGSTOP)  # (held there: its marker stays fresh for minutes)
        again = cli.run("system", "backup", "--target", target, "--name", "sys2", check=False)
        assert again.returncode == 1 and "named sys2 is under way" in again.stderr, again.stderr
        (part,) = cli.json("backup", "ls", "--target", target, "--volume", "x")
        newer = cli.backup("x", target)  # (a backup of x made meanwhile: the part is older)
        pruned = cli.json("backup", "prune", "--target", target, "--volume", "x",
                          "--keep-last", "1")  # fmt: skip
        assert "sys2 (under way)" in json.dumps(pruned["kept"]), pruned
        refused = cli.run("backup", "rm", part["url"], check=False)
        assert refused.returncode == 1 and "system backup sys2 (under way)" in refused.stderr
        cli.run("backup", "rm", newer)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        proxy.close()
    listed = cli.json("system", "ls", "--target", target)
    # (killed on this host: interrupted at once, its parts kept all the same)
    assert [(s["name"], s["state"]) for s in listed] == [("sys2", "interrupted")], listed
    assert listed[0]["created"] <= rfc3339(began + 2), (began, listed)  # (its start: not a beat)
    assert listed[0]["parts"] == [["x", part["name"]]], listed
    failed = cli.run("system", "restore", f"{target}?system=sys2", check=False)
    assert failed.returncode == 1 and "no system backup 'sys2'" in failed.stderr
    unfinished = cli.json("backup", "ls", "--target", target, "--volume", "y")
    assert all(b["state"] == "interrupted" for b in unfinished), unfinished  # (killed in it)
    # and a new system backup completes after it
    url = cli.run("system", "backup", "--target", target, "--quiet").stdout.splitlines()[-1]
    states = {s["name"]: s["state"] for s in cli.json("system", "ls", "--target", target)}
    assert states[url.split("system=")[1]] == "complete" and states["sys2"] == "interrupted"


LOCK_HOLDER = """
import sys
from pathlib import Path
from lhfs.core import locks
fd = locks.take(Path(sys.argv[1]), 0, "busy")
print("held", flush=True)
sys.stdin.read()  # (until it is killed)
"""


def test_a_detached_volume_busy_with_another_command_is_refused_before_any_io_is_held(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A detached volume whose command lock another command keeps (a detached backup reading
    it) refuses a system backup within seconds, in one line naming it and that command's pid,
    before any attached volume's I/O is held: its snapshot was taken inside the hold, behind
    that lock, and every attached volume's writes waited for the hold's lease (60 s) before
    the system backup failed. Once the other command is done, it completes."""
    target = "s3://system-busy/p"
    for name in ("a", "d"):
        cli.run("volume", "create", name, "--size", "16M", "--replicas", "1")
    device = tmp_path / "a.dev"
    cli.run("volume", "attach", "a", "--device", str(device))
    lock = volumes.load(cli.root, "d").dir / "command.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        began = time.monotonic()
        refused = cli.run(
            "system", "backup", "--target", target, "--name", "s1", "--create-bucket", check=False
        )
        took = time.monotonic() - began
    finally:
        holder.kill()
        holder.communicate()
    assert refused.returncode == 1 and refused.stderr == (
        f"lhfs: error: volume d is busy with another command (pid {holder.pid}): try again "
        "once it is done\n"
    ), refused.stderr
    assert took < 30, took  # (a few seconds' wait: never the hold's lease, nor five minutes)
    write_direct(device, 0, b"a" * 4096)  # (its I/O flows)
    assert cli.json("snapshot", "ls", "a") == [] and cli.json("snapshot", "ls", "d") == []
    assert cli.json("system", "ls", "--target", target) == []
    url = cli.run("system", "backup", "--target", target, "--name", "s1", "--quiet").stdout
    listed = cli.json("system", "ls", "--target", target)
    assert [(s["name"], s["state"], s["volumes"]) for s in listed] == [
        ("s1", "complete", ["a", "d"])
    ], (url, listed)
    cli.run("volume", "attach", "d", "--device", str(tmp_path / "d.dev"), timeout=60)
    cli.run("volume", "detach", "d")
    cli.run("volume", "detach", "a")


def test_a_system_restore_says_a_registered_image_record_is_damaged(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A system restore over a backing image of the same name whose record is damaged says
    so and how to clear it, nothing made (it said the image "exists with other content",
    which no command could show); once cleared, the restore makes it."""
    target = "s3://system-damaged-image/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(5).randbytes(MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    made = cli.run("system", "backup", "--target", target, "--create-bucket", "--quiet")
    url = made.stdout.splitlines()[-1]
    other = Cli(tmp_path / "root2")
    try:
        other.run("backing-image", "create", "base", "--from", str(raw))
        record = other.root / "backing-images" / "base.json"
        record.write_text("{not json")
        refused = other.run("system", "restore", url, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith(
            f"lhfs: error: backing image base is registered with a damaged record ({record} "
            "is damaged: "
        ), refused.stderr
        assert refused.stderr.endswith("): 'lhfs backing-image rm base' clears it\n")
        assert record.read_text() == "{not json" and other.json("volume", "ls") == []
        other.run("backing-image", "rm", "base")
        done = other.json("system", "restore", url, "--quiet")
        assert done["images"] == ["base"], done
        assert [i["name"] for i in other.json("backing-image", "ls")] == ["base"]
    finally:
        teardown(other.root)
