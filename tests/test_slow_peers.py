"""Peers that are slow but alive: a replica on a slow link, a store that stops answering.

Replicas are real processes and the store a real S3 server, behind ``tools.faultproxy``,
which slows or stalls what passes through it on loopback."""

from __future__ import annotations

import calendar
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from conftest import needs_fuse

from lhfs.core.procs import wait_for
from lhfs.testing import Cli, write_direct
from tools.faultproxy import FaultProxy

MIB = 1 << 20


def replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


def timed_writes(device: Path, count: int, size: int) -> list[float]:
    """``count`` O_DIRECT writes of ``size`` bytes at once, one per thread (the engine gets
    them together): how long each one took."""

    def one(i: int) -> float:
        data = os.urandom(size)
        start = time.monotonic()
        write_direct(device, i * size, data, sync=False)
        return time.monotonic() - start

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@needs_fuse
def test_a_slow_replica_holds_writes_no_longer_than_the_io_timeout(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    """A replica behind a link that carries 256 KiB/s takes 8 s to receive 32 writes of
    64 KiB, answering each as it arrives: bytes come from it all the time, yet the last
    write waits 8 s. The deadline is each request's: the replica is marked failed once a
    write waited the I/O timeout, and the writes go on without it. (Any bytes counted as
    life: the writes waited behind it for as long as it took.) On a link at a sane rate, a
    burst of 1 MiB writes leaves the replica serving."""
    cli.run("volume", "create", "w", "--size", "64M", "--replicas", "1", "--io-timeout", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "w", "--device", str(device))
    _remote, proxy, address = proxied_replica("w")
    far = cli.run("replica", "add", "w", "--address", address).stdout.split()[2]
    assert replica(cli, "w", far)["mode"] == "RW"

    proxy.send_rate = 64 * MIB  # 8 MiB at once: an eighth of a second to cross, all in time
    took = timed_writes(device, 8, MIB)
    said = replica(cli, "w", far)
    assert said["mode"] == "RW" and said["failures"] == 0, (said, took)

    proxy.send_rate = 256 << 10
    took = timed_writes(device, 32, 64 << 10)
    said = replica(cli, "w", far)
    assert said["mode"] == "ERR", (said, took)
    assert said["error"] == "no answer within 2s", said
    # the timeout, a watchdog tick (a quarter of it) and room for a loaded machine (the
    # last write waited 8 s when any byte counted as life)
    assert max(took) < 5, sorted(took)[-4:]
    assert cli.live("w")["state"] == "degraded"
    proxy.send_rate = None
    cli.run("volume", "detach", "w")


@needs_fuse
def test_a_replica_too_slow_to_be_rebuilt_says_why_and_waits_longer(
    cli: Cli, tmp_path: Path, proxied_replica
) -> None:
    """A replica on a slow link is rebuilt while the volume is written: it cannot keep up
    with the writes it receives once it joins, and its rebuild fails for that, saying so
    (it said "connection ... closed", the engine log alone naming the timeout). Brought
    back and failing again, it is not tried again within seconds (each attempt held the
    volume's writes for the I/O timeout, again and again): ``replica ls`` says it is too
    slow and when it is tried again. No write waits much past the I/O timeout meanwhile."""
    cli.run("volume", "create", "s", "--size", "64M", "--replicas", "1", "--io-timeout", "2")
    cli.run("volume", "set", "s", "--rejoin-wait", "0")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "s", "--device", str(device))
    write_direct(device, 0, os.urandom(8 * MIB))
    _remote, proxy, address = proxied_replica("s")
    proxy.send_rate = proxy.rate = 256 << 10

    stop = threading.Event()
    slowest: list[float] = [0.0]

    def writer(i: int) -> None:
        data = os.urandom(128 << 10)
        while not stop.is_set():
            start = time.monotonic()
            write_direct(device, (16 + i) * MIB, data, sync=False)
            slowest[0] = max(slowest[0], time.monotonic() - start)

    with ThreadPoolExecutor(16) as pool:  # (2 MiB in flight: 8 s on that link)
        writers = [pool.submit(writer, i) for i in range(16)]
        try:
            far = cli.run("replica", "add", "s", "--address", address, "--no-wait")
            far_id = far.stdout.split()[2]
            wait_for(
                lambda: "too slow" in (replica(cli, "s", far_id)["rejoin"] or ""),
                30,
                "the replica to be found too slow",
            )
        finally:
            stop.set()
        for done in writers:
            done.result()
    said = replica(cli, "s", far_id)
    assert said["mode"] == "ERR", said
    # (failed by the I/O deadline of a write, or by the rebuild's own of its requests)
    assert said["error"] in (
        f"rebuild failed: replica {far_id} ({address}) failed: no answer within 2s",
        f"rebuild failed: replica {far_id} ({address}) answered nothing for 2s",
    ), said
    assert said["rejoin"] == (
        f"too slow to keep up with the volume's writes while rebuilt ({said['error']}); "
        "trying again in 30s"
    ), said
    assert said["failures"] >= 2, said  # (failed, brought back, failed again: then it waits)
    assert slowest[0] < 5, slowest  # (the I/O timeout and room for a loaded machine: not 8 s)
    proxy.send_rate = proxy.rate = None
    cli.run("volume", "detach", "s")


@needs_fuse
def test_dr_status_says_when_the_store_leaves_a_request_unanswered(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A store that takes connections and answers nothing holds the follower's listing for
    as long as its read timeout and retries last. ``dr status`` says it waits for the store,
    and since when, within seconds, also after the follower was started again, and no longer
    once the store answers. (It said ``standby``, no error, for some 30 s, and again after
    each start: only the lag grew.)"""
    target = "s3://dr-stall/p"
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), delay=10.0)
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    cli.backup("v", target)

    def waiting() -> dict | None:
        return standby.json("dr", "status", "s").get("waiting_for_store")

    try:
        standby.run(
            "dr", "create", "s", "--target", target, "--volume", "v", "--replicas", "1",
            "--interval", "1", "--quiet",
        )  # fmt: skip
        assert waiting() is None
        proxy.hold()  # what is sent on open connections waits...
        proxy.fail_every(1, ["delay"])  # ...and new ones are taken, and relayed 10 s later
        started = time.time()
        said = wait_for(waiting, 15, "dr status to say it waits for the store")
        assert said["request"].startswith("LIST "), said
        since = calendar.timegm(time.strptime(said["since"], "%Y-%m-%dT%H:%M:%SZ"))
        assert started - 2 <= since <= time.time(), (said, started)
        shown = standby.run("dr", "status", "s").stdout
        assert f"waiting for the store since {said['since']}: LIST " in shown, shown

        standby.run("dr", "stop", "s")
        assert waiting() is None  # (no follower: nothing waits)
        standby.run("dr", "start", "s")
        wait_for(waiting, 15, "dr status to say it waits for the store again")

        proxy.clear()
        proxy.release()
        wait_for(lambda: waiting() is None, 30, "dr status to see the store answer")
    finally:
        proxy.clear()
        proxy.release()
        proxy.close()
