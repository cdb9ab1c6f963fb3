"""A replica that an operation reads from is lost in the middle of it: the operation goes on
from another healthy replica. Replicas are real processes; a fault proxy in front of one stands
for its host's link (``hold``: the link stops delivering, as a cut one does)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.core.procs import wait_for
from lhfs.testing import Cli, write_direct
from lhfs.wire.client import parse_address
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


def replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


@pytest.fixture
def behind_proxy(cli: Cli, tmp_path: Path, replica_factory) -> Iterator:
    """``start(volume)``: a replica process of VOLUME with a fault proxy in front of it: (the
    proxy, the address to add the replica by). The proxies are closed at the end."""
    proxies: list[FaultProxy] = []

    def start(volume: str) -> tuple[FaultProxy, str]:
        key = tmp_path / f"{volume}.key"
        if not key.exists():
            cli.run("volume", "key", volume, "--out", str(key))
        remote = replica_factory(tmp_path / f"remote{len(proxies)}", key)
        proxy = FaultProxy(parse_address(remote.address))
        proxies.append(proxy)
        return proxy, f"127.0.0.1:{proxy.port}"

    yield start
    for proxy in proxies:
        proxy.close()


def test_a_rebuild_whose_source_is_cut_before_the_copy_goes_on_from_another(
    cli: Cli, tmp_path: Path, behind_proxy
) -> None:
    """r1 comes back (its process was killed) and is rebuilt from r2, whose link has stopped
    delivering; r3 serves too. The rebuild marks r2 ERR within the I/O timeout and goes on from
    r3: r1 is RW at its first attempt. (The rebuild failed, "rebuild source r2: connection
    ... closed", in its prepare or barrier step, and r1 waited for the next attempt, seconds
    more each time: under rolling host cuts the volume lost its last RW replica meanwhile.)"""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1", "--io-timeout", "2")
    cli.run("volume", "set", "v", "--rejoin-wait", "0")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    proxy, address = behind_proxy("v")
    assert cli.run("replica", "add", "v", "--address", address).stdout.split()[2] == "r2"
    assert cli.run("replica", "add", "v").stdout.split()[2] == "r3"
    write_direct(device, 0, os.urandom(4 * MIB))
    expected = cli.checksum("v")

    proxy.hold()  # r2's link stops delivering; no I/O goes to it, so the engine does not know
    os.kill(replica(cli, "v", "r1")["pid"], signal.SIGKILL)

    def back() -> bool:
        r1 = replica(cli, "v", "r1")
        return r1["failures"] >= 1 and r1["mode"] == "RW"

    wait_for(back, 30, "r1 to be found dead and rebuilt")
    log = cli.engine_log("v")
    assert "rebuild of r1 failed" not in log, log
    assert "rebuilding replica r1 from r3" in log, log
    assert replica(cli, "v", "r1")["failures"] == 1
    wait_for(lambda: cli.live("v")["state"] == "healthy", 60, "r2 to be brought back too")
    assert cli.checksum("v") == expected
    cli.run("volume", "detach", "v")


def _two_remote(cli: Cli, device: Path, behind_proxy, written: int) -> tuple:
    """Volume b attached on ``device``, its replicas r2 and r3 remote, each behind a fault
    proxy (r1 removed: a local replica would be read first), ``written`` bytes written:
    (proxy, address) of r2 and of r3."""
    size = max(4 * MIB, written)
    cli.run("volume", "create", "b", "--size", str(size), "--replicas", "1", "--io-timeout", "2")
    cli.run("volume", "attach", "b", "--device", str(device))
    proxied = [behind_proxy("b"), behind_proxy("b")]
    for expected, (_, address) in zip(("r2", "r3"), proxied, strict=True):
        assert cli.run("replica", "add", "b", "--address", address).stdout.split()[2] == expected
    cli.run("replica", "rm", "b", "r1")
    write_direct(device, 0, os.urandom(written))
    return proxied[0], proxied[1]


def test_a_backup_whose_replica_is_cut_reads_on_from_another(
    cli: Cli, tmp_path: Path, behind_proxy, s3_endpoint: str
) -> None:
    """A backup of an attached volume reads its snapshot from r2, whose link stops delivering
    once the backup has its reading connection; r3 holds the same snapshot. The backup leaves
    r2 within the volume's I/O timeout, says so, and reads on from r3; the backup restores to
    the volume's content. (It waited for TCP to give up on the link, about a minute, and then
    failed although r3 could have served it.)"""
    device = tmp_path / "dev"
    (first, _), _ = _two_remote(cli, device, behind_proxy, 8 * MIB)
    expected = cli.checksum("b")
    target = "s3://failover/b"
    cli.run("backup", "init", "--target", target, "--create-bucket")

    first.rate = 1 << 20  # (the snapshot's 8 MiB would take seconds to read from r2)
    opened = first.connections
    backup = cli.start("backup", "create", "b", "--target", target, "--quiet", "--block-size", "1M")
    try:
        # its look at each replica's snapshot, then the connection it reads through
        wait_for(lambda: first.connections >= opened + 2, 30, "the backup to read from r2")
        first.hold()
        out, err = backup.communicate(timeout=30)
    finally:
        backup.kill()
        backup.wait(30)
    assert backup.returncode == 0, (out, err)
    said = next(line for line in err.splitlines() if "replica r2 was lost" in line)
    assert said.endswith("reading on from r3"), err
    url = out.split()[-1]
    cli.run("backup", "restore", url, "copy", "--replicas", "1", "--quiet")
    assert cli.checksum("copy") == expected
    cli.run("volume", "detach", "b")


def test_a_backup_whose_every_replica_is_out_of_reach_says_so(
    cli: Cli, tmp_path: Path, behind_proxy, s3_endpoint: str
) -> None:
    """r2 and r3 serve the engine but refuse every new connection (the engine's own ones
    kept): the backup fails in one line naming a replica it could not reach and why, not
    "no snapshot" (said so, it sent the operator looking for a snapshot that was there)."""
    device = tmp_path / "dev"
    (first, _), (second, _) = _two_remote(cli, device, behind_proxy, MIB)
    cli.run("snapshot", "create", "b", "s1")
    target = "s3://unreachable/b"
    cli.run("backup", "init", "--target", target, "--create-bucket")

    first.stop()
    second.stop()
    failed = cli.run(
        "backup", "create", "b", "--target", target, "--snapshot", "s1", "--quiet", check=False
    )
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert re.fullmatch(
        r"lhfs: error: volume b: no healthy replica answered; replica r[23]: cannot reach "
        r"replica 127\.0\.0\.1:\d+: .+\n",
        failed.stderr,
    ), failed.stderr
    assert {r["mode"] for r in cli.live("b")["replicas"]} == {"RW"}  # (the engine's links kept)
    first.resume()
    second.resume()
    failed = cli.run(
        "backup", "create", "b", "--target", target, "--snapshot", "nope", "--quiet", check=False
    )
    assert failed.returncode == 1 and "volume b has no snapshot 'nope'" in failed.stderr, failed
    cli.run("volume", "detach", "b")
