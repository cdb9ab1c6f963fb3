#!/usr/bin/env python3
"""Small synchronous writes on a volume whose metrics endpoint is flooded with scrapes.

Nobody is asked who they are before a scrape, so a flood of them must not slow the volume
much more than any busy process on the host would. Each round times ``--writes`` 4 KiB
writes (``O_DSYNC``) to the device: without scrapes, then while ``--clients`` processes'
threads scrape ``/metrics`` as fast as they can; the ratio is to the unscraped rounds of the
same run. Also says how many scrapes a second the endpoint answered.

    python bench/metrics_flood_bench.py [--writes 2000] [--clients 32] [--rounds 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lhfs.testing import Cli, scratch, teardown


def flood(port: int, clients: int, stop: float, answered: multiprocessing.Value) -> None:
    """Scrape from ``clients`` threads until ``stop`` (a ``time.time()``)."""

    def one() -> None:
        while time.time() < stop:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                got = b""
                while chunk := sock.recv(1 << 16):
                    got += chunk
            if got:  # (one closed unanswered is not counted)
                with answered.get_lock():
                    answered.value += 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def writes(device: Path, count: int) -> float:
    """Seconds ``count`` 4 KiB synchronous writes take."""
    fd = os.open(device, os.O_WRONLY | os.O_DSYNC)
    block = os.urandom(4096)
    try:
        started = time.monotonic()
        for i in range(count):
            os.pwrite(fd, block, i * 4096 % (32 << 20))
        return time.monotonic() - started
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", help="where the volume lives (default: a temporary directory)")
    args = parser.parse_args()
    work = scratch("lhfs-metrics-flood-", args.dir, Path(tempfile.gettempdir()))
    cli = Cli(work / "root")
    try:
        cli.run("volume", "create", "bench", "--size", "64M", "--replicas", "1")
        device = work / "dev"
        cli.run("volume", "attach", "bench", "--device", str(device), "--metrics", "127.0.0.1:0")
        port = int(cli.info("bench")["metrics"].rsplit(":", 1)[1])
        writes(device, args.writes)  # (warm: the chunks exist from here on)
        quiet, flooded, rates = [], [], []
        for _ in range(args.rounds):
            quiet.append(writes(device, args.writes))
            answered = multiprocessing.Value("l", 0)
            stop = time.time() + 3600
            scraper = multiprocessing.Process(
                target=flood, args=(port, args.clients, stop, answered)
            )
            scraper.start()
            time.sleep(1.0)  # (the flood under way before the clock starts)
            before, started = answered.value, time.monotonic()
            flooded.append(writes(device, args.writes))
            rates.append((answered.value - before) / (time.monotonic() - started))
            scraper.terminate()
            scraper.join()
        base, under = statistics.median(quiet), statistics.median(flooded)
        print(f"{args.writes} x 4K O_DSYNC writes, median of {args.rounds} rounds")
        print(f"no scrapes:            {base:.2f} s (1.00)")
        print(
            f"{args.clients} clients scraping: {under:.2f} s ({under / base:.2f}), "
            f"{statistics.median(rates):.0f} scrapes/s answered"
        )
    finally:
        teardown(cli.root)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
