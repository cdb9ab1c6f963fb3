"""Shared fixtures: replica processes on loopback ports, always stopped in a finaliser."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import Cli, S3Server, teardown
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import parse_address
from tools.faultproxy import FaultProxy

# Outside CI, a machine without root or /dev/fuse skips the device tests (pytest -ra lists
# them); in CI they always run, so a missing FUSE fails loudly instead of hiding.
needs_fuse = pytest.mark.skipif(
    not os.environ.get("CI") and (os.geteuid() != 0 or not os.path.exists("/dev/fuse")),
    reason="needs root and /dev/fuse for FUSE mounts and loop devices",
)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The lhfs command on a fresh root; whatever a test leaves attached is torn down."""
    root = tmp_path / "root"
    yield Cli(root)
    teardown(root)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Sweep FUSE mounts an interrupted earlier run left under pytest's temporary base: those
    whose engine is gone (a live one may be another session's, running beside this one)."""
    with open("/proc/self/mounts") as f:
        stale = [line.split()[1] for line in f if line.split()[2] == "fuse.lhfs"]
    for mountpoint in stale:
        if mountpoint.startswith("/tmp/pytest-of-") and _disconnected(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def _disconnected(mountpoint: str) -> bool:
    """Whether the mount's engine is gone (asked in a child: a stopped engine's mount would
    hold a ``stat`` here for ever)."""
    try:
        asked = subprocess.run(["stat", mountpoint], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return "not connected" in asked.stderr


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server over HTTP: ``AWS_ENDPOINT_URL`` if set (e.g. a MinIO), else a moto
    server started here on a free loopback port and stopped at the end. Its log goes to a file
    (a pipe nobody reads would fill up and stall it)."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server.endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A volume key for replicas a test starts by hand (``replica.key`` holds it loaded)."""
    path = tmp_path / "volume.key"
    VolumeKey.new("test").save(path)
    return path


@pytest.fixture
def serve() -> Iterator:
    """``serve(dir, key, port=0)``: a ``replica serve`` on DIR, a host's replica (started
    again on its port after the host was cut, or on a copy of its directory); every one is
    stopped at the end."""
    started: list[ReplicaProcess] = []

    def start(directory: Path, key: Path, port: int = 0) -> ReplicaProcess:
        proc = ReplicaProcess(directory, key, port=port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def replica_factory(tmp_path: Path, key_file: Path) -> Iterator:
    """``start(dir)`` runs ``lhfs replica serve`` on DIR with the test's key (or ``key``, a
    key file); every process is stopped at the end."""
    started: list[ReplicaProcess] = []

    def start(
        directory: Path | None = None,
        key: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> ReplicaProcess:
        directory = directory or tmp_path / f"replica{len(started)}"
        proc = ReplicaProcess(directory, key or key_file, tls=tls)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def proxied_replica(cli: Cli, tmp_path: Path, replica_factory) -> Iterator:
    """``start(volume)``: a replica of an attached VOLUME served by a process of its own, with
    a fault proxy in front of it: (the replica, the proxy, the address to add it by). The
    proxies are closed at the end."""
    proxies: list[FaultProxy] = []

    def start(volume: str) -> tuple[ReplicaProcess, FaultProxy, str]:
        key = tmp_path / f"{volume}.key"
        cli.run("volume", "key", volume, "--out", str(key))
        remote = replica_factory(tmp_path / "remote", key)
        proxy = FaultProxy(parse_address(remote.address))
        proxies.append(proxy)
        return remote, proxy, f"127.0.0.1:{proxy.port}"

    yield start
    for proxy in proxies:
        proxy.close()


def restore_killed_half_way(cli: Cli, s3_endpoint: str, url: str, name: str) -> None:
    """Restore ``url`` as ``name`` through a slow link and SIGKILL the restore once it writes;
    return when its engine has followed it."""
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # (the restore takes long enough to be killed half-way)
    try:
        restore = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}).start(
            "backup", "restore", url, name, "--quiet"
        )
        wait_for(
            lambda: name in volumes.list_names(cli.root) and cli.info(name)["state"] == "restoring",
            60,
            "the restore to start writing",
        )
        restore.kill()
        restore.wait(30)
    finally:
        proxy.close()
    wait_for(lambda: not cli.info(name)["attached"], 30, "the restore's engine to follow it")
