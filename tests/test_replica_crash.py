"""kill -9 a real replica process mid-write and mid-snapshot-removal, reopen, verify.

What must hold: every write acknowledged before the last acknowledged flush reads back; a write
after it reads back as either its old or its new bytes; the chain is valid and the volume's
content is unchanged by an interrupted snapshot removal, which can then be finished.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import trio

from lhfs.core.errors import ConnectionLost
from lhfs.store.chunkstore import ChunkStore
from lhfs.wire.client import open_replica

CHUNK = 4096
SIZE = 8 << 20


def test_kill_during_writes_loses_nothing_flushed(tmp_path: Path, replica_factory) -> None:
    directory = tmp_path / "r"
    ChunkStore.create(directory, SIZE, CHUNK).close()
    durable = bytearray(SIZE)
    rng = random.Random(42)

    for _round in range(6):
        replica = replica_factory(directory)
        in_flight: list[tuple[int, bytes]] = []

        async def main(replica=replica, in_flight=in_flight) -> None:
            async with open_replica(replica.address, replica.key) as client:
                model = bytearray(durable)
                for _epoch in range(rng.randrange(1, 4)):
                    for _ in range(40):
                        offset = rng.randrange(SIZE - 20000)
                        data = rng.randbytes(rng.randrange(1, 20000))
                        await client.write(offset, data)
                        model[offset : offset + len(data)] = data
                    await client.flush()
                    durable[:] = model
                # unflushed writes on distinct ranges, many still in flight at the kill
                slots = rng.sample(range(SIZE // 65536), 16)
                for slot in slots:
                    offset = slot * 65536 + rng.randrange(1000)
                    in_flight.append((offset, rng.randbytes(rng.randrange(1, 60000))))

                async def write(offset: int, data: bytes) -> None:
                    with contextlib.suppress(ConnectionLost):  # those that leave after the kill
                        await client.write(offset, data)

                async with trio.open_nursery() as nursery:
                    for offset, data in in_flight:
                        nursery.start_soon(write, offset, data)
                    await trio.lowlevel.checkpoint()  # let the queued writes go out
                    replica.kill()
                    nursery.cancel_scope.cancel()

        trio.run(main)
        with ChunkStore.open(directory) as store:
            content = store.read(0, SIZE)
        touched = bytearray(SIZE)  # 1 where an unflushed write may or may not have landed
        for offset, data in in_flight:
            new = content[offset : offset + len(data)]
            old = durable[offset : offset + len(data)]
            assert all(n in (a, b) for n, a, b in zip(new, old, data, strict=True)), "torn byte"
            touched[offset : offset + len(data)] = b"\1" * len(data)
            durable[offset : offset + len(data)] = new
        assert content == durable, "a flushed write was lost"


def _prepare_chain(directory: Path, rng: random.Random) -> str:
    with ChunkStore.create(directory, SIZE, CHUNK) as store:
        for name in ("base", "middle"):
            for _ in range(400):
                store.write(rng.randrange(SIZE - 9000), rng.randbytes(rng.randrange(1, 9000)))
            store.snapshot(name)
        for _ in range(100):
            store.write(rng.randrange(SIZE - 9000), rng.randbytes(rng.randrange(1, 9000)))
        return store.checksum()


def test_kill_during_snapshot_removal_keeps_content(tmp_path: Path, replica_factory) -> None:
    rng = random.Random(5)
    interrupted = 0
    for attempt in range(4):
        directory = tmp_path / f"r{attempt}"
        expected = _prepare_chain(directory, rng)
        replica = replica_factory(directory)
        target = rng.random()

        async def main(replica=replica, target=target) -> None:
            finished = trio.Event()

            async def remove(client) -> None:
                await client.call("remove_snapshot", name="middle")
                finished.set()

            async with (
                trio.open_nursery() as nursery,
                open_replica(replica.address, replica.key) as client,
            ):
                nursery.start_soon(remove, client)
                while not finished.is_set():  # kill once past a random point of the coalesce
                    operation = (await client.info())["operation"]
                    if operation and operation["done"] >= target * operation["total"]:
                        break
                replica.kill()
                nursery.cancel_scope.cancel()

        trio.run(main)
        with ChunkStore.open(directory) as store:
            names = [layer["name"] for layer in store.list_layers()]
            assert names in (["base", "middle", None], ["base", None])
            assert store.checksum() == expected
            if "middle" in names:
                interrupted += 1
                store.remove_snapshot("middle")
            assert [layer["name"] for layer in store.list_layers()] == ["base", None]
            assert store.checksum() == expected
    assert interrupted, "no kill landed in the middle of a removal"
