"""The engine's I/O path against real replica processes on loopback, without a device."""

from __future__ import annotations

from pathlib import Path

import trio

from lhfs.engine.engine import ERR, RW, Engine
from lhfs.store.chunkstore import ChunkStore

SIZE = 4 << 20


def _replicas(tmp_path: Path, replica_factory, count: int) -> list:
    procs = []
    for i in range(count):
        ChunkStore.create(tmp_path / f"r{i}", SIZE, 4096).close()
        procs.append(replica_factory(tmp_path / f"r{i}"))
    return procs


def test_a_cancelled_quiesce_lets_parked_io_go(tmp_path: Path, replica_factory) -> None:
    """A barrier that gives up while waiting for I/O to drain (its caller was cancelled) must
    not leave the requests that arrived meanwhile parked forever."""
    procs = _replicas(tmp_path, replica_factory, 2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(SIZE, 4096, nursery, procs[0].key)
            await engine.attach([(f"r{i}", proc.address, False) for i, proc in enumerate(procs)])
            assert [r.mode for r in engine.replicas] == [RW, RW]
            slow = trio.Event()
            engine.submit_write(0, b"a" * 4096, lambda error: slow.set())  # in flight, unpushed
            with trio.move_on_after(0.05):
                async with engine.structural:  # (as every caller of quiesce)
                    await engine.quiesce()  # cannot drain: the write above has not left yet
            done = trio.Event()
            engine.submit_write(4096, b"b" * 4096, lambda error: done.set())
            engine.push()
            with trio.fail_after(10):
                await slow.wait()
                await done.wait()
            assert await engine.read(0, 8192) == b"a" * 4096 + b"b" * 4096
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_replica_dying_under_a_burst_never_acknowledges_a_lost_write(
    tmp_path: Path, replica_factory
) -> None:
    """Writes in flight when one of two replicas is killed complete, and what the engine
    acknowledged reads back from the survivor."""
    procs = _replicas(tmp_path, replica_factory, 2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(SIZE, 4096, nursery, procs[0].key)
            await engine.attach([(f"r{i}", proc.address, False) for i, proc in enumerate(procs)])
            acknowledged: dict[int, bytes] = {}
            pending = 0
            submitted = False
            settled = trio.Event()

            def finished(offset: int, data: bytes):  # type: ignore[no-untyped-def]
                def done(error: Exception | None) -> None:
                    nonlocal pending
                    if error is None:
                        acknowledged[offset] = data
                    pending -= 1
                    if pending == 0 and submitted:
                        settled.set()

                return done

            for round_ in range(20):
                for i in range(16):
                    offset = (round_ * 16 + i) % (SIZE // 4096) * 4096
                    data = bytes([round_ + 1]) * 4096
                    pending += 1
                    engine.submit_write(offset, data, finished(offset, data))
                engine.push()
                if round_ == 10:
                    procs[1].kill()
                await trio.sleep(0)
            submitted = True
            if pending == 0:
                settled.set()
            with trio.fail_after(30):
                await settled.wait()
            assert engine.replicas[1].mode != RW and engine.state == "degraded"
            for offset, data in acknowledged.items():
                assert await engine.read(offset, 4096) == data
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_replica_that_dies_while_the_volume_is_idle_is_marked_err(
    tmp_path: Path, replica_factory
) -> None:
    """No I/O at all after a replica is killed: the engine still marks it ERR within a few
    seconds, with why, instead of showing it RW until the next write."""
    procs = _replicas(tmp_path, replica_factory, 2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(SIZE, 4096, nursery, procs[0].key, io_timeout=8)
            await engine.attach([(f"r{i}", proc.address, False) for i, proc in enumerate(procs)])
            failed = trio.Event()
            engine.on_failed = lambda link, at_once: failed.set()
            nursery.start_soon(engine.run)
            await engine.write(0, b"c" * 4096)
            procs[1].kill()  # (SIGKILL, waited for)
            with trio.fail_after(5):  # (within the watchdog's second, well before io_timeout)
                await failed.wait()
            assert engine.replicas[1].mode == ERR
            assert "connection to replica" in (engine.replicas[1].error or "")
            assert engine.replicas[0].mode == RW
            assert await engine.read(0, 4096) == b"c" * 4096
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_discard_of_a_volume_full_of_data_leaves_every_replica_serving(
    tmp_path: Path, replica_factory
) -> None:
    """A discard of the whole volume (mkfs, fstrim) is many requests, each a hole punched per
    chunk: sent all at once, the last ones waited longer than the I/O timeout behind the
    others and both replicas were failed, the volume faulted. Sent one after the other, each
    has the timeout to itself."""
    size, chunk = 128 << 20, 4096
    procs = []
    for i in range(2):
        ChunkStore.create(tmp_path / f"r{i}", size, chunk).close()
        procs.append(replica_factory(tmp_path / f"r{i}"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            engine = Engine(size, chunk, nursery, procs[0].key, io_timeout=2)
            await engine.attach([(f"r{i}", proc.address, False) for i, proc in enumerate(procs)])
            nursery.start_soon(engine.run)
            data = bytes(range(256)) * 4096  # (1 MiB, no chunk of zeros)
            for at in range(0, size, len(data)):
                await engine.write(at, data)
            await engine.flush()
            await engine.trim(0, size)
            assert [(r.mode, r.error) for r in engine.replicas] == [(RW, None), (RW, None)]
            assert engine.state == "healthy"
            assert await engine.read(size - chunk, chunk) == bytes(chunk)
            await engine.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
