"""Fencing: a write sent to a replica before it was cut off never lands after it rejoined, an
engine whose session was superseded changes nothing, and a replica's epoch survives a kill."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from conftest import needs_fuse

from lhfs.core.errors import Fenced, LhfsError
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.engine.engine import Engine
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, raw_session, write_direct
from lhfs.wire import protocol as p
from lhfs.wire.client import parse_address
from tools.faultproxy import FaultProxy

MIB = 1 << 20
BLOCK = 4096


@needs_fuse
def test_writes_held_on_the_way_never_land_after_the_replica_rejoined(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    cli.run("volume", "create", "f", "--size", "16M", "--replicas", "2", "--io-timeout", "2")
    device = tmp_path / "f.dev"
    cli.run("volume", "attach", "f", "--device", str(device))
    write_direct(device, 0, os.urandom(4 * MIB))
    remote, proxy, address = proxied_replica("f")
    far = cli.run("replica", "add", "f", "--address", address).stdout.split()[2]
    # the link to the remote replica stops delivering: a write sits in its send queue,
    # the replica leaves it unanswered and is marked ERR after the I/O timeout
    proxy.hold()
    offset = 3 * MIB
    write_direct(device, offset, b"A" * BLOCK)  # (completes on the other two)
    assert cli.replica("f", far)["mode"] == "ERR"
    write_direct(device, offset, b"B" * BLOCK)  # newer data, while the replica is away
    cli.run("replica", "rm", "f", far)
    again = cli.run("replica", "add", "f", "--address", address).stdout.split()[2]
    assert cli.replica("f", again)["mode"] == "RW"
    proxy.release()  # the link comes back: what was queued is delivered, late
    wait_for(lambda: proxy.delivered + proxy.undelivered > 0, 30, "the held bytes")
    wait_for(lambda: "fenced" in remote.log.read_text(), 30, "the replica to say so")
    sums = control.call(volumes_socket(cli, "f"), "replica_checksums")
    assert len(sums) == 3 and len(set(sums.values())) == 1, sums
    with open(device, "rb") as f:
        f.seek(offset)
        assert f.read(BLOCK) == b"B" * BLOCK
    info = cli.info("f")
    assert info["state"] == "healthy", info
    cli.run("volume", "detach", "f")


def volumes_socket(cli: Cli, name: str) -> Path:
    from lhfs.config import volume as volumes

    return volumes.load(cli.root, name).control_socket


def test_an_engine_whose_session_was_superseded_cannot_change_a_replica(
    tmp_path: Path, replica_factory
) -> None:
    """Two engines reach one replica: the one attached last wins it; the other's connection
    is reset, its volume faults rather than writing, and it cannot come back on its own."""
    size = 4 * MIB
    ChunkStore.create(tmp_path / "r", size, BLOCK).close()
    replica = replica_factory(tmp_path / "r")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            old = Engine(size, BLOCK, nursery, replica.key, io_timeout=5)
            await old.attach([("r0", replica.address, False)])
            await old.write(0, b"o" * BLOCK)
            new = Engine(size, BLOCK, nursery, replica.key, io_timeout=5)
            await new.attach([("r0", replica.address, False)])
            assert new.epoch > old.epoch
            await new.write(0, b"n" * BLOCK)
            with pytest.raises(LhfsError):
                await old.write(0, b"X" * BLOCK)  # its session was reset: it faults
            assert old.state == "faulted"
            with pytest.raises(Fenced, match="taken over by another engine"):
                await old.connect(replica.address)  # and is refused when it tries again
            assert await new.read(0, BLOCK) == b"n" * BLOCK
            await new.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert replica.stop() == 0
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(0, BLOCK) == b"n" * BLOCK


def test_an_engine_cut_off_and_back_never_takes_the_replicas_from_the_one_attached_since(
    tmp_path: Path, replica_factory
) -> None:
    """Engine A reaches its replica through a link that is cut; while A tries to reach it
    again and again, engine B attaches the volume and writes. The link back, A's next attempt
    is refused as another engine's: A stays faulted and B's acknowledged write stays (A's
    attempts raised its epoch above B's, and its reconnection took the replica back from B,
    its writes landing over B's)."""
    size = 4 * MIB
    ChunkStore.create(tmp_path / "r", size, BLOCK).close()
    replica = replica_factory(tmp_path / "r")
    link = FaultProxy(parse_address(replica.address))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            old = Engine(size, BLOCK, nursery, replica.key, io_timeout=2)
            through = f"127.0.0.1:{link.port}"
            await old.attach([("r0", through, False)])
            await old.write(0, b"o" * BLOCK)
            link.cut()
            with pytest.raises(LhfsError):
                await old.write(0, b"X" * BLOCK)
            for _ in range(8):  # (a long cut: attempt after attempt)
                with pytest.raises(LhfsError):
                    await old.connect(through)
            new = Engine(size, BLOCK, nursery, replica.key, io_timeout=2)
            await new.attach([("r0", replica.address, False)])
            await new.write(0, b"n" * BLOCK)
            link.resume()
            with pytest.raises(Fenced, match="taken over by another engine"):
                await old.connect(through)
            await new.write(BLOCK, b"m" * BLOCK)  # (still its replica)
            assert await new.read(0, 2 * BLOCK) == b"n" * BLOCK + b"m" * BLOCK
            await new.close()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        link.close()
    assert replica.stop() == 0
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(0, 2 * BLOCK) == b"n" * BLOCK + b"m" * BLOCK


def test_a_replica_of_this_engine_answering_at_another_ones_address_is_not_another_engine(
    tmp_path: Path, key_file: Path
) -> None:
    """Two replicas trade addresses (local replicas started again on each other's old port, a
    replica moved): the epoch the engine last held at that address is below the one it holds
    at the replica answering there now, which refuses it as older. That replica says it is in
    this engine's session: the engine reconnects in that epoch, not taking itself for
    superseded (it stopped serving the volume at all)."""
    from lhfs.replica.process import ReplicaProcess

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    procs = []
    for i, port in enumerate(ports):
        ChunkStore.create(tmp_path / f"r{i}", MIB, BLOCK).close()
        procs.append(ReplicaProcess(tmp_path / f"r{i}", key_file, port=port))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(MIB, BLOCK, nursery, procs[0].key, io_timeout=5)
            await engine.attach([(f"r{i}", proc.address, False) for i, proc in enumerate(procs)])
            first, second = (engine.granted[proc.address] for proc in procs)
            assert first < second
            for proc in procs:
                assert proc.stop() == 0
            procs.append(ReplicaProcess(tmp_path / "r1", key_file, port=ports[0]))
            client = await engine.connect(procs[-1].address)
            assert client.epoch == second and engine.superseded is None
            await client.aclose()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for proc in procs:
            proc.stop()


def test_a_replicas_epoch_survives_a_kill(tmp_path: Path, replica_factory) -> None:
    ChunkStore.create(tmp_path / "r", MIB, BLOCK).close()
    replica = replica_factory(tmp_path / "r")
    owner = b"engine-1"
    raw_session(replica.address, replica.key, epoch=7, owner=owner).close()
    replica.kill()
    again = replica_factory(tmp_path / "r")
    for epoch, who in ((6, owner), (7, b"engine-2"), (0, p.NO_OWNER)):
        with pytest.raises(Fenced):
            raw_session(again.address, again.key, epoch=epoch, owner=who).close()
    with raw_session(again.address, again.key, epoch=7, owner=owner) as s:  # the same session
        s.sendall(p.frame(1, p.WRITE, p.U64.pack(0), b"z" * BLOCK))
        _, request_id, status = p.HEADER.unpack(s.recv(p.HEADER.size, socket.MSG_WAITALL))
        assert (request_id, status) == (1, p.OK)
    assert "refused an engine session of epoch 6" in again.log.read_text()


def test_a_session_refused_as_older_says_the_epochs_that_decided(
    tmp_path: Path, replica_factory
) -> None:
    """A replica another engine holds refuses an older engine session, saying which epochs
    decided: the replica's, and the one asked for, as they are (both were once shown as the
    same number when another engine held that very epoch, with nothing saying why that was
    refused)."""
    ChunkStore.create(tmp_path / "r", MIB, BLOCK).close()
    replica = replica_factory(tmp_path / "r")
    raw_session(replica.address, replica.key, epoch=7, owner=b"engine-1").close()
    for epoch, said in (
        (6, "in session epoch 7; this one asked for epoch 6, an older one"),
        (7, "in session epoch 7, the epoch this one asked for too"),
    ):
        with pytest.raises(Fenced) as refused:
            raw_session(replica.address, replica.key, epoch=epoch, owner=b"engine-2").close()
        assert str(refused.value) == (
            f"replica {replica.address} was taken over by another engine ({said}): "
            "this one may not change it"
        )


@needs_fuse
def test_a_replica_away_across_attaches_finds_the_engine_newer(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """Every session's epoch is kept before it is asked for, failed ones too: a remote replica
    that recorded the epoch of a ``replica add`` (after failed adds had raised it) and is away
    at the next attach rejoins that attach's engine when it is back, instead of refusing it
    as another engine's and faulting a healthy volume (before: the epoch was kept at attach
    only)."""
    from lhfs.replica.process import ReplicaProcess

    cli.run("volume", "create", "e", "--size", "16M", "--replicas", "1", "--rejoin-wait", "1")
    device = tmp_path / "e.dev"
    cli.run("volume", "attach", "e", "--device", str(device))
    key = tmp_path / "e.key"
    cli.run("volume", "key", "e", "--out", str(key))
    odd = tmp_path / "odd"  # (of another chunk size: each add is refused, taking an epoch)
    cli.run("replica", "init", "--dir", str(odd), "--size", "16M", "--chunk-size", "128K",
            "--key-file", str(key))  # fmt: skip
    odd_address = replica_factory(odd, key).address
    for _ in range(8):
        refused = cli.run("replica", "add", "e", "--address", odd_address, check=False)
        assert "chunk size" in refused.stderr, refused.stderr
    remote = replica_factory(tmp_path / "remote", key)
    cli.run("replica", "add", "e", "--address", remote.address)
    cli.run("volume", "detach", "e")
    port = int(remote.address.rsplit(":", 1)[1])
    assert remote.stop() == 0
    cli.run("volume", "attach", "e", "--device", str(device))
    again = ReplicaProcess(tmp_path / "remote", key, port=port)  # its host is back
    try:
        wait_for(lambda: cli.live("e")["state"] == "healthy", 60, "the remote replica back")
        assert "took the volume over" not in cli.engine_log("e")
        write_direct(device, 0, b"x" * BLOCK)
        cli.run("volume", "detach", "e")
    finally:
        again.stop()
