"""Snapshot housekeeping: the system snapshots of an attached volume kept to a number.

Backups and rebuilds take snapshots of their own (``backup-…``, ``rebuild-…``); left alone
they pile up, and each one costs a layer to every read that misses the head. The volume
setting ``system_snapshots`` says how many to keep: the older ones are coalesced away in the
background by the engine, after a system snapshot is taken, after a rebuild and at attach.

Never removed: a snapshot an operator named (only the two prefixes above are the system's),
the snapshot of each target's last backup (the next backup to that target reads only the
chunks changed since it: without it, the next backup reads the whole volume), a snapshot a
backup under way holds (``hold``: recorded in the volume's configuration with the backup's
pid before the snapshot is taken, so that a housekeeping that runs meanwhile sees it), and
anything while a rebuild runs (the rebuild copies the chain as it is).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.procs import is_lhfs

log = logging.getLogger("lhfs.housekeeping")

SYSTEM_PREFIXES = ("backup-", "rebuild-")


def is_system(name: str) -> bool:
    return name.startswith(SYSTEM_PREFIXES)


def needed(config: dict[str, Any]) -> set[str]:
    """Snapshots a backup still needs: each target's last, and those held by a live backup."""
    keep = {
        str(record.get("snapshot"))
        for record in (config.get("backups") or {}).values()
        if isinstance(record, dict)
    }
    return keep | set(holders(config))


def holders(config: dict[str, Any]) -> dict[str, int]:
    """The snapshots of the volume that live processes hold (backups reading them), with
    their pids: a hold whose process died counts for nothing. (The volume's removal is
    refused while one is held.)"""
    return {
        snapshot: pid
        for snapshot, pid in (config.get("snapshot_holds") or {}).items()
        if is_lhfs(pid)
    }


def surplus(names: list[str], keep: int, protected: set[str]) -> list[str]:
    """The system snapshots to remove from ``names`` (oldest first): all but the newest
    ``keep`` of them, never one in ``protected``."""
    system = [name for name in names if is_system(name)]
    older = system[: max(0, len(system) - keep)]
    return [name for name in older if name not in protected]


@contextlib.contextmanager
def hold(vol: volumes.Volume, snapshot: str) -> Iterator[None]:
    """Keep housekeeping off ``snapshot`` while the block runs (a backup reading it). A hold
    whose process died is ignored: a crash leaves nothing that would keep a snapshot forever.
    A later hold of the same snapshot takes it over; an earlier one ending then leaves it."""

    def add(config: dict[str, Any]) -> None:
        config["snapshot_holds"] = holders(config) | {snapshot: os.getpid()}  # (the dead go)

    def drop(config: dict[str, Any]) -> None:
        holds = config.get("snapshot_holds") or {}
        if holds.get(snapshot) == os.getpid():  # (not another's that took it over)
            holds.pop(snapshot)

    vol.update(add)
    try:
        yield
    finally:
        vol.update(drop)
