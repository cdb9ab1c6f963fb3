"""Prometheus metrics of an attached volume and of a DR follower, scraped for real."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.engine import daemon
from lhfs.testing import Cli, fio_verify, loop_attach

pytestmark = needs_fuse


def scrape(address: str) -> dict[str, float]:
    """``{series: value}`` of a metrics endpoint (``name{labels}`` as Prometheus writes it)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def value(series: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{key}="{val}"' for key, val in labels.items()]
    found = [
        v for k, v in series.items() if k.split("{")[0] == name and all(w in k for w in wanted)
    ]
    assert len(found) == 1, (name, labels, [k for k in series if k.startswith(name)])
    return found[0]


def scrape_until(
    address: str, name: str, wanted: Callable[[float], bool], within: float = 10, **labels: str
) -> dict[str, float]:
    """A scrape where ``name{labels}`` is ``wanted``: an endpoint makes its answer once a
    second at most, so what just happened may show only in a later one."""

    def once() -> dict[str, float] | None:
        series = scrape(address)
        found = [
            v
            for k, v in series.items()
            if k.split("{")[0] == name and all(f'{a}="{b}"' in k for a, b in labels.items())
        ]
        return series if len(found) == 1 and wanted(found[0]) else None

    return wait_for(once, within, f"{name} {labels} in the metrics")


def test_engine_metrics_follow_io_a_replica_kill_and_its_rebuild(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "m", "--size", "128M", "--replicas", "2")
    device = ("--device", str(tmp_path / "dev"))
    out = cli.run("volume", "attach", "m", *device, "--metrics", "127.0.0.1:0").stdout
    address = cli.info("m")["metrics"]
    assert address and f"http://{address}/metrics" in out
    first = scrape(address)
    assert value(first, "lhfs_volume_state", volume="m", state="healthy") == 1
    assert value(first, "lhfs_io_operations_total", volume="m", op="write") == 0
    loop = loop_attach(tmp_path / "dev")
    try:
        fio = fio_verify(loop, "16M")
        out, err = fio.communicate(timeout=300)
        assert fio.returncode == 0, out + err
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    after = scrape_until(address, "lhfs_io_operations_total", bool, volume="m", op="write")
    writes = value(after, "lhfs_io_operations_total", volume="m", op="write")
    assert writes >= 4096  # 16 MiB in 4 KiB writes
    assert value(after, "lhfs_io_bytes_total", volume="m", op="write") >= 16 << 20
    assert value(after, "lhfs_io_operations_total", volume="m", op="read") >= 4096  # verify
    assert value(after, "lhfs_io_latency_seconds_count", volume="m", op="write") == writes
    assert (
        value(after, "lhfs_io_latency_seconds_bucket", volume="m", op="write", le="+Inf") == writes
    )
    assert value(after, "lhfs_io_inflight", volume="m") == 0
    victim = cli.info("m")["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    with open(tmp_path / "dev", "r+b") as f:  # a write notices
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
    degraded = scrape_until(address, "lhfs_volume_state", bool, volume="m", state="degraded")
    assert value(degraded, "lhfs_volume_state", volume="m", state="degraded") == 1
    assert value(degraded, "lhfs_replica_mode", volume="m", replica=victim["id"], mode="ERR") == 1
    added = cli.run("replica", "add", "m").stdout.split()[2]
    healthy = scrape_until(
        address, "lhfs_replica_mode", bool, within=60, volume="m", replica=added, mode="RW"
    )
    assert value(healthy, "lhfs_rebuild_copied_bytes", volume="m", replica=added) > 0
    back = wait_for(
        lambda: (
            (s := scrape(address))
            and value(s, "lhfs_replica_mode", volume="m", replica=victim["id"], mode="RW") == 1
            and s
        ),
        60,
        "the killed replica back by itself",
    )
    assert value(back, "lhfs_replica_restarts_total", volume="m", replica=victim["id"]) == 1
    assert value(back, "lhfs_replica_failures_total", volume="m", replica=victim["id"]) == 1
    assert value(back, "lhfs_replica_failures_total", volume="m", replica=added) == 0
    assert value(back, "lhfs_volume_refused_writes_total", volume="m") == 0
    disks = wait_for(  # (the engine asks the replicas about their disks every 15 s)
        lambda: (
            (s := scrape(address))
            and any(f'replica="{added}"' in k for k in s if "lhfs_replica_disk_free" in k)
            and s
        ),
        60,
        "the added replica's disk in the metrics",
    )
    assert value(disks, "lhfs_replica_disk_free_bytes", volume="m", replica=added) > 1 << 20
    assert value(disks, "lhfs_replica_disk_bytes", volume="m", replica=added) > 0
    cli.run("volume", "detach", "m")


def test_backup_scrub_restore_and_dr_follower_metrics(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://metrics-backups/p"
    cli.run("volume", "create", "b", "--size", "64M", "--replicas", "3")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "b", "--device", str(device), "--metrics", "127.0.0.1:0")
    address = cli.info("b")["metrics"]
    with open(device, "r+b") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    assert value(scrape(address), "lhfs_scrub_last_timestamp_seconds", volume="b") == 0
    cli.run("volume", "scrub", "b")
    scrubbed = scrape_until(address, "lhfs_scrub_last_timestamp_seconds", bool, volume="b")
    assert value(scrubbed, "lhfs_scrub_last_timestamp_seconds", volume="b") > 0
    assert value(scrubbed, "lhfs_scrub_damaged_replicas", volume="b") == 0
    url = cli.backup("b", target)
    backed = scrape_until(
        address, "lhfs_backup_last_uploaded_bytes", bool, volume="b", target=target
    )
    assert value(backed, "lhfs_backup_last_uploaded_bytes", volume="b", target=target) > 0
    assert value(backed, "lhfs_backup_last_duration_seconds", volume="b", target=target) > 0
    cli.run("backup", "restore", url, "copy", "--replicas", "1", "--quiet")
    cli.run(
        "volume", "attach", "copy", "--device", str(tmp_path / "copy"), "--metrics", "127.0.0.1:0"
    )
    restored = scrape(cli.info("copy")["metrics"])
    assert value(restored, "lhfs_restore_bytes", volume="copy") >= 4 << 20
    cli.run("volume", "detach", "copy")

    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "b", "--replicas", "1",
        "--interval", "1", "--quiet", "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    follower = cli.json("dr", "status", "standby")["metrics"]
    assert (
        follower
        and f"metrics: http://{follower}/metrics" in cli.run("dr", "status", "standby").stdout
    )
    assert "'dr status' shows it" in " ".join(cli.run("dr", "create", "--help").stdout.split())
    first = scrape(follower)
    assert value(first, "lhfs_dr_follower_state", volume="standby", state="standby") == 1
    assert value(first, "lhfs_dr_increments_total", volume="standby") == 1
    assert value(first, "lhfs_dr_fetched_bytes_total", volume="standby") > 0
    assert value(first, "lhfs_dr_last_applied_backup_timestamp_seconds", volume="standby") > 0
    with open(device, "r+b") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    cli.dr_restored("standby", cli.backup("b", target))
    later = scrape_until(follower, "lhfs_dr_increments_total", lambda n: n == 2, volume="standby")
    assert value(later, "lhfs_dr_increments_total", volume="standby") == 2
    assert value(later, "lhfs_dr_lag_seconds", volume="standby") < 30
    cli.run("dr", "stop", "standby")
    cli.run("volume", "detach", "b")


def test_connections_that_never_finish_a_request_hold_no_thread_for_long(
    cli: Cli, tmp_path: Path
) -> None:
    """Sixty connections to the metrics endpoint that send half a request: the engine serves
    at most 32 at once (the others are closed at once) and lets each go after 5 s (each held a
    thread until its client left, without bound); then it answers scrapes as before."""
    import socket

    cli.run("volume", "create", "h", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    with socket.socket() as taken:  # an address taken: refused, and no mount left behind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        failed = cli.run(
            "volume", "attach", "h", "--device", str(device), "--metrics", busy, check=False
        )
    assert failed.returncode == 1, failed
    assert failed.stderr.count("\n") == 1 and f"metrics on {busy}: Address already" in failed.stderr
    assert (
        str(device) not in Path("/proc/mounts").read_text() and cli.info("h")["state"] == "detached"
    )
    assert not device.exists()  # (the file the attach made, removed with it)
    cli.run("volume", "attach", "h", "--device", str(device), "--metrics", "127.0.0.1:0")
    address = cli.info("h")["metrics"]
    host, port = address.rsplit(":", 1)
    engine = cli.engine_pid("h")

    def threads() -> int:
        status = Path(f"/proc/{engine}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Threads:"))[8:])

    before = threads()
    halves = [socket.create_connection((host, int(port)), timeout=10) for _ in range(60)]
    try:
        for sock in halves:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # (and never the end)
        wait_for(lambda: threads() >= before + 16, 10, "the engine to take the connections")
        assert threads() <= before + 32 + 2, (before, threads())
        wait_for(lambda: threads() <= before + 2, 20, "the half requests to be let go")
    finally:
        for sock in halves:
            sock.close()
    assert value(scrape(address), "lhfs_volume_state", volume="h", state="healthy") == 1
    cli.run("volume", "detach", "h")
    assert not device.exists()  # (made by the attach: gone with the detach)


def test_an_ipv6_metrics_address_is_said_in_brackets() -> None:
    """The address an engine or follower serves metrics on, as it records and prints it:
    ``[::1]:PORT`` (``::1:PORT`` was neither a URL nor an address ``--metrics`` takes)."""
    from prometheus_client.core import GaugeMetricFamily

    from lhfs.engine.metrics import serve

    class One:
        def collect(self) -> list[GaugeMetricFamily]:
            return [GaugeMetricFamily("lhfs_test_one", "one", value=1)]

    host, port = serve("[::1]:0", One())
    assert host == "[::1]", host
    assert value(scrape(f"{host}:{port}"), "lhfs_test_one") == 1


def test_a_hung_disk_is_read_by_one_thread_at_a_time(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local replica whose disk hangs is read by one thread at most: the rounds while it is
    blocked get no reading (unknown) at once instead of another thread blocked beside it,
    and the one after it ends reads again. (A hung disk cannot be made on demand: the reading
    of the directory blocks on an event here instead.)"""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    engine = daemon.Daemon(volumes.load(cli.root, "v"), tmp_path / "v.dev")
    hung, entered = threading.Event(), []

    def blocked(directory: Path) -> int:
        entered.append(directory)
        hung.wait(60)
        return 1

    monkeypatch.setattr(daemon, "disk_bytes", blocked)
    first = threading.Thread(target=engine._directory_usage, args=("r1",))
    first.start()
    try:
        wait_for(lambda: entered, 10, "the first reading to block")
        for _ in range(8):  # (rounds while it hangs)
            assert engine._directory_usage("r1") == (None, None)
        assert len(entered) == 1
    finally:
        hung.set()
        first.join(60)
    taken, free = engine._directory_usage("r1")
    assert taken == 1 and free is not None and free > 0 and len(entered) == 2
