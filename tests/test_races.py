"""Two commands on one volume at once, or one cut short by a kill -9: the later one waits for
the first or is refused in one line naming it (and its pid), and nothing is half done. Races
are made deterministic by stopping a process (SIGSTOP) at the point of the race, or slowing
its store with the fault proxy: real processes, every wait with a condition and a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from conftest import needs_fuse

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, read_direct, write_at
from lhfs.volumes import attachment, manage, mount
from tools.faultproxy import FaultProxy

MIB = 1 << 20


@contextlib.contextmanager
def slow_store(cli: Cli, s3_endpoint: str) -> Iterator[Cli]:
    """The lhfs command with its store behind a proxy of 256 KiB/s: a transfer of a few MiB
    takes seconds, long enough to act in the middle of it."""
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10
    try:
        yield Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    finally:
        proxy.close()


def fill_detached(cli: Cli, name: str, size: int, seed: int) -> None:
    """Random data at the start of a detached volume, written into each replica's directory."""
    data = random.Random(seed).randbytes(size)
    vol = volumes.load(cli.root, name)
    for replica in vol.replicas:
        with ChunkStore.open(vol.replica_dir(replica)) as store:
            store.write(0, data)


@contextlib.contextmanager
def collection_running(target: str) -> Iterator[None]:
    """The marker of a collection of this (live) process in the store of ``target`` for the
    block: a backup to it waits there, its snapshot taken and held, and says so on stderr
    (a point to act at), and goes on once the block ends."""
    store = BackupStore(Bucket(Target.parse(target)))
    store.bucket.ensure(create=True)
    marker = store._collection_marker()
    marker._write()
    try:
        yield
    finally:
        store.bucket.delete(marker.key)


def waiting_backup(cli: Cli, volume: str, target: str, *options: str) -> subprocess.Popen:
    """``backup create`` of ``volume`` (``--quiet`` unless ``options`` are given), once it
    waits for a collection (``collection_running``): its snapshot taken, nothing opened."""
    backup = cli.start("backup", "create", volume, "--target", target, *(options or ["--quiet"]))
    assert backup.stderr is not None
    line = backup.stderr.readline()
    assert "waiting for a collection" in line, (line, backup.communicate())
    return backup


@contextlib.contextmanager
def stopped(proc: subprocess.Popen) -> Iterator[None]:
    """``proc`` stopped (SIGSTOP) for the block, then killed."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        proc.kill()
        proc.wait(30)


def refused(cli: Cli, *args: str) -> str:
    """The one line of a command that must fail with exit 1."""
    result = cli.run(*args, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result
    return result.stderr.removeprefix("lhfs: error: ").rstrip("\n")


def test_rm_refuses_a_volume_being_backed_up_or_restored(cli: Cli, s3_endpoint: str) -> None:
    """``volume rm`` of a volume a live backup reads (its hold) or a live restore writes (its
    mark) is refused, naming the pid: it removed it under them (the backup then said it
    failed, the restore failed on a raw missing file). A restore's cleanup removes only the
    volume it made, never one made under its name since."""
    target = "s3://races-rm/p"
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    fill_detached(cli, "src", 2 * MIB, seed=1)
    with collection_running(target):
        backup = waiting_backup(cli, "src", target)
        said = refused(cli, "volume", "rm", "src")
        assert said == f"volume src is being backed up by pid {backup.pid}: wait for it"
    out, err = backup.communicate(timeout=60)
    assert backup.returncode == 0, err
    url = out.split()[-1]
    with slow_store(cli, s3_endpoint) as slow:  # (what it downloads comes slowly)
        restore = slow.start("backup", "restore", url, "dst", "--quiet")
        wait_for(
            lambda: (volumes.volumes_dir(cli.root) / "dst" / "config.json").exists(),
            30,
            "the restore to make its volume",
        )
        with stopped(restore):
            said = refused(cli, "volume", "rm", "dst")
            assert (
                said == f"volume dst is being restored by pid {restore.pid}: wait for it or stop it"
            )
    cli.run("volume", "rm", "dst")  # (its restore died: an unfinished volume, removed)
    assert manage.remove(cli.root, "src", volume_id="another volume's") == []
    assert volumes.list_names(cli.root) == ["src"]


def test_an_rm_cut_short_is_shown_and_finished(cli: Cli) -> None:
    """A ``volume rm`` killed after its rename leaves the volume whole under
    ``.NAME.removing`` (and its name lock): ``volume ls`` and ``doctor`` say so, and ``volume
    rm NAME`` finishes it, where it said "no volume named"."""
    cli.run("volume", "create", "gone", "--size", "4M", "--replicas", "2")
    cli.run("volume", "create", "kept", "--size", "4M", "--replicas", "1")
    base = volumes.volumes_dir(cli.root)
    (base / ".gone.lock").write_text(f"{2**22 + 1} removed\n")  # (what the killed rm left)
    os.rename(base / "gone", base / ".gone.removing")
    listed = cli.run("volume", "ls").stdout
    assert "gone: its removal was cut short ('lhfs volume rm gone' finishes it)" in listed
    listed = {v["name"]: v for v in cli.json("volume", "ls")}
    assert sorted(listed) == ["gone", "kept"], listed
    assert listed["gone"]["state"] == "removal cut short", listed
    assert "'lhfs volume rm gone' finishes it" in listed["gone"]["error"], listed
    doctor = {c["check"]: c for c in json.loads(cli.run("doctor", "--json", check=False).stdout)}
    assert doctor["removal"]["status"] == "warn", doctor
    assert doctor["removal"]["hint"].endswith("volume rm gone"), doctor
    # a new volume of that name waits for it: both would answer to 'volume rm gone'
    made = refused(cli, "volume", "create", "gone", "--size", "4M")
    assert made == (
        "a removal of volume gone was cut short: 'lhfs volume rm gone' finishes it; then "
        "create the volume"
    ), made
    done = cli.run("volume", "rm", "gone").stdout
    assert done == "finished the removal of volume gone, which was cut short\n"
    assert sorted(p.name for p in base.iterdir()) == ["kept"]
    assert refused(cli, "volume", "rm", "gone").startswith("no volume named 'gone'")


def test_a_listing_skips_a_volume_removed_while_it_lists(cli: Cli, monkeypatch) -> None:
    """A volume removed between the listing of names and its reading is left out of ``volume
    ls`` (and the other loops over every volume), which failed as a whole."""
    cli.run("volume", "create", "here", "--size", "4M", "--replicas", "1")
    monkeypatch.setattr(volumes, "list_names", lambda root: ["gone", "here"])
    assert [v["name"] for v in manage.list_volumes(cli.root)] == ["here"]
    assert [v.name for v in volumes.readable(cli.root)] == ["here"]


def test_a_snapshot_create_cut_short_is_said_and_removed(cli: Cli) -> None:
    """A detached ``snapshot create`` killed half-way leaves the snapshot on some replicas:
    creating it again says so, and ``snapshot rm`` removes it from those, saying so."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "3")
    vol = volumes.load(cli.root, "v")
    with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store:
        store.snapshot("s")  # (where the kill stopped it)
    said = refused(cli, "snapshot", "create", "v", "s")
    assert said == (
        "snapshot 's' already exists on 1 of 3 replicas only (a snapshot create cut short): "
        "'lhfs snapshot rm v s' removes it"
    )
    assert cli.run("snapshot", "rm", "v", "s", "--quiet").stdout == (
        "removed snapshot s, which only 1 replica held\n"
    )
    assert cli.json("snapshot", "ls", "v") == []
    cli.run("snapshot", "create", "v", "s")
    assert cli.run("snapshot", "rm", "v", "s", "--quiet").stdout == "removed snapshot s\n"


@contextlib.contextmanager
def proxied(cli: Cli, s3_endpoint: str) -> Iterator[tuple[Cli, FaultProxy]]:
    """The lhfs command with its store behind a fault proxy, for the block: setting its
    ``rate`` to 200 makes every answer take a second or two (a backup then reads for many)."""
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    try:
        yield Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}), proxy
    finally:
        proxy.close()


def reading_backup(slow: Cli, proxy: FaultProxy, volume: str, target: str) -> subprocess.Popen:
    """A full ``backup create`` of ``volume`` in 64K blocks, once it reads (its first
    progress line: the volume is open) with every store answer slow (``proxied``): a dozen
    uploads at least to wait for before it is done. Until that line its answers are slowed
    ten times less (its first upload and the listings before it took 7 to 20 s at the slow
    rate): enough that it is still at its first blocks when the rate drops."""
    with collection_running(target):
        backup = waiting_backup(slow, volume, target, "--full", "--block-size", "64K")
        proxy.rate = 2000
    assert backup.stderr is not None
    line = backup.stderr.readline()
    proxy.rate = 200
    assert line.startswith(f"backup {volume}: "), (line, backup.communicate())
    return backup


@needs_fuse
def test_a_detached_backup_holds_its_volume_only_while_it_reads(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A backup of a detached volume reads its replica directories: an attach meanwhile found
    them taken (its replica "did not start": a rebuild, or with one replica no attach at all).
    An attach waits for it now, while it reads; never while it waits for a collection (every
    attach, mount, detach or ``replica rm`` waited five minutes, then failed): those go
    through, and the backup then reads the volume as they left it (its configuration read
    again: not a removed replica's directory). A detached ``replica rm`` waits for an attach
    under way, then removes the replica through its engine (it once said removed and left
    the directory)."""
    target = "s3://races-attach/p"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    fill_detached(cli, "v", 2 * MIB, seed=2)
    lock = volumes.load(cli.root, "v").dir / "command.lock"
    with collection_running(target):
        backup = waiting_backup(cli, "v", target)
        removed = cli.run("replica", "rm", "v", "r2", timeout=60).stdout
        assert removed == "removed replica r2 from v\n"
    out, err = backup.communicate(timeout=60)
    assert backup.returncode == 0, err
    cli.run("backup", "restore", out.split()[-1], "copy", "--replicas", "1", "--quiet")
    assert cli.checksum("copy") == cli.checksum("v")
    with collection_running(target):
        backup = waiting_backup(cli, "v", target)
        cli.run("volume", "attach", "v", "--device", str(tmp_path / "dev"), timeout=60)
    out, err = backup.communicate(timeout=60)  # (read through its engine)
    assert backup.returncode == 0, err
    cli.run("volume", "detach", "v")

    with proxied(cli, s3_endpoint) as (slow, proxy):  # (in 64K blocks: another prefix)
        backup = reading_backup(slow, proxy, "v", "s3://races-attach/slow")
        attach = cli.start("volume", "attach", "v", "--device", str(tmp_path / "dev"))
        wait_for(lambda: _waits_on(attach.pid, lock), 30, "the attach to wait for the backup")
        assert backup.poll() is None, backup.communicate()
        proxy.rate = None
        out, err = backup.communicate(timeout=60)
        assert backup.returncode == 0, err
    assert attach.wait(120) == 0, attach.communicate()
    assert cli.info("v")["state"] == "healthy"
    assert read_direct(tmp_path / "dev", 0, 2 * MIB) == random.Random(2).randbytes(2 * MIB)
    cli.run("volume", "detach", "v")

    cli.run("volume", "create", "w", "--size", "4M", "--replicas", "3")
    w = volumes.load(cli.root, "w")
    lock = w.dir / "command.lock"
    attach = cli.start("volume", "attach", "w", "--device", str(tmp_path / "wdev"))
    wait_for(
        lambda: lock.exists() and lock.read_text().strip() == str(attach.pid),
        30,
        "the attach to take the command lock",
    )
    os.kill(attach.pid, signal.SIGSTOP)  # (an attach under way, stopped there)
    rm = cli.start("replica", "rm", "w", "r3")
    wait_for(lambda: _waits_on(rm.pid, lock), 30, "the replica rm to wait for the attach")
    os.kill(attach.pid, signal.SIGCONT)
    assert attach.wait(60) == 0, attach.communicate()
    out, err = rm.communicate(timeout=60)
    assert rm.returncode == 0 and out == "removed replica r3 from w\n", (out, err)
    assert [r["id"] for r in cli.info("w")["replicas"]] == ["r1", "r2"]
    assert not (w.dir / "replicas" / "r3").exists()
    cli.run("volume", "detach", "w")


def _waits_on(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (a command waiting for that lock)."""
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    return False


@needs_fuse
def test_detach_frees_a_loop_device_a_killed_mount_left(cli: Cli) -> None:
    """``lhfs mount`` killed between its loop device and its mount leaves a loop device on
    the volume's own device file: the detach frees it (it refused, "in use by")."""
    cli.run("volume", "create", "v", "--size", "64M", "--replicas", "1")
    device = volumes.load(cli.root, "v").dir / "device"
    cli.run("volume", "attach", "v", "--device", str(device))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device)], capture_output=True, text=True, check=True
    ).stdout.strip()
    done = cli.json("volume", "detach", "v")
    assert f"freed {loop}" in done["cleaned"], done
    assert attachment.loops_backed_by(device) == []


@needs_fuse
def test_an_expansion_cut_short_after_the_volume_grew_is_finished(cli: Cli, tmp_path: Path) -> None:
    """A mounted ``volume expand`` killed once the volume grew (its configuration says the
    new size) left the loop device and file system small: run again, it grows them. Where
    this process may not grow a mounted ext4 (no CAP_SYS_RESOURCE), the file system stays
    small and each run says what is still to do (it said "nothing to do")."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "g", "--size", "64M", "--replicas", "1")
    cli.run("mount", "g", str(mnt), "--fs", "ext4")
    try:
        vol = volumes.load(cli.root, "g")
        control.call(vol.control_socket, "expand", size=128 * MIB)  # (where the kill was)
        assert volumes.load(cli.root, "g").size == 128 * MIB
        done = cli.json("volume", "expand", "g", "--size", "128M")
        assert not done["changed"] and done["loop"], done
        assert attachment.loops_backed_by(Path(cli.info("g")["device"])) == [done["loop"]]
        again = cli.run("volume", "expand", "g", "--size", "128M").stdout
        if mount.capable(mount.CAP_SYS_RESOURCE):  # (grown online the first time)
            assert done["filesystem"] == "ext4" and not done["todo"], done
            assert again == "g is already 128M: nothing to do\n"
        else:
            assert "CAP_SYS_RESOURCE" in done["todo"], done
            assert again.startswith("g is already 128M; still to do: resize2fs "), again
            assert "CAP_SYS_RESOURCE" in again, again
    finally:
        cli.run("umount", str(mnt))


@needs_fuse
def test_an_attach_killed_during_its_engine_start_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    """An attach killed before its engine said ready: the engine ends in one log line (no
    traceback of a broken pipe) and removes the device file the attach made."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    device = tmp_path / "dev"
    attach = cli.start("volume", "attach", "v", "--device", str(device))
    engine = wait_for(lambda: _child(attach.pid), 30, "the engine to start")
    os.kill(engine, signal.SIGSTOP)  # (before it says ready)
    attach.kill()
    attach.wait(30)
    os.kill(engine, signal.SIGCONT)
    wait_for(lambda: not volumes.alive(engine), 60, "the engine to end")
    log = cli.engine_log("v")
    assert "Traceback" not in log and "the attach that started the engine is gone" in log, log
    assert not device.exists()
    assert cli.info("v")["state"] == "detached"


def _child(parent: int) -> int | None:
    """The engine an attach of pid ``parent`` started, once it runs."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry.name)
    return None


def test_dr_starts_at_once_all_say_following(cli: Cli, s3_endpoint: str) -> None:
    """Three ``dr start`` at once answer like one after another: each says it follows,
    with the one follower's pid (two said "exited at once: a follower runs already")."""
    target = "s3://races-dr/p"
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    cli.backup("src", target)
    cli.run("dr", "create", "d", "--target", target, "--volume", "src", "--replicas", "1")
    cli.run("dr", "stop", "d")
    starts = [cli.start("dr", "start", "d", "--json") for _ in range(3)]
    ended = [(proc.wait(60), *proc.communicate()) for proc in starts]
    assert [status for status, _, _ in ended] == [0, 0, 0], ended
    pids = {json.loads(out)["pid"] for _, out, _ in ended}
    assert len(pids) == 1 and volumes.alive(pids.pop()), ended
    cli.run("dr", "stop", "d")


@needs_fuse
def test_a_backup_whose_replica_connection_breaks_says_why_at_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A backup of an attached volume whose replica connection breaks as it reads says why in
    one line, not "connection to replica ... broke": the volume was detached during the
    backup, or detached and attached again (another engine: it said "the engine died"). A
    replica that broke alone says so at once (it waited 10 s for the engine to die)."""
    target = "s3://races-detach/p"
    device = tmp_path / "dev"
    cli.run("volume", "create", "b", "--size", "4M", "--replicas", "1")
    cli.run("volume", "attach", "b", "--device", str(device))
    write_at(device, 0, random.Random(4).randbytes(2 * MIB))
    said = {
        "detached": "volume b was detached during the backup",
        "attached again": "volume b was detached and attached again during the backup",
        "replica": "",  # (the replica's own error)
    }
    with proxied(cli, s3_endpoint) as (slow, proxy):
        for case, why in said.items():
            backup = reading_backup(slow, proxy, "b", target)
            with stopped_for(backup):  # (between two of its reads)
                if case == "replica":
                    os.kill(cli.info("b")["replicas"][0]["pid"], signal.SIGKILL)
                else:
                    cli.run("volume", "detach", "b")
                if case == "attached again":
                    cli.run("volume", "attach", "b", "--device", str(device))
                proxy.rate = None
                resumed = time.monotonic()
            _, err = backup.communicate(timeout=60)
            assert backup.returncode == 1 and err.count("\n") == 1, (case, err)
            assert err.startswith(f"lhfs: error: backup of b failed: {why}"), (case, err)
            if case == "replica":  # (its one replica gone: the volume cannot remove it yet)
                assert err.endswith(" stays until housekeeping trims it (not removed: volume "
                                    "is faulted: no healthy replica)\n"), err  # fmt: skip
            else:  # (the volume answers again: removed)
                assert "snapshot" not in err, (case, err)
            if case == "detached":
                cli.run("volume", "attach", "b", "--device", str(device))
        assert "replica" in err and "detached" not in err and "died" not in err, err
        assert time.monotonic() - resumed < 8, "a broken replica waited for its engine to die"
    cli.run("volume", "detach", "b")


@contextlib.contextmanager
def stopped_for(proc: subprocess.Popen) -> Iterator[None]:
    """``proc`` stopped (SIGSTOP) for the block, then continued."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)
