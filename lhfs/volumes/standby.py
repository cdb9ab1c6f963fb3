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
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core import locks
from lhfs.core.durable import atomic_write_json
from lhfs.core.errors import Busy, CorruptState
from lhfs.core.procs import is_pid

STATE = "dr-state.json"
STATUS = "dr-status.json"
LOCK = "dr.lock"
LOG = "dr.log"
UNKNOWN = "?"
STOP_TIMEOUT = 60.0


def load_state(vol: volumes.Volume) -> dict[str, Any]:
    """What the volume's replicas hold. Missing means "unknown everywhere": everything is
    rewritten, which is never wrong. Damaged (not what lhfs writes) is ``CorruptState``
    naming the file and the field: a follower that met it once retried it for ever, and
    ``dr status`` failed on it with a traceback."""
    path = vol.dir / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"backup": None, "created": None, "size": vol.size, "block_size": None, "blocks": []}
    except (OSError, ValueError) as exc:
        raise CorruptState(f"{path} is damaged: {exc}") from None
    return check_state(state, path)


def check_state(state: Any, path: Path) -> dict[str, Any]:
    """Return ``state`` (read from ``path``) if lhfs could have written it (see ``save_state``
    and ``lhfs.backups.dr.apply``)."""

    def bad(field: str, should: str) -> CorruptState:
        return CorruptState(f"{path}: {field} must be {should}, not {state.get(field)!r:.60}")

    if not isinstance(state, dict):
        raise CorruptState(f"{path} is damaged: not a JSON object")
    for field in ("backup", "applying"):
        if state.get(field) is not None and not isinstance(state[field], str):
            raise bad(field, "a backup's name or null")
    for field, needed in (("size", True), ("block_size", False)):
        value = state.get(field)
        if (value is not None or needed) and (type(value) is not int or value <= 0):
            raise bad(field, "a positive integer" + ("" if needed else " or null"))
    blocks = state.get("blocks")
    if not isinstance(blocks, list) or not all(b is None or isinstance(b, str) for b in blocks):
        raise bad("blocks", "a list of block digests (or null)")
    if "backup" not in state:
        raise bad("backup", "present (a backup's name or null)")
    return state


def save_state(vol: volumes.Volume, state: dict[str, Any]) -> None:
    atomic_write_json(vol.dir / STATE, state)


def read_status(vol: volumes.Volume) -> dict[str, Any]:
    """What the follower last said it does: a runtime file, so a damaged one, or a field of
    it that is not what the follower writes, reads as unsaid (never an error: the follower
    writes it whole again)."""
    try:
        status = json.loads((vol.dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(status, dict):
        return {}
    if not is_pid(status.get("pid")):
        status.pop("pid", None)
    since = status.get("current_at")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        status.pop("current_at")
    return status


def lock(vol: volumes.Volume, wait: float = 0.0) -> int:
    """Hold the standby's follower lock: one process at a time brings it forward."""
    return locks.take(
        vol.dir / LOCK, wait, f"volume {vol.name} is being updated by another process"
    )


def follower_pid(vol: volumes.Volume) -> int | None:
    pid = read_status(vol).get("pid")
    return pid if volumes.alive(pid) and _holds_lock(vol) else None


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
