"""A hold on a volume's I/O for a snapshot at one instant across several volumes.

``lhfs system backup`` holds every attached volume's I/O (new requests wait, in order; those
in flight are answered), then snapshots each volume, then releases them all: a write that an
application made after seeing another one acknowledged, on another volume, is in a snapshot
only if that other one is too (a database's log on one volume and its data on another stay
in step). Each volume held alone, one after the other, gives no such promise: between two
snapshots an application goes on writing.

A hold is a lease: it ends by itself after ``lease`` seconds if nobody releases it (the
command that held it died), and its owner learns at release whether it lasted: if it did not,
the snapshots were not all taken inside it.
"""

from __future__ import annotations

import logging
import math
import secrets

import trio

from lhfs.core.errors import Busy, InvalidArgument, LhfsError
from lhfs.engine.engine import Engine

log = logging.getLogger("lhfs.hold")

MAX_LEASE = 300.0


class IoHold:
    """At most one hold at a time on one engine."""

    def __init__(self, engine: Engine, nursery: trio.Nursery) -> None:
        self.engine = engine
        self.nursery = nursery
        self.id: str | None = None
        self._lease: trio.CancelScope | None = None

    async def hold(self, lease: float, drain: float) -> str:
        """Hold I/O: once what is in flight is answered (within ``drain`` seconds, else
        nothing stays held), return the hold's id. It ends at ``release`` or after ``lease``
        seconds, whichever comes first."""
        if not (0 < lease <= MAX_LEASE and 0 < drain <= MAX_LEASE) or math.isnan(lease + drain):
            raise InvalidArgument(f"a hold lasts from 0 to {MAX_LEASE:g} seconds")
        if self.id is not None:
            raise Busy("this volume's I/O is held already (another system backup?)")
        hold_id = self.id = secrets.token_hex(6)
        try:
            with trio.fail_after(drain):
                await self.engine.flush()  # (what the snapshots flush while I/O waits: less)
                await self.engine.quiesce()
        except trio.TooSlowError:
            self.id = None
            raise LhfsError(
                f"the volume's I/O in flight was not answered within {drain:g}s"
            ) from None
        except BaseException:
            self.id = None
            raise
        self._lease = trio.CancelScope(deadline=trio.current_time() + lease)
        self.nursery.start_soon(self._expire, hold_id, self._lease)
        return hold_id

    async def _expire(self, hold_id: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        if self.id == hold_id:  # (the lease ran out: not released)
            log.warning("I/O hold %s ended by itself: nobody released it in time", hold_id)
            self._end()

    def release(self, hold_id: str) -> bool:
        """End the hold ``hold_id``; whether it was still in place (its lease not run out)."""
        if hold_id != self.id:
            return False
        self._end()
        return True

    def _end(self) -> None:
        self.id = None
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        self.engine.resume()
