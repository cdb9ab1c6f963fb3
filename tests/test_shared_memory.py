"""Local replicas through shared memory: the data path, its failures and its buffers' ownership.

The engine's pool and each connection's read region are real memfds shared with real replica
processes; the volume tests go through the FUSE device, where writes land in the pool.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from lhfs.core.errors import InvalidArgument, LhfsError
from lhfs.core.procs import wait_for
from lhfs.engine.engine import ERR, RW, Engine
from lhfs.engine.fusedev import BUFFER
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import (
    Cli,
    fio_verify,
    kill_engine,
    loop_attach,
    read_direct,
    write_direct,
)
from lhfs.wire import protocol as p
from lhfs.wire import shm
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import SyncReplica, open_replica

MIB = 1 << 20
CHUNK = 64 << 10


def test_random_io_over_shared_memory_matches_the_model(cli: Cli, tmp_path: Path) -> None:
    """Random writes, reads and hole punches of every size up to 1 MiB, from four threads at
    once, through the device of a volume with three local replicas: every read equals a
    bytearray model, and the writes and reads did go through shared memory."""
    size = 32 * MIB
    cli.run("volume", "create", "m", "--size", "32M", "--replicas", "3")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "m", "--device", str(device))
    info = cli.live("m")
    assert [r["shared_memory"] for r in info["replicas"]] == [True] * 3
    model = bytearray(size)
    mismatches: list[str] = []
    quarter = size // 4

    def worker(number: int) -> None:
        rng = random.Random(number)
        base = number * quarter
        for step in range(150):
            length = rng.choice([4096, 8192, CHUNK, 3 * CHUNK + 4096, MIB])
            at = base + rng.randrange(0, (quarter - length) // 4096) * 4096
            action = rng.random()
            if action < 0.5:
                data = rng.randbytes(length)
                write_direct(device, at, data, sync=False)
                model[at : at + length] = data
            elif action < 0.6:
                _punch(device, at, length)
                model[at : at + length] = bytes(length)
            elif read_direct(device, at, length) != model[at : at + length]:
                mismatches.append(f"thread {number} step {step}: {length} at {at}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches, mismatches[:5]
    with open(device, "rb") as whole:
        assert whole.read() == model
    info = cli.live("m")
    assert info["shared_writes"] > 0 and info["shared_reads"] > 0, info
    assert info["replica_answered_reads"] > 0, info  # the replicas answered the kernel
    assert info["state"] == "healthy"
    cli.run("volume", "detach", "m")


def _punch(device: Path, offset: int, length: int) -> None:
    """A hole punched in the device (what discard becomes): a trim."""
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length), device],
        check=True,
    )


def test_a_replica_killed_mid_burst_leaves_every_request_correct(cli: Cli, tmp_path: Path) -> None:
    """fio --verify through the device while one of three local replicas is SIGKILLed in the
    middle of its bursts: no verify error; the others go on over shared memory."""
    cli.run("volume", "create", "k", "--size", "128M", "--replicas", "3")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "k", "--device", str(device))
    loop = loop_attach(device)
    fio = fio_verify(loop, "96M", "--iodepth=32")
    try:
        wait_for(lambda: cli.live("k")["shared_writes"] > 3000, 120, "fio writing")
        victim = next(r for r in cli.live("k")["replicas"] if r["id"] == "r2")
        os.kill(victim["pid"], signal.SIGKILL)
        assert fio.poll() is None, "fio ended before the replica was killed"
        out, err = fio.communicate(timeout=600)
        assert fio.returncode == 0 and "verify" not in err.lower(), out + err
    finally:
        if fio.poll() is None:
            fio.kill()
        subprocess.run(["losetup", "-d", loop], check=False)
    info = cli.live("k")
    modes = {r["id"]: r["mode"] for r in info["replicas"]}
    assert modes["r1"] == modes["r3"] == RW and info["state"] != "faulted", info
    cli.run("volume", "detach", "k")


def test_reads_answered_by_replicas_end_with_their_engine(cli: Cli, tmp_path: Path) -> None:
    """Replicas answer reads on the engine's FUSE device: when the engine is SIGKILLed in the
    middle of a stream of reads, no process keeps that FUSE connection alive. The reader gets
    an error (not a hang), no replica holds a FUSE descriptor, and the volume attaches again
    with its data."""
    cli.run("volume", "create", "d", "--size", "32M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "d", "--device", str(device))
    data = random.Random(5).randbytes(4 * MIB)
    write_direct(device, 0, data)
    replica_pids = [r["pid"] for r in cli.live("d")["replicas"]]
    outcome: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        rng = random.Random(6)
        try:
            while not stop.is_set():
                at = rng.randrange(0, 1024) * 4096
                if read_direct(device, at, 4096) != data[at : at + 4096]:
                    raise AssertionError(f"wrong data at {at}")
        except BaseException as exc:  # the error the engine's death causes, expected
            outcome.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        wait_for(lambda: cli.live("d")["replica_answered_reads"] > 2000, 60, "reads answered")
        kill_engine(cli, "d")
        thread.join(timeout=30)
        assert not thread.is_alive(), "reads hang after the engine died"
        assert outcome and isinstance(outcome[0], OSError), outcome
        wait_for(lambda: not any(_holds_fuse(pid) for pid in replica_pids), 30, "FUSE let go")
    finally:
        stop.set()
    cli.run("volume", "attach", "d", "--device", str(device))
    assert read_direct(device, 0, len(data)) == data
    cli.run("volume", "detach", "d")


def _holds_fuse(pid: int) -> bool:
    """Whether process ``pid`` (if alive) has /dev/fuse open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


@pytest.fixture
def local_replicas(tmp_path: Path, key_file: Path):  # type: ignore[no-untyped-def]
    started: list[ReplicaProcess] = []
    for number in range(2):
        started.append(
            ReplicaProcess(
                tmp_path / f"r{number}", key_file, local=f"lhfs-test-{os.getpid()}-{number}"
            )
        )
    yield started
    for proc in started:
        if proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGCONT)
        proc.stop()


def test_a_buffer_is_never_reused_while_a_replica_may_still_read_it(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """A write from a pool slot to two local replicas, one of them stopped (slow, not dead):
    the slot stays the request's until the stopped one is marked failed, then is held for its
    connection, not reused, while every other slot is filled with other data. When the replica
    resumes, it writes what the request held; the slot is free again only once a newer session
    fenced the old connection. Malformed descriptors are refused."""
    key = VolumeKey.load(key_file)
    fast, slow = local_replicas
    volume_size = 4 * MIB

    async def main() -> None:
        pool = shm.Region("lhfs-test", 4, BUFFER)
        for proc in local_replicas:
            async with open_replica(proc.address, key) as client:
                await client.call("init", size=volume_size, chunk_size=CHUNK)
        async with trio.open_nursery() as nursery:
            engine = Engine(volume_size, CHUNK, nursery, key, io_timeout=2.0, pool=pool)
            engine.local_names = {proc.address: proc.local for proc in local_replicas}
            await engine.attach([("a", fast.address, False), ("b", slow.address, False)])
            nursery.start_soon(engine.run)
            assert all(link.client.shared for link in engine.replicas)

            # a malformed descriptor is refused like any malformed request
            client = engine.replicas[0].client
            reply = p.SHM_READ_REPLY.pack(0, 4096, 0, 1)
            with pytest.raises(InvalidArgument, match="no FUSE device"):
                await client.request(p.READ_REPLY, reply)  # (this engine shared none)
            outside = p.SHM_WRITE.pack(0, pool.size - 4096, 8192)
            with pytest.raises(InvalidArgument, match="outside the region"):
                await client.request(p.WRITE_SHM, outside)
            with pytest.raises(InvalidArgument):
                await client.request(p.READ_SHM, p.SHM_READ.pack(0, 4096, 1 << 40))
            async with open_replica(fast.address, key, role=p.READER) as tcp:
                with pytest.raises(LhfsError):
                    await tcp.request(p.WRITE_SHM, p.SHM_WRITE.pack(0, 0, 4096))

            before = (await _info(slow, key))["revision"]
            os.kill(slow.proc.pid, signal.SIGSTOP)
            slot = pool.take()
            assert slot is not None
            held = random.Random(7).randbytes(CHUNK)
            pool.view(slot, CHUNK)[:] = held
            outcome: list[Exception | None] = []
            finished = trio.Event()

            def done(error: Exception | None) -> None:
                outcome.append(error)
                finished.set()

            fast_before = (await _info(fast, key))["revision"]
            engine.submit_write(CHUNK, pool.view(slot, CHUNK), done)
            engine.push()
            await trio.to_thread.run_sync(
                wait_for, lambda: _revision(fast.address, key) > fast_before, 30, "the write"
            )
            await trio.testing.wait_all_tasks_blocked()  # (its answer is in)
            assert not finished.is_set() and pool.free == 3  # the stopped one has not answered
            with trio.fail_after(15):  # the I/O deadline marks it failed; the write completes
                await finished.wait()
            assert outcome == [None] and engine.replicas[1].mode == ERR
            pool.give(slot)  # (what the FUSE frontend does once the write is answered)
            assert pool.free == 3, "a slot the stopped replica may still read was freed"
            others = [pool.take() for _ in range(3)]
            assert None not in others and pool.take() is None
            for other in others:
                pool.view(other)[:] = b"\xee" * BUFFER

            os.kill(slow.proc.pid, signal.SIGCONT)
            await trio.to_thread.run_sync(  # it carries out what it received before the cut
                wait_for, lambda: _revision(slow.address, key) > before, 30, "the late write"
            )
            async with open_replica(slow.address, key, role=p.READER) as reader:
                head = (await reader.call("info"))["head"]
                content = await reader.request(
                    p.READ_SNAPSHOT, p.RANGE.pack(CHUNK, CHUNK), head.encode()
                )
            assert content == held, "the stopped replica wrote data of a reused buffer"

            assert pool.free == 0
            fresh = await engine.connect(slow.address)  # a newer session fences the old one
            assert pool.free == 1
            await fresh.aclose()
            await engine.close()
            nursery.cancel_scope.cancel()
        pool.close()

    trio.run(main)


def _revision(address: str, key: VolumeKey) -> int:
    """A replica's revision, asked by a reader session (blocking: for ``wait_for``)."""
    reader = SyncReplica(address, key)
    try:
        return reader.call("info")["revision"]
    finally:
        reader.close()


async def _info(proc: ReplicaProcess, key: VolumeKey) -> dict:
    async with open_replica(proc.address, key, role=p.READER) as reader:
        return await reader.call("info")


def test_shared_memory_is_refused_off_the_local_socket(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """Only an engine session on the local socket may map memory: over TCP the replica
    refuses, and the connection goes on serving over the socket."""
    key = VolumeKey.load(key_file)

    async def main() -> None:
        async with open_replica(local_replicas[0].address, key) as client:
            await client.call("init", size=MIB, chunk_size=CHUNK)
            with pytest.raises(LhfsError, match="local socket"):
                await client.request(p.SHM_ATTACH, p.SHM_SIZES.pack(BUFFER, BUFFER))
            await client.write(0, b"x" * 4096)
            assert await client.read(0, 4096) == b"x" * 4096

    trio.run(main)


def test_only_the_fuse_device_is_taken_as_one(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """A third descriptor at the set-up must be the FUSE device: anything else is refused, and
    the replica is served over its socket alone; the device itself is taken."""
    key = VolumeKey.load(key_file)
    not_fuse = os.open("/dev/null", os.O_RDWR)
    fuse = os.open("/dev/fuse", os.O_RDWR)

    async def main() -> None:
        for proc in local_replicas:
            async with open_replica(proc.address, key) as client:
                await client.call("init", size=MIB, chunk_size=CHUNK)
        pool = shm.Region("lhfs-test", 4, BUFFER)
        for device, taken in ((not_fuse, False), (fuse, True)):
            async with trio.open_nursery() as nursery:
                engine = Engine(MIB, CHUNK, nursery, key, pool=pool, device=device)
                engine.local_names = {proc.address: proc.local for proc in local_replicas}
                await engine.attach([("a", local_replicas[0].address, False)])
                nursery.start_soon(engine.run)
                client = engine.replicas[0].client
                assert (client.shared, client.answers_reads) == (taken, taken)
                assert engine.replicas[0].mode == RW
                await engine.write(0, b"y" * 4096)
                assert await engine.read(0, 4096) == b"y" * 4096
                await engine.close()
                nursery.cancel_scope.cancel()
        pool.close()

    try:
        trio.run(main)
    finally:
        os.close(not_fuse)
        os.close(fuse)


def test_a_fenced_session_served_by_its_thread_stops_at_once(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """A connection with shared memory is served by a thread of the replica; when a newer
    engine session fences it, the thread stops and the connection is reset: the old engine
    faults on its next write rather than writing, the new one reads what it wrote."""
    key = VolumeKey.load(key_file)
    proc = local_replicas[0]

    async def main() -> None:
        async with open_replica(proc.address, key) as client:
            await client.call("init", size=MIB, chunk_size=CHUNK)
        pools = [shm.Region("lhfs-test", 4, BUFFER) for _ in range(2)]
        async with trio.open_nursery() as nursery:
            engines = []
            for pool in pools:
                engine = Engine(MIB, CHUNK, nursery, key, io_timeout=5, pool=pool)
                engine.local_names = {proc.address: proc.local}
                await engine.attach([("a", proc.address, False)])
                nursery.start_soon(engine.run)
                assert engine.replicas[0].client.shared
                await engine.write(0, bytes([len(engines) + 1]) * 4096)
                engines.append(engine)
            old, new = engines
            with pytest.raises(LhfsError), trio.fail_after(10):
                await old.write(0, b"X" * 4096)
            assert old.state == "faulted"
            assert await new.read(0, 4096) == b"\x02" * 4096
            await new.close()
            nursery.cancel_scope.cancel()
        for pool in pools:
            pool.close()

    trio.run(main)
    assert "fenced" in proc.log.read_text()


def test_a_bad_frame_on_a_thread_served_connection_closes_it_with_one_line(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """The frame rules hold on the thread as on the event loop: a frame of a bad length from
    an engine session with shared memory closes that connection, logged in one line (not a
    traceback), and the replica serves the next engine."""
    key = VolumeKey.load(key_file)
    proc = local_replicas[0]

    async def main() -> None:
        async with open_replica(proc.address, key) as client:
            await client.call("init", size=MIB, chunk_size=CHUNK)
        pool = shm.Region("lhfs-test", 4, BUFFER)
        async with trio.open_nursery() as nursery:
            engine = Engine(MIB, CHUNK, nursery, key, io_timeout=5, pool=pool)
            engine.local_names = {proc.address: proc.local}
            await engine.attach([("a", proc.address, False)])
            nursery.start_soon(engine.run)
            client = engine.replicas[0].client
            assert client.shared
            await engine.write(0, b"z" * 4096)
            bad = p.LENGTH.pack(p.MAX_FRAME + 1) + bytes(p.HEADER.size - p.LENGTH.size)
            await p.socket_of(client._stream).send(bad)
            with pytest.raises(LhfsError), trio.fail_after(10):
                await engine.write(0, b"Z" * 4096)
            await engine.close()
            nursery.cancel_scope.cancel()
        pool.close()
        async with open_replica(proc.address, key, epoch=engine.epoch + 1) as client:
            assert await client.read(0, 4096) == b"z" * 4096

    trio.run(main)
    log = proc.log.read_text()
    assert f"closing connection: bad frame length {p.MAX_FRAME + 1}" in log
    assert "Traceback" not in log and "handler failed" not in log


def test_the_thread_is_served_while_the_event_loop_is_busy(
    local_replicas: list[ReplicaProcess], key_file: Path
) -> None:
    """A long request runs on the replica's event loop in steps (a whole-volume checksum, the
    loop never idle until it ends): the engine's writes, served by the connection's thread,
    go on between those steps instead of waiting for the end (the store lock is handed to a
    waiting thread at every round of the loop, not kept by the loop)."""
    key = VolumeKey.load(key_file)
    proc = local_replicas[0]
    size = 4 << 30

    async def main() -> None:
        async with open_replica(proc.address, key) as client:
            await client.call("init", size=size, chunk_size=CHUNK)
        pool = shm.Region("lhfs-test", 4, BUFFER)
        async with trio.open_nursery() as nursery:
            engine = Engine(size, CHUNK, nursery, key, pool=pool)
            engine.local_names = {proc.address: proc.local}
            await engine.attach([("a", proc.address, False)])
            nursery.start_soon(engine.run)
            assert engine.replicas[0].client.shared
            asked, done = trio.Event(), trio.Event()

            async def checksum() -> None:
                async with open_replica(proc.address, key, role=p.READER) as reader:
                    asked.set()
                    await reader.call("checksum")
                done.set()

            nursery.start_soon(checksum)
            await asked.wait()
            during = 0
            while not done.is_set():
                await engine.write(during % 1024 * 4096, b"w" * 4096)
                during += 1
            assert during >= 50, f"{during} writes while the checksum ran"
            await engine.close()
            nursery.cancel_scope.cancel()
        pool.close()

    trio.run(main)
