"""What runs on an attached volume, asked of a DR standby, names dr activate."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse

from backupstore.s3 import Bucket, Target
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, write_at
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    upstream = urlparse(s3_endpoint)
    relay = FaultProxy((upstream.hostname, upstream.port))
    try:
        yield relay
    finally:
        relay.close()


def _name(url: str) -> str:
    return url.split("backup=")[1]


def _source(cli: Cli, tmp_path: Path, size: int = 4) -> tuple[Path, random.Random]:
    """A volume ``src`` of ``size`` MiB, attached, filled with random data."""
    cli.run("volume", "create", "src", "--size", f"{size}M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    rng = random.Random(7)
    write_at(device, 0, rng.randbytes(size * MIB))
    return device, rng


def _backup(cli: Cli, target: str) -> str:
    args = ("backup", "create", "src", "--target", target, "--create-bucket", "--quiet")
    return cli.run(*args, "--block-size", "64K").stdout.split()[-1]


def _readers(target: str) -> list[str]:
    """The reader markers in the store (what a restore writes while it reads a backup)."""
    parsed = Target.parse(target)
    return [o.object_name for o in Bucket(parsed).list(parsed.key("locks", "read") + "/")]


def _slow_restore(cli: Cli, proxy: FaultProxy, url: str, name: str) -> object:
    """``backup restore URL NAME`` through the throttled proxy, once it writes."""
    proxy.rate = 256 << 10
    restore = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}).start(
        "backup", "restore", url, name, "--quiet", "--replicas", "1"
    )
    wait_for(
        lambda: name in volumes.list_names(cli.root) and cli.info(name)["state"] == "restoring",
        60,
        "the restore to start writing",
    )
    return restore


def _standby(cli: Cli, proxy: FaultProxy, target: str, name: str) -> Cli:
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    standby.run(
        "dr", "create", name, "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    return standby


def test_replica_add_on_a_standby_names_dr_activate(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://guard-add/p"
    _source(cli, tmp_path)
    url = _backup(cli, target)
    standby = _standby(cli, proxy, target, "dsa")
    cli.dr_restored("dsa", url)
    before = [r["id"] for r in cli.info("dsa")["replicas"]]
    added = cli.run("replica", "add", "dsa", check=False)
    assert added.returncode == 1
    line = added.stderr.strip()
    assert "\n" not in line and "not attached" not in line
    assert "volume dsa is a DR standby: adding a replica waits for 'lhfs dr activate dsa'" in line
    assert [r["id"] for r in cli.info("dsa")["replicas"]] == before
    standby.run("dr", "stop", "dsa")
