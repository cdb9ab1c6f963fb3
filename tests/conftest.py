"""Shared fixtures: replica processes on loopback ports, always stopped in a finaliser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lhfs.procs import ReplicaProcess


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
