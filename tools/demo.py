"""The main job on embedded defaults: what lhfs does today, end to end, on this machine.

A replica process on a loopback port serves a volume on a backing image; data is written,
snapshotted, overwritten, the snapshot is coalesced away, the process is killed with SIGKILL
and the flushed data is verified after reopening. Everything runs in a temporary directory and
nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import trio

from lhfs.replica_client import open_replica
from lhfs.store import ChunkStore
from lhfs.procs import ReplicaProcess

MIB = 1 << 20


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="lhfs-demo-"))
    started = time.monotonic()
    try:
        image = work / "base.img"
        image.write_bytes(os.urandom(4 * MIB))
        ChunkStore.create(work / "replica", 64 * MIB, 64 << 10, image, "local-name.img").close()
        print(f"1. replica initialised: 64 MiB volume on a 4 MiB backing image ({work})")
        replica = ReplicaProcess(work / "replica")
        try:
            payload = os.urandom(8 * MIB)

            async def session() -> tuple[str, str]:
                async with open_replica(replica.address) as client:
                    await client.write(1 * MIB + 123, payload)
                    await client.call("snapshot", name="before-overwrite")
                    await client.write(2 * MIB, b"overwritten" * 1000)
                    before = await client.call("checksum")
                    await client.call("remove_snapshot", name="before-overwrite")
                    after = await client.call("checksum")
                    await client.flush()
                    return before, after

            before, after = trio.run(session)
            print(f"2. wrote 8 MiB, took a snapshot, overwrote, coalesced it: checksum {after}")
            assert before == after, "coalescing changed the volume's content"
            replica.kill()
            print("3. replica process killed with SIGKILL")
        finally:
            replica.stop()
        with ChunkStore.open(work / "replica") as store:
            assert store.checksum() == after, "flushed data lost"
            layers = len(store.list_layers())
        print(f"4. reopened: same checksum, {layers} layer(s), backing image verified by content")
        print(f"demo ok in {time.monotonic() - started:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
