"""What a DR standby keeps in its volume's directory, and the lock of its follower.

A standby's follower (``lhfs.backups.dr``) records what the volume holds in ``dr-state.json``
and what it is doing in ``dr-status.json``, and holds ``dr.lock`` while it runs. Volume
management needs a little of this without depending on backups: a standby's state in ``volume
info`` and stopping its follower before ``volume rm``. So it lives here, below both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core import locks
from lhfs.core.durable import atomic_write_json
from lhfs.core.errors import Busy, CorruptState

STATE = "dr-state.json"
STATUS = "dr-status.json"
LOCK = "dr.lock"
LOG = "dr.log"
UNKNOWN = "?"
STOP_TIMEOUT = 60.0


def load_state(vol: volumes.Volume) -> dict[str, Any]:
    """What the volume's replicas hold. Missing means "unknown everywhere": everything is
    rewritten, which is never wrong."""
    try:
        return json.loads((vol.dir / STATE).read_text())
    except FileNotFoundError:
        return {"backup": None, "created": None, "size": vol.size, "block_size": None, "blocks": []}
    except ValueError as exc:
        raise CorruptState(f"{vol.dir / STATE} is damaged: {exc}") from None


def save_state(vol: volumes.Volume, state: dict[str, Any]) -> None:
    atomic_write_json(vol.dir / STATE, state)


def read_status(vol: volumes.Volume) -> dict[str, Any]:
    try:
        return json.loads((vol.dir / STATUS).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def lock(vol: volumes.Volume, wait: float = 0.0) -> int:
    """Hold the standby's follower lock: one process at a time brings it forward."""
    return locks.take(
        vol.dir / LOCK, wait, f"volume {vol.name} is being updated by another process"
    )


def follower_pid(vol: volumes.Volume) -> int | None:
    pid = read_status(vol).get("pid")
    return pid if pid and volumes.alive(pid) and _holds_lock(vol) else None


def _holds_lock(vol: volumes.Volume) -> bool:
    try:
        fd = lock(vol)
    except Busy:
        return True
    os.close(fd)
    return False


def stop(vol: volumes.Volume) -> int:
    """Stop the follower and return its lock, held: nothing updates the standby until the
    caller closes it. SIGTERM first; SIGKILL if it does not stop (safe: every step of a
    follower can be redone, see ``lhfs.backups.dr``)."""
    pid = follower_pid(vol)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            return lock(vol, wait=STOP_TIMEOUT)
        except Busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return lock(vol, wait=STOP_TIMEOUT)


def remove(vol: volumes.Volume) -> None:
    """Stop the follower of a standby that is being deleted (its lock is dropped with it)."""
    if vol.config.get("dr"):
        os.close(stop(vol))
