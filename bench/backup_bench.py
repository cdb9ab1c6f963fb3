#!/usr/bin/env python3
"""lhfs backups (to a plain and to an encrypted store) next to restic, to the same S3 server,
in one run.

A volume of half-compressible data (and the same bytes as a plain file for restic): initial
backup; a backup after 1% of the volume was rewritten in 1 MiB extents at random (files
rewritten); a backup after 1% of the 64 KiB chunks changed at random (scattered small writes,
the worst case for 2 MiB blocks); a full restore. Prints seconds and bytes uploaded (measured
as the growth of the bucket) for each. Each kind of change is made ``--rounds`` times, lhfs and
restic backing up after each: the median is shown with the fastest and slowest (a backup of
under a second moves by a third with this machine's pace).

    python bench/backup_bench.py [--size 2G] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backupstore.s3 import Bucket, Target
from lhfs.config import volume as volumes
from lhfs.core.units import parse_size
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, S3Server, scratch

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
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
    parser.add_argument("--rounds", type=int, default=3, help="changes of each kind (default 3)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    size = parse_size(args.size)
    work = scratch("backup-bench-", args.dir, Path(__file__).parent)
    s3 = S3Server(work / "s3.log")
    os.environ.update(s3.env)
    cli = Cli(work / "root", env=s3.env)
    rows = []
    try:
        cli.run("volume", "create", "bench", "--size", args.size, "--replicas", "1")
        vol = volumes.load(cli.root, "bench")
        plain = work / "volume.img"
        rng = random.Random(1)
        floor_rng = random.Random(2)  # (the changes stay those of a run without floor rows)
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
            cli.run("backup", "create", "bench", "--target", target, "--create-bucket", "--quiet")

        sealed_target = "s3://lhfs-bench-enc/p"
        sealed = Cli(cli.root, env={**s3.env, "LHFS_BACKUP_PASSWORD": "bench"})

        def lhfs_encrypted_backup() -> None:
            sealed.run(
                "backup", "create", "bench", "--target", sealed_target, "--create-bucket",
                "--quiet",
            )  # fmt: skip

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
            times: dict[str, list[float]] = {"lhfs": [], "lhfs encrypted": [], "restic": []}
            sent: dict[str, list[int]] = {"lhfs": [], "lhfs encrypted": [], "restic": []}
            floor: dict[str, list[float]] = {"start": [], "send": []}
            for _ in range(args.rounds if unit else 1):
                if unit:
                    change(vol, plain, unit, size, rng)
                for tool, backup, bucket in (
                    ("lhfs", lhfs_backup, "lhfs-bench"),
                    ("lhfs encrypted", lhfs_encrypted_backup, "lhfs-bench-enc"),
                    ("restic", restic_backup, "restic-bench"),
                ):
                    if tool == "restic" and not restic:
                        continue
                    before = bucket_bytes(bucket)
                    times[tool].append(timed(backup))
                    sent[tool].append(bucket_bytes(bucket) - before)
                if unit == MIB:  # what any increment of this size costs here, at the least
                    floor["start"].append(client_start())
                    floor["send"].append(send_alone(sent["lhfs"][-1], floor_rng))
            for tool in ("lhfs", "lhfs encrypted", "restic"):
                if times[tool]:
                    rows.append((f"{tool} {label}", times[tool], statistics.median(sent[tool])))
                if tool == "lhfs" and floor["start"]:
                    rows.append(("- floor: interpreter + S3 client alone", floor["start"], 0))
                    rows.append(("- floor: the same bytes sent alone", floor["send"], 0))
        url = cli.json("backup", "ls", "--target", target)[-1]["url"]
        seconds = timed(
            lambda: cli.run("backup", "restore", url, "back", "--replicas", "1", "--quiet")
        )
        rows.append(("lhfs full restore", [seconds], 0))
        url = sealed.json("backup", "ls", "--target", sealed_target)[-1]["url"]
        seconds = timed(
            lambda: sealed.run("backup", "restore", url, "back2", "--replicas", "1", "--quiet")
        )
        rows.append(("lhfs encrypted full restore", [seconds], 0))
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
            rows.append(("restic full restore", [seconds], 0))
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nbackups of a {args.size} volume (half-compressible), S3 = moto server on loopback\n")
    print("| what | seconds (median) | fastest-slowest | uploaded bytes | % of volume |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, sent in rows:
        share = f"{100 * sent / size:.2f}%" if sent else "-"
        spread = f"{min(seconds):.2f}-{max(seconds):.2f}" if len(seconds) > 1 else "-"
        print(
            f"| {label} | {statistics.median(seconds):.2f} | {spread} | {int(sent):,} | {share} |"
        )


def client_start() -> float:
    """An interpreter that loads the backup store and its S3 client as ``lhfs`` does, then
    exits."""
    code = "from lhfs.cli import _load_store; _load_store()"
    return timed(lambda: subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT))


def send_alone(sent: int, rng: random.Random) -> float:
    """PUT new 2 MiB blocks of the volume's kind, compressed as a backup does, 8 at a time as
    a backup does, until about ``sent`` bytes went: the S3 part of an increment, alone."""
    packer = zstandard.ZstdCompressor(level=3)
    blocks = []
    while sum(map(len, blocks)) < sent * 0.95:
        half = rng.randbytes(MIB // 2) + bytes(MIB // 2)
        blocks.append(packer.compress(half + rng.randbytes(MIB // 2) + bytes(MIB // 2)))
    bucket = Bucket(Target("lhfs-floor", ""))
    bucket.ensure(create=True)
    tag = rng.randrange(1 << 30)

    def send() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: bucket.put(f"{tag}-{i}", blocks[i]), range(len(blocks))))

    return timed(send)


def change(vol: volumes.Volume, plain: Path, unit: int, size: int, rng: random.Random) -> None:
    """Rewrite 1% of the volume in ``unit`` pieces at random, the same in the plain file."""
    places = rng.sample(range(size // unit), size // unit // 100)
    with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store, open(plain, "r+b") as f:
        for place in places:
            data = rng.randbytes(unit // 2) + bytes(unit // 2)
            store.write(place * unit, data)
            f.seek(place * unit)
            f.write(data)


if __name__ == "__main__":
    main()
