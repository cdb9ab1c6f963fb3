#!/usr/bin/env python3
"""lhfs backups next to restic, to the same S3 server, in one run.

A volume of half-compressible data (and the same bytes as a plain file for restic): initial
backup; a backup after 1% of the volume was rewritten in 1 MiB extents at random (files
rewritten); a backup after 1% of the 64 KiB chunks changed at random (scattered small writes,
the worst case for 2 MiB blocks); a full restore. Prints seconds and bytes uploaded (measured
as the growth of the bucket) for each.

    python bench/backup_bench.py [--size 2G] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backupstore.s3 import Bucket, Target
from lhfs import volume as volumes
from lhfs.store import ChunkStore
from lhfs.testing import Cli, S3Server
from lhfs.units import parse_size

MIB = 1 << 20
CHUNK = 64 << 10


def bucket_bytes(name: str) -> int:
    bucket = Bucket(Target(name, ""))
    try:
        return sum(obj.size or 0 for obj in bucket.list(""))
    except Exception:
        return 0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.dir or Path(__file__).parent))
    s3 = S3Server(work / "s3.log")
    os.environ.update(s3.env)
    cli = Cli(work / "root", env=s3.env)
    rows = []
    try:
        cli.run("volume", "create", "bench", "--size", args.size, "--replicas", "1")
        vol = volumes.load(cli.root, "bench")
        plain = work / "volume.img"
        rng = random.Random(1)
        with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store, open(plain, "wb") as f:
            for offset in range(0, size, MIB):
                data = rng.randbytes(MIB // 2) + bytes(MIB // 2)
                store.write(offset, data)
                f.write(data)
        target = "s3://lhfs-bench/p"
        env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "rc")}
        repo = f"s3:{s3.endpoint}/restic-bench"
        restic = shutil.which("restic")

        def lhfs_backup() -> None:
            cli.run("backup", "create", "bench", "--target", target, "--quiet")

        def restic_backup() -> None:
            subprocess.run(
                [restic, "-r", repo, "backup", "-q", str(plain)],
                env=env,
                check=True,
                capture_output=True,
            )

        if restic:
            subprocess.run([restic, "-r", repo, "init"], env=env, check=True, capture_output=True)
        patterns = (
            ("initial backup", 0),
            ("1% rewritten in 1 MiB extents", MIB),
            ("1% of 64 KiB chunks changed", CHUNK),
        )
        for label, unit in patterns:
            if unit:
                places = rng.sample(range(size // unit), size // unit // 100)
                replica_dir = vol.replica_dir(vol.replicas[0])
                with ChunkStore.open(replica_dir) as store, open(plain, "r+b") as f:
                    for place in places:
                        data = rng.randbytes(unit // 2) + bytes(unit // 2)
                        store.write(place * unit, data)
                        f.seek(place * unit)
                        f.write(data)
            before = bucket_bytes("lhfs-bench")
            seconds = timed(lhfs_backup)
            rows.append((f"lhfs {label}", seconds, bucket_bytes("lhfs-bench") - before))
            if restic:
                before = bucket_bytes("restic-bench")
                seconds = timed(restic_backup)
                rows.append((f"restic {label}", seconds, bucket_bytes("restic-bench") - before))
        url = cli.json("backup", "ls", "--target", target)[-1]["url"]
        seconds = timed(
            lambda: cli.run("backup", "restore", url, "back", "--replicas", "1", "--quiet")
        )
        rows.append(("lhfs full restore", seconds, 0))
        if restic:
            out = work / "restored"
            seconds = timed(
                lambda: subprocess.run(
                    [restic, "-r", repo, "restore", "latest", "--target", str(out)],
                    env=env,
                    check=True,
                    capture_output=True,
                )
            )
            rows.append(("restic full restore", seconds, 0))
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nbackups of a {args.size} volume (half-compressible), S3 = moto server on loopback\n")
    print("| what | seconds | uploaded bytes | % of volume |")
    print("|---|---:|---:|---:|")
    for label, seconds, sent in rows:
        share = f"{100 * sent / size:.2f}%" if sent else "-"
        print(f"| {label} | {seconds:.2f} | {sent:,} | {share} |")


if __name__ == "__main__":
    main()
