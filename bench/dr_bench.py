#!/usr/bin/env python3
"""A DR standby applying a 1% incremental backup, next to a full restore of the same backup.

A volume of half-compressible data is backed up; a standby follows it (its first, full restore
is timed too). Then 1% of the volume's 2 MiB backup blocks are rewritten and backed up again,
and the time the standby's follower takes to apply that increment (as its status reports it)
is set against ``lhfs backup restore`` of the same backup into a new volume, in the same run,
on the same S3 server (the moto server on loopback), one replica each.

    python bench/dr_bench.py [--size 2G] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.config import volume as volumes
from lhfs.core.units import parse_size
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, S3Server, scratch, teardown

MIB = 1 << 20
BLOCK = 2 * MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = scratch("dr-bench-", args.dir, Path(__file__).parent)
    s3 = S3Server(work / "s3.log")
    os.environ.update(s3.env)
    cli = Cli(work / "root", env=s3.env)
    target = "s3://lhfs-dr-bench/p"
    rng = random.Random(1)
    try:
        cli.run("volume", "create", "src", "--size", args.size, "--replicas", "1")
        vol = volumes.load(cli.root, "src")
        with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store:
            for offset in range(0, size, MIB):
                store.write(offset, rng.randbytes(MIB // 2) + bytes(MIB // 2))
        cli.backup("src", target)
        cli.run("dr", "create", "standby", "--target", target, "--volume", "src",
                "--replicas", "1", "--interval", "0.5", "--quiet")  # fmt: skip
        first = cli.json("dr", "status", "standby")["last_increment"]

        changed = rng.sample(range(size // BLOCK), size // BLOCK // 100)
        with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store:
            for block in changed:
                store.write(block * BLOCK, rng.randbytes(BLOCK // 2) + bytes(BLOCK // 2))
        url = cli.backup("src", target)
        increment = cli.dr_restored("standby", url, 600)["last_increment"]
        started = time.perf_counter()
        cli.run("backup", "restore", url, "full", "--replicas", "1", "--quiet")
        full = time.perf_counter() - started
        assert cli.checksum("full") == cli.checksum("src")
        cli.run("dr", "stop", "standby")
        assert cli.checksum("standby") == cli.checksum("src")
    finally:
        teardown(cli.root)
        for name in volumes.list_names(cli.root):
            cli.run("volume", "rm", name, check=False)
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("standby: first (full) restore", first),
        (f"standby: 1% increment ({len(changed)} of {size // BLOCK} blocks rewritten)", increment),
    ]
    print(f"\nDR standby of a {args.size} volume, S3 = moto server on loopback, 1 replica\n")
    print("| what | seconds | blocks fetched | bytes fetched |")
    print("|---|---:|---:|---:|")
    for label, stats in rows:
        print(f"| {label} | {stats['seconds']:.2f} | {stats['fetched']} | {stats['bytes']:,} |")
    print(f"| backup restore of the same backup (new volume) | {full:.2f} | - | - |")
    print(
        f"\nincrement / backup restore = {increment['seconds'] / full:.3f}, increment / the "
        f"standby's own full restore = {increment['seconds'] / first['seconds']:.3f} "
        "(target <= 0.1)"
    )


if __name__ == "__main__":
    main()
