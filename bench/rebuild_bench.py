#!/usr/bin/env python3
"""Rebuild of a fresh and of a stale replica next to rsync of the same replica data.

A 2 GiB volume (2 replicas) is filled through its device. Then, in one run:
- full: a new replica is added and rebuilt; rsync copies a healthy replica's directory;
- 1%: a replica is killed, 1% of the chunks are rewritten, the volume is attached again and the
  stale replica is rebuilt; ``rsync --inplace --no-whole-file`` brings the earlier copy up to
  date with the same change.
Prints seconds, MB/s and bytes moved.

    python bench/rebuild_bench.py [--size 2G] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.core.units import parse_size
from lhfs.engine import control
from lhfs.testing import Cli, scratch, teardown

CHUNK = 64 << 10
MIB = 1 << 20


def replica(cli: Cli, replica_id: str) -> dict:
    info = control.call(volumes.load(cli.root, "bench").control_socket, "info", timeout=30)
    return next(r for r in info["replicas"] if r["id"] == replica_id)


def rsync(src: Path, dst: Path, *extra: str) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(
        ["rsync", "-a", "--stats", *extra, f"{src}/", f"{dst}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seconds = time.perf_counter() - start
    sent = next(line for line in out.splitlines() if line.startswith("Total bytes sent"))
    return seconds, int(sent.split(":")[1].replace(",", "").split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = scratch("rebuild-bench-", args.dir, Path(__file__).parent)
    cli = Cli(work / "root")
    rows = []
    try:
        cli.run("volume", "create", "bench", "--size", args.size, "--replicas", "2")
        device = work / "dev"
        cli.run("volume", "attach", "bench", "--device", str(device))
        rng = random.Random(1)
        fd = os.open(device, os.O_WRONLY)
        for offset in range(0, size, 4 * MIB):  # half-compressible, all distinct
            os.pwrite(fd, rng.randbytes(2 * MIB) + bytes(2 * MIB), offset)
        os.fsync(fd)
        os.close(fd)
        vol = volumes.load(cli.root, "bench")
        r1_dir = vol.replica_dir(vol.replica("r1"))

        cli.run("replica", "add", "bench", "--quiet")
        stats = replica(cli, "r3")["rebuild_stats"]
        rows.append(("full rebuild (new replica)", stats["seconds"], stats["bytes_copied"]))
        print(f"full rebuild phases: {stats['phases']}", file=sys.stderr)
        copy = work / "rsync-copy"
        seconds, sent = rsync(r1_dir, copy)
        rows.append(("rsync, full copy of a replica", seconds, sent))

        os.kill(replica(cli, "r3")["pid"], signal.SIGKILL)
        chunks = rng.sample(range(size // CHUNK), size // CHUNK // 100)
        fd = os.open(device, os.O_WRONLY)
        for chunk in chunks:
            os.pwrite(fd, rng.randbytes(CHUNK), chunk * CHUNK)
        os.fsync(fd)
        os.close(fd)
        cli.run("volume", "detach", "bench")
        seconds, sent = rsync(r1_dir, copy, "--inplace", "--no-whole-file")
        rows.append(("rsync --inplace --no-whole-file, 1% changed", seconds, sent))
        cli.run("volume", "attach", "bench", "--device", str(device))
        wait_for(lambda: replica(cli, "r3")["mode"] == "RW", 600, "the stale replica")
        stats = replica(cli, "r3")["rebuild_stats"]
        rows.insert(3, ("stale rebuild, 1% changed", stats["seconds"], stats["bytes_copied"]))
        print(f"stale rebuild phases: {stats['phases']}", file=sys.stderr)
        cli.run("volume", "detach", "bench")
    finally:
        teardown(cli.root)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nrebuild vs rsync, {args.size} volume of written data, chunks of 64K, one run\n")
    print("| what | seconds | MB/s of volume | bytes moved | % of volume |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, moved in rows:
        print(
            f"| {label} | {seconds:.2f} | {size / seconds / 1e6:,.0f} | {moved:,} | "
            f"{100 * moved / size:.2f}% |"
        )


if __name__ == "__main__":
    main()
