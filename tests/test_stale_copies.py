"""A replica directory brought back older than it was, or without what names it, never costs
acknowledged writes and never leaves a volume unattachable by itself: an older copy of a
replica recorded healthy never serves (the revision each replica last flushed is recorded,
not only a faulted volume's), a local replica whose ``id`` file was lost is still known by its
path, a volume whose key file is missing is refused rather than given a new identity, and a
configuration without ``next_replica`` still adds replicas."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio
from conftest import needs_fuse
from test_freshest import port_of, recorded

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.engine.engine import Engine, Faulted, Recorded
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, kill_engine, one_line, read_direct, remote_volume, write_direct

MIB = 1 << 20
BLOCK = 4096


def flushed(cli: Cli, name: str) -> dict[str, int | None]:
    return {r["id"]: r.get("flushed") for r in recorded(cli, name)["replicas"]}


def same_replicas(cli: Cli, name: str) -> None:
    """Every replica of the attached volume holds the same content."""
    sums = control.call(volumes.load(cli.root, name).control_socket, "replica_checksums")
    assert len(set(sums.values())) == 1, sums


@needs_fuse
def test_an_older_copy_of_a_replica_never_serves_while_the_freshest_is_away(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """r2 on host A, r3 on host B; B's directory is copied after a clean detach, D2 written
    after. With A down and B back on the old copy, the attach is refused in one line naming
    both (before: B's copy served D1, exit 0, and A was later rebuilt from it: D2 lost for
    good). With A back, D2 serves and the old copy is rebuilt from r2."""
    key, (a, b) = remote_volume(cli, tmp_path, serve, "v", 2)
    device = tmp_path / "v.dev"
    write_direct(device, 0, os.urandom(MIB))
    cli.run("volume", "detach", "v")
    first = flushed(cli, "v")
    assert first["r2"] == first["r3"] and first["r2"] > 0, first  # (recorded at the detach)
    old = tmp_path / "b-old"
    assert b.stop() == 0
    shutil.copytree(b.dir, old)  # (the same identity: a host rolled back)
    b = serve(b.dir, key, port_of(b))
    cli.run("volume", "attach", "v", "--device", str(device))
    d2 = os.urandom(MIB)
    write_direct(device, MIB, d2)
    cli.run("volume", "detach", "v")
    assert flushed(cli, "v")["r3"] > first["r3"]
    port_a, port_b = port_of(a), port_of(b)
    assert a.stop() == 0 and b.stop() == 0
    copy = serve(old, key, port_b)
    before = recorded(cli, "v")
    line = one_line(cli.run("volume", "attach", "v", "--device", str(device), check=False))
    assert "r2 (recorded healthy) cannot be reached" in line, line
    older = "r3 (recorded healthy) answers at its address with an older copy of its directory"
    assert older in line and f"below the {before['replicas'][1]['flushed']}" in line, line
    assert recorded(cli, "v")["replicas"] == before["replicas"]  # (its epoch moved only)
    assert cli.info("v")["attached"] is False
    serve(a.dir, key, port_a)  # A is back: it serves, and the old copy is rebuilt from it
    cli.run("volume", "attach", "v", "--device", str(device))
    assert read_direct(device, MIB, MIB) == d2
    wait_for(lambda: cli.live("v")["state"] == "healthy", 60, "r3 rebuilt from r2")
    same_replicas(cli, "v")
    cli.run("volume", "detach", "v")
    assert copy.stop() == 0


@needs_fuse
def test_giving_up_the_freshest_replica_accepts_an_older_copy(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """The freshest replica lost for good and the other back on an older copy: the attach is
    refused until the operator gives the lost one up (``replica rm --accept-loss``) and
    accepts the older copy by name (``replica accept``): giving up one replica never makes
    another's older copy serve. Then it serves, as it is (its newer writes are the loss
    accepted)."""
    key, (a, b) = remote_volume(cli, tmp_path, serve, "g", 2)
    device = tmp_path / "g.dev"
    d1 = os.urandom(MIB)
    write_direct(device, 0, d1)
    cli.run("volume", "detach", "g")
    port_b = port_of(b)
    assert b.stop() == 0
    old = tmp_path / "b-old"
    shutil.copytree(b.dir, old)
    b = serve(b.dir, key, port_b)
    cli.run("volume", "attach", "g", "--device", str(device))
    write_direct(device, 0, os.urandom(MIB))
    cli.run("volume", "detach", "g")
    assert a.stop() == 0 and b.stop() == 0  # (host A lost for good)
    serve(old, key, port_b)
    line = one_line(cli.run("volume", "attach", "g", "--device", str(device), check=False))
    assert "r3 (recorded healthy) answers at its address with an older copy" in line, line
    cli.run("replica", "rm", "g", "r2", "--accept-loss")
    line = one_line(cli.run("volume", "attach", "g", "--device", str(device), check=False))
    assert "r3 (recorded healthy) answers at its address with an older copy" in line, line
    assert line.endswith(
        "(if that is lost for good, 'lhfs replica accept g r3' serves the older copy as it "
        "is, losing the writes after it)"
    ), line
    accepted = cli.json("replica", "accept", "g", "r3")
    assert accepted["accepted"] and accepted["recorded"] > 0, accepted
    again = one_line(cli.run("replica", "accept", "g", "r3", check=False))
    assert again.endswith("there is nothing to accept"), again
    cli.run("volume", "attach", "g", "--device", str(device))
    assert read_direct(device, 0, MIB) == d1
    refused = one_line(cli.run("replica", "accept", "g", "r3", check=False))
    assert "volume g is attached" in refused, refused
    cli.run("volume", "detach", "g")
    log = (cli.root / "volumes" / "g" / "engine.log").read_text()
    assert "replica r3 accepted as it is, below revision" in log


@needs_fuse
def test_a_single_replica_back_on_an_older_copy_is_refused(cli: Cli, tmp_path: Path, serve) -> None:
    """One remote replica, a clean detach, its host back on an older copy of its directory:
    refused (before: served, the newer writes silently gone); ``replica rm --accept-loss``
    of the only replica says what to do instead; its own directory back, it serves."""
    key, (far,) = remote_volume(cli, tmp_path, serve, "s", 1)
    device = tmp_path / "s.dev"
    write_direct(device, 0, os.urandom(MIB))
    cli.run("volume", "detach", "s")
    port = port_of(far)
    assert far.stop() == 0
    old = tmp_path / "old"
    shutil.copytree(far.dir, old)
    far = serve(far.dir, key, port)
    cli.run("volume", "attach", "s", "--device", str(device))
    data = os.urandom(MIB)
    write_direct(device, 0, data)
    cli.run("volume", "detach", "s")
    assert far.stop() == 0
    copy = serve(old, key, port)
    line = one_line(cli.run("volume", "attach", "s", "--device", str(device), check=False))
    assert "r2 (recorded healthy) answers at its address with an older copy" in line, line
    refused = one_line(cli.run("replica", "rm", "s", "r2", "--accept-loss", check=False))
    assert "r2 is the only replica of s" in refused and "volume rm s" in refused, refused
    assert "bring its own directory back" in refused, refused
    assert "'lhfs replica accept s r2' serves that copy as it is" in refused, refused
    assert [r["id"] for r in recorded(cli, "s")["replicas"]] == ["r2"]
    assert copy.stop() == 0
    serve(far.dir, key, port)
    cli.run("volume", "attach", "s", "--device", str(device))
    assert read_direct(device, 0, MIB) == data
    cli.run("volume", "detach", "s")


@needs_fuse
def test_an_older_copy_is_refused_after_the_engine_was_killed(
    cli: Cli, tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No clean detach: the revisions the replicas reach are recorded while the volume is
    written (not per write; here every second, not every 15 s), so after a kill -9 of the
    engine an older copy of the only replica's directory is still refused."""
    monkeypatch.setenv("LHFS_DISKS_EVERY", "1")
    key, (far,) = remote_volume(cli, tmp_path, serve, "k", 1)
    device = tmp_path / "k.dev"
    cli.run("volume", "detach", "k")
    port = port_of(far)
    assert far.stop() == 0
    old = tmp_path / "old"
    shutil.copytree(far.dir, old)
    far = serve(far.dir, key, port)
    cli.run("volume", "attach", "k", "--device", str(device))
    at_attach = flushed(cli, "k")["r2"]
    write_direct(device, 0, os.urandom(MIB))
    wait_for(lambda: flushed(cli, "k")["r2"] > at_attach, 40, "the new revision recorded")
    kill_engine(cli, "k")
    assert far.stop() == 0
    copy = serve(old, key, port)
    line = one_line(cli.run("volume", "attach", "k", "--device", str(device), check=False))
    assert "r2 (recorded healthy) answers at its address with an older copy" in line, line
    assert copy.stop() == 0


def test_the_engine_serves_no_replica_below_its_recorded_revision(
    tmp_path: Path, replica_factory
) -> None:
    """The engine's own choice: a trusted replica below the revision recorded for it is never
    served (not even as the only one that answers) and is kept connected, to be rebuilt, when
    another trusted one holds its recorded revision."""
    size = 4 * MIB
    for name in ("old", "new"):
        ChunkStore.create(tmp_path / name, size, BLOCK).close()
        with ChunkStore.open(tmp_path / name) as store:
            for n in range(3 if name == "old" else 6):
                store.write(0, bytes([n + 1]) * BLOCK)
            store.flush()
    old, new = replica_factory(tmp_path / "old"), replica_factory(tmp_path / "new")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            alone = Engine(size, BLOCK, nursery, old.key, io_timeout=5)
            with pytest.raises(Faulted, match=r"older copy of its directory \(revision 3, below"):
                await alone.attach([Recorded("r1", old.address, trusted=True, synced=6)])
            await alone.close()
            engine = Engine(size, BLOCK, nursery, old.key, io_timeout=5)
            await engine.attach(
                [
                    Recorded("r1", old.address, trusted=True, synced=6),
                    Recorded("r2", new.address, trusted=True, synced=6),
                ]
            )
            first, second = engine.replicas
            assert (first.mode, second.mode) == ("ERR", "RW")
            assert first.client is not None and "older copy" in (first.error or "")
            assert await engine.read(0, BLOCK) == bytes([6]) * BLOCK
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


@needs_fuse
def test_a_local_replica_whose_id_file_is_lost_still_serves(cli: Cli, tmp_path: Path) -> None:
    """A single local replica whose ``id`` is damaged, then missing: the attach serves it
    (before: "answers at its address with another replica's directory" for ever, the volume
    unattachable), adopting the new identity, said in the log. An older copy put in its place
    without an id is still refused as one."""
    cli.run("volume", "create", "l", "--size", "8M", "--replicas", "1")
    device = tmp_path / "l.dev"
    directory = cli.root / "volumes" / "l" / "replicas" / "r1"
    cli.run("volume", "attach", "l", "--device", str(device))
    write_direct(device, 0, os.urandom(MIB))
    cli.run("volume", "detach", "l")
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    cli.run("volume", "attach", "l", "--device", str(device))
    data = os.urandom(MIB)
    write_direct(device, 0, data)
    cli.run("volume", "detach", "l")
    for damage in ("garbage", None):
        uid = recorded(cli, "l")["replicas"][0]["uid"]
        if damage is None:
            (directory / "id").unlink()
        else:
            (directory / "id").write_text(damage)
        cli.run("volume", "attach", "l", "--device", str(device))
        assert read_direct(device, 0, MIB) == data
        cli.run("volume", "detach", "l")
        now = recorded(cli, "l")["replicas"][0]["uid"]
        assert now != uid and now == (directory / "id").read_text().strip()
        assert f"has a new identity {now} (was {uid}" in cli.engine_log("l")
    shutil.rmtree(directory)
    shutil.copytree(old, directory)
    (directory / "id").unlink()
    line = one_line(cli.run("volume", "attach", "l", "--device", str(device), check=False))
    assert "r1 (recorded healthy) answers at its address with an older copy" in line, line
    assert cli.info("l")["attached"] is False


@needs_fuse
def test_a_missing_key_file_is_refused_not_made_again(cli: Cli, tmp_path: Path) -> None:
    """``key.json`` lost from a volume that has an identity: attach and ``volume key`` are
    refused in one line saying how to get it back, and nothing changes (before: a new key
    was made and ``volume_id`` rewritten, every replica then refused the volume for good).
    The key restored, the volume attaches."""
    cli.run("volume", "create", "k", "--size", "8M", "--replicas", "2")
    directory = cli.root / "volumes" / "k"
    saved = tmp_path / "key.saved"
    shutil.move(directory / "key.json", saved)
    before = (directory / "config.json").read_bytes()
    device = tmp_path / "k.dev"
    for args in (
        ("volume", "attach", "k", "--device", str(device)),
        ("volume", "key", "k", "--out", str(tmp_path / "k.key")),
    ):
        line = one_line(cli.run(*args, check=False))
        assert "key.json is missing" in line and "restore key.json" in line, line
        assert not (directory / "key.json").exists()
        assert (directory / "config.json").read_bytes() == before
    doctor = cli.run("doctor", "k", "--json", check=False)  # (said as a check, not an abort)
    assert doctor.returncode == 1, doctor.stderr
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert checks["key"]["status"] == "fail" and "restore key.json" in checks["key"]["detail"]
    assert not (directory / "key.json").exists()
    shutil.move(saved, directory / "key.json")
    cli.run("volume", "attach", "k", "--device", str(device))
    assert cli.live("k")["state"] == "healthy"
    cli.run("volume", "detach", "k")


@needs_fuse
def test_a_configuration_without_next_replica_still_adds_replicas(cli: Cli, tmp_path: Path) -> None:
    """``next_replica`` missing (written by hand): the next replica is numbered above every
    one there is (before: "internal error: 'next_replica'"). A remote replica without an
    address is refused in one line naming the field."""
    cli.run("volume", "create", "n", "--size", "8M", "--replicas", "2")
    path = cli.root / "volumes" / "n" / "config.json"
    config = json.loads(path.read_text())
    del config["next_replica"]
    path.write_text(json.dumps(config))
    device = tmp_path / "n.dev"
    cli.run("volume", "attach", "n", "--device", str(device))
    added = cli.run("replica", "add", "n").stdout.split()[2]
    assert added == "r3", added
    assert recorded(cli, "n")["next_replica"] == 4
    cli.run("volume", "detach", "n")
    config = json.loads(path.read_text())
    config["replicas"].append({"id": "r9", "local": False, "mode": "ERR"})
    path.write_text(json.dumps(config))
    line = one_line(cli.run("volume", "info", "n", check=False))
    assert "replicas[3].address must be" in line, line


@needs_fuse
def test_an_empty_directory_at_a_replicas_address_is_said_plainly(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """An empty replica directory served at the only replica's address: the attach is refused
    saying what that means, not "holds no volume yet (call init)"."""
    key, (far,) = remote_volume(cli, tmp_path, serve, "e", 1)
    cli.run("volume", "detach", "e")
    port = port_of(far)
    assert far.stop() == 0
    empty = serve(tmp_path / "empty", key, port)
    device = tmp_path / "e.dev"
    line = one_line(cli.run("volume", "attach", "e", "--device", str(device), check=False))
    assert "call init" not in line, line
    assert "r2 (recorded healthy) answers at its address with an empty replica directory" in line
    assert "serve the replica's own directory there" in line, line
    assert empty.stop() == 0
    serve(far.dir, key, port)
    cli.run("volume", "attach", "e", "--device", str(device))
    cli.run("volume", "detach", "e")


def test_a_replica_number_of_another_script_is_no_traceback(tmp_path: Path) -> None:
    """``next_replica`` derived from the replicas there are: a name such as ``r²`` (a digit
    to ``str.isdigit`` that ``int`` refuses) is no replica number, not a traceback."""
    (tmp_path / "replicas" / "r\u00b2").mkdir(parents=True)
    (tmp_path / "replicas" / "r7").mkdir()
    config = {"replicas": [{"id": "r2", "local": True}]}
    assert volumes._next_replica(config["replicas"], tmp_path / "replicas") == 8
