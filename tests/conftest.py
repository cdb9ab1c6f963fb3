"""Shared fixtures: replica processes on loopback ports, always stopped in a finaliser."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lhfs.procs import ReplicaProcess
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
