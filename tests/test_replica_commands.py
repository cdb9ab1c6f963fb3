"""Replica commands around their edges: refusals said in one line, failed adds given back,
``replica serve`` and ``replica init`` that check before they make anything."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, one_line, write_direct

MIB = 1 << 20


def attached(cli: Cli, tmp_path: Path, name: str, size: str = "16M", replicas: int = 1) -> Path:
    """A new volume, attached; its device."""
    cli.run("volume", "create", name, "--size", size, "--replicas", str(replicas))
    device = tmp_path / f"{name}.dev"
    cli.run("volume", "attach", name, "--device", str(device))
    return device


def key_of(cli: Cli, tmp_path: Path, name: str) -> Path:
    key = tmp_path / f"{name}.key"
    cli.run("volume", "key", name, "--out", str(key))
    return key


@needs_fuse
def test_snapshot_rm_during_a_rebuild_says_busy_in_one_line(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A refusal raised inside the engine's nursery (``snapshot rm`` while a rebuild runs) is
    said as itself, not as "internal error: Exceptions from Trio nursery"."""
    device = attached(cli, tmp_path, "v", "64M")
    write_direct(device, 0, os.urandom(32 * MIB))
    cli.run("snapshot", "create", "v", "s1")
    remote = replica_factory(tmp_path / "remote", key_of(cli, tmp_path, "v"))
    add = cli.start("replica", "add", "v", "--address", remote.address, "--no-wait")
    assert "added replica r2" in add.stdout.readline()
    os.kill(remote.proc.pid, signal.SIGSTOP)  # (its rebuild waits for it meanwhile)
    try:
        assert cli.live("v")["replicas"][1]["mode"] != "RW"  # (not rebuilt before it stopped)
        line = one_line(cli.run("snapshot", "rm", "v", "s1", check=False), 1)
        assert "a replica is being rebuilt: removing a snapshot is refused" in line, line
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)
        add.communicate(timeout=30)
    assert "Trio nursery" not in cli.engine_log("v")
    assert "s1" in [s["name"] for s in cli.json("snapshot", "ls", "v")]
    cli.run("volume", "detach", "v")


@needs_fuse
def test_an_add_whose_target_refuses_is_given_back(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A ``replica add`` whose first rebuild fails for a reason trying again cannot change
    (the served directory is not empty) fails in one line and leaves the volume as it was:
    the replica removed, its id given back, no barrier snapshot left beyond the limit."""
    device = attached(cli, tmp_path, "v")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a replica")
    key = key_of(cli, tmp_path, "v")
    served = replica_factory(junk, key)
    add = cli.run("replica", "add", "v", "--address", served.address, "--quiet", check=False)
    line = one_line(add, 1)
    assert "replica r2: rebuild failed" in line and "is not empty" in line, line
    assert "given back" in line, line
    info = cli.live("v")
    assert info["state"] == "healthy" and [r["id"] for r in info["replicas"]] == ["r1"], info
    config = volumes.load(cli.root, "v").config
    assert [r["id"] for r in config["replicas"]] == ["r1"] and config["next_replica"] == 2
    assert (junk / "notes.txt").read_text() == "not a replica"
    assert set(os.listdir(junk)) <= {"id", "epoch", "notes.txt"}  # (its own files only)
    assert cli.json("replica", "add", "v")["id"] == "r2"  # (the id given back is taken again)

    write_direct(device, 0, os.urandom(4 * MIB))  # a target whose disk is too small for it
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "none", str(small)], check=True)
    try:
        served = replica_factory(small / "r", key)
        add = cli.run("replica", "add", "v", "--address", served.address, "--quiet", check=False)
        line = one_line(add, 1)
        assert "replica r3: rebuild failed" in line and "given back" in line, line
        assert "space" in line.lower(), line
        served.stop()
    finally:  # (lazily: a failure above leaves its replica holding files there)
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert [r["id"] for r in cli.live("v")["replicas"]] == ["r1", "r2"]
    assert cli.live("v")["state"] == "healthy"
    cli.run("volume", "detach", "v")


def test_serve_and_init_check_before_they_make_anything(
    cli: Cli, tmp_path: Path, key_file: Path, replica_factory
) -> None:
    """``replica serve`` refuses a directory whose parent is missing, a path that is a file,
    and an address it cannot bind, in one line with exit 1, having made nothing (it made the
    directory levels and its ``id`` first); ``replica init`` refuses a missing backing image
    leaving no directory. A missing file named on the command line is exit 1 whichever option
    names it, and so is an address that cannot be bound. A new directory is still served."""
    key = str(key_file)

    def serve(directory: Path, listen: str = "127.0.0.1:0", *more: str) -> str:
        args = ("replica", "serve", "--dir", str(directory), "--listen", listen, "--key-file", key)
        return one_line(cli.run(*args, *more, check=False, timeout=30), 1)

    deep = tmp_path / "nowhere" / "a" / "b"
    assert f"{deep.parent} is not a directory that exists" in serve(deep)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert serve(afile).endswith(f"{afile} is not a directory")
    fresh = tmp_path / "fresh"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "Address already in use" in serve(fresh, f"127.0.0.1:{taken.getsockname()[1]}")
    assert "Cannot assign requested address" in serve(fresh, "192.0.2.1:0")  # (not this host's)
    missing = str(tmp_path / "missing.pem")
    assert "does not exist" in serve(
        fresh, "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing
    )
    assert not fresh.exists() and not (tmp_path / "nowhere").exists()

    ca = ("--tls-ca", missing)
    added = cli.run("replica", "add", "ghost", "--address", "127.0.0.1:1", *ca, check=False)
    assert one_line(added, 1).endswith(f"CA certificate {missing} does not exist")
    # a CA that is no file, or larger than a CA: refused before it is read whole
    added = cli.run(
        "replica", "add", "ghost", "--address", "127.0.0.1:1", "--tls-ca", "/dev/zero", check=False
    )
    assert one_line(added, 2).endswith("CA certificate /dev/zero is not a regular file")
    fifo = tmp_path / "ca.fifo"  # (no writer: opened without waiting for one)
    os.mkfifo(fifo)
    added = cli.run(
        "replica",
        "add",
        "ghost",
        "--address",
        "127.0.0.1:1",
        "--tls-ca",
        str(fifo),
        check=False,
        timeout=30,
    )
    assert one_line(added, 2).endswith(f"CA certificate {fifo} is not a regular file")
    huge = tmp_path / "huge.pem"
    with huge.open("wb") as f:
        f.truncate(1 << 30)
    added = cli.run(
        "replica", "add", "ghost", "--address", "127.0.0.1:1", "--tls-ca", str(huge), check=False
    )
    assert one_line(added, 2).endswith(
        f"CA certificate {huge} is larger than a CA (64 KiB at most)"
    )

    made = tmp_path / "made"
    image = ("--backing-image", str(tmp_path / "no.img"))
    init = cli.run("replica", "init", "--dir", str(made), "--size", "16M", *image, check=False)
    assert one_line(init, 1).endswith(f"backing image {tmp_path / 'no.img'} does not exist")
    assert not made.exists()

    served = replica_factory(fresh)  # (a new directory in one that exists: made and served)
    assert served.address and (fresh / "id").exists()


@needs_fuse
def test_a_replica_that_cannot_record_its_epoch_says_why(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A replica served from a read-only directory answers the engine's handshake with why it
    cannot take the session (its epoch cannot be recorded), instead of closing the connection
    unexplained ("closed the connection during the handshake")."""
    attached(cli, tmp_path, "v")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "none", str(readonly)], check=True)
    try:
        served = replica_factory(readonly, key_of(cli, tmp_path, "v"))
        add = cli.run("replica", "add", "v", "--address", served.address, check=False)
        line = one_line(add, 1)
        assert line.endswith(
            f"cannot add replica: replica at {served.address} cannot record its epoch: "
            "Read-only file system"
        ), line
        served.stop()
    finally:  # (lazily: a failure above leaves its replica holding files there)
        subprocess.run(["umount", "-l", str(readonly)], check=True)
    assert [r["id"] for r in cli.live("v")["replicas"]] == ["r1"]
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_rotten_backing_image_copy_found_at_start_is_replaced(cli: Cli, tmp_path: Path) -> None:
    """A replica whose copy of the backing image was written into while detached cannot open
    (its content is not the image's). It was retried until the rejoin limit, and a scrub said
    "no corruption"; its copy is now set aside as ``.rotten`` and it is rebuilt with a good
    one, every replica then serving the image's content."""
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(2 * MIB))
    cli.run("volume", "create", "bi", "--size", "16M", "--replicas", "2",
            "--backing-image", str(image))  # fmt: skip
    expected = cli.checksum("bi")
    vol = volumes.load(cli.root, "bi")
    (copy,) = vol.replica_dir(vol.replica("r1")).glob("*.img")  # type: ignore[union-attr]
    with open(copy, "r+b") as f:  # (as dd would: its time changes, so the open rehashes it)
        f.seek(100_000)
        f.write(b"ROTTEN")
    cli.run("volume", "attach", "bi", "--device", str(tmp_path / "bi.dev"))
    wait_for(lambda: cli.live("bi")["state"] == "healthy", 60, "r1 rebuilt with a good copy")
    r1 = next(r for r in cli.live("bi")["replicas"] if r["id"] == "r1")
    assert r1["rebuild_stats"]["backing_bytes"] > 0, r1
    assert (copy.parent / f"{copy.name}.rotten").exists()
    assert "rotten (set aside as" in cli.engine_log("bi")
    for _ in range(3):  # (reads go round the replicas)
        assert cli.checksum("bi") == expected
    assert cli.json("volume", "scrub", "bi")["damaged"] == {}

    cli.run("volume", "set", "bi", "--rejoin-wait", "0")  # the same found by a restart
    (second,) = copy.parent.glob("*.img")
    with open(second, "r+b") as f:  # (then its process is killed: it is started again)
        f.seek(200_000)
        f.write(b"ROTTEN")
    os.kill(r1["pid"] or 0, signal.SIGKILL)
    wait_for(lambda: (copy.parent / f"{second.name}.rotten").exists(), 30, "set aside again")
    wait_for(lambda: cli.live("bi")["state"] == "healthy", 60, "r1 rebuilt again")
    assert cli.checksum("bi") == expected
    cli.run("volume", "detach", "bi")
    entry = volumes.load(cli.root, "bi").replica("r1")
    assert entry["mode"] == "RW" and not entry.get("rotten_backing"), entry


def test_commands_that_meet_a_detach_are_done_detached(
    cli: Cli, tmp_path: Path, monkeypatch
) -> None:
    """``snapshot create``, ``volume checksum``, ``snapshot rm`` and ``replica rm`` find the
    volume attached, and its engine has gone by the time they call it (a detach in between:
    its socket is gone). They are done as on a detached volume, which they also work on,
    instead of failing with "the volume is not attached". The race is made sure of by the
    first look at the volume being told it is attached."""
    from lhfs.volumes import manage

    cli.run("volume", "create", "d", "--size", "16M", "--replicas", "2")
    expected = cli.checksum("d")
    real = volumes.Volume.runtime

    def attached_at_first_look() -> None:
        looks = iter([{"pid": os.getpid(), "device": str(tmp_path / "gone.dev")}])
        monkeypatch.setattr(volumes.Volume, "runtime", lambda self: next(looks, None) or real(self))

    attached_at_first_look()
    assert manage.snapshot_create(cli.root, "d", "s1")["name"] == "s1"
    attached_at_first_look()
    assert manage.checksum(cli.root, "d") == expected
    attached_at_first_look()
    manage.snapshot_remove(cli.root, "d", "s1")
    attached_at_first_look()
    assert manage.replica_remove(cli.root, "d", "r2") == []
    monkeypatch.setattr(volumes.Volume, "runtime", real)
    assert [s["name"] for s in cli.json("snapshot", "ls", "d")] == []
    assert [r["id"] for r in cli.json("replica", "ls", "d")] == ["r1"]


def test_a_request_the_engine_went_away_with_is_not_done_again(cli: Cli, monkeypatch) -> None:
    """An engine that went away *with* a request (``EngineGone``) may have carried it out:
    the command says so rather than do it again offline, where it would fail for its own
    change (a snapshot it made "exists") or do it twice."""
    from lhfs.engine import control
    from lhfs.volumes import manage

    cli.run("volume", "create", "g", "--size", "16M", "--replicas", "1")
    real, looks = volumes.Volume.runtime, iter([{"pid": os.getpid()}])  # (attached at first)
    monkeypatch.setattr(volumes.Volume, "runtime", lambda self: next(looks, None) or real(self))

    def gone(*args: object, **kwargs: object) -> None:
        raise control.EngineGone("the engine of g died (or went away) during 'snapshot'")

    monkeypatch.setattr(control, "call", gone)
    with pytest.raises(control.EngineGone):
        manage.snapshot_create(cli.root, "g", "s1")
    monkeypatch.undo()
    assert cli.json("snapshot", "ls", "g") == []  # (not made offline behind its back)


def test_a_rebuild_failed_by_its_source_never_gives_back_the_target() -> None:
    """An added replica is given back only for what its target refused: an error of the
    source (or of the replicas a barrier snapshots), of whatever kind, is the source's."""
    from lhfs.core.errors import StorageError
    from lhfs.engine.daemon import _cannot_retry
    from lhfs.engine.engine import ReplicaLink
    from lhfs.engine.rebuild import _source_error

    assert _cannot_retry(StorageError("no space left on the target"))
    error = _source_error(ReplicaLink("r1", "127.0.0.1:1"), StorageError("Input/output error"))
    assert str(error) == "rebuild source r1: Input/output error"
    assert not _cannot_retry(error)


def test_a_replica_being_prepared_is_shown_being_rebuilt() -> None:
    """A replica whose rebuild is in its first step (a new one receiving the backing image)
    is not failed: it is shown WO with its progress, not ERR "rebuild: preparing" (which made
    the volume look failed to ``replica ls`` and ``lhfs doctor``). One whose rebuild failed
    is ERR with why."""
    from lhfs.engine.engine import ERR, ReplicaLink

    link = ReplicaLink("r5", "127.0.0.1:1", mode=ERR, error="rebuild: preparing")
    link.rebuild_progress = 0.0
    shown = link.public()
    assert (shown["mode"], shown["error"], shown["rebuild_progress"]) == ("WO", None, 0.0)
    link.rebuild_progress, link.error = None, "rebuild failed: no space"
    assert (link.public()["mode"], link.public()["error"]) == ("ERR", "rebuild failed: no space")


@needs_fuse
def test_a_new_replica_receiving_the_backing_image_is_not_failed(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """While a new replica receives the backing image, ``replica ls`` shows it WO and
    ``lhfs doctor`` does not call it failed."""
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(64 * MIB))
    cli.run("volume", "create", "b", "--size", "128M", "--replicas", "1",
            "--backing-image", str(image))  # fmt: skip
    cli.run("volume", "attach", "b", "--device", str(tmp_path / "b.dev"))
    remote = replica_factory(tmp_path / "remote", key_of(cli, tmp_path, "b"))
    add = cli.start("replica", "add", "b", "--address", remote.address, "--no-wait")
    assert "added replica r2" in add.stdout.readline()
    os.kill(remote.proc.pid, signal.SIGSTOP)  # (held in its upload for a while)
    try:
        new = cli.json("replica", "ls", "b")[1]
        assert new["mode"] == "WO" and new["error"] is None, new
        stats = new["rebuild_stats"]  # (still preparing: the image not all sent)
        assert "prepare" not in stats["phases"] and stats["backing_bytes"] < 64 * MIB, stats
        doctor = cli.run("doctor", "b", check=False).stdout
        assert "has it failed" not in doctor, doctor
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)
        add.communicate(timeout=30)
    wait_for(lambda: cli.live("b")["state"] == "healthy", 60, "r2 rebuilt")
    cli.run("volume", "detach", "b")
