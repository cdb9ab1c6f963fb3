"""Shared fixtures: replica processes on loopback ports, always stopped in a finaliser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lhfs.procs import ReplicaProcess, wait_for
from lhfs.testing import Cli, teardown

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="needs root and /dev/fuse for FUSE mounts and loop devices",
)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The lhfs command on a fresh root; whatever a test leaves attached is torn down."""
    root = tmp_path / "root"
    yield Cli(root)
    teardown(root)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Sweep FUSE mounts an interrupted earlier run left under pytest's temporary base."""
    with open("/proc/self/mounts") as f:
        stale = [line.split()[1] for line in f if line.split()[2] == "fuse.lhfs"]
    for mountpoint in stale:
        if mountpoint.startswith("/tmp/pytest-of-"):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server over HTTP: ``AWS_ENDPOINT_URL`` if set (e.g. a MinIO), else a moto
    server started here on a free loopback port and stopped at the end. Its log goes to a file
    (a pipe nobody reads would fill up and stall it)."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        found = wait_for(
            lambda: (
                proc.poll() is not None
                or re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
            ),
            60,
            "the S3 server",
        )
        assert proc.poll() is None, log.read_text()
        saved = {k: os.environ.get(k) for k in _S3_ENV}
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{found.group(1)}",
            AWS_ACCESS_KEY_ID="lhfs-test",
            AWS_SECRET_ACCESS_KEY="lhfs-test-secret",
            AWS_REGION="us-east-1",
        )
        yield os.environ["AWS_ENDPOINT_URL"]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        proc.terminate()
        proc.wait(30)


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


@pytest.fixture
def replica_factory(tmp_path: Path) -> Iterator:
    """``start(dir)`` runs ``lhfs replica serve`` on DIR; every process is stopped at the end."""
    started: list[ReplicaProcess] = []

    def start(directory: Path | None = None) -> ReplicaProcess:
        directory = directory or tmp_path / f"replica{len(started)}"
        proc = ReplicaProcess(directory)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
