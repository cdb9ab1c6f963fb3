#!/usr/bin/env python3
"""fio on the lhfs device (1 and 3 replicas) next to a plain file and qemu-storage-daemon.

All in one run, one table, ratios to the plain file on the same disk. Each target is driven
through a loop device with direct I/O (what a user formats and mounts), except the plain file,
which fio opens itself. Jobs: 1 MiB sequential write and read, 4 KiB random write and read, 16
in flight, libaio, direct=1, time based. A null device (lhfs's FUSE channel storing nothing)
shows what the FUSE path itself costs. The "metrics on" targets serve Prometheus metrics and
are scraped every second while fio runs (a scraper ten times more eager than usual): next to
the same target without, they show what the metrics cost.

    python bench/fio_bench.py [--size 1G] [--runtime 10] [--repeat 1] [--dir DIR]
        [--targets null,1,3,1s,3s,1m,3m,qemu]

"1s" and "3s" are 1 and 3 replicas with shared memory off (``LHFS_SHARED_MEMORY=off``): every
replica on its socket, as remote ones are. Next to qemu-storage-daemon, each lhfs row also
gets its ratio to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.core.procs import wait_for
from lhfs.testing import Cli, loop_attach, scratch, teardown

JOBS = [
    ("seq write 1M", "write", "1M"),
    ("seq read 1M", "read", "1M"),
    ("rand write 4K", "randwrite", "4k"),
    ("rand read 4K", "randread", "4k"),
]


def fio(target: str, rw: str, bs: str, size: str, runtime: int) -> tuple[float, float]:
    """(IOPS, MB/s) of one fio job."""
    result = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--filename={target}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--size={size}",
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            "--time_based",
            f"--runtime={runtime}",
            "--ramp_time=1",
            "--output-format=json",
            "--randrepeat=0",
            "--norandommap",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    job = json.loads(result.stdout)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"], side["bw_bytes"] / 1e6


@contextmanager
def lhfs_device(
    work: Path, replicas: int, size: str, metrics: bool = False, sockets: bool = False
) -> Iterator[str]:
    scratch = Path(tempfile.mkdtemp(prefix=f"lhfs{replicas}{'m' if metrics else ''}-", dir=work))
    cli = Cli(scratch / "root", env={"LHFS_SHARED_MEMORY": "off"} if sockets else None)
    device = scratch / "device"
    stop = threading.Event()
    try:
        cli.run("volume", "create", "bench", "--size", size, "--replicas", str(replicas))
        extra = ("--metrics", "127.0.0.1:0") if metrics else ()
        cli.run("volume", "attach", "bench", "--device", str(device), *extra)
        if metrics:
            address = cli.info("bench")["metrics"]
            threading.Thread(target=scrape_every_second, args=(address, stop), daemon=True).start()
        loop = loop_attach(device)
        try:
            yield loop
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    finally:
        stop.set()
        teardown(cli.root)
        shutil.rmtree(scratch, ignore_errors=True)


def scrape_every_second(address: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
            answer.read()


@contextmanager
def loop_on_server(proc: subprocess.Popen, path: Path) -> Iterator[str]:
    """A loop device on the file that ``proc`` (started, serving) exports; both go at the end."""
    try:
        loop = loop_attach(path)
        try:
            yield loop
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def null_device(work: Path, size: str) -> Iterator[str]:
    """lhfs's FUSE channel with nothing behind it (bench/null_device.py)."""
    path = work / "null.dev"
    server = str(Path(__file__).with_name("null_device.py"))
    proc = subprocess.Popen(
        [sys.executable, server, str(path), "--size", size], stdout=subprocess.PIPE, text=True
    )
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the null device did not start")
    with loop_on_server(proc, path) as loop:
        yield loop


@contextmanager
def qemu_device(work: Path, size: str) -> Iterator[str]:
    image, export = work / "qemu.qcow2", work / "qemu.export"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True)
    export.touch()
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,filename={image},node-name=file,cache.direct=off",
            "--blockdev",
            "driver=qcow2,file=file,node-name=qcow",
            "--export",
            f"type=fuse,id=exp,node-name=qcow,mountpoint={export},writable=on",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: proc.poll() is not None or export.stat().st_size > 0, 30, "the export")
    if proc.poll() is not None:
        raise RuntimeError(f"qemu-storage-daemon exited with {proc.returncode}")
    with loop_on_server(proc, export) as loop:
        yield loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--dir", default=None, help="scratch directory (default: under bench/)")
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument(
        "--targets",
        default="null,1,3,qemu",
        help="which to measure besides the plain file: null, 1, 3, 1s and 3s (shared memory "
        "off), 1m and 3m (1 and 3 replicas with metrics served and scraped), qemu (default: "
        "null,1,3,qemu)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each job this many times, the median counts (the order of the targets "
        "changes at each round, so that a slow moment of the disk hits each in turn)",
    )
    parser.add_argument(
        "--jobs",
        default=None,
        help="only these jobs, by fio mode: write,read,randwrite,randread (default: all)",
    )
    args = parser.parse_args()
    if args.jobs:
        JOBS[:] = [job for job in JOBS if job[1] in args.jobs.split(",")]
    wanted = set(args.targets.split(","))
    work = scratch("fio-bench-", args.dir, Path(__file__).parent)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        plain = work / "plain.img"
        subprocess.run(["fallocate", "-l", args.size, str(plain)], check=True)
        targets = [
            ("plain file", None),
            ("lhfs FUSE channel alone (null file)", "null"),
            ("lhfs 1 replica", 1),
            ("lhfs 3 replicas", 3),
            ("lhfs 1 replica, sockets only", "1s"),
            ("lhfs 3 replicas, sockets only", "3s"),
            ("lhfs 1 replica, metrics on", "1m"),
            ("lhfs 3 replicas, metrics on", "3m"),
        ]
        if not args.skip_qemu and shutil.which("qemu-storage-daemon"):
            targets.append(("qemu-storage-daemon qcow2", "qemu"))
        targets = [(label, kind) for label, kind in targets if kind is None or str(kind) in wanted]
        rounds: dict[str, list[list[tuple[float, float]]]] = {label: [] for label, _ in targets}
        for round_ in range(args.repeat):
            order = targets if round_ % 2 == 0 else targets[::-1]
            for label, kind in order:
                print(f"running {label} ...", file=sys.stderr, flush=True)
                rounds[label].append(measure(work, kind, args.size, args.runtime, plain))
                print(f"  {label}: {rounds[label][-1]}", file=sys.stderr, flush=True)
        for label, runs in rounds.items():
            results[label] = [
                (statistics.median(r[j][0] for r in runs), statistics.median(r[j][1] for r in runs))
                for j in range(len(JOBS))
            ]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    times = f", median of {args.repeat}" if args.repeat > 1 else ""
    print(f"\nfio, libaio, direct=1, iodepth 16, {args.size}, {args.runtime}s per job{times}\n")
    print_table(results, "plain file")
    qemu = results.get("qemu-storage-daemon qcow2")
    if qemu:
        print("\nagainst qemu-storage-daemon (" + ", ".join(n for n, _, _ in JOBS) + "):")
        for label, rows in results.items():
            if label.startswith("lhfs") and "null" not in label:
                ratios = " ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(rows, qemu, strict=True))
                print(f"- {label}: {ratios}")
    for replicas in ("1 replica", "3 replicas"):
        off, on = results.get(f"lhfs {replicas}"), results.get(f"lhfs {replicas}, metrics on")
        if off and on:
            ratios = " ".join(f"{b[0] / a[0]:.3f}" for a, b in zip(off, on, strict=True))
            print(f"\nmetrics on / off, {replicas} ({', '.join(n for n, _, _ in JOBS)}): {ratios}")


def print_table(results: dict[str, list[tuple[float, float]]], reference: str) -> None:
    """One Markdown row per target: each job's figure and its ratio to ``reference``'s."""
    print("| target | " + " | ".join(name for name, _, _ in JOBS) + " |")
    print("|---|" + "---:|" * len(JOBS))
    for label, rows in results.items():
        cells = []
        for (name, _, _), (iops, mbs), (ref_iops, _) in zip(
            JOBS, rows, results[reference], strict=True
        ):
            figure = f"{mbs:,.0f} MB/s" if "1M" in name else f"{iops:,.0f} IOPS"
            cells.append(f"{figure} ({iops / ref_iops:.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


def measure(
    work: Path, kind: str | int | None, size: str, runtime: int, plain: Path
) -> list[tuple[float, float]]:
    """Every job once on one target (a fresh volume for the lhfs ones)."""
    if kind is None:
        return [fio(str(plain), rw, bs, size, runtime) for _, rw, bs in JOBS]
    if kind == "qemu":
        context = qemu_device(work, size)
    elif kind == "null":
        context = null_device(work, size)
    else:
        text = str(kind)
        replicas = int(text.rstrip("ms"))
        context = lhfs_device(
            work, replicas, size, metrics=text.endswith("m"), sockets=text.endswith("s")
        )
    with context as device:
        fio(device, "write", "1M", size, max(3, runtime // 2))  # allocate
        return [fio(device, rw, bs, size, runtime) for _, rw, bs in JOBS]


if __name__ == "__main__":
    main()
