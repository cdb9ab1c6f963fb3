"""Commands run at once on one thing, or cut short by a kill (of themselves or of an engine):
each ends in one line that says what is true, and what it leaves is whole. Real processes,
real FUSE devices; every wait has a condition and a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

from conftest import needs_fuse, restore_killed_half_way

from lhfs.config import volume as volumes
from lhfs.core.procs import read_line_matching, wait_for
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
from tools.faultproxy import FaultProxy


def test_creates_and_removals_of_one_name_at_once_leave_one_whole_volume(cli: Cli) -> None:
    """Three creates of each name at once: one makes the volume, the others say it exists
    (or is being made) in one line and touch nothing of it; then two removals of each at
    once: one removes it, the other says so. Nothing is left behind in either case."""
    names = [f"cc{i}" for i in range(6)]
    creates = {
        (name, count): cli.start(
            "volume", "create", name, "--size", f"{64 * count}M", "--replicas", str(count)
        )
        for name in names
        for count in (1, 2, 3)
    }
    ended = {key: (proc.wait(120), *proc.communicate()) for key, proc in creates.items()}
    for name in names:
        won = [count for (of, count), (status, _, _) in ended.items() if of == name and not status]
        assert len(won) == 1, (name, ended)
        for (of, count), (status, out, err) in ended.items():
            if of != name or count == won[0]:
                continue
            assert status == 1 and not out and err.count("\n") == 1, (name, count, out, err)
            assert re.fullmatch(
                rf"lhfs: error: volume {name} (already exists|is being created by another "
                r"command \(pid \d+\))\n",
                err,
            ), err
        vol = volumes.load(cli.root, name)
        assert vol.size == 64 * won[0] << 20 and len(vol.replicas) == won[0]
        assert json.loads(vol.key_path.read_text())["id"] == vol.config["volume_id"]
        held = sorted(p.name for p in (vol.dir / "replicas").iterdir())
        assert held == [r["id"] for r in vol.replicas]
        for replica in vol.replicas:
            layout = json.loads((vol.replica_dir(replica) / "volume.json").read_text())
            assert layout["volume_id"] == vol.config["volume_id"], (name, replica)
    top = cli.root / "volumes"
    assert sorted(p.name for p in top.iterdir()) == names  # (no staging, no lock left)

    removals = [cli.start("volume", "rm", name) for name in names for _ in range(2)]
    outcomes = [(proc.wait(120), *proc.communicate()) for proc in removals]
    for name, pair in zip(names, zip(outcomes[::2], outcomes[1::2], strict=True), strict=True):
        assert sorted(status for status, _, _ in pair) == [0, 1], pair
        err = next(err for status, _, err in pair if status)
        assert re.fullmatch(
            rf"lhfs: error: (no volume named '{name}' \(under .*\)|volume {name} is being "
            r"removed by another command \(pid \d+\))\n",
            err,
        ), err
    assert list(top.iterdir()) == []


def _fill(device: Path, size: int) -> None:
    """Write all of ``size`` bytes of a volume's device (a pattern, not zeros: every chunk
    holds data a rebuild must copy) and fsync."""
    block = bytes(range(256)) * 4096
    fd = os.open(device, os.O_RDWR)
    try:
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_replica_add_ends_when_the_engine_dies_or_the_volume_is_detached(
    cli: Cli, tmp_path: Path
) -> None:
    """A ``replica add`` waiting for its rebuild ends at once, in one line, when nothing
    rebuilds the replica any more (the rebuild of 1 GiB takes seconds: the kill and the detach
    come within its first moments), and the replica it left is rebuilt at the next attach."""
    cli.run("volume", "create", "s1", "--size", "1G", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "s1", "--device", str(device))
    _fill(device, 1 << 30)

    add = cli.start("replica", "add", "s1", "--quiet")
    added = read_line_matching(add, r"^added replica (r\d+) ", 60).group(1)
    kill_engine(cli, "s1")
    _, err = add.communicate(timeout=20)
    assert add.returncode == 1 and err.count("\n") == 1, err
    assert f"the engine of s1 died during the rebuild of replica {added}" in err, err
    assert "rebuilt when the volume is attached again" in err, err
    cli.run("volume", "attach", "s1", "--device", str(device))
    wait_for(lambda: cli.replica("s1", added)["mode"] == "RW", 120, f"{added} rebuilt")

    add = cli.start("replica", "add", "s1", "--quiet")
    added = read_line_matching(add, r"^added replica (r\d+) ", 60).group(1)
    cli.run("volume", "detach", "s1")
    _, err = add.communicate(timeout=20)
    assert add.returncode == 1 and err.count("\n") == 1, err
    assert f"s1 was detached during the rebuild of replica {added}: {added} is kept" in err, err
    cli.run("volume", "attach", "s1", "--device", str(device))
    wait_for(lambda: cli.replica("s1", added)["mode"] == "RW", 120, f"{added} rebuilt")
    assert cli.info("s1")["state"] == "healthy"


@needs_fuse
def test_a_request_cut_by_the_engine_dying_says_so(cli: Cli, tmp_path: Path) -> None:
    """A command whose engine dies before it answers says so in one line naming the volume,
    never the system's bare "Connection reset by peer". The replica is stopped first, so the
    engine has taken the request and waits for the replica (the I/O timeout is long) when it
    is killed."""
    cli.run("volume", "create", "v", "--size", "64M", "--replicas", "1", "--io-timeout", "60")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "dev"))
    pid = cli.engine_pid("v")
    assert pid is not None
    socket_path = str(volumes.load(cli.root, "v").control_socket)
    replica = cli.replica("v", "r1")["pid"]
    os.kill(replica, signal.SIGSTOP)
    try:
        snapshot = cli.start("snapshot", "create", "v", "s1")
        wait_for(lambda: _taken(socket_path), 30, "the engine to take the request")
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(replica, signal.SIGCONT)  # (it ends: its engine is gone)
    _, err = snapshot.communicate(timeout=30)
    assert snapshot.returncode == 1, err
    assert err == (
        "lhfs: error: the engine of v died (or went away) during 'snapshot': see 'lhfs volume "
        "info v'\n"
    ), err
    wait_for(lambda: cli.info("v")["state"] == "crashed", 30, "the volume to show crashed")


def _taken(path: str) -> bool:
    """Whether the listener of the Unix socket ``path`` has accepted a connection (the
    kernel lists the accepted end in /proc/net/unix with the listener's path, in state 03:
    connected)."""
    with open("/proc/net/unix") as f:
        return any(line.split()[5] == "03" and line.rstrip("\n").endswith(" " + path) for line in f)


@needs_fuse
def test_attach_finishes_an_expansion_its_engine_was_killed_in(cli: Cli, tmp_path: Path) -> None:
    """What an engine killed during ``volume expand`` leaves: the replicas grown (here one of
    two, as a kill half-way through leaves them; all of them, as one after the last replica
    answered does), ``config.json`` at the old size. The next attach grows every replica to
    the largest size and records it, so that the volume says one size, attached or not."""
    cli.run("volume", "create", "g", "--size", "64M", "--replicas", "2")
    vol = volumes.load(cli.root, "g")
    with ChunkStore.open(vol.replica_dir(vol.replica("r1"))) as store:
        store.expand(128 << 20)
    assert cli.info("g")["size"] == 64 << 20  # (what was said before: the old size)

    device = tmp_path / "dev"
    cli.run("volume", "attach", "g", "--device", str(device))
    assert device.stat().st_size == 128 << 20
    assert "an expansion cut short" in cli.engine_log("g")
    write_direct(device, (128 << 20) - 4096, b"e" * 4096)  # (the new end, on both replicas)
    assert read_direct(device, (128 << 20) - 4096, 4096) == b"e" * 4096
    assert cli.info("g")["state"] == "healthy"
    cli.run("volume", "detach", "g")

    vol = volumes.load(cli.root, "g")
    assert vol.size == 128 << 20 and cli.info("g")["size"] == 128 << 20
    for replica in vol.replicas:
        with ChunkStore.open(vol.replica_dir(replica)) as store:
            assert store.size == 128 << 20, replica["id"]
            assert store.read((128 << 20) - 4096, 4096) == b"e" * 4096, replica["id"]


@needs_fuse
def test_a_failed_mkfs_says_the_volume_is_not_formatted_and_how_to_format_it(
    cli: Cli, tmp_path: Path
) -> None:
    """mkfs that fails (here its writes are refused: the replica's disk is full) leaves no
    file system and a record of a format begun. Each mount says so, with the commands that
    format it, the plain one too (it runs mkfs again, and fails the same way while the cause
    stays); once the cause is gone, the plain mount formats it."""
    with small_disk(tmp_path / "disk", 48 << 20) as disk:
        try:
            cli.run(
                "volume", "create", "v", "--size", "256M", "--replicas", "1", "--disks", str(disk)
            )
            cli.run("volume", "attach", "v", "--device", str(tmp_path / "dev"))
            fill(disk / "rest")
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            mount = f"lhfs --root {shlex.quote(str(cli.root))} mount v {shlex.quote(str(mnt))}"
            for _ in range(2):
                failed = cli.run("mount", "v", str(mnt), check=False)
                assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
                assert failed.stderr.startswith("lhfs: error: mkfs failed: "), failed.stderr
                assert failed.stderr.endswith(
                    f"; volume v is not formatted: '{mount}' formats it as ext4 again, "
                    f"'{mount} --fs xfs' as xfs\n"
                ), failed.stderr
                assert cli.info("v")["filesystem"]["state"] == "formatting"
                assert "(formatting: mkfs never completed" in cli.run("volume", "info", "v").stdout
            (disk / "rest").unlink()
            assert "formatted and mounted" in cli.run("mount", "v", str(mnt)).stdout
            assert cli.info("v")["filesystem"]["state"] == "formatted"
            cli.run("umount", str(mnt))
        finally:
            teardown(cli.root)


@needs_fuse
def test_a_stopped_engine_is_shown_not_answering_at_once(cli: Cli, tmp_path: Path) -> None:
    """One volume's engine stopped (SIGSTOP): ``volume ls`` lists every volume at once, that
    one "not answering"; its ``volume info`` says what to do; what only its engine knows
    (``snapshot ls``, ``replica ls``) fails at once in one line saying the same, and so does
    ``detach``. The other volume answers as ever. Continued, it serves again; stopped again,
    ``detach --force`` kills it and cleans up at once (it waited 80 s for its answers)."""
    for name in ("a", "b"):
        cli.run("volume", "create", name, "--size", "64M", "--replicas", "1")
        cli.run("volume", "attach", name, "--device", str(tmp_path / f"{name}.dev"))
    cli.run("snapshot", "create", "b", "s1")
    pid = cli.engine_pid("a")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listing = {vol["name"]: vol for vol in cli.json("volume", "ls")}
        assert time.monotonic() - started < 8
        assert listing["a"]["state"] == "not answering" and listing["a"]["pid"] == pid
        assert listing["a"]["attached"] and [r["id"] for r in listing["a"]["replicas"]] == ["r1"]
        assert listing["b"]["state"] == "healthy"
        assert [s["name"] for s in listing["b"]["snapshots"]] == ["s1"]
        root = shlex.quote(str(cli.root))
        hint = (
            f"its engine (pid {pid}) is stopped: 'kill -CONT {pid}' resumes it; 'lhfs --root "
            f"{root} volume detach --force a' kills it instead (writes not yet flushed are lost)"
        )
        shown = cli.run("volume", "info", "a").stdout.splitlines()
        assert shown[:2] == [f"a: not answering, 64M, device {tmp_path / 'a.dev'}", f"  {hint}"]
        for verb in ("snapshot", "replica"):
            started = time.monotonic()
            refused = cli.run(verb, "ls", "a", check=False)
            assert time.monotonic() - started < 8
            assert refused.returncode == 1, refused
            assert refused.stderr == f"lhfs: error: volume a does not answer: {hint}\n"
        assert [s["name"] for s in cli.json("snapshot", "ls", "b")] == ["s1"]
        for args in (("snapshot", "create", "a", "s9"), ("volume", "expand", "a", "--size", "96M")):
            started = time.monotonic()
            refused = cli.run(*args, check=False)
            assert time.monotonic() - started < 8 and refused.returncode == 1, refused
            assert refused.stderr.count("\n") == 1 and f"(pid {pid}) is stopped" in refused.stderr
        started = time.monotonic()
        refused = cli.run("volume", "detach", "a", check=False)
        assert time.monotonic() - started < 8 and refused.returncode == 1, refused
        assert f"the engine of a (pid {pid}) is stopped: 'kill -CONT {pid}'" in refused.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: cli.info("a")["state"] == "healthy", 30, "a to answer again")
    info = cli.info("a")  # (what was refused was never sent: nothing of it happens now)
    assert info["size"] == 64 << 20 and [s["name"] for s in info["snapshots"]] == [], info
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        detached = cli.json("volume", "detach", "a", "--force")
        assert time.monotonic() - started < 15, detached
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert f"killed its engine (pid {pid}), which was stopped" in detached["cleaned"], detached
    assert cli.info("a")["state"] == "detached" and not (tmp_path / "a.dev").exists()
    cli.run("volume", "attach", "a", "--device", str(tmp_path / "a.dev"))
    assert cli.info("a")["state"] == "healthy"


@needs_fuse
def test_a_backup_whose_engine_dies_and_a_killed_restore_say_so(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A backup read from an attached volume whose engine is killed fails at once saying the
    engine died (its replicas go with it), not "connection to replica ... broke". A restore
    killed half-way leaves a volume that ``lhfs doctor`` fails, with what to run."""
    target = "s3://cut-short/p"
    cli.run("volume", "create", "b", "--size", "128M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "b", "--device", str(device))
    with open(device, "r+b") as f:
        f.write(random.Random(4).randbytes(128 << 20))  # (a backup of it takes seconds)
        os.fsync(f.fileno())
    backup = cli.start("backup", "create", "b", "--target", target, "--create-bucket")
    assert backup.stderr is not None
    assert backup.stderr.readline().startswith("backup b: ")  # (it reads: 0.x% done)
    kill_engine(cli, "b")
    _, err = backup.communicate(timeout=60)
    assert backup.returncode == 1, err
    # (the snapshot it took is left to housekeeping: nothing changes a crashed volume's
    # replicas until it is let go)
    assert err.splitlines()[-1].startswith(
        "lhfs: error: backup of b failed: the engine of b died (the volume crashed: 'lhfs "
        "volume info b' says what it left); its snapshot backup-"
    ), err
    assert err.splitlines()[-1].endswith(
        "stays until housekeeping trims it (not removed: volume b crashed (its engine died and "
        f"left the dead FUSE mount {device}): 'lhfs volume detach b' cleans up after it first)"
    ), err
    assert cli.info("b")["state"] == "crashed"
    cli.run("volume", "detach", "b")
    url = cli.backup("b", target)  # (detached: read from its directory)

    restore_killed_half_way(cli, s3_endpoint, url, "half")
    doctor = cli.run("doctor", "half", "--json", check=False)
    assert doctor.returncode == 1, doctor.stderr
    checks = {check["check"]: check for check in json.loads(doctor.stdout)}
    assert checks["restore"]["status"] == "fail", checks
    assert (
        checks["restore"]["detail"]
        == f"the restore of {url} was interrupted: the volume holds part of it"
    )
    root = shlex.quote(str(cli.root))
    assert checks["restore"]["hint"] == f"lhfs --root {root} volume rm half, then restore it again"
    shown = cli.run("doctor", "half", check=False).stdout
    assert "FAIL  restore" in shown, shown


@needs_fuse
def test_a_killed_activation_is_said_by_dr_status_with_what_to_run(
    cli: Cli, s3_endpoint: str
) -> None:
    """``dr activate`` records that it began before it changes anything: killed (here while
    the standby's store does not answer), it leaves the standby stopped, and ``dr status``
    says an activation was cut short and what to run. Run again, it activates."""
    target = "s3://cut-short-dr/p"
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    via_proxy = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    activation = None
    try:
        cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
        cli.backup("src", target)
        via_proxy.run(
            *("dr", "create", "sb", "--target", target, "--volume", "src", "--replicas", "1"),
            *("--interval", "1", "--retry-max", "1", "--quiet"),
        )
        proxy.stop()  # (the activation waits on the store: killed meanwhile)
        activation = cli.start("dr", "activate", "sb", "--quiet")
        wait_for(
            lambda: (
                (volumes.load(cli.root, "sb").config["dr"].get("activating") or {}).get("pid")
                == activation.pid
            ),
            30,
            "the activation to begin",
        )
        assert cli.json("dr", "status", "sb")["state"] == "activating"
        activation.kill()
        activation.wait(30)
        status = cli.json("dr", "status", "sb")
        assert status["state"] == "stopped" and status["activation"]["interrupted"], status
        shown = cli.run("dr", "status", "sb").stdout
        assert (
            f"  an activation (pid {activation.pid}, begun {status['activation']['started']}) "
            "was cut short, the standby partly changed: 'lhfs dr activate sb' finishes it, or "
            "'lhfs dr start sb' follows again\n"
        ) in shown, shown
        proxy.resume()
        assert "is a normal volume now" in cli.run("dr", "activate", "sb").stdout
        assert cli.info("sb")["dr"] is None
        assert cli.checksum("sb") == cli.checksum("src")
    finally:
        if activation is not None and activation.poll() is None:
            activation.kill()
            activation.wait(30)
        proxy.close()


@needs_fuse
def test_a_replica_stuck_after_its_engine_died_is_killed_by_the_detach(
    cli: Cli, tmp_path: Path
) -> None:
    """A local replica that does not end when its engine dies (stopped here; stuck in its
    shutdown once) holds the volume's FUSE device, on which whatever looks waits for ever,
    and its directory. The detach that cleans up after the engine kills it (a stopped one at
    once), without looking at the device, and the next attach serves every write."""
    cli.run("volume", "create", "v", "--size", "32M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    data = os.urandom(1 << 20)
    write_direct(device, 0, data)
    stuck = cli.replica("v", "r2")["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        kill_engine(cli, "v")
        detached = cli.json("volume", "detach", "v")
        assert (
            f"killed its replica process {stuck}, which did not end with it" in detached["cleaned"]
        ), detached
        wait_for(lambda: not Path(f"/proc/{stuck}").exists(), 30, "the stuck replica to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGKILL)
    cli.run("volume", "attach", "v", "--device", str(device))
    assert read_direct(device, 0, 1 << 20) == data
    assert cli.info("v")["state"] == "healthy"
