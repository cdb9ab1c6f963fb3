"""A replica whose directory does not open for damage (layer files cut or lost, a
``volume.json`` lhfs could not have written) is set aside and rebuilt by itself while another
replica serves: local or on another host, its damaged directory always kept beside it."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.errors import LhfsError
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.replica.process import ReplicaProcess
from lhfs.store.chunkstore import ChunkStore, damaged_aside
from lhfs.testing import (
    Cli,
    RawSession,
    one_line,
    raw_session,
    read_direct,
    remote_volume,
    write_direct,
)
from lhfs.wire import protocol as p
from lhfs.wire.auth import VolumeKey

MIB = 1 << 20


def _attached_with_snapshot(cli: Cli, device: Path) -> bytes:
    """Volume v, two local replicas, attached on ``device``: a MiB of random data, snapshot
    s1 of it, another MiB over it; what the volume holds."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(device))
    data = os.urandom(2 * MIB)
    write_direct(device, 0, data[:MIB])
    cli.run("snapshot", "create", "v", "s1")
    write_direct(device, MIB, data[MIB:])
    return data


def _same_everywhere(cli: Cli, volume: str) -> None:
    sums = control.call(volumes.load(cli.root, volume).control_socket, "replica_checksums")
    assert len(sums) >= 2 and len(set(sums.values())) == 1, sums


@needs_fuse
def test_a_local_replica_with_a_damaged_volume_json_is_set_aside_and_rebuilt(
    cli: Cli, tmp_path: Path
) -> None:
    """r1's ``volume.json`` is garbage: it stayed ERR until replaced by hand. Now its directory
    is set aside (its layer files with it) and r1 rebuilt from r2; the reason says where."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    kept = sorted(p.name for p in r1.iterdir() if p.suffix in (".data", ".idx"))
    (r1 / "volume.json").write_bytes(b'{"format": 1, "size": "lost')
    cli.run("volume", "attach", "v", "--device", str(device))
    (aside,) = r1.parent.glob("r1.damaged-*")
    assert (aside / "volume.json").read_bytes() == b'{"format": 1, "size": "lost'
    assert sorted(p.name for p in aside.iterdir() if p.suffix in (".data", ".idx")) == kept
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 rebuilt from r2")
    _same_everywhere(cli, "v")
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, 2 * MIB) == data
    assert "volume.json is damaged" in cli.engine_log("v")
    assert f"set aside as {aside}" in cli.engine_log("v")
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_volume_json_of_a_newer_lhfs_is_not_set_aside(cli: Cli, tmp_path: Path) -> None:
    """A newer format is not damage: the replica is refused (ERR, said) and left as it is."""
    device = tmp_path / "v.dev"
    _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    meta = json.loads((r1 / "volume.json").read_text())
    (r1 / "volume.json").write_text(json.dumps({**meta, "format": 9}))
    cli.run("volume", "attach", "v", "--device", str(device))
    assert not list(r1.parent.glob("r1.damaged-*"))
    (r1_state,) = [r for r in cli.json("replica", "ls", "v") if r["id"] == "r1"]
    assert r1_state["mode"] == "ERR" and "upgrade lhfs" in r1_state["error"], r1_state
    cli.run("volume", "detach", "v")
    line = one_line(cli.run("replica", "inspect", "--dir", str(r1), check=False))
    assert "newer than this lhfs's" in line, line


def _snapshot_data(directory: Path) -> Path:
    """The data file of snapshot s1 in a replica directory."""
    meta = json.loads((directory / "volume.json").read_text())
    (s1,) = [lid for lid, info in meta["layers"].items() if info["name"] == "s1"]
    return directory / f"{s1}.data"


def _cut_layer(directory: Path) -> None:
    os.truncate(_snapshot_data(directory), 0)


def _garbage_meta(directory: Path) -> None:
    (directory / "volume.json").write_bytes(b"\x00garbage, not JSON")


DAMAGE = {"cut-layer": _cut_layer, "garbage-volume-json": _garbage_meta}


def _files(directory: Path) -> dict[str, bytes]:
    """What a replica directory holds, but its lock and the epoch an engine's handshake
    records (bookkeeping, not the replica's content)."""
    return {f.name: f.read_bytes() for f in directory.iterdir() if f.name not in ("lock", "epoch")}


def _with_remote(
    cli: Cli, tmp_path: Path, serve: Any, device: Path, remote: Path | None = None
) -> tuple[bytes, Path, Path, ReplicaProcess]:
    """Volume v: local r1 and r2 served on loopback by a process of its own (its directory
    ``remote``, else one under ``tmp_path``), attached on ``device`` and written (snapshot
    s1 under the head): the data, r2's directory, the key file, r2's process."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1", "--rejoin-wait", "1")
    cli.run("volume", "attach", "v", "--device", str(device))
    key = tmp_path / "v.key"
    cli.run("volume", "key", "v", "--out", str(key))
    remote = remote or tmp_path / "remote"
    proc = serve(remote, key)
    cli.run("replica", "add", "v", "--address", proc.address)
    data = os.urandom(2 * MIB)
    write_direct(device, 0, data[:MIB])
    cli.run("snapshot", "create", "v", "s1")
    write_direct(device, MIB, data[MIB:])
    return data, remote, key, proc


@needs_fuse
@pytest.mark.parametrize("when", ["attached", "at-attach"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_remote_replica_with_a_damaged_directory_is_set_aside_and_rebuilt(
    cli: Cli, tmp_path: Path, serve: Any, damage: str, when: str
) -> None:
    """r2's host serves its directory again damaged (a layer cut, a volume.json of garbage),
    while the volume is attached or before it is: its process exited at start and r2 stayed
    ERR until replaced by hand. Now it serves the damaged directory to its engine alone,
    which has it set aside there (kept) and rebuilds r2 from r1, the volume served all
    along."""
    device = tmp_path / "v.dev"
    data, remote, key, first = _with_remote(cli, tmp_path, serve, device)
    if when == "at-attach":
        cli.run("volume", "detach", "v")
    port = int(first.address.rsplit(":", 1)[1])
    first.stop()
    DAMAGE[damage](remote)
    before = _files(remote)
    again = serve(remote, key, port)
    if when == "at-attach":
        cli.run("volume", "attach", "v", "--device", str(device))
    wait_for(lambda: list(remote.parent.glob("remote.damaged-*")), 60, "r2's directory set aside")
    assert read_direct(device, 0, 2 * MIB) == data  # (served meanwhile, by r1)
    wait_for(lambda: cli.live("v")["state"] == "healthy", 60, "r2 rebuilt from r1")
    (aside,) = remote.parent.glob("remote.damaged-*")
    assert _files(aside) == before  # (kept whole)
    assert (remote / "id").read_bytes() == (aside / "id").read_bytes()  # (the same replica)
    _same_everywhere(cli, "v")
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, 2 * MIB) == data
    said = cli.engine_log("v")
    assert f"set aside as {aside} on its host" in said, said[-2000:]
    assert f"set aside as {aside}" in again.log.read_text()
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_remote_damaged_replica_is_not_set_aside_when_no_other_serves(
    cli: Cli, tmp_path: Path, serve: Any
) -> None:
    """r1 (local) and r2 (remote) both damaged: no replica serves, so neither is set aside;
    the attach is refused naming r2's damage, both directories as they were."""
    device = tmp_path / "v.dev"
    _data, remote, key, first = _with_remote(cli, tmp_path, serve, device)
    cli.run("volume", "detach", "v")
    port = int(first.address.rsplit(":", 1)[1])
    first.stop()
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    _cut_layer(r1)
    _garbage_meta(remote)
    before = (_files(r1), _files(remote))
    again = serve(remote, key, port)
    line = one_line(cli.run("volume", "attach", "v", "--device", str(device), check=False))
    assert "not attached" in line and "is damaged" in line, line
    assert (_files(r1), _files(remote)) == before
    assert not list(r1.parent.glob("r1.damaged-*"))
    assert not list(remote.parent.glob("remote.damaged-*"))
    assert again.proc.poll() is None  # (it serves, damaged, for the engine to come)


def _ask(session: RawSession, method: str, **args: Any) -> tuple[int, dict[str, Any]]:
    """One call on a raw session: its status and its answer (an error's kind and message)."""
    session.sendall(p.frame(1, p.CALL, p.encode_json({"method": method, "args": args})))
    length, _, status = p.HEADER.unpack(session.recv(p.HEADER.size, socket.MSG_WAITALL))
    payload = session.recv(length - (p.HEADER.size - p.LENGTH.size), socket.MSG_WAITALL)
    return status, json.loads(payload)


def test_only_the_engine_sets_a_damaged_directory_aside(tmp_path: Path, replica_factory) -> None:
    """A peer without the key cannot ask; a reader session, an engine naming another
    identity, and any peer of a healthy replica are refused, nothing changed; the engine
    naming the replica's identity has it set aside, kept whole, an empty one of the same
    identity in its place."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    for name in ("damaged", "healthy"):
        with ChunkStore.create(tmp_path / name, MIB, 4096, volume_id=key.id_hex) as store:
            store.write(0, b"x" * 8192)
            store.snapshot("s1")
    _cut_layer(tmp_path / "damaged")
    damaged = replica_factory(tmp_path / "damaged", tmp_path / "v.key")
    healthy = replica_factory(tmp_path / "healthy", tmp_path / "v.key")
    uid = (tmp_path / "damaged" / "id").read_text().strip()
    before = {name: _files(tmp_path / name) for name in ("damaged", "healthy")}

    with pytest.raises(LhfsError):  # (another volume's key: no handshake, nothing read)
        raw_session(damaged.address, VolumeKey.new("v")).close()
    with raw_session(damaged.address, key, role=p.READER) as reader:
        status, answer = _ask(reader, "hello")
        assert status == p.OK and ".data holds 0 bytes" in answer["damaged"], answer
        status, answer = _ask(reader, "set_aside", uid=uid, need=0)
        assert (status, answer["kind"]) == (p.ERROR, "NotPermitted"), answer
    with raw_session(damaged.address, key, epoch=3, owner=b"engine-1") as engine:
        status, answer = _ask(engine, "info")
        assert status == p.ERROR and "is damaged" in answer["message"], answer
        status, answer = _ask(engine, "set_aside", uid="0" * 32, need=0)
        assert (status, answer["kind"]) == (p.ERROR, "NotPermitted"), answer
        status, answer = _ask(engine, "set_aside", uid=["not", "text"], need=0)
        assert (status, answer["kind"]) == (p.ERROR, "InvalidArgument"), answer
    with raw_session(healthy.address, key, epoch=3, owner=b"engine-1") as engine:
        healthy_uid = (tmp_path / "healthy" / "id").read_text().strip()
        status, answer = _ask(engine, "set_aside", uid=healthy_uid, need=0)
        assert (status, answer["kind"]) == (p.ERROR, "WrongState"), answer
    after = {name: _files(tmp_path / name) for name in ("damaged", "healthy")}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["damaged", "healthy"]

    with raw_session(damaged.address, key, epoch=4, owner=b"engine-1") as engine:
        status, answer = _ask(engine, "set_aside", uid=uid, need=0)
        assert status == p.OK, answer
        aside = Path(answer["aside"])
        assert aside.parent == tmp_path and aside.name.startswith("damaged.damaged-")
        assert _files(aside).keys() == after["damaged"].keys()
        assert sorted(os.listdir(tmp_path / "damaged")) == ["epoch", "id", "lock"]
        assert (tmp_path / "damaged" / "id").read_text().strip() == uid
        status, answer = _ask(engine, "hello")
        assert status == p.OK and answer["initialised"] is False and "damaged" not in answer
        assert answer["uid"] == uid
        status, answer = _ask(engine, "set_aside", uid=uid, need=0)  # (once: it is not damaged now)
        assert (status, answer["kind"]) == (p.ERROR, "WrongState"), answer


@needs_fuse
def test_a_damaged_directory_is_not_added_as_a_replica(
    cli: Cli, tmp_path: Path, serve: Any
) -> None:
    """A damaged directory served at an address given to ``replica add`` was never the
    volume's: refused in one line, left as it is, never set aside."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    key = tmp_path / "v.key"
    cli.run("volume", "key", "v", "--out", str(key))
    remote = tmp_path / "remote"
    with ChunkStore.create(remote, 4 * MIB, 65536, volume_id=VolumeKey.load(key).id_hex) as s:
        s.write(0, b"y" * 65536)
        s.snapshot("s1")
    _cut_layer(remote)
    address = serve(remote, key).address
    before = _files(remote)
    line = one_line(cli.run("replica", "add", "v", "--address", address, check=False))
    assert "serves a damaged directory" in line and "left untouched" in line, line
    assert _files(remote) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("remote")) == [
        "remote",
        "remote.log",
    ]
    assert [r["id"] for r in cli.json("replica", "ls", "v")] == ["r1"]
    cli.run("volume", "detach", "v")


@needs_fuse
def test_the_last_replica_back_damaged_is_not_set_aside_and_says_why(
    cli: Cli, tmp_path: Path, serve: Any
) -> None:
    """r2, on another host, is the volume's only replica: it goes away (the volume faulted)
    and comes back damaged. Nothing else holds the volume: it is never set aside, and the
    engine says why it is not served (not as a wiped directory)."""
    device = tmp_path / "v.dev"
    _data, remote, key, first = _with_remote(cli, tmp_path, serve, device)
    cli.run("replica", "rm", "v", "r1")
    port = int(first.address.rsplit(":", 1)[1])
    first.stop()
    wait_for(lambda: cli.live("v")["state"] == "faulted", 60, "the volume faulted")
    _garbage_meta(remote)
    before = _files(remote)
    serve(remote, key, port)

    def said() -> str:
        (r2,) = cli.json("replica", "ls", "v")
        return r2.get("rejoin") or ""

    wait_for(lambda: "its directory is damaged" in said(), 60, "the engine to say why")
    assert "volume.json is damaged" in said(), said()
    assert cli.live("v")["state"] == "faulted"
    assert _files(remote) == before
    assert not list(remote.parent.glob("remote.damaged-*"))
    cli.run("volume", "detach", "v", "--force")


def _damaged_store(directory: Path, key: VolumeKey) -> str:
    """A replica directory of ``key``'s volume with its snapshot's layer cut; its identity
    (made by serving it once)."""
    with ChunkStore.create(directory, MIB, 4096, volume_id=key.id_hex) as store:
        store.write(0, b"x" * 8192)
        store.snapshot("s1")
    _cut_layer(directory)
    uid = "ab" * 16
    (directory / "id").write_text(f"{uid}\n")
    return uid


def test_a_damaged_directory_served_through_a_link_is_set_aside_on_its_own_disk(
    tmp_path: Path, replica_factory
) -> None:
    """``--dir`` is a symbolic link to the damaged directory: the directory is set aside
    beside itself and made anew there, the link left pointing at it; the link was renamed
    instead and an empty directory made in its place, on the link's disk."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    disk = tmp_path / "disk"
    disk.mkdir()
    uid = _damaged_store(disk / "real", key)
    before = _files(disk / "real")
    link = tmp_path / "link"
    link.symlink_to(disk / "real")
    served = replica_factory(link, tmp_path / "v.key")
    with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
        status, answer = _ask(engine, "set_aside", uid=uid, need=0)
        assert status == p.OK, answer
    aside = Path(answer["aside"])
    assert aside.parent == disk and aside.name.startswith("real.damaged-"), aside
    assert not aside.is_symlink() and _files(aside) == before
    assert link.is_symlink() and link.resolve() == disk / "real"
    assert sorted(os.listdir(disk / "real")) == ["epoch", "id", "lock"]
    assert (disk / "real" / "id").read_text().strip() == uid
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("link.")) == ["link.log"]


def test_a_damaged_mount_point_is_not_set_aside_and_says_what_to_do(
    tmp_path: Path, replica_factory
) -> None:
    """``--dir`` is where a disk is mounted: it cannot be renamed. The replica says so with
    its damage and refuses ``set_aside`` in the same words, nothing changed, still serving;
    the rename failed as a disk error ("Device or resource busy"), which reads as final."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "none", str(disk)], check=True)
    try:
        uid = _damaged_store(disk, key)
        before = _files(disk)
        served = replica_factory(disk, tmp_path / "v.key")
        said = f"{disk} is a mount point and cannot be set aside: serve a subdirectory of it"
        with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
            status, answer = _ask(engine, "hello")
            assert status == p.OK and said in answer["damaged"], answer
            assert ".data holds 0 bytes" in answer["damaged"], answer
            status, answer = _ask(engine, "set_aside", uid=uid, need=0)
            assert (status, answer["kind"]) == (p.ERROR, "WrongState"), answer
            assert said in answer["message"], answer
        assert _files(disk) == before
        assert served.proc.poll() is None
        served.stop()
    finally:  # (lazily: a failure above leaves its replica holding files there)
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_damaged_directory_is_not_set_aside_without_room_for_its_rebuild(
    tmp_path: Path, replica_factory
) -> None:
    """The engine says how much the rebuild writes (``need``, checked); a disk with less free
    is refused, saying how much is needed and free, nothing changed, and asked again once
    room is made: it was set aside on any disk, the rebuild filling it and failing."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    uid = _damaged_store(tmp_path / "damaged", key)
    before = _files(tmp_path / "damaged")
    served = replica_factory(tmp_path / "damaged", tmp_path / "v.key")
    with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
        for need in (None, -1, "1", 1 << 62):
            status, answer = _ask(engine, "set_aside", uid=uid, need=need)
            assert (status, answer["kind"]) == (p.ERROR, "InvalidArgument"), answer
        status, answer = _ask(engine, "set_aside", uid=uid, need=1 << 50)
        assert (status, answer["kind"]) == (p.ERROR, "NoSpace"), answer
        assert "not set aside: its rebuild needs about 1P beside it" in answer["message"], answer
        assert "free; make room there" in answer["message"], answer
        assert _files(tmp_path / "damaged") == before
        assert not list(tmp_path.glob("damaged.damaged-*"))
        status, answer = _ask(engine, "set_aside", uid=uid, need=MIB)
        assert status == p.OK and Path(answer["aside"]).parent == tmp_path, answer


@needs_fuse
def test_a_remote_damaged_replica_waits_for_room_for_its_rebuild(
    cli: Cli, tmp_path: Path, serve: Any
) -> None:
    """r2's disk has less room than its rebuild writes: its damaged directory is kept as it
    is, ``replica ls`` saying how much is needed and what to do; once room is made there, it
    is set aside and rebuilt."""
    device = tmp_path / "v.dev"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "none", str(disk)], check=True)
    try:
        data, remote, key, first = _with_remote(cli, tmp_path, serve, device, disk / "remote")
        port = int(first.address.rsplit(":", 1)[1])
        first.stop()
        _cut_layer(remote)
        before = _files(remote)
        again = serve(remote, key, port)

        def said() -> str:
            (r2,) = [r for r in cli.json("replica", "ls", "v") if r["id"] == "r2"]
            return r2.get("error") or ""

        wait_for(lambda: "not set aside: its rebuild needs about" in said(), 60, "no room said")
        assert "make room there" in said() and "lhfs replica rm v r2" in said(), said()
        assert _files(remote) == before
        assert not list(disk.glob("remote.damaged-*"))
        subprocess.run(["mount", "-o", "remount,size=32M", str(disk)], check=True)
        wait_for(lambda: cli.live("v")["state"] == "healthy", 60, "r2 set aside and rebuilt")
        (aside,) = disk.glob("remote.damaged-*")
        assert _files(aside) == before
        assert read_direct(device, 0, 2 * MIB) == data
        _same_everywhere(cli, "v")
        cli.run("volume", "detach", "v")
        again.stop()
    finally:  # (lazily: a failure above leaves its replica holding files there)
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_set_aside_that_fails_leaves_the_replica_damaged_and_is_done_when_asked_again(
    tmp_path: Path, replica_factory
) -> None:
    """The disk has no inode left for the new directory: the set-aside fails with the disk's
    error and changes nothing (the replica still damaged, its directory where it was), and
    is done when asked again once there is room. The damaged directory was moved first and
    the failure left the replica cleared, its identity kept in memory only."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=64", "none", str(disk)], check=True)
    try:
        uid = _damaged_store(disk / "r", key)
        served = replica_factory(disk / "r", tmp_path / "v.key")
        with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
            before = _files(disk / "r")
            fillers = 0
            with pytest.raises(OSError):  # (every inode taken)
                while True:
                    (disk / f"filler{fillers}").touch()
                    fillers += 1
            status, answer = _ask(engine, "set_aside", uid=uid, need=0)
            assert (status, answer["kind"]) == (p.ERROR, "StorageError"), answer
            assert "No space left on device" in answer["message"], answer
            assert _files(disk / "r") == before
            assert not list(disk.glob("r.damaged-*"))
            status, answer = _ask(engine, "hello")
            assert ".data holds 0 bytes" in answer["damaged"], answer
            for n in range(8):
                (disk / f"filler{n}").unlink()
            status, answer = _ask(engine, "set_aside", uid=uid, need=0)
            assert status == p.OK, answer
            aside = Path(answer["aside"])
            assert aside.parent == disk and _files(aside) == before
            assert sorted(os.listdir(disk / "r")) == ["epoch", "id", "lock"]
            assert (disk / "r" / "id").read_text().strip() == uid
            assert (disk / "r" / "epoch").read_text().split()[0] == "3"
            assert not list(disk.glob("r.anew"))
        served.stop()
    finally:  # (lazily: a failure above leaves its replica holding files there)
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_set_aside_whose_new_directory_is_held_moves_nothing(
    tmp_path: Path, replica_factory
) -> None:
    """The directory made to take the damaged one's place is held by another process: the
    set-aside is refused, the damaged directory still where it was, and an engine taking
    the replica over meanwhile records its epoch there; done when asked again once it is let
    go, the replica's identity kept across a restart. The new directory was locked only
    once the damaged one had moved: the replica served with nothing at its path, the
    takeover's epoch made a directory there that the new one could never replace, and the
    replica came back from its next start under a new identity, a stranger to its engine."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    uid = _damaged_store(tmp_path / "r", key)
    served = replica_factory(tmp_path / "r", tmp_path / "v.key")
    before = _files(tmp_path / "r")
    (tmp_path / "r.anew").mkdir(mode=0o700)
    held = os.open(tmp_path / "r.anew" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
            status, answer = _ask(engine, "set_aside", uid=uid, need=0)
            assert (status, answer["kind"]) == (p.ERROR, "Busy"), answer
        assert _files(tmp_path / "r") == before
        assert not list(tmp_path.glob("r.damaged-*"))
        with raw_session(served.address, key, epoch=4, owner=b"engine-2") as engine:
            assert (tmp_path / "r" / "epoch").read_text().split()[0] == "4"
            status, answer = _ask(engine, "hello")
            assert ".data holds 0 bytes" in answer["damaged"], answer
    finally:
        os.close(held)
    with raw_session(served.address, key, epoch=5, owner=b"engine-2") as engine:
        status, answer = _ask(engine, "set_aside", uid=uid, need=0)
        assert status == p.OK, answer
        assert _files(Path(answer["aside"])) == before
    served.stop()
    again = replica_factory(tmp_path / "r", tmp_path / "v.key")
    with raw_session(again.address, key, epoch=6, owner=b"engine-2") as engine:
        status, answer = _ask(engine, "hello")
        assert status == p.OK and answer["uid"] == uid and "damaged" not in answer, answer
    assert sorted(os.listdir(tmp_path / "r")) == ["epoch", "id", "lock"]


def test_a_set_aside_stopped_between_its_renames_records_no_epoch_meanwhile(
    tmp_path: Path, replica_factory
) -> None:
    """The new directory cannot be renamed into place (a file system is mounted on it): the
    damaged one has moved aside, and the set-aside fails saying why. An engine taking the
    replica over meanwhile is refused, as by a disk that cannot record its epoch, and
    nothing is made at the replica's path: its epoch was recorded into a directory made
    there for it, which the new one could then never replace (the replica a stranger to its
    engine from its next start)."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    uid = _damaged_store(tmp_path / "r", key)
    served = replica_factory(tmp_path / "r", tmp_path / "v.key")
    fresh = tmp_path / "r.anew"
    fresh.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "none", str(fresh)], check=True)
    try:
        with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
            status, answer = _ask(engine, "set_aside", uid=uid, need=0)
            assert status == p.ERROR and "Device or resource busy" in answer["message"], answer
        assert not (tmp_path / "r").exists() and len(list(tmp_path.glob("r.damaged-*"))) == 1
        with pytest.raises(LhfsError, match="cannot record its epoch"):
            raw_session(served.address, key, epoch=4, owner=b"engine-2").close()
        assert not (tmp_path / "r").exists()
        assert (fresh / "id").read_text().strip() == uid
        assert (fresh / "epoch").read_text().split()[0] == "3"
        served.stop()
    finally:  # (lazily: the replica holds the lock inside it while it runs)
        subprocess.run(["umount", "-l", str(fresh)], check=True)


def test_a_set_aside_cut_between_its_renames_is_finished_at_the_next_start(
    tmp_path: Path, replica_factory
) -> None:
    """Killed once the damaged directory moved aside but before the new one took its place:
    the next start puts the new one there, the replica's identity kept (served empty under
    a new identity, it was a stranger to its engine)."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    uid = _damaged_store(tmp_path / "r", key)
    (tmp_path / "r.anew").mkdir()
    (tmp_path / "r.anew" / "id").write_text(f"{uid}\n")
    (tmp_path / "r.anew" / "epoch").write_text(f"3 {b'engine-1'.hex()}\n")
    os.rename(tmp_path / "r", tmp_path / "r.damaged-20261206T000000-000000")
    served = replica_factory(tmp_path / "r", tmp_path / "v.key")
    with raw_session(served.address, key, epoch=4, owner=b"engine-1") as engine:
        status, answer = _ask(engine, "hello")
        assert status == p.OK and answer["uid"] == uid and "damaged" not in answer, answer
    assert not (tmp_path / "r.anew").exists()
    with pytest.raises(LhfsError):  # (its fencing epoch kept: an older engine is refused)
        raw_session(served.address, key, epoch=2, owner=b"engine-0").close()


def test_a_damaged_directory_is_held_and_one_repaired_meanwhile_is_not_set_aside(
    tmp_path: Path, replica_factory
) -> None:
    """Served damaged, the directory is held as a store holds it: a second ``replica serve``
    of it is refused (it could later be asked to set aside what the first one's engine had
    rebuilt there). Repaired by hand while served, it is opened again when its engine asks
    to set it aside: served from then on, not set aside."""
    key = VolumeKey.new("v")
    key.save(tmp_path / "v.key")
    directory = tmp_path / "r"
    with ChunkStore.create(directory, MIB, 4096, volume_id=key.id_hex) as store:
        store.write(0, b"x" * 8192)
        store.snapshot("s1")
    layer = _snapshot_data(directory)
    whole = layer.read_bytes()
    _cut_layer(directory)
    served = replica_factory(directory, tmp_path / "v.key")
    uid = (directory / "id").read_text().strip()
    with pytest.raises(RuntimeError, match="in use by another lhfs process"):
        replica_factory(directory, tmp_path / "v.key")
    layer.write_bytes(whole)  # (repaired by hand)
    with raw_session(served.address, key, epoch=3, owner=b"engine-1") as engine:
        status, answer = _ask(engine, "set_aside", uid=uid, need=0)
        assert (status, answer["kind"]) == (p.ERROR, "WrongState"), answer
        assert "opens now (repaired)" in answer["message"], answer
        status, answer = _ask(engine, "hello")
        assert answer["initialised"] is True and "damaged" not in answer, answer
        status, answer = _ask(engine, "info")
        assert status == p.OK and answer["uid"] == uid, answer
    assert not list(tmp_path.glob("r.damaged-*")) and not list(tmp_path.glob("r.anew"))
    assert layer.read_bytes() == whole


def test_a_damaged_directory_of_another_volume_is_refused_as_another_volumes(
    tmp_path: Path, replica_factory
) -> None:
    """Served with the key of another volume than its own, a damaged directory is refused
    naming whose it is (the operator's mistake), as an undamaged one is; it was refused
    with its damage, as if it were the key's volume's to repair."""
    mine, other = VolumeKey.new("v"), VolumeKey.new("w")
    other.save(tmp_path / "w.key")
    _damaged_store(tmp_path / "r", mine)
    before = _files(tmp_path / "r")
    with pytest.raises(RuntimeError) as refused:
        replica_factory(tmp_path / "r", tmp_path / "w.key")
    said = str(refused.value)
    assert f"holds a replica of another volume (id {mine.id_hex})" in said, said
    assert f"the key file is for volume w (id {other.id_hex})" in said, said
    assert _files(tmp_path / "r") == before


@needs_fuse
def test_an_empty_directory_holding_the_replicas_identity_is_not_called_another(
    cli: Cli, tmp_path: Path, serve: Any
) -> None:
    """What a set-aside leaves when its engine dies before the rebuild begins: an empty
    directory holding the replica's own identity. The attach says it is the replica's own,
    to be rebuilt; it said it was another directory, to be replaced by the replica's own
    (the one set aside)."""
    key, (far,) = remote_volume(cli, tmp_path, serve, "e", 1)
    cli.run("volume", "detach", "e")
    port = int(far.address.rsplit(":", 1)[1])
    assert far.stop() == 0
    anew = tmp_path / "anew"
    anew.mkdir()
    (anew / "id").write_bytes((far.dir / "id").read_bytes())
    served = serve(anew, key, port)
    device = tmp_path / "e.dev"
    line = one_line(cli.run("volume", "attach", "e", "--device", str(device), check=False))
    assert "r2 (recorded healthy) answers at its address with its own directory, empty" in line
    assert "serve the replica's own directory there" not in line, line
    assert served.stop() == 0


def test_a_damaged_directory_is_set_aside_under_one_name_local_or_remote(tmp_path: Path) -> None:
    """The local engine and a replica on another host name a damaged directory set aside
    alike (one function): beside it, ``<dir>.damaged-<time>-<6 hex>``, two in one second
    apart."""
    names = {damaged_aside(tmp_path / "r2") for _ in range(16)}
    assert len(names) == 16
    for name in names:
        assert name.parent == tmp_path, name
        assert re.fullmatch(r"r2\.damaged-\d{8}T\d{6}-[0-9a-f]{6}", name.name), name
