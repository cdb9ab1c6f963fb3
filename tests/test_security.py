"""The trust boundary: strangers read and write nothing, a replica belongs to one volume, hostile
frames cost the replica nothing lasting, state is private and secrets stay where needed."""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (a child dropped to uid 65534 cannot import it later)
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.errors import LhfsError
from lhfs.core.procs import LHFS, wait_for
from lhfs.engine import control
from lhfs.replica.server import FRAME_TIMEOUT
from lhfs.testing import Cli, RawSession, make_tls, raw_session, write_direct
from lhfs.wire import protocol as p
from lhfs.wire import tls
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import ReplicaClient, open_replica, parse_address
from tools.faultproxy import FaultProxy

NOBODY = 65534
MIB = 1 << 20


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that dropped to uid and gid 65534; its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = {"result": fn()}
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while data := os.read(read_end, 65536):
        chunks.append(data)
    os.close(read_end)
    os.waitpid(pid, 0)
    outcome = json.loads(b"".join(chunks))
    assert "error" not in outcome, outcome
    return outcome["result"]


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


def stranger(connect: Callable[[], socket.socket], volume_id: bytes | None) -> dict[str, Any]:
    """What someone without the key gets from a replica: the volume id it announces, how it
    answers a made-up proof, and whether a frame sent anyway is answered (it must not be)."""
    out: dict[str, Any] = {}
    with connect() as s:
        s.settimeout(10)
        try:
            hello = p.HELLO.pack(p.MAGIC, p.VERSION, volume_id or os.urandom(16), os.urandom(32))
            s.sendall(hello)
            challenge = _exactly(s, p.CHALLENGE.size)
        except OSError:  # reset: turned away before a word
            challenge = b""
        if len(challenge) < p.CHALLENGE.size:
            return {"challenge": None}
        status, announced = p.CHALLENGE.unpack(challenge)[2:4]
        out.update(challenge=status, announced=announced.hex())
        if status != p.HS_OK:
            return out
        s.sendall(p.AUTH.pack(os.urandom(32), p.ENGINE, 1 << 40, p.NO_OWNER))
        welcome = _exactly(s, 1)
        out["welcome"] = welcome[0] if welcome else None
        frames = [
            p.frame(1, p.READ, p.RANGE.pack(0, 4096)),
            p.frame(2, p.WRITE, p.U64.pack(0), b"\xee" * 4096),
            p.frame(3, p.CALL, p.encode_json({"method": "rebuild_begin", "args": {"names": []}})),
            p.frame(4, p.CALL, p.encode_json({"method": "expand", "args": {"size": 1 << 40}})),
            p.frame(5, p.CALL, p.encode_json({"method": "init", "args": {"size": 1 << 20}})),
        ]
        try:
            s.sendall(b"".join(frames))
            out["answered"] = s.recv(65536)  # b"" (closed) or nothing at all
        except OSError as exc:  # reset: nothing was answered
            out["answered"] = type(exc).__name__
        out["answered"] = (
            out["answered"] if isinstance(out["answered"], str) else len(out["answered"])
        )
    return out


def tcp(address: str) -> Callable[[], socket.socket]:
    host, port = address.rsplit(":", 1)
    return lambda: socket.create_connection((host, int(port)), timeout=10)


def local(name: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + name)
        return sock

    return connect


def local_names(engine_pid: int) -> list[str]:
    """The abstract Unix sockets the replicas of an engine listen on."""
    with open("/proc/net/unix") as f:
        names = {line.split()[-1][1:] for line in f if f"@lhfs-{engine_pid}-" in line}
    return sorted(names)


def replica_addresses(cli: Cli, name: str) -> list[str]:
    return [r["address"] for r in cli.info(name)["replicas"]]


@needs_fuse
def test_strangers_read_nothing_and_a_replica_serves_one_volume(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    cli.run("volume", "create", "a1", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "a1", "--device", str(tmp_path / "a1.dev"))
    with open(tmp_path / "a1.dev", "r+b") as dev:
        dev.write(random.Random(1).randbytes(4 * MIB))
        os.fsync(dev.fileno())
    key_file = tmp_path / "a1.key"
    cli.run("volume", "key", "a1", "--out", str(key_file))
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    remote = replica_factory(tmp_path / "remote", key_file)
    cli.run("replica", "add", "a1", "--address", remote.address)
    before = cli.checksum("a1")
    vol = volumes.load(cli.root, "a1")
    volume_id = bytes.fromhex(vol.config["volume_id"])
    epoch_file = tmp_path / "remote" / "epoch"
    epoch_before = epoch_file.read_text()
    engine_pid = cli.engine_pid("a1")
    assert engine_pid is not None
    sockets = local_names(engine_pid)
    assert len(sockets) == 1, sockets
    data_file = next((vol.dir / "replicas" / "r1").glob("*.data"))

    def attempts() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for what, path in (("key", vol.key_path), ("data", data_file), ("config", vol.dir)):
            try:
                (open(path, "rb").read(16) if path.is_file() else os.listdir(path))  # noqa: SIM115
                out[what] = "read"
            except PermissionError:
                out[what] = "denied"
        out["tcp_unknown_id"] = stranger(tcp(remote.address), None)
        out["tcp"] = stranger(tcp(remote.address), volume_id)
        out["local"] = stranger(local(sockets[0]), volume_id)
        return out

    seen = as_nobody(attempts)
    assert (seen["key"], seen["data"], seen["config"]) == ("denied", "denied", "denied"), seen
    # the id is public (it names the volume, as a replica directory does); the secret is not
    assert seen["tcp_unknown_id"] == {
        "challenge": p.HS_WRONG_VOLUME,
        "announced": volume_id.hex(),
    }
    assert seen["tcp"]["challenge"] == p.HS_OK and seen["tcp"]["welcome"] == p.HS_DENIED, seen
    assert seen["tcp"]["answered"] in (0, "ConnectionResetError", "BrokenPipeError"), seen
    assert seen["local"] == {"challenge": None}, seen  # another user: closed before any word

    # root without the secret fares no better: a made-up key, the right volume id
    forged = VolumeKey("a1", volume_id, os.urandom(32))
    for address in [remote.address, *replica_addresses(cli, "a1")]:
        if address:
            outcome = stranger(tcp(address), volume_id)
            assert outcome["welcome"] == p.HS_DENIED and outcome["answered"] in (
                0,
                "ConnectionResetError",
                "BrokenPipeError",
            ), outcome

    async def forged_client() -> str:
        async with trio.open_nursery() as nursery:
            try:
                client = await ReplicaClient.connect(remote.address, nursery, forged)
            except LhfsError as exc:
                return type(exc).__name__
            await client.aclose()
            return "connected"

    assert trio.run(forged_client) == "AuthenticationFailed"
    assert epoch_file.read_text() == epoch_before  # the made-up epoch 2**40 was not recorded

    # a mistyped address: another volume's replica is refused and left alone
    cli.run("volume", "create", "a2", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "a2", "--device", str(tmp_path / "a2.dev"))
    taken = cli.run("replica", "add", "a2", "--address", remote.address, check=False)
    assert taken.returncode == 1, taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1, taken.stderr
    assert "serves a replica of volume a1, not of a2" in taken.stderr
    assert [r["id"] for r in cli.info("a2")["replicas"]] == ["r1"]
    info = cli.info("a1")
    assert info["state"] == "healthy", info
    assert cli.checksum("a1") == before
    sums = cli.json("volume", "scrub", "a1")
    assert sums["damaged"] == {}, sums
    cli.run("volume", "detach", "a1")
    cli.run("volume", "detach", "a2")


@needs_fuse
def test_state_is_private_and_secrets_stay_with_the_store_clients(tmp_path: Path) -> None:
    """Under umask 022 every file and directory under a root is its owner's only; an engine and
    its replicas are started without the S3 secret the attaching shell holds."""
    root = tmp_path / "root"
    cli = Cli(root, env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-for-the-store-only"})
    old = os.umask(0o022)
    try:
        cli.run("volume", "create", "v", "--size", "16M", "--replicas", "2")
        image = tmp_path / "image.raw"
        image.write_bytes(random.Random(2).randbytes(MIB))
        cli.run("backing-image", "create", "img", "--from", str(image))
        cli.run("volume", "attach", "v", "--device", str(root / "v.dev"))
        with open(root / "v.dev", "r+b") as dev:
            dev.write(b"private" * 1000)
            os.fsync(dev.fileno())
        cli.run("snapshot", "create", "v", "s1")
        engine = cli.engine_pid("v")
        assert engine is not None
        children = [
            int(entry)
            for entry in os.listdir("/proc")
            if entry.isdigit() and _parent(int(entry)) == engine
        ]
        assert len(children) == 2, children
        for pid in [engine, *children]:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"AWS_SECRET_ACCESS_KEY" not in environ, pid
            assert b"s3cr3t" not in environ, pid
        exposed = [
            (str(path), oct(path.lstat().st_mode & 0o777))
            for path in [root, *root.rglob("*")]
            if path.lstat().st_mode & 0o077 and path != root / "v.dev"
        ]
        assert exposed == []
        assert os.stat(root / "v.dev").st_mode & 0o077 == 0  # the FUSE file, as it was
        cli.run("volume", "detach", "v")
        exposed = [str(path) for path in [root, *root.rglob("*")] if path.lstat().st_mode & 0o077]
        assert exposed == []
    finally:
        os.umask(old)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# -- hostile frames --------------------------------------------------------------------------


def _bad_calls(rng: random.Random) -> bytes:
    calls: list[Any] = [
        [],
        {"method": [1, 2]},
        {"method": {"a": 1}},
        {"method": "expand", "args": {"size": "x"}},
        {"method": "expand", "args": {"size": 1 << 70}},
        {"method": "changed_blocks", "args": {"base": "x", "top": "y", "block_size": 1}},
        {"method": "changed_blocks", "args": {"base": "x", "top": "y", "block_size": 0}},
        {"method": "init", "args": {"size": -1, "chunk_size": 0}},
        {"method": "rebuild_begin", "args": {"names": "x", "revision": -1}},
        {"method": "rebuild_begin", "args": {"names": [1, 2], "revision": 0}},
        {"method": "rebuild_begin", "args": {"names": ["a"], "revision": 0, "created": ["x"]}},
        {"method": "rebuild_begin", "args": {"names": ["a"], "revision": 0, "created": [1, 2]}},
        {"method": "snapshot", "args": {"name": "../x"}},
        {"method": "remove_snapshot", "args": {"name": 7}},
        {"method": "pull_run", "args": {"source": "nowhere", "first": -1}},
        {"method": "backing_commit", "args": {"id": "zz"}},
        {"method": "backing_commit", "args": {"id": "0" * 32 + "-99999999999999"}},
        {"method": "revert", "args": {}},
        {"method": "verify_layer", "args": {"layer": None}},
        {"method": "nothing"},
        {"method": "info", "args": [1]},
    ]
    choice = rng.choice(calls)
    body = json.dumps(choice).encode() if rng.random() < 0.9 else rng.randbytes(40)
    return body


def bad_frame(rng: random.Random, request_id: int) -> bytes:
    """One frame that is well framed but wrong inside: no such op, short or oversized
    arguments, out-of-range values, bad names, JSON of every wrong shape."""
    kind = rng.randrange(12)
    huge = rng.choice([p.MAX_IO + 1, 1 << 31, (1 << 32) - 1])
    if kind == 0:
        return p.frame(request_id, rng.choice([0, 11, 12, 99, 65535]), rng.randbytes(20))
    if kind == 1:
        return p.frame(request_id, p.READ, p.RANGE.pack(rng.randrange(1 << 40), huge))
    if kind == 2:
        return p.frame(request_id, p.WRITE, rng.randbytes(rng.randrange(8)))
    if kind == 3:
        return p.frame(request_id, p.WRITE, p.U64.pack((1 << 40) + rng.randrange(99)), b"x" * 64)
    if kind == 4:
        return p.frame(request_id, p.TRIM, p.TRIM_RANGE.pack(0, 1 << 40))
    if kind == 5:
        return p.frame(request_id, p.CALL, _bad_calls(rng))
    if kind == 6:
        return p.frame(request_id, p.LAYER_SUMS, p.SUMS_REQ.pack(0, 1 << 30, 1) + b"nope")
    if kind == 7:
        return p.frame(request_id, p.READ_LAYER_RUN, p.RUN.pack(0, 65535) + b"\xff\xfe")
    if kind == 8:
        return p.frame(request_id, p.WRITE_LAYER_RUN, p.WRITE_RUN.pack(0, 9, 300) + b"z" * 20)
    if kind == 9:
        return p.frame(request_id, p.BACKING_UPLOAD, p.UPLOAD.pack(1 << 50, 4) + b"abcd" * 3)
    if kind == 10:
        return p.frame(request_id, p.READ_SNAPSHOT, p.RANGE.pack(0, huge) + b"nosuch")
    return p.frame(request_id, p.CALL, p.encode_json({"method": "snapshot", "args": {"name": ""}}))


def fuzz(address: str, key: VolumeKey, frames: int, seed: int) -> dict[str, int]:
    """Send ``frames`` malformed frames: most over authenticated sessions (engine and reader),
    the rest as strangers (garbage, forged handshakes); returns what was sent."""
    rng = random.Random(seed)
    host, port = address.rsplit(":", 1)
    sent = {"authenticated": 0, "stranger": 0, "connections": 0}
    while sent["authenticated"] + sent["stranger"] < frames:
        sent["connections"] += 1
        if rng.random() < 0.1:  # a stranger: garbage, or a hello with a made-up proof
            try:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    if rng.random() < 0.5:
                        s.sendall(rng.randbytes(rng.randrange(1, 300)))
                    else:
                        s.sendall(p.HELLO.pack(p.MAGIC, p.VERSION, key.id, rng.randbytes(32)))
                        _exactly(s, p.CHALLENGE.size)
                        s.sendall(p.AUTH.pack(rng.randbytes(32), p.ENGINE, 0, p.NO_OWNER))
                        s.sendall(bad_frame(rng, 1) * 20)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
            except OSError:
                pass
            sent["stranger"] += 20
            continue
        role = rng.choice([p.ENGINE, p.READER])
        with raw_session(address, key, role=role) as s:
            batch = [bad_frame(rng, i) for i in range(rng.randrange(200, 2000))]
            if rng.random() < 0.2:  # and a broken frame length at the end: the peer is cut off
                batch.append(struct.pack("<IIH", rng.choice([0, 3, p.MAX_FRAME + 1]), 0, 1))
            drained = threading.Thread(target=_drain, args=(s,), daemon=True)
            drained.start()
            try:
                s.sendall(b"".join(batch))
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            drained.join(60)
            sent["authenticated"] += len(batch)
    return sent


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_hostile_frames_cost_the_replica_nothing_lasting(tmp_path: Path, replica_factory) -> None:
    """100,000 malformed frames, from authenticated sessions and from strangers, and fifty
    connections that announce a maximal frame and then say nothing, while an engine session does
    4 KiB I/O: the replica stays up, answers the engine within a second every time, stays under
    300 MB, logs no traceback, and closes the stalled connections after its frame timeout."""
    from lhfs.store.chunkstore import ChunkStore

    size = 64 * MIB
    ChunkStore.create(tmp_path / "r", size, 65536).close()
    replica = replica_factory(tmp_path / "r")
    stalled: list[RawSession] = []
    for _ in range(50):
        s = raw_session(replica.address, replica.key)
        s.sendall(struct.pack("<IIH", p.MAX_FRAME, 1, p.WRITE) + b"\0" * 4096)
        stalled.append(s)
    opened_at = time.monotonic()
    sent: dict[str, int] = {}
    fuzzer = threading.Thread(
        target=lambda: sent.update(fuzz(replica.address, replica.key, 100_000, 5))
    )
    stats = {"longest": 0.0, "ios": 0, "rss": 0}
    model = bytearray(size)
    rng = random.Random(9)

    async def main() -> None:
        async with open_replica(replica.address, replica.key) as client:
            fuzzer.start()
            while fuzzer.is_alive() or stats["ios"] < 200:
                offset = rng.randrange(size // 4096) * 4096
                data = rng.randbytes(4096)
                started = trio.current_time()
                await client.write(offset, data)
                assert await client.read(offset, 4096) == data
                stats["longest"] = max(stats["longest"], trio.current_time() - started)
                model[offset : offset + 4096] = data
                stats["ios"] += 1
                stats["rss"] = max(stats["rss"], _rss(replica.proc.pid))
                await trio.sleep(0.001)
            assert xxhash_of(await client.read(0, 16 * MIB)) == xxhash_of(model[: 16 * MIB])
            assert await client.call("checksum") == xxhash_of(model)

    trio.run(main)
    fuzzer.join()
    assert sent["authenticated"] + sent["stranger"] >= 100_000, sent
    assert replica.proc.poll() is None
    assert stats["longest"] < 1.0, stats
    assert stats["rss"] < 300 * MIB, stats
    # the stalled connections are closed once their frame timeout passed
    for s in stalled:
        s.settimeout(max(1.0, FRAME_TIMEOUT + 10 - (time.monotonic() - opened_at)))
        with contextlib.suppress(ConnectionResetError):  # (a reset says the same)
            assert s.recv(65536) == b""
        s.close()
    assert time.monotonic() - opened_at < FRAME_TIMEOUT + 10
    wait_for(lambda: _rss(replica.proc.pid) < 300 * MIB, 10, "the replica's memory")
    log = replica.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("stayed incomplete") == len(stalled), log[-3000:]
    # the fuzz's frames reached the replica's checks as its peer's: none failed its tag
    assert "authentication check" not in log, log[-3000:]


def test_a_frame_replayed_forged_or_changed_on_the_way_is_refused(
    tmp_path: Path, replica_factory
) -> None:
    """Over TCP without TLS frames are sealed (``lhfs.wire.seal``). Someone who sees the
    connection and sends into it (a replayed frame, a frame of their own, a frame they changed)
    has the connection closed with one line, and none of it is applied."""
    from lhfs.store.chunkstore import ChunkStore

    block = 4096
    ChunkStore.create(tmp_path / "r", MIB, block).close()
    replica = replica_factory(tmp_path / "r")

    def answer(s: RawSession) -> tuple[int, int]:
        return p.HEADER.unpack(s.recv(p.HEADER.size, socket.MSG_WAITALL))[1:]

    with raw_session(replica.address, replica.key) as s:
        wire = s.sealed(p.frame(1, p.WRITE, p.U64.pack(0), b"a" * block))
        s.sock.sendall(wire)
        assert answer(s) == (1, p.OK)
        s.sock.sendall(wire)  # the same frame again, tag and all
        assert s.sock.recv(64) == b""
    with raw_session(replica.address, replica.key) as s:  # a frame with a made-up tag
        forged = p.frame(1, p.WRITE, p.U64.pack(block), b"f" * block)
        s.sock.sendall(forged + p.seal_frame(os.urandom(16)))
        assert s.sock.recv(64) == b""
    with raw_session(replica.address, replica.key) as s:  # a frame changed after it was sealed
        wire = bytearray(s.sealed(p.frame(1, p.WRITE, p.U64.pack(2 * block), b"c" * block)))
        wire[100] ^= 1
        s.sock.sendall(wire)
        assert s.sock.recv(64) == b""
    with raw_session(replica.address, replica.key) as s:
        s.sendall(p.frame(1, p.READ, p.RANGE.pack(0, 3 * block)))
        assert answer(s) == (1, p.OK)
        assert s.recv(3 * block, socket.MSG_WAITALL) == b"a" * block + bytes(2 * block)
    log = replica.log.read_text()
    assert log.count("closing connection: a frame failed its authentication check") == 3, log
    assert "Traceback" not in log, log


def test_an_answer_changed_on_its_way_back_is_never_handed_over(
    tmp_path: Path, replica_factory
) -> None:
    """The same on the way back: a read's answer rewritten between a replica and its client
    fails its check there; the read fails with the connection, and the rewritten bytes are
    never returned."""
    from lhfs.store.chunkstore import ChunkStore

    ChunkStore.create(tmp_path / "r", MIB, 4096).close()
    replica = replica_factory(tmp_path / "r")
    proxy = FaultProxy(parse_address(replica.address))

    async def main() -> None:
        async with open_replica(f"127.0.0.1:{proxy.port}", replica.key) as client:
            await client.write(0, b"precious" * 512)
            assert await client.read(0, 4096) == b"precious" * 512
            proxy.tamper(b"precious" * 2, b"tampered" * 2, answers=True)
            with pytest.raises(LhfsError, match="failed its authentication check"):
                await client.read(0, 4096)

    try:
        trio.run(main)
    finally:
        proxy.close()
    assert proxy.tampered > 0


@needs_fuse
def test_a_write_changed_on_its_way_to_a_remote_replica_never_lands(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    """A host on the path to a remote replica (no TLS) rewrites a write in flight: the replica
    refuses the frame and drops the connection, the engine goes on with its other replica and
    the remote one comes back by itself, rebuilt: every replica holds what was written. (The
    proxy does not pass the replica's close on to the engine, which marks the replica ERR at
    its I/O timeout: 2 s here, not 8.)"""
    cli.run(
        "volume", "create", "t", "--size", "16M", "--replicas", "1",
        "--rejoin-wait", "1", "--io-timeout", "2",
    )  # fmt: skip
    device = tmp_path / "t.dev"
    cli.run("volume", "attach", "t", "--device", str(device))
    remote, proxy, address = proxied_replica("t")
    far = cli.run("replica", "add", "t", "--address", address).stdout.split()[2]
    assert cli.replica("t", far)["link"] == "sealed"
    proxy.tamper(b"precious" * 2, b"tampered" * 2)  # the connections open now
    write_direct(device, MIB, b"precious" * 512)
    wait_for(lambda: proxy.tampered > 0, 30, "the write rewritten on its way")
    wait_for(lambda: "authentication check" in remote.log.read_text(), 30, "the refusal")
    wait_for(lambda: cli.replica("t", far)["mode"] == "RW", 60, "the replica back")
    sums = control.call(volumes.load(cli.root, "t").control_socket, "replica_checksums")
    assert len(sums) == 2 and len(set(sums.values())) == 1, sums
    with open(device, "rb") as f:
        f.seek(MIB)
        assert f.read(4096) == b"precious" * 512
    cli.run("volume", "detach", "t")
    assert "Traceback" not in remote.log.read_text()


def say_hello(address: str, key: VolumeKey) -> tuple[socket.socket, int]:
    """A connection that says hello to a replica and then nothing (it holds one of the
    replica's handshake slots, if it got one): the socket, and the status the replica
    answered (``HS_OK``: a slot is held; -1: no answer, a reset)."""
    sock = socket.create_connection(parse_address(address), timeout=10)
    try:
        sock.sendall(p.ClientHandshake(key, address, p.READER, 0, False).hello())
        answer = sock.recv(p.CHALLENGE.size, socket.MSG_WAITALL)
        return sock, p.CHALLENGE.unpack(answer)[2] if len(answer) == p.CHALLENGE.size else -1
    except OSError:
        return sock, -1


@needs_fuse
def test_connections_held_from_the_engines_host_keep_it_out_of_no_replica(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    """A process on the engine's host holds every handshake slot of that host at a remote
    replica (eight connections that say hello and then nothing, each made again as soon as it
    is closed), and the replica restarts: the engine gets back in all the same (the oldest
    held handshake is cut to make room for it) and rebuilds it (it was reset, and tried again
    every 30 s for ever). A connection that finds every slot just taken is told, in one line,
    that the replica is busy and why, not reset."""
    from lhfs.replica.process import ReplicaProcess
    from lhfs.replica.session import PER_SOURCE
    from lhfs.wire.client import SyncReplica

    cli.run("volume", "create", "h", "--size", "16M", "--replicas", "1", "--io-timeout", "3")
    cli.run("volume", "set", "h", "--rejoin-wait", "1")
    device = tmp_path / "h.dev"
    cli.run("volume", "attach", "h", "--device", str(device))
    remote, proxy, address = proxied_replica("h")  # (the engine reaches it through the proxy)
    far = cli.run("replica", "add", "h", "--address", address).stdout.split()[2]
    stop = threading.Event()
    holding: set[socket.socket] = set()

    def hold() -> None:
        while not stop.is_set():
            try:
                sock, status = say_hello(remote.address, remote.key)
            except OSError:  # (the replica restarting)
                stop.wait(0.05)
                continue
            with sock:
                if status == p.HS_OK:
                    holding.add(sock)
                    with contextlib.suppress(OSError):
                        sock.recv(1)  # (until the replica cuts it: then again at once)
                    holding.discard(sock)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(PER_SOURCE)]
    again = None
    try:
        proxy.stop()  # (the engine tries again only once the slots are held)
        assert remote.stop() == 0
        wait_for(lambda: cli.replica("h", far)["mode"] == "ERR", 30, "the replica gone")
        for thread in threads:
            thread.start()
        port = parse_address(remote.address)[1]
        again = ReplicaProcess(tmp_path / "remote", tmp_path / "h.key", port=port)
        wait_for(lambda: len(holding) == PER_SOURCE, 30, "every slot of this host held")
        proxy.resume()
        wait_for(lambda: cli.replica("h", far)["mode"] == "RW", 60, "the engine back in")
        write_direct(device, 0, os.urandom(MIB))
        assert cli.info("h")["state"] == "healthy"
        assert "handshake cut after" in again.log.read_text()  # (a held one made room)
        stop.set()
        for sock in list(holding):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # (wakes its thread's recv)
        for thread in threads:
            thread.join(10)
        fresh = []  # every slot taken just now: nothing old enough to cut
        while len(fresh) < PER_SOURCE:  # (those of the threads may not be gone yet)
            sock, status = say_hello(again.address, again.key)
            if status == p.HS_OK:
                fresh.append(sock)
            else:
                sock.close()
        with pytest.raises(LhfsError) as refused:
            SyncReplica(again.address, again.key)
        assert str(refused.value) == (
            f"replica {again.address} is busy: too many handshakes under way from this host "
            "(someone holds connections to it)"
        )
        for sock in fresh:
            sock.close()
        cli.run("volume", "detach", "h")
    finally:
        stop.set()
        for sock in list(holding):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if again is not None:
            again.stop()


def xxhash_of(data: bytes | bytearray) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(bytes(data))


def dated_certificate(directory: Path, start: datetime, end: datetime) -> tuple[Path, Path]:
    """A self-signed certificate valid from ``start`` to ``end``, and its key (mode 600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lhfs replica")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@needs_fuse
def test_tls_mistakes_are_said_in_one_line(cli: Cli, tmp_path: Path, replica_factory) -> None:
    """A replica served without TLS and added with ``--tls-ca`` is refused with what to do (it
    said only that the connection was reset); ``replica serve`` with a certificate outside its
    dates says so as it starts, in one line with the date (it said nothing: every engine's
    TLS handshake with it failed)."""
    ca = make_tls(tmp_path / "tls")[0]
    cli.run("volume", "create", "t", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "t", "--device", str(tmp_path / "t.dev"))
    cli.run("volume", "key", "t", "--out", str(tmp_path / "t.key"))
    plain = replica_factory(tmp_path / "plain", tmp_path / "t.key")
    refused = cli.run(
        "replica", "add", "t", "--address", plain.address, "--tls-ca", str(ca), check=False
    )
    said = refused.stderr.strip()
    assert refused.returncode != 0 and len(said.splitlines()) == 1, said
    assert said.endswith("(it answers without TLS: if it is served so, add it without --tls-ca)"), (
        said
    )
    assert [r["id"] for r in cli.info("t")["replicas"]] == ["r1"]
    cli.run("volume", "detach", "t")
    now, day = datetime.now(UTC), timedelta(days=1)
    for name, start, end, says in [
        ("expired", now - 3 * day, now - day, f"expired on {now - day:%Y-%m-%d %H:%M} UTC"),
        ("early", now + day, now + 3 * day, f"is not valid before {now + day:%Y-%m-%d %H:%M}"),
    ]:
        cert, key = dated_certificate(tmp_path / name, start, end)
        served = replica_factory(tmp_path / f"{name}-r", tmp_path / "t.key", tls=(cert, key))
        lines = [line for line in served.log.read_text().splitlines() if str(cert) in line]
        assert len(lines) == 1 and says in lines[0], lines


@needs_fuse
def test_a_replica_on_another_host_over_tls(
    cli: Cli, tmp_path: Path, replica_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica served with a certificate is added with the operator's CA, rebuilt over TLS
    and then serves as the rebuild source of another one (which is handed the CA to pull);
    a client without TLS, or trusting another CA, is refused."""
    ca, cert, key = make_tls(tmp_path / "tls")
    other_ca = make_tls(tmp_path / "other")[0]
    cli.run("volume", "create", "t", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "t", "--device", str(tmp_path / "t.dev"))
    with open(tmp_path / "t.dev", "r+b") as dev:
        dev.write(random.Random(4).randbytes(8 * MIB))
        os.fsync(dev.fileno())
    expected = cli.checksum("t")
    cli.run("volume", "key", "t", "--out", str(tmp_path / "t.key"))
    remote = replica_factory(tmp_path / "remote", tmp_path / "t.key", tls=(cert, key))
    wrong = cli.run("replica", "add", "t", "--address", remote.address, "--tls-ca", str(other_ca),
                    check=False)  # fmt: skip
    assert wrong.returncode == 1 and "certificate verify failed" in wrong.stderr, wrong.stderr
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # (ca as a CA of the system's store)
    context = tls.client_context(other_ca.read_text())
    monkeypatch.delenv("SSL_CERT_FILE")
    raw = socket.create_connection(parse_address(remote.address))
    with raw, pytest.raises(ssl.SSLCertVerificationError):  # (only the CA given is trusted)
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    plain = cli.run("replica", "add", "t", "--address", remote.address, check=False)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "closed the connection before answering" in plain.stderr, plain.stderr
    assert "--tls-ca" in plain.stderr, plain.stderr
    added = cli.run("replica", "add", "t", "--address", remote.address, "--tls-ca", str(ca))
    far = added.stdout.split()[2]
    cli.run("replica", "rm", "t", "r1")  # the TLS replica is now the only source
    near = cli.run("replica", "add", "t").stdout.split()[2]
    stats = next(r for r in cli.info("t")["replicas"] if r["id"] == near)["rebuild_stats"]
    assert stats["bytes_copied"] > 0 and stats["bytes_relayed"] == 0, stats  # pulled over TLS
    replicas = cli.info("t")["replicas"]
    assert {r["id"]: (r["mode"], r["link"]) for r in replicas} == {
        far: ("RW", "tls"),
        near: ("RW", "local"),
    }
    assert cli.checksum("t") == expected
    cli.run("volume", "detach", "t")
    cli.run("volume", "attach", "t", "--device", str(tmp_path / "t.dev"))  # reconnects by TLS
    assert cli.info("t")["state"] == "healthy"
    assert cli.checksum("t") == expected
    cli.run("volume", "detach", "t")


def test_a_root_others_own_and_a_configuration_naming_paths_are_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """A state root another user owns is refused (they could rewrite what lhfs deletes and
    runs as root); a volume whose configuration names a path as a replica (its id, its disk)
    is not acted on: ``volume rm`` refuses it and deletes nothing (it deleted that path)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    result = Cli(theirs).run("volume", "ls", check=False)
    assert result.returncode == 1 and f"belongs to user {NOBODY}" in result.stderr, result.stderr
    shared = tmp_path / "shared"  # (a --root /tmp by mistake: not taken from everyone)
    shared.mkdir(mode=0o1777)
    os.chmod(shared, 0o1777)
    (shared / "someone-elses").write_text("x")
    result = Cli(shared).run("volume", "ls", check=False)
    assert result.returncode == 1 and "a directory of its own" in result.stderr, result.stderr
    assert os.stat(shared).st_mode & 0o7777 == 0o1777
    for root in ("", str(shared / "someone-elses")):  # (empty: it was the current directory)
        result = subprocess.run([LHFS, "--root", root, "volume", "ls"], capture_output=True,
                                text=True, cwd=shared)  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert os.stat(shared).st_mode & 0o7777 == 0o1777
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("kept")
    for change in ({"id": str(victim)}, {"id": "r1", "disk": "/", "local": True},
                   {"id": "../../../victim"}):  # fmt: skip
        cli.run("volume", "create", "c", "--size", "16M", "--replicas", "1")
        path = cli.root / "volumes" / "c" / "config.json"
        config = json.loads(path.read_text())
        config["replicas"][0].update(change)
        if "disk" in change:
            config["volume_id"] = "/../../" + str(victim)
        path.write_text(json.dumps(config))
        result = cli.run("volume", "rm", "c", check=False)
        assert result.returncode == 1 and "config.json" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert (victim / "precious").read_text() == "kept"
        config["replicas"][0].update(id="r1", disk=None)
        path.write_text(json.dumps(config))
        cli.run("volume", "rm", "c")


@needs_fuse
def test_a_crowd_of_silent_strangers_keeps_no_one_out(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Strangers on eight loopback addresses hold every TCP handshake slot of a replica (and
    take each one again as soon as it is dropped): a backup of the attached volume still reads
    it (by the replica's local socket, where only this user is let in; it failed with a reset),
    writes go on, and the replica's log holds a line a minute per source, not one per
    refusal (tens of thousands, rotating away what the log held)."""
    cli.run("volume", "create", "f", "--size", "16M", "--replicas", "1")
    device = tmp_path / "f.dev"
    cli.run("volume", "attach", "f", "--device", str(device))
    write_direct(device, 0, os.urandom(MIB))
    host, port = replica_addresses(cli, "f")[0].rsplit(":", 1)
    stop = threading.Event()
    held: set[socket.socket] = set()
    made: list[int] = []

    def crowd(source: str) -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection(
                    (host, int(port)), timeout=5, source_address=(source, 0)
                )
            except OSError:
                continue
            with sock:
                held.add(sock)
                made.append(1)
                with contextlib.suppress(OSError):
                    sock.recv(1)  # (until the replica drops it: then again at once)
                held.discard(sock)

    threads = [  # eight connections from each of eight addresses
        threading.Thread(target=crowd, args=(f"127.0.0.{n}",), daemon=True)
        for n in range(2, 10)
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(made) >= 64, 30, "the strangers to hold every slot")
        url = cli.backup("f", "s3://crowded/p")
        write_direct(device, MIB, os.urandom(MIB))
        assert cli.info("f")["state"] == "healthy"
    finally:
        stop.set()
        for sock in list(held):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # (wakes its thread's recv)
        for thread in threads:
            thread.join(10)
    assert "backup=" in url
    log = (cli.root / "volumes" / "f" / "r1.log").read_text()
    refused = log.count("refused a connection") + log.count("during the handshake")
    assert refused <= 40, refused  # (a line per source and kind, and the engine's own)
    cli.run("volume", "detach", "f")
