"""Shared fixtures: replica processes on loopback ports, always stopped in a finaliser."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lhfs.procs import ReplicaProcess


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
