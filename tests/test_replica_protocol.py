"""The replica process over a real TCP connection: operations, pipelining, errors, shutdown."""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
import xxhash

from lhfs.core.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    NotInitialised,
    ProtocolError,
    PullFailed,
)
from lhfs.store.chunkstore import ChunkStore
from lhfs.store.layer import ABSENT, DATA
from lhfs.testing import raw_session
from lhfs.wire import protocol as p
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import ReplicaClient, open_replica

CHUNK = 4096
SIZE = 4 << 20
KEY = VolumeKey.new("nobody")  # a key no replica holds


def _init(directory: Path, size: int = SIZE, chunk: int = CHUNK) -> None:
    ChunkStore.create(directory, size, chunk).close()


def test_pipelined_io_snapshots_and_layer_access(tmp_path: Path, replica_factory) -> None:
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")
    rng = random.Random(1)
    model = bytearray(SIZE)

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            # 64 unaligned writes in flight at once on one connection
            writes = []
            for _ in range(64):
                offset = rng.randrange(SIZE - 10000)
                data = rng.randbytes(rng.randrange(1, 10000))
                writes.append((offset, data))
            async with trio.open_nursery() as nursery:
                for offset, data in writes:
                    nursery.start_soon(client.write, offset, data)
            # concurrent writes may land in any order: apply them in order, then rewrite all
            for offset, data in writes:
                await client.write(offset, data)
                model[offset : offset + len(data)] = data
            assert await client.read(0, SIZE) == model
            revision = await client.flush()
            assert revision >= 128

            await client.trim(CHUNK, 3 * CHUNK + 5)
            model[CHUNK : 4 * CHUNK + 5] = bytes(3 * CHUNK + 5)
            snap = await client.call("snapshot", name="first")
            assert snap["name"] == "first"
            await client.write(0, b"x" * CHUNK)
            layers = await client.call("list_layers")
            assert [layer["name"] for layer in layers] == ["first", None]
            head_id = layers[1]["id"]
            state, data = await client.read_layer_chunk(head_id, 0)
            assert (state, data) == (DATA, b"x" * CHUNK)
            state, data = await client.read_layer_chunk(head_id, 5)
            assert (state, data) == (ABSENT, b"")
            # trimmed whole chunks with nothing below them leave the layer entirely
            state, _ = await client.read_layer_chunk(layers[0]["id"], 1)
            assert state == ABSENT
            sums = await client.layer_sums(layers[0]["id"])
            assert [s[0] for s in sums] == sorted(s[0] for s in sums)
            assert 1 not in {s[0] for s in sums}
            for chunk, state, digest in sums[:20]:
                assert state == DATA
                _, data = await client.read_layer_chunk(layers[0]["id"], chunk)
                assert digest == xxhash.xxh3_128_digest(data)
            # a page: the chunks of a range that the layer holds
            held = {s[0] for s in sums}
            start = sums[3][0]
            page = await client.layer_sums(layers[0]["id"], first=start, span=3)
            assert [s[0] for s in page] == [c for c in range(start, start + 3) if c in held]
            assert page[0] == sums[3]
            await client.call("remove_snapshot", name="first")
            model[0:CHUNK] = b"x" * CHUNK
            assert await client.read(0, SIZE) == model
            assert [layer["name"] for layer in await client.call("list_layers")] == [None]

    trio.run(main)


def test_errors_are_answers_and_the_connection_survives(tmp_path: Path, replica_factory) -> None:
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            with pytest.raises(InvalidArgument, match="outside the volume"):
                await client.read(SIZE - 10, 20)
            with pytest.raises(InvalidArgument, match="outside the volume"):
                await client.write(SIZE, b"x")
            with pytest.raises(InvalidArgument, match="unknown operation"):
                await client.request(99)
            with pytest.raises(InvalidArgument, match="unknown method"):
                await client.call("format_everything")
            with pytest.raises(NotFound):
                await client.call("remove_snapshot", name="nope")
            with pytest.raises(InvalidArgument, match="snapshot name"):
                await client.call("snapshot", name="../etc")
            with pytest.raises(InvalidArgument, match="too short"):
                await client.request(p.WRITE, b"abc")
            with pytest.raises(Busy):
                await client.call("init", size=4096, chunk_size=4096)
            await client.write(0, b"still works")
            assert await client.read(0, 11) == b"still works"

    trio.run(main)


def test_protocol_violations_close_only_that_connection(tmp_path: Path, replica_factory) -> None:
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")
    host, port = replica.address.split(":")

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as good:
            await good.write(0, b"before")
            # wrong version: refused at the handshake
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(p.PREAMBLE.pack(p.MAGIC, 999))
                reply = s.recv(p.CHALLENGE.size, socket.MSG_WAITALL)
                assert p.CHALLENGE.unpack(reply)[2] == p.HS_VERSION
                assert s.recv(64) == b""
            # oversized frame after a good handshake: the connection is closed
            with raw_session(replica.address, replica.key) as s:
                s.sendall(struct.pack("<IIH", p.MAX_FRAME + 1, 1, p.WRITE))
                assert s.recv(64) == b""
            assert await good.read(0, 6) == b"before"

    trio.run(main)


def test_random_bytes_never_hurt_the_replica(tmp_path: Path, replica_factory) -> None:
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")
    host, port = replica.address.split(":")
    rng = random.Random(7)

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            await client.write(1000, b"precious data")
            await client.flush()
            before = await client.call("checksum")
            for i in range(200):
                opened = (
                    raw_session(replica.address, replica.key)
                    if i % 2
                    else socket.create_connection((host, int(port)), timeout=10)
                )
                with opened as s:
                    if i % 3 == 0:
                        # well-formed frames with garbage inside (ops not changing data)
                        op = rng.choice([p.READ, p.CALL, p.LAYER_SUMS, p.READ_LAYER_RUN, 77])
                        body = rng.randbytes(rng.randrange(0, 64))
                        s.sendall(struct.pack("<IIH", 6 + len(body), i, op) + body)
                    else:
                        s.sendall(rng.randbytes(rng.randrange(1, 4096)))
                    try:  # the replica answers with errors or closes (a reset, if unread;
                        # then even the shutdown may find the connection gone)
                        s.shutdown(socket.SHUT_WR)
                        while s.recv(65536):
                            pass
                    except OSError:  # reset, broken pipe, not connected
                        pass
            assert await client.call("checksum") == before
            assert await client.read(1000, 13) == b"precious data"
        # and a brand-new connection is still served
        async with open_replica(replica.address, replica.key) as fresh:
            assert await fresh.read(1000, 13) == b"precious data"

    trio.run(main)
    assert replica.proc.poll() is None


def test_uninitialised_replica_is_initialised_remotely(tmp_path: Path, replica_factory) -> None:
    replica = replica_factory(tmp_path / "empty")

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            assert (await client.call("hello"))["initialised"] is False
            with pytest.raises(NotInitialised):
                await client.read(0, 1)
            info = await client.call("init", size=1 << 20, chunk_size=CHUNK)
            assert info["size"] == 1 << 20
            await client.write(0, b"hello")
            assert await client.read(0, 5) == b"hello"

    trio.run(main)


def test_a_replica_pulls_layer_chunks_only_from_the_peer_named(
    tmp_path: Path, replica_factory
) -> None:
    """``pull_run`` copies chunks straight from a peer replica, which is named by address and by
    the id its layer has there: a peer that does not hold that layer (the address led somewhere
    else) or cannot be reached makes the pull fail with ``PullFailed`` and writes nothing."""
    _init(tmp_path / "source")
    source = replica_factory(tmp_path / "source")
    target = replica_factory(tmp_path / "target")
    data = random.Random(3).randbytes(8 * CHUNK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"

    async def main() -> None:
        async with (
            open_replica(source.address, source.key) as src,
            open_replica(target.address, target.key) as dst,
        ):
            await src.write(CHUNK, data)
            await src.call("snapshot", name="s")
            layer_id = (await src.call("list_layers"))[0]["id"]
            await dst.call("init", size=SIZE, chunk_size=CHUNK)
            await dst.call("rebuild_begin", names=["s"], revision=1)
            pull = {"layer": "s", "first": 0, "count": 12}
            for address, source_layer in ((source.address, "0" * 16), (nobody, layer_id)):
                with pytest.raises(PullFailed, match="cannot copy from"):
                    await dst.call("pull_run", source=address, source_layer=source_layer, **pull)
            assert (await dst.read_layer_chunk("s", 1))[0] == ABSENT
            moved = await dst.call("pull_run", source=source.address, source_layer=layer_id, **pull)
            assert moved == {"bytes": len(data)}
            for k in range(12):
                assert await dst.read_layer_chunk("s", k) == await src.read_layer_chunk("s", k)
            assert await dst.layer_sums("s") == await src.layer_sums("s")

    trio.run(main)


def test_sigterm_flushes_and_exits_cleanly(tmp_path: Path, replica_factory) -> None:
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            await client.write(123, b"written, never flushed by the client")

    trio.run(main)
    assert replica.stop() == 0
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(123, 36) == b"written, never flushed by the client"


def test_client_reports_unreachable_and_non_lhfs_peers(tmp_path: Path) -> None:
    from lhfs.core.errors import ConnectionLost

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectionLost, match="cannot reach"):
                await ReplicaClient.connect(f"127.0.0.1:{free_port}", nursery, KEY)
            with pytest.raises(InvalidArgument):
                await ReplicaClient.connect("no-port-here", nursery, KEY)
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

            async def not_lhfs(stream: trio.SocketStream) -> None:
                await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                await stream.aclose()

            nursery.start_soon(trio.serve_listeners, not_lhfs, [listener])
            port = listener.socket.getsockname()[1]
            with pytest.raises(ProtocolError):
                await ReplicaClient.connect(f"127.0.0.1:{port}", nursery, KEY)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """(request id, code, payload) of the next frame on a blocking socket."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            assert more, "connection closed"
            data += more
        return data

    length, request_id, code = p.HEADER.unpack(exactly(p.HEADER.size))
    return request_id, code, exactly(length - (p.HEADER.size - p.LENGTH.size))


def test_a_connection_that_never_runs_dry_does_not_starve_another(
    tmp_path: Path, replica_factory
) -> None:
    """A peer that keeps the replica's socket full of pipelined writes is served, and another
    connection's reads are answered all the while: a receiver that keeps finding data yields
    now and then (it does not hand control over after every read any more)."""
    _init(tmp_path / "r")
    replica = replica_factory(tmp_path / "r")
    block = bytes(range(256)) * (CHUNK // 256)
    burst = b"".join(p.frame(i, p.WRITE, p.U64.pack((i % 512) * CHUNK), block) for i in range(256))
    done = threading.Event()
    answered = [0]
    flood = raw_session(replica.address, replica.key)

    def send() -> None:
        try:
            while not done.is_set():
                flood.sendall(burst)
        except OSError:
            pass

    def count_answers() -> None:
        try:
            while data := flood.recv(1 << 16):
                answered[0] += len(data)
        except OSError:
            pass

    threads = [threading.Thread(target=f, daemon=True) for f in (send, count_answers)]
    for thread in threads:
        thread.start()

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            with trio.fail_after(60):
                while answered[0] < 20_000 * (p.HEADER.size + p.U64.size):  # 20k writes served
                    assert all(thread.is_alive() for thread in threads), "the flood stopped"
                    with trio.fail_after(10):
                        assert await client.read(2 << 20, 5) == bytes(5)

    try:
        trio.run(main)
    finally:
        done.set()
        with contextlib.suppress(OSError):
            flood.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(30)
        flood.close()


def test_io_is_answered_while_a_layer_is_hashed_or_the_volume_summed(
    tmp_path: Path, replica_factory
) -> None:
    """Checksums of a snapshot that has none recorded are computed off the event loop, and a
    whole-volume checksum a few MiB at a time: a read sent right after asking for either is
    answered first (on a large volume they take minutes; an engine would time the replica out
    if it waited)."""
    _init(tmp_path / "r", size=64 << 20)
    replica = replica_factory(tmp_path / "r")

    async def setup() -> str:
        async with open_replica(replica.address, replica.key) as client:
            rng = random.Random(3)
            for offset in range(0, 64 << 20, 8 << 20):
                await client.write(offset, rng.randbytes(8 << 20))
            await client.call("snapshot", name="big")
            return (await client.call("list_layers"))[0]["id"]

    layer = trio.run(setup)
    sums = p.SUMS_REQ.pack(0, 1 << 19, 1) + layer.encode()
    checksum = p.encode_json({"method": "checksum", "args": {}})
    for op, payload in ((p.LAYER_SUMS, sums), (p.CALL, checksum)):
        with raw_session(replica.address, replica.key) as s:
            read = p.frame(2, p.READ, p.RANGE.pack(5, 100))
            s.sendall(p.frame(1, op, payload) + read)  # one send, in this order
            first, second = _read_frame(s), _read_frame(s)
        assert (first[0], first[1]) == (2, p.OK) and len(first[2]) == 100
        assert (second[0], second[1]) == (1, p.OK)
        if op == p.LAYER_SUMS:
            assert len(second[2]) == (64 << 20) // CHUNK * p.SUM_ENTRY.size
        else:
            assert len(p.decode_json(second[2])) == 32


def test_snapshot_removal_waits_for_a_checksum_job_instead_of_refusing(
    tmp_path: Path, replica_factory
) -> None:
    """A removal that arrives while a snapshot is being hashed (a scrub or a rebuild asking)
    waits for the hash and then runs: a refusal would make the engine mark this healthy
    replica failed. Whichever of the two runs first, neither is refused as busy."""
    _init(tmp_path / "r", size=32 << 20)
    replica = replica_factory(tmp_path / "r")

    async def write() -> None:
        async with open_replica(replica.address, replica.key) as client:
            rng = random.Random(5)
            for offset in range(0, 32 << 20, 8 << 20):
                await client.write(offset, rng.randbytes(8 << 20))

    trio.run(write)
    for round_ in range(4):
        name = f"s{round_}"
        with raw_session(replica.address, replica.key) as s:
            snap = p.encode_json({"method": "snapshot", "args": {"name": name}})
            s.sendall(p.frame(1, p.CALL, snap))
            assert _read_frame(s)[:2] == (1, p.OK)
            sums = p.frame(2, p.LAYER_SUMS, p.SUMS_REQ.pack(0, 1 << 19, 1) + name.encode())
            remove = p.encode_json({"method": "remove_snapshot", "args": {"name": name}})
            s.sendall(sums + p.frame(3, p.CALL, remove))  # one send: both are under way at once
            answers = {frame[0]: frame for frame in (_read_frame(s), _read_frame(s))}
        assert answers[3][1] == p.OK, p.decode_error(answers[3][2])
        if answers[2][1] == p.OK:  # hashed before the removal
            assert len(answers[2][2]) == (32 << 20) // CHUNK * p.SUM_ENTRY.size
        else:  # removed first: the snapshot is gone
            assert isinstance(p.decode_error(answers[2][2]), NotFound)


def test_each_request_is_answered_once_when_the_peer_dies_mid_burst() -> None:
    """A replica answers one write and dies; the next burst's send fails at once (EPIPE, before
    the reader has looked at the answer already received). Every request's callback runs
    exactly once: an answer counted twice would let the engine acknowledge a write that a
    replica never got, or reuse a buffer still being sent."""

    async def main() -> list[tuple[str, str]]:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        calls: list[tuple[str, str]] = []

        def callback(name: str):  # type: ignore[no-untyped-def]
            return lambda error, _payload: calls.append((name, type(error).__name__))

        async with trio.open_nursery() as nursery:
            client = ReplicaClient(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "x")
            nursery.start_soon(client._run)
            await trio.testing.wait_all_tasks_blocked()
            client.submit(p.WRITE, (p.U64.pack(0), b"one"), callback("w1"), quick=True)
            client.push()
            peer.recv(1000)
            peer.send(p.frame(1, p.OK, p.U64.pack(1)))
            peer.close()
            client.submit(p.WRITE, (p.U64.pack(0), b"two"), callback("w2"), quick=True)
            client.push()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return calls

    calls = trio.run(main)
    assert sorted(name for name, _ in calls) == ["w1", "w2"], calls
    assert all(kind == "ConnectionLost" for _, kind in calls), calls


def test_every_task_waiting_for_the_outbox_to_drain_wakes() -> None:
    """A connection's loop and its long requests may all wait for the socket to take what is
    queued: when it does, each of them goes on (one left waiting stops the connection)."""

    async def main() -> list[str]:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        woken: list[str] = []
        out = p.Outbox(trio.socket.from_stdlib_socket(ours), lambda exc: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.drain)
            while not out._blocked:  # fill the socket until it takes no more
                out.queue.append(b"x" * 65536)
                out.push()

            async def wait(name: str) -> None:
                await out.sent()
                woken.append(name)

            for name in ("loop", "long request", "another"):
                nursery.start_soon(wait, name)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            peer.setblocking(False)
            with trio.fail_after(10):
                while len(woken) < 3:
                    with contextlib.suppress(BlockingIOError):
                        while peer.recv(1 << 20):
                            pass
                    await trio.testing.wait_all_tasks_blocked()  # (the sender refilled it)
            nursery.cancel_scope.cancel()
        return woken

    assert sorted(trio.run(main)) == ["another", "long request", "loop"]


def test_a_sealed_receiver_makes_room_for_a_large_frame_behind_a_small_one() -> None:
    """On a sealed connection the frames of a group wait for its seal, so the room to make is
    that of the frame under way, not of the group's first: a small request and then an 8 MiB
    one were received 256 KiB at a time, the pending bytes copied into a new buffer each time
    (about twenty buffers for one group, quadratic copying); now it grows to the group's size
    at once, and no more: the rest of a frame whose length is known is received in the room
    left (it grew again, sometimes twice, for the usual minimum of room beyond the group)."""
    from lhfs.wire.seal import Seal

    key = bytes(range(32))
    small = p.frame(1, p.CALL, b"{}")
    large = p.frame(2, p.WRITE, p.U64.pack(0), bytes(8 << 20))
    wire = small + large + p.seal_frame(Seal(key).tag([small + large], len(small + large)))
    ours, peer = socket.socketpair()
    # (the small frame and the large one's header are there for the first receive, as they
    # are when sent together: one that found less could not know the group's size yet)
    cut = len(small) + 64
    peer.sendall(wire[:cut])
    sender = threading.Thread(target=peer.sendall, args=(wire[cut:],))
    sender.start()
    frames = p.FrameBuffer()
    frames.opener = Seal(key)
    buffers, got = [frames.buf], []  # (held: a freed buffer's id could come back)
    try:
        while not got:
            assert frames.recv_from(ours)
            if frames.buf is not buffers[-1]:
                buffers.append(frames.buf)
            got = [(request_id, len(payload)) for request_id, _, payload in frames.frames()]
    finally:
        sender.join()
        ours.close()
        peer.close()
        frames.release()
    assert got == [(1, 2), (2, 8 + (8 << 20))]
    assert len(buffers) <= 2, len(buffers)


def test_a_task_waiting_for_a_tls_outbox_to_empty_wakes_when_it_has() -> None:
    """``sent()`` on the outbox of a TLS connection returns once everything queued has left,
    even when more is pushed while it waits and a send is under way (a push used to swap the
    event it waited on for a new one, and it slept for ever: a rebuild over TLS hung at 99%)."""

    async def main() -> None:
        sender, receiver = trio.testing.lockstep_stream_pair()  # (a send waits for a reader)
        out = p.StreamOutbox(sender, on_error=lambda exc: None)
        woke = trio.Event()

        async def waiter() -> None:
            await out.sent()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.drain)
            out.add([b"a" * 10])
            out.push()
            await trio.testing.wait_all_tasks_blocked()  # (the drain task is in its send)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            out.add([b"b" * 10])
            out.push()
            got = b""
            with trio.fail_after(5):
                while len(got) < 20:
                    got += await receiver.receive_some()
                await woke.wait()
            assert got == b"a" * 10 + b"b" * 10 and not out.queue
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_replica_on_an_ipv6_address_says_it_as_an_address_is_given(
    tmp_path: Path, key_file: Path
) -> None:
    """``replica serve`` on an IPv6 address says where it serves as ``--address`` takes it,
    its host in brackets (``[::1]:PORT``; it said ``::1:PORT``), and it is reached by that."""
    from lhfs.replica.process import ReplicaProcess

    _init(tmp_path / "r")
    replica = ReplicaProcess(tmp_path / "r", key_file, host="::1")
    try:
        assert re.fullmatch(r"\[::1\]:\d+", replica.address), replica.address

        async def main() -> None:
            async with open_replica(replica.address, replica.key) as client:
                assert (await client.info())["size"] == SIZE

        trio.run(main)
    finally:
        replica.stop()
