#!/usr/bin/env python3
"""A FUSE device that stores nothing: lhfs's FUSE channel with no engine behind it.

Writes are acknowledged and dropped, reads return zeros. ``bench/fio_bench.py`` runs fio on it
to show what the kernel's FUSE path and the channel cost by themselves, the ceiling of the
lhfs device on this machine.

    python bench/null_device.py FILE [--size 1G]     # serves until SIGTERM or unmount
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.core.units import parse_size
from lhfs.engine import fusedev as f

ZEROS = bytes(f.MAX_WRITE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--size", default="1G")
    args = parser.parse_args()
    size = parse_size(args.size)
    args.file.touch()
    channel = f.FuseChannel(args.file, fsname="lhfs-null")

    def handle(opcode: int, unique: int, data: memoryview) -> None:
        if opcode == f.WRITE:
            channel.reply(unique, f.WRITE_OUT.pack(f.IO_IN.unpack_from(data)[2], 0))
        elif opcode == f.READ:
            channel.reply(unique, ZEROS[: f.IO_IN.unpack_from(data)[2]])
        elif opcode in (f.GETATTR, f.SETATTR):
            channel.reply(unique, f.attr_reply(size, 0))
        elif opcode == f.OPEN:
            flags = f.FOPEN_DIRECT_IO | f.FOPEN_PARALLEL_DIRECT_WRITES
            channel.reply(unique, f.OPEN_OUT.pack(f.ROOT_INODE, flags, 0))
        elif opcode == f.INIT:
            channel.reply(unique, channel.init_reply(data))
        elif opcode in (f.FSYNC, f.FLUSH, f.RELEASE, f.DESTROY, f.FALLOCATE):
            channel.reply(unique)
        elif opcode not in f.NO_REPLY:
            channel.reply_error(unique, errno.ENOSYS)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        channel.stop()
                        return

            nursery.start_soon(stop_on_signal)
            print("ready", flush=True)
            await channel.serve(handle, lambda: None)
            nursery.cancel_scope.cancel()

    channel.mount()
    try:
        trio.run(serve)
    finally:
        channel.close()


if __name__ == "__main__":
    main()
