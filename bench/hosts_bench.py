#!/usr/bin/env python3
"""A volume whose replicas are on other hosts (network namespaces), next to loopback replicas.

In one run: fio through the device of a volume with 3 replicas on this host, then of one with
its 3 replicas on 3 namespace hosts (``tools/hosts.py``); then, on the latter, the I/O stall when
a host's link drops (the longest gap between completed 4 KiB writes of a steady writer, against
the I/O timeout), and the time and bytes it takes to bring that replica back after 1% of the
volume changed while it was away (by itself: reconnection, wait, incremental rebuild).

    python bench/hosts_bench.py [--size 1G] [--runtime 8]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fio_bench import JOBS, fio, print_table

from lhfs.core.procs import wait_for
from lhfs.core.units import parse_size
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import Cli, loop_attach, teardown
from tools.hosts import Cluster

CHUNK = 64 << 10
REJOIN_WAIT = 1.0


def volume(cli: Cli, work: Path, size: str, cluster: Cluster | None, started: list) -> Path:
    """Volume ``v``: 3 local replicas, or (``cluster``) one on each host; its device."""
    device = work / f"{cli.root.name}.dev"
    replicas = "3" if cluster is None else "1"
    cli.run(
        *("volume", "create", "v", "--size", size, "--replicas", replicas),
        *("--rejoin-wait", str(REJOIN_WAIT)),
    )
    cli.run("volume", "attach", "v", "--device", str(device))
    if cluster is not None:
        cli.run("volume", "key", "v", "--out", str(work / "v.key"))
        for host in cluster.hosts:
            proc = ReplicaProcess(
                work / host.name, work / "v.key", host=host.address, wrap=host.command([])
            )
            started.append(proc)
            cli.run("replica", "add", "v", "--address", proc.address, "--quiet")
        cli.run("replica", "rm", "v", "r1")
    return device


def steady_writes(device: Path, stop: threading.Event, done: list[float]) -> None:
    """4 KiB O_DIRECT writes one after the other, each completion time recorded."""
    buf = mmap.mmap(-1, 4096)
    buf[:] = os.urandom(4096)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    rng = random.Random(5)
    try:
        while not stop.is_set():
            try:
                os.pwritev(fd, [buf], rng.randrange(1024) * 4096)
            except OSError:
                continue
            done.append(time.monotonic())
    finally:
        os.close(fd)


def replica_of(cli: Cli, rid: str) -> dict:
    return next(r for r in cli.info("v")["replicas"] if r["id"] == rid)


def outage(cli: Cli, device: Path, cluster: Cluster, size: int) -> dict[str, float]:
    """Cut a replica host's link under a steady writer, change 1% of the volume while it is
    away, bring the link back: the stall, and what bringing the replica back took."""
    info = cli.info("v")
    victim = cluster.hosts[0]
    rid = next(r["id"] for r in info["replicas"] if r["address"].startswith(victim.address))
    timeout = info["settings"]["io_timeout"]
    stop, done = threading.Event(), []
    writer = threading.Thread(target=steady_writes, args=(device, stop, done))
    writer.start()
    wait_for(lambda: len(done) > 200, 30, "the writer")
    cut = time.monotonic()
    victim.cut()
    wait_for(lambda: replica_of(cli, rid)["mode"] == "ERR", 60, "the replica to be marked ERR")
    wait_for(lambda: done[-1] > cut + 1, 60, "writes to go on")
    stop.set()
    writer.join()
    after = [t for t in done if t >= cut]
    stall = max(b - a for a, b in zip([cut, *after], after, strict=False))
    rng = random.Random(7)
    chunks = rng.sample(range(size // CHUNK), max(1, size // CHUNK // 100))  # 1%
    fd = os.open(device, os.O_RDWR)
    try:
        for chunk in chunks:
            os.pwrite(fd, rng.randbytes(CHUNK), chunk * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
    restored = time.monotonic()
    victim.restore()
    wait_for(lambda: replica_of(cli, rid)["mode"] == "RW", 600, "the replica to come back")
    back = time.monotonic() - restored
    stats = replica_of(cli, rid)["rebuild_stats"]
    return {
        "timeout": timeout,
        "stall": stall,
        "back": back,
        "rebuild": stats["seconds"],
        "copied": stats["bytes_copied"],
        "changed": len(chunks) * CHUNK,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runtime", type=int, default=8)
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="hosts-bench-", dir=Path(__file__).parent))
    cluster = Cluster(prefix="hb")
    cluster.up(3)
    started: list[ReplicaProcess] = []
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        for label, hosts in (("3 replicas on this host", None), ("3 replicas on 3 hosts", cluster)):
            cli = Cli(work / ("local" if hosts is None else "hosts"))
            device = volume(cli, work, args.size, hosts, started)
            loop = loop_attach(device)
            try:
                fio(loop, "write", "1M", args.size, max(3, args.runtime // 2))  # allocate
                results[label] = [fio(loop, rw, bs, args.size, args.runtime) for _, rw, bs in JOBS]
            finally:
                subprocess.run(["losetup", "-d", loop], check=False)
            if hosts is not None:
                away = outage(cli, device, cluster, size)
            teardown(cli.root)
    finally:
        for proc in started:
            proc.stop()
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nfio, libaio, direct=1, iodepth 16, {args.size}, {args.runtime}s per job\n")
    print_table(results, "3 replicas on this host")
    print(
        f"\nlink of a replica host cut under a steady 4 KiB writer: the longest wait for a "
        f"write {away['stall']:.2f} s (I/O timeout {away['timeout']:.0f} s)\n"
        f"1% of the volume ({away['changed'] / 1e6:.1f} MB) changed while it was away; link "
        f"back: RW again after {away['back']:.1f} s (rejoin wait {REJOIN_WAIT:.0f} s, rebuild "
        f"{away['rebuild']:.1f} s), {away['copied'] / 1e6:.1f} MB copied"
    )
    print(json.dumps(away))


if __name__ == "__main__":
    main()
