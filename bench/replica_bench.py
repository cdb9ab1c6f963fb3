#!/usr/bin/env python3
"""One replica process over loopback TCP next to plain os.pwrite/os.pread on the same disk.

Runs, in one go: 1 MiB sequential write and read, 4 KiB random write and read; the replica with
a queue depth (16 by default) of requests in flight on one connection, the plain file with
synchronous calls. Also measures "TCP alone": the same blocks moved over loopback TCP between
two processes with no protocol (one at a time, blocking calls), the transport's own ceiling,
and the same replica served over TLS (``--tls``). Connections are authenticated with the
volume's key, once each. Prints one table with IOPS, MB/s and the ratios to the plain file
(and TLS to plain TCP).

    python bench/replica_bench.py [--dir DIR] [--size 1G] [--seconds 5] [--depth 16] [--tls]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.core.units import parse_size
from lhfs.replica.process import ReplicaProcess
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import make_tls, scratch
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import open_replica

MIB = 1 << 20


def plain(path: Path, size: int, pattern: str, bs: int, seconds: float) -> tuple[int, float]:
    """(operations, elapsed) of synchronous I/O on a plain file."""
    flags = os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o644)
    buf = os.urandom(bs)
    rng = random.Random(1)
    ops = 0
    offset = 0
    start = time.perf_counter()
    deadline = start + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(64):
                if pattern.startswith("rand"):
                    offset = rng.randrange(size // bs) * bs
                else:
                    offset = (offset + bs) % size
                if pattern.endswith("write"):
                    os.pwrite(fd, buf, offset)
                else:
                    os.pread(fd, bs, offset)
                ops += 1
        if pattern.endswith("write"):
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return ops, time.perf_counter() - start


def transport(path: Path, size: int, pattern: str, bs: int, seconds: float) -> tuple[int, float]:
    """(operations, elapsed) of the same data movement over loopback TCP with no protocol and
    no store: a child process receives each block and writes it to a file (or reads it from
    the file and sends it), the parent sends (or receives) with blocking calls. What loopback
    TCP itself carries on this machine: the ceiling of any replica reached over it."""
    write = pattern.endswith("write")
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:  # the "replica"
        code = 0
        try:
            conn, _ = listener.accept()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            buf = bytearray(bs)
            rng = random.Random(2)
            while True:
                offset = rng.randrange(size // bs) * bs
                if write:
                    view, got = memoryview(buf), 0
                    while got < bs:
                        n = conn.recv_into(view[got:])
                        if not n:
                            raise EOFError
                        got += n
                    os.pwrite(fd, buf, offset)
                else:
                    conn.sendall(os.pread(fd, bs, offset))
        except (EOFError, OSError):
            pass
        except BaseException:
            code = 1
        os._exit(code)
    port = listener.getsockname()[1]
    listener.close()
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        buf = os.urandom(bs) if write else bytearray(bs)
        while time.perf_counter() < deadline:
            if write:
                conn.sendall(buf)
            else:
                view, got = memoryview(buf), 0
                while got < bs:
                    got += conn.recv_into(view[got:])
            ops += 1
        conn.close()
    finally:
        os.kill(pid, signal.SIGKILL)  # it leaves by itself once the connection closes, too
        os.waitpid(pid, 0)
    return ops, time.perf_counter() - start


async def replica(
    proc: ReplicaProcess,
    size: int,
    pattern: str,
    bs: int,
    seconds: float,
    depth: int,
    ca: str | None = None,
) -> tuple[int, float]:
    """(operations, elapsed) with ``depth`` requests in flight on one connection."""
    buf = os.urandom(bs)
    ops = 0
    next_offset = 0
    async with open_replica(proc.address, proc.key, tls_ca=ca) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(seed: int) -> None:
            nonlocal ops, next_offset
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                if pattern.startswith("rand"):
                    offset = rng.randrange(size // bs) * bs
                else:
                    offset = next_offset
                    next_offset = (next_offset + bs) % size
                if pattern.endswith("write"):
                    await client.write(offset, buf)
                else:
                    await client.read(offset, bs)
                ops += 1

        async with trio.open_nursery() as nursery:
            for i in range(depth):
                nursery.start_soon(worker, i)
        if pattern.endswith("write"):
            await client.flush()
        return ops, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--chunk-size", default="64K")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--tls", action="store_true", help="also measure the replica over TLS")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = scratch("replica-bench-", args.dir, Path(__file__).parent)
    tests = [
        ("seq write", 1 * MIB),
        ("seq read", 1 * MIB),
        ("rand write", 4096),
        ("rand read", 4096),
    ]
    rows = []
    try:
        ChunkStore.create(work / "replica", size, parse_size(args.chunk_size)).close()
        VolumeKey.new("bench").save(work / "volume.key")
        secure = make_tls(work / "tls") if args.tls else None
        for name, bs in tests:
            pattern = name.replace(" ", "")
            # each run starts with nothing left to write back from the one before it
            os.sync()
            p_ops, p_secs = plain(work / "plain.img", size, pattern, bs, args.seconds)
            os.sync()
            t_ops, t_secs = transport(work / "plain.img", size, pattern, bs, args.seconds)
            row = [name, bs, p_ops / p_secs, t_ops / t_secs]
            for tls in (None, secure) if secure else (None,):
                os.sync()
                proc = ReplicaProcess(work / "replica", work / "volume.key", tls=tls and tls[1:])
                try:
                    ca = tls[0].read_text() if tls else None
                    r_ops, r_secs = trio.run(
                        replica, proc, size, pattern, bs, args.seconds, args.depth, ca
                    )
                finally:
                    proc.stop()
                row.append(r_ops / r_secs)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nreplica over loopback TCP (depth {args.depth}) vs plain file, {args.size} volume,")
    print(f"chunk size {args.chunk_size}, {args.seconds:.0f} s per test, {os.cpu_count()} cores\n")
    tls_head = " TLS IOPS | TLS / TCP |" if args.tls else ""
    print(
        "| test | bs | plain IOPS | plain MB/s | TCP alone MB/s (ratio) | replica IOPS "
        f"| replica MB/s | ratio |{tls_head}"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.tls else ""))
    for name, bs, p_iops, t_iops, r_iops, *tls_iops in rows:
        tls_cells = "".join(f" {x:,.0f} | {x / r_iops:.2f} |" for x in tls_iops)
        print(
            f"| {name} | {bs // 1024}K | {p_iops:,.0f} | {p_iops * bs / 1e6:,.0f} | "
            f"{t_iops * bs / 1e6:,.0f} ({t_iops / p_iops:.2f}) | "
            f"{r_iops:,.0f} | {r_iops * bs / 1e6:,.0f} | {r_iops / p_iops:.2f} |{tls_cells}"
        )


if __name__ == "__main__":
    main()
