"""A replica directory damaged behind lhfs's back is refused, named in one line, never served:
a layer's data file cut (its missing bytes would read as zeros, the volume's data to every read
spread onto it and to a replica rebuilt from it); layer files its ``volume.json`` lost (never
deleted on that word alone); a snapshot chain unlike the other replicas' (rebuilt)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.errors import CorruptState
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, read_direct, write_direct

CHUNK = 4096
MIB = 1 << 20


def _store_with_snapshot(directory: Path) -> tuple[bytes, bytes]:
    """A store holding ``a`` in snapshot s1 and ``b`` over part of it in the head."""
    a, b = os.urandom(4 * CHUNK), os.urandom(2 * CHUNK)
    with ChunkStore.create(directory, 64 * CHUNK, CHUNK) as store:
        store.write(0, a)
        store.snapshot("s1")
        store.write(CHUNK, b)
    return a, b


def _layer_ids(directory: Path) -> tuple[str, str]:
    meta = json.loads((directory / "volume.json").read_text())
    head = meta["head"]
    return head, meta["layers"][head]["parent"]


@pytest.mark.parametrize("which", ["head", "snapshot"])
@pytest.mark.parametrize("length", [0, 3 * CHUNK + 100])
def test_a_cut_data_file_is_refused_at_open_naming_it(
    tmp_path: Path, which: str, length: int
) -> None:
    directory = tmp_path / "r"
    _store_with_snapshot(directory)
    head, snap = _layer_ids(directory)
    cut = directory / f"{head if which == 'head' else snap}.data"
    os.truncate(cut, min(length, cut.stat().st_size - 1))
    before = sorted((p.name, p.stat().st_size) for p in directory.iterdir())
    with pytest.raises(CorruptState, match=str(cut)):
        ChunkStore.open(directory)
    assert sorted((p.name, p.stat().st_size) for p in directory.iterdir()) == before


def test_a_data_file_cut_while_open_fails_reads_instead_of_serving_zeros(tmp_path: Path) -> None:
    directory = tmp_path / "r"
    a, b = _store_with_snapshot(directory)
    _, snap = _layer_ids(directory)
    with ChunkStore.open(directory) as store:
        assert store.read(0, 4 * CHUNK) == a[:CHUNK] + b + a[3 * CHUNK :]
        store.layer_sums(snap)  # (recorded)
        os.truncate(directory / f"{snap}.data", 0)
        for offset, length in ((0, CHUNK), (0, 4 * CHUNK), (3 * CHUNK, 10)):
            with pytest.raises(CorruptState, match=f"{snap}.data"):
                store.read(offset, length)
        assert store.verify_job(snap)() == [0, 1, 2, 3]  # (what a scrub finds, and repairs)


def test_a_rebuild_cut_short_leaves_a_replica_that_opens(tmp_path: Path) -> None:
    """A write into part of a chunk while a rebuild fills the layers below lands as it is; a
    crash before the rebuild ends must not leave a data file shorter than its index says."""
    directory = tmp_path / "r"
    with ChunkStore.create(directory, 64 * CHUNK, CHUNK) as store:
        store.rebuild_begin(["s1"], 5)
        store.write(40 * CHUNK + 10, b"x" * 100)  # (past the end of the head's file)
        store.flush()  # ... and the process dies before ``rebuild_finish``
    with ChunkStore.open(directory) as store:
        assert store.read(40 * CHUNK + 10, 100) == b"x" * 100


def _attached_with_snapshot(cli: Cli, device: Path) -> bytes:
    """Volume v, two replicas, attached on ``device``: a MiB of random data, snapshot s1 of it;
    the data."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(device))
    data = os.urandom(MIB)
    write_direct(device, 0, data)
    cli.run("snapshot", "create", "v", "s1")
    return data


@needs_fuse
def test_a_replica_with_a_cut_layer_is_set_aside_and_rebuilt(cli: Cli, tmp_path: Path) -> None:
    """r1's snapshot layer is cut to nothing: before, it opened, the volume was healthy and
    reads spread onto r1 returned zeros. Now r1 refuses to open, its directory is set aside
    (kept, said) and r1 is rebuilt from r2; once r2 is the only replica, such damage is
    refused, never served."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    _, snap = _layer_ids(r1)
    os.truncate(r1 / f"{snap}.data", 0)
    cli.run("volume", "attach", "v", "--device", str(device))
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, MIB) == data
    (aside,) = r1.parent.glob("r1.damaged-*")
    assert (aside / f"{snap}.data").stat().st_size == 0  # kept for a look
    assert f"{snap}.data holds 0 bytes" in cli.engine_log("v")
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 rebuilt from r2")
    sums = control.call(volumes.load(cli.root, "v").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    cli.run("volume", "detach", "v")
    cli.run("replica", "rm", "v", "r1")
    r2 = r1.with_name("r2")
    layers = json.loads((r2 / "volume.json").read_text())["layers"]
    (s1,) = [lid for lid, info in layers.items() if info["name"] == "s1"]
    os.truncate(r2 / f"{s1}.data", 0)
    line = one_line(cli.run("volume", "attach", "v", "--device", str(device), check=False))
    assert "could be started" in line, line
    assert not list(r2.parent.glob("r2.damaged-*"))  # (nothing else to serve: kept as it is)


def _drop_snapshot(directory: Path) -> str:
    """Edit ``volume.json`` as damage would: snapshot s1 gone, the head on nothing."""
    meta = json.loads((directory / "volume.json").read_text())
    head, snap = meta["head"], meta["layers"][meta["head"]]["parent"]
    del meta["layers"][snap]
    meta["layers"][head]["parent"] = None
    (directory / "volume.json").write_text(json.dumps(meta))
    return snap


def test_layer_files_the_metadata_lost_are_refused_never_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "r"
    _store_with_snapshot(directory)
    snap = _drop_snapshot(directory)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(CorruptState, match=f"{snap}.data, {snap}.idx belong to no layer"):
        ChunkStore.open(directory)
    assert sorted(p.name for p in directory.iterdir()) == before


@pytest.mark.parametrize("operation", ["remove", "revert", "rebuild"])
def test_what_a_crash_of_a_layer_operation_leaves_is_still_cleaned_up(
    tmp_path: Path, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal recorded and killed before the layer's files went, and a layer created and
    killed before it was recorded: both are left-overs, removed at the next open."""
    from lhfs.store.layer import Layer

    directory = tmp_path / "r"
    a, b = _store_with_snapshot(directory)
    head, snap = _layer_ids(directory)
    gone = {"remove": snap, "revert": head, "rebuild": snap}[operation]
    with monkeypatch.context() as patch, ChunkStore.open(directory) as store:
        patch.setattr(Layer, "remove_files", lambda self: None)  # (killed before)
        if operation == "remove":
            store.remove_snapshot("s1")
        elif operation == "revert":
            store.revert("s1")
        else:
            store.rebuild_begin(["s0"], store.revision)
    Layer.create(directory, "0123456789abcdef", CHUNK)  # (made, never recorded)
    assert (directory / f"{gone}.data").exists()
    with ChunkStore.open(directory) as store:
        if operation == "remove":
            assert store.read(0, 4 * CHUNK) == a[:CHUNK] + b + a[3 * CHUNK :]
        elif operation == "revert":
            assert store.read(0, 4 * CHUNK) == a
    left = {p.name.split(".")[0] for p in directory.iterdir()}
    assert gone not in left and "0123456789abcdef" not in left, left


@needs_fuse
def test_a_replica_whose_snapshot_chain_differs_is_not_served_but_rebuilt(
    cli: Cli, tmp_path: Path
) -> None:
    """r1's ``volume.json`` lost snapshot s1 and its files were moved aside: before, both
    replicas were served as equals, and reads spread onto r1 returned zeros where only s1
    held data. Now r1 is not served, said, and rebuilt from r2 with s1."""
    device = tmp_path / "v.dev"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(device))
    a, b = os.urandom(MIB), os.urandom(MIB)
    write_direct(device, 0, a)
    cli.run("snapshot", "create", "v", "s1")
    write_direct(device, MIB // 2, b)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    snap = _drop_snapshot(r1)
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in r1.glob(f"{snap}.*"):
        path.rename(aside / path.name)
    cli.run("volume", "attach", "v", "--device", str(device))
    expected = a[: MIB // 2] + b
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, MIB + MIB // 2) == expected
    said = "its snapshot chain (no snapshots) differs from the others' (s1)"
    assert said in cli.engine_log("v")
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 rebuilt from r2")
    sums = control.call(volumes.load(cli.root, "v").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    assert "s1" in [s["name"] for s in cli.json("snapshot", "ls", "v")]
    cli.run("volume", "detach", "v")
    chains = []
    for replica in ("r1", "r2"):
        with ChunkStore.open(r1.with_name(replica)) as store:
            chains.append(store.info()["chain"])
    assert chains[0] == chains[1] and chains[0][0] == "s1", chains


@needs_fuse
def test_a_layer_cut_while_served_is_found_by_scrub_and_repaired(cli: Cli, tmp_path: Path) -> None:
    """r1's snapshot layer is cut while the volume is attached: a scrub finds its chunks
    changed and r1 is rebuilt (it copies them whole: before, they hashed as zeros)."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    _, snap = _layer_ids(r1)
    os.truncate(r1 / f"{snap}.data", MIB // 2 + 100)
    scrub = cli.run("volume", "scrub", "v", "--json", check=False)
    assert scrub.returncode == 3, scrub.stderr
    assert json.loads(scrub.stdout)["repaired"] == ["r1"], scrub.stdout
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 rebuilt from r2")
    sums = control.call(volumes.load(cli.root, "v").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    for _ in range(4):
        assert read_direct(device, 0, MIB) == data
    cli.run("volume", "detach", "v")


def test_what_an_older_lhfs_left_of_a_removal_is_swept_as_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata written before removals were recorded (no ``removed``): the files of a layer a
    removal cut short left are deleted at the next open, as that lhfs did (refused, a replica
    upgraded then could not open); the metadata written next records removals."""
    from lhfs.store.layer import Layer

    directory = tmp_path / "r"
    a, b = _store_with_snapshot(directory)
    _, snap = _layer_ids(directory)
    with monkeypatch.context() as patch, ChunkStore.open(directory) as store:
        patch.setattr(Layer, "remove_files", lambda self: None)  # (killed before)
        store.remove_snapshot("s1")
    meta = json.loads((directory / "volume.json").read_text())
    del meta["removed"]  # (as an older lhfs wrote it)
    (directory / "volume.json").write_text(json.dumps(meta))
    assert (directory / f"{snap}.data").stat().st_size > 0
    with ChunkStore.open(directory) as store:
        assert store.read(0, 4 * CHUNK) == a[:CHUNK] + b + a[3 * CHUNK :]
        store.snapshot("s2")
    assert not (directory / f"{snap}.data").exists()
    assert json.loads((directory / "volume.json").read_text())["removed"] == []


@needs_fuse
def test_no_copy_is_set_aside_when_every_replica_is_damaged(cli: Cli, tmp_path: Path) -> None:
    """Both replicas' snapshot layers cut: neither is set aside (each was, on the word of the
    other's record as RW, and no directory was left to serve from); the attach is refused and
    both directories stay as they are."""
    device = tmp_path / "v.dev"
    _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    replicas = cli.root / "volumes" / "v" / "replicas"
    for replica in ("r1", "r2"):
        _, snap = _layer_ids(replicas / replica)
        os.truncate(replicas / replica / f"{snap}.data", 0)
    line = one_line(cli.run("volume", "attach", "v", "--device", str(device), check=False))
    assert "no replica of the volume could be started" in line, line
    assert "r1: " in line and "r2: " in line and ".data holds 0 bytes" in line, line
    assert sorted(p.name for p in replicas.iterdir()) == ["r1", "r2"]
    modes = {r["id"]: r["mode"] for r in volumes.load(cli.root, "v").config["replicas"]}
    assert modes == {"r1": "RW", "r2": "RW"}, modes


@needs_fuse
def test_a_removal_cut_short_is_finished_not_rebuilt(cli: Cli, tmp_path: Path) -> None:
    """An engine killed during ``snapshot rm`` leaves one replica without the snapshot and one
    with it, the removal recorded (``removing``): the next attach serves both (their chains
    are compared without it), and finishes the removal; neither is rebuilt."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    vol = volumes.load(cli.root, "v")
    vol.removing("s1", begun=True)
    with ChunkStore.open(cli.root / "volumes" / "v" / "replicas" / "r1") as store:
        store.remove_snapshot("s1")  # (r1 done, r2 not yet: then the kill)
    cli.run("volume", "attach", "v", "--device", str(device))
    assert cli.live("v")["state"] == "healthy"
    assert "differs from the others'" not in cli.engine_log("v")
    assert read_direct(device, 0, MIB) == data
    wait_for(lambda: not cli.json("snapshot", "ls", "v"), 30, "the removal to be finished")
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_replica_whose_layer_was_cut_and_whose_process_died_is_set_aside_and_rebuilt(
    cli: Cli, tmp_path: Path
) -> None:
    """r1's snapshot layer cut while attached, then its process killed: every start again
    failed at open (damaged layers) until the rejoin limit, the volume degraded until the
    next attach. Now its directory is set aside (``doctor`` names it, with its size) and r1
    is started anew and rebuilt from r2."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    _, snap = _layer_ids(r1)
    os.truncate(r1 / f"{snap}.data", 0)
    (pid,) = [r["pid"] for r in cli.live("v")["replicas"] if r["id"] == "r1"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: list(r1.parent.glob("r1.damaged-*")), 30, "r1's directory set aside")
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 started anew and rebuilt")
    sums = control.call(volumes.load(cli.root, "v").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    for _ in range(4):
        assert read_direct(device, 0, MIB) == data
    doctor = cli.run("doctor", "v", "--json", check=False)
    warned = [c["detail"] for c in json.loads(doctor.stdout) if c["status"] == "warn"]
    assert any("r1.damaged-" in w and "set aside" in w for w in warned), warned
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_snapshot_is_not_removed_under_a_scrub(cli: Cli, tmp_path: Path) -> None:
    """A snapshot removed while a scrub compares the snapshots failed the scrub ("no layer",
    exit 1, as if it could not scrub) and could have compared a layer coalesced on one replica
    only: ``snapshot rm`` is refused in one line while a scrub runs (housekeeping waits for
    its end), and both go through once it is done."""
    device = tmp_path / "v.dev"
    _attached_with_snapshot(cli, device)
    socket = volumes.load(cli.root, "v").control_socket
    (pid,) = [r["pid"] for r in cli.live("v")["replicas"] if r["id"] == "r2"]
    os.kill(pid, signal.SIGSTOP)  # (the scrub waits for r2's answer)
    try:
        scrub = cli.start("volume", "scrub", "v", "--json")
        wait_for(lambda: control.call(socket, "progress", task="scrub"), 10, "the scrub")
        line = one_line(cli.run("snapshot", "rm", "v", "s1", check=False))
        assert "a scrub of volume v is under way: snapshot s1 is not removed" in line, line
    finally:
        os.kill(pid, signal.SIGCONT)
    out, err = scrub.communicate(timeout=60)
    assert scrub.returncode == 0, err
    assert json.loads(out)["layers"] == ["s1"]
    cli.run("snapshot", "rm", "v", "s1")
    assert cli.json("snapshot", "ls", "v") == []
    cli.run("volume", "detach", "v")
