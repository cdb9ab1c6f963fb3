"""Replicas on other hosts: network namespaces on a bridge (``tools.hosts``), links cut and
restored, hosts rebooted, the engine's own link cut; every test removes its hosts."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.core.procs import LHFS, wait_for
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import (
    Cli,
    HostName,
    fio_verify,
    loop_attach,
    read_direct,
    web_server,
    write_direct,
)
from tools.hosts import Cluster, Host, sweep_orphans

pytestmark = needs_fuse
MIB = 1 << 20
CHUNK = 64 << 10
IO_TIMEOUT = 3


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three hosts on a bridge, named after this process (a crashed run's are swept first)."""
    sweep_orphans("lt")
    hosts = Cluster(prefix=f"lt{os.getpid() % 100000}")
    hosts.up(3)
    try:
        yield hosts
    finally:
        hosts.down()


def test_a_host_process_lets_go_of_what_is_unmounted_after_it_started(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A file system mounted on this machine when a host's process started, unmounted since,
    is gone from that process too (it kept a volume's loop device busy: its umount refused)."""
    point = tmp_path / "point"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "lhfs-propagation", str(point)], check=True)
    sleeper = cluster.hosts[0].start(["sleep", "60"])
    try:
        comm = Path(f"/proc/{sleeper.pid}/comm")  # ("sleep" once in place: namespaces made)
        wait_for(lambda: comm.read_text() == "sleep\n", 10, "the host's process")
        assert str(point) in Path(f"/proc/{sleeper.pid}/mounts").read_text()
        subprocess.run(["umount", str(point)], check=True)
        seen = Path(f"/proc/{sleeper.pid}/mounts").read_text()
        assert str(point) not in seen, "an unmount did not reach the host's process"
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        sleeper.kill()
        sleeper.wait()


def serve(
    host: Host, directory: Path, key: Path, started: list[ReplicaProcess], port: int = 0
) -> str:
    """``replica serve`` of ``directory`` on ``host`` (on ``port``, as a service restarted after
    a reboot would be); its address."""
    proc = ReplicaProcess(directory, key, port=port, host=host.address, wrap=host.command([]))
    started.append(proc)
    return proc.address


def remote_volume(cli: Cli, tmp_path: Path, hosts: list[Host], started: list) -> dict[str, str]:
    """Volume ``v`` (256 MiB) with a replica on each of ``hosts`` and one local replica:
    replica id -> address."""
    cli.run(
        *("volume", "create", "v", "--size", "256M", "--replicas", "1"),
        *("--io-timeout", str(IO_TIMEOUT), "--rejoin-wait", "1"),
    )
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    cli.run("volume", "key", "v", "--out", str(tmp_path / "v.key"))
    placed = {}
    for host in hosts:
        address = serve(host, tmp_path / host.name, tmp_path / "v.key", started)
        added = cli.run("replica", "add", "v", "--address", address).stdout.split()[2]
        placed[added] = address
    return placed


def fio_json(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "verify" not in err.lower(), err
    return json.loads(out[out.index("{") :])


def test_a_replica_host_cut_off_or_rebooted_comes_back_by_itself(
    cli: Cli, tmp_path: Path, cluster: Cluster
) -> None:
    """fio --verify through the device while one replica host's link is cut, then restored;
    then while another host reboots. No verify error, I/O stalls no longer than the I/O timeout
    (plus margin), and each replica is RW again without a command, having copied only chunks
    written while it was away."""
    h1, h2, _ = cluster.hosts
    started: list[ReplicaProcess] = []
    try:
        placed = remote_volume(cli, tmp_path, [h1, h2], started)
        on = {address.split(":")[0]: rid for rid, address in placed.items()}
        loop = loop_attach(tmp_path / "v.dev")

        def away(event: str, victim: Host) -> None:
            rid = on[victim.address]
            before = cli.replica("v", rid)["rebuild_stats"]
            writes = cli.info("v")["writes"]
            fio = fio_verify(
                loop, "32M", "--io_size=24M", "--rate_iops=1500", "--output-format=json"
            )
            wait_for(lambda: cli.info("v")["writes"] > writes + 500, 60, "fio to be writing")
            if event == "cut":
                victim.cut()
                wait_for(lambda: cli.replica("v", rid)["mode"] == "ERR", 30, "the ERR mark")
                # The writes go on while the host is away: 1,500 more, or fio's last one done
                # (under load, fio may finish its 6,144 before this looks at the counter).
                degraded = cli.info("v")["writes"]
                wait_for(
                    lambda: fio.poll() is not None or cli.info("v")["writes"] > degraded + 1500,
                    60,
                    "writes meanwhile",
                )
                victim.restore()
            else:
                cluster.reboot(victim)  # a power cut: the replica process dies with it
                wait_for(lambda: cli.replica("v", rid)["mode"] == "ERR", 30, "the ERR mark")
                port = int(placed[rid].rsplit(":", 1)[1])
                serve(victim, tmp_path / victim.name, tmp_path / "v.key", started, port)
            result = fio_json(fio)
            stall = max(job["write"]["clat_ns"]["max"] for job in result["jobs"]) / 1e9
            assert stall < IO_TIMEOUT + 3, f"{event}: a write waited {stall:.1f}s"
            wait_for(lambda: cli.replica("v", rid)["mode"] == "RW", 120, f"{rid} back")
            stats = cli.replica("v", rid)["rebuild_stats"]
            assert stats != before and stats["bytes_relayed"] == 0, stats
            written = 32 * MIB // CHUNK  # the region fio writes, in chunks
            assert 0 < stats["chunks_copied"] <= written + 16, (event, stats)
            assert cli.info("v")["state"] == "healthy"

        try:
            away("cut", h1)
            away("reboot", h2)
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
        sums = cli.json("volume", "scrub", "v")
        assert sums["damaged"] == {}, sums
        cli.run("volume", "detach", "v")
    finally:
        for proc in started:
            proc.stop()


def test_the_engines_own_link_cut_faults_and_recovers(
    cli: Cli, tmp_path: Path, cluster: Cluster
) -> None:
    """Every replica on another host, and the engine's host loses its link: I/O errors (never
    wrong data); once the link is back, the replica that served last serves again by itself
    and the others are rebuilt from it."""
    started: list[ReplicaProcess] = []
    try:
        remote_volume(cli, tmp_path, cluster.hosts, started)
        cli.run("replica", "rm", "v", "r1")  # no replica left on the engine's host
        device = tmp_path / "v.dev"
        pattern = os.urandom(MIB)
        write_direct(device, 8 * MIB, pattern)
        subprocess.run(["ip", "link", "set", cluster.bridge, "down"], check=True)
        try:
            with pytest.raises(OSError):  # the write fails: every replica is out of reach
                write_direct(device, 8 * MIB, os.urandom(MIB))
            wait_for(lambda: cli.info("v")["state"] == "faulted", 30, "the volume to fault")
            with pytest.raises(OSError):
                read_direct(device, 8 * MIB, MIB)
        finally:
            subprocess.run(["ip", "link", "set", cluster.bridge, "up"], check=True)
        wait_for(lambda: cli.info("v")["state"] == "healthy", 120, "the volume to recover")
        assert read_direct(device, 8 * MIB, MIB) == pattern
        sums = cli.json("volume", "scrub", "v")
        assert sums["damaged"] == {} and len(sums["replicas"]) == 3, sums
        cli.run("volume", "detach", "v")
    finally:
        for proc in started:
            proc.stop()


def write_generation(cli: Cli, tmp_path: Path, seed: int) -> str:
    """Attach ``src``, write 4 MiB of new data at a place of its own, detach, back it up."""
    device = tmp_path / "src.dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    write_direct(device, seed * 4 * MIB, random.Random(seed).randbytes(4 * MIB))
    cli.run("volume", "detach", "src")
    return cli.backup("src", "s3://lhfs-dr-hosts/p")


def test_a_standby_on_its_own_host_rides_out_its_links_and_a_reboot(
    cli: Cli, tmp_path: Path, cluster: Cluster, s3_endpoint: str
) -> None:
    """A DR standby on another host follows a volume's backups while its route to S3 is cut,
    while the store's name no longer resolves there, and across a reboot of its host (every
    process killed, 'dr start' again); then it catches up and activates equal to the source."""
    from urllib.parse import urlparse

    from tools.faultproxy import FaultProxy

    host = cluster.hosts[2]
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), listen=cluster.gateway)
    name = HostName(cluster.gateway, host.hosts_file())
    name.resolve()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{name.name}:{proxy.port}"}
    standby = Cli(tmp_path / "dr-root")

    def on_host(*args: str) -> subprocess.CompletedProcess:
        command = [LHFS, "--root", str(standby.root), *args]
        return host.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)

    def retrying(what: str) -> dict:
        return wait_for(
            lambda: (s := standby.json("dr", "status", "sb"))["state"] == "retrying" and s,
            60,
            f"the standby to retry ({what})",
        )

    try:
        cli.run("volume", "create", "src", "--size", "64M", "--replicas", "1")
        first = write_generation(cli, tmp_path, 1)
        on_host(
            *("dr", "create", "sb", "--target", "s3://lhfs-dr-hosts/p", "--volume", "src"),
            *("--replicas", "1", "--interval", "1", "--retry-max", "1.5", "--quiet"),
        )
        standby.dr_restored("sb", first)

        host.cut()  # its route to the store is gone
        second = write_generation(cli, tmp_path, 2)
        assert retrying("link cut")["last_restored_backup"] in first
        host.restore()
        standby.dr_restored("sb", second, timeout=120)

        name.drop()  # the store's name no longer resolves on that host
        third = write_generation(cli, tmp_path, 3)
        status = retrying("name gone")
        assert name.name in (status["last_error"] or ""), status
        name.resolve()
        standby.dr_restored("sb", third, timeout=120)

        cluster.reboot(host)  # every process of the host killed; the follower with them
        fourth = write_generation(cli, tmp_path, 4)
        wait_for(lambda: standby.json("dr", "status", "sb")["state"] == "stopped", 30, "stop")
        on_host("dr", "start", "sb")
        standby.dr_restored("sb", fourth, timeout=120)
        on_host("dr", "activate", "sb", "--quiet")
        assert standby.checksum("sb") == cli.checksum("src")
    finally:
        with contextlib.suppress(Exception):
            host.run([LHFS, "--root", str(standby.root), "dr", "stop", "sb"], capture_output=True)
        name.drop()
        proxy.close()


def test_doctor_names_what_is_broken(
    cli: Cli, tmp_path: Path, cluster: Cluster, s3_endpoint: str
) -> None:
    """``lhfs doctor`` passes on a working setup and fails, with the check and what to do,
    when a replica's host is down, the store's name does not resolve, the store refuses the
    credentials or has no such bucket."""
    started: list[ReplicaProcess] = []
    target = "s3://lhfs-doctor/p"
    name = HostName()
    name.resolve()
    port = urlparse_port(s3_endpoint)
    by_name = Cli(cli.root, env={"AWS_ENDPOINT_URL": f"http://{name.name}:{port}"})

    hints: dict[str, str] = {}  # (what the last run said to do, per check)

    def doctor(runner: Cli, *args: str) -> tuple[int, dict[str, str]]:
        result = runner.run("doctor", *args, "--json", check=False)
        assert result.returncode in (0, 1), result.stderr
        report = json.loads(result.stdout)
        hints.clear()
        hints.update({c["check"]: c["hint"] or "" for c in report})
        return result.returncode, {c["check"]: c["status"] for c in report}

    try:
        cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
        cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
        cli.run("volume", "key", "v", "--out", str(tmp_path / "v.key"))
        address = serve(cluster.hosts[0], tmp_path / "h1", tmp_path / "v.key", started)
        remote = cli.run("replica", "add", "v", "--address", address).stdout.split()[2]
        cli.backup("v", target)
        status, checks = doctor(by_name, "v", "--target", target)
        assert status == 0 and checks[f"replica {remote}"] == "ok", checks
        report = json.loads(cli.run("doctor", "v", "--json").stdout)
        said = {c["check"]: c["detail"] for c in report}
        assert "frames sealed but not encrypted" in said[f"replica {remote}"], said
        assert checks["s3 bucket"] == checks["s3 write"] == checks["s3 name"] == "ok", checks

        cluster.hosts[0].cut()
        status, checks = doctor(cli, "v")
        assert status == 1 and checks[f"replica {remote}"] == "fail", checks
        cluster.hosts[0].restore()

        name.drop()
        status, checks = doctor(by_name, "--target", target)
        assert status == 1 and checks["s3 name"] == "fail", checks
        name.resolve()

        status, checks = doctor(cli, "--target", "s3://lhfs-doctor-none/p", "--retry-timeout", "3")
        assert status == 1 and checks["s3 bucket"] == "fail", checks
        assert "backup init --target s3://lhfs-doctor-none/p --create-bucket" in hints["s3 bucket"]
        anonymous = Cli(cli.root, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
        status, checks = doctor(anonymous, "--target", target)
        assert status == 1 and checks["s3 settings"] == "fail", checks
        with refusing_s3() as endpoint:
            refused = Cli(cli.root, env={"AWS_ENDPOINT_URL": endpoint})
            status, checks = doctor(refused, "--target", target)
            assert status == 1 and checks["s3 bucket"] == "fail", checks
            assert "create-bucket" not in hints["s3 bucket"], hints  # (no bucket to make)
        cli.run("volume", "detach", "v")
    finally:
        name.drop()
        for proc in started:
            proc.stop()


def urlparse_port(url: str) -> int:
    from urllib.parse import urlparse

    return urlparse(url).port or 80


@contextlib.contextmanager
def refusing_s3() -> Iterator[str]:
    """An S3-speaking server that refuses every request's credentials."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
        b"<Message>The access key does not exist.</Message></Error>"
    )
    with web_server(lambda method, path: (403, "application/xml", body)) as url:
        yield url


def test_a_replica_added_again_by_another_of_its_addresses_is_refused(
    cli: Cli, tmp_path: Path, cluster: Cluster
) -> None:
    """A replica host with two addresses serves its replica on both: added by one, the replica
    is refused by the other in one line naming what it is already, and nothing changes (taken
    twice, its two sessions fenced each other for ever and the volume flapped to faulted). So
    is a local replica named by another name of its address (``localhost``)."""
    host = cluster.hosts[0]
    second = f"{cluster.subnet}.21"
    host.run(["ip", "addr", "add", f"{second}/24", "dev", "eth0"], check=True)
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1", "--io-timeout", "3")
    device = tmp_path / "v.dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    cli.run("volume", "key", "v", "--out", str(tmp_path / "v.key"))
    proc = ReplicaProcess(
        tmp_path / "far", tmp_path / "v.key", host="0.0.0.0", wrap=host.command([])
    )
    try:
        port = proc.address.rsplit(":", 1)[1]
        first = f"{host.address}:{port}"
        far = cli.run("replica", "add", "v", "--address", first).stdout.split()[2]
        config = (cli.root / "volumes" / "v" / "config.json").read_text()
        local = cli.replica("v", "r1")["address"]
        for address, known, reached in [
            (f"{second}:{port}", far, first),
            (f"localhost:{local.rsplit(':', 1)[1]}", "r1", local),
        ]:
            refused = cli.run("replica", "add", "v", "--address", address, check=False)
            said = refused.stderr.strip()
            assert refused.returncode != 0 and len(said.splitlines()) == 1, said
            assert (
                f"{address} is replica {known} of this volume already, reached as {reached}" in said
            )
        assert (cli.root / "volumes" / "v" / "config.json").read_text() == config
        write_direct(device, 0, os.urandom(MIB))
        assert [r["mode"] for r in cli.info("v")["replicas"]] == ["RW", "RW"]
        assert "fenced" not in proc.log.read_text()
        cli.run("volume", "detach", "v")
    finally:
        proc.stop()
