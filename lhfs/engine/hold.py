"""A hold on a volume's I/O for snapshots at one instant across several volumes.

``lhfs system backup`` holds every attached volume's I/O (new requests wait, in order; those
in flight are answered), snapshots each volume, then lets them all go: a write that an
application made after seeing another one answered, on another volume, is in a snapshot only
if that other one is too (a database's log on one volume and its data on another stay in
step). Each volume snapshotted alone, one after the other, gives no such promise: between two
snapshots an application goes on writing.

A hold has two steps, so that the volumes' I/O waits only for the snapshots: ``prepare`` (I/O
still flows) takes the engine's ``structural`` lock, which a snapshot removal or a rebuild step
may hold for long, and flushes; once every volume is prepared, ``freeze`` holds the I/O of all
of them at once. One task owns the hold from the lock to the end (a trio lock is released by
the task that took it). A hold ends when the connection that asked for it closes (the command
died: ``abandon``), and each step is also a lease: a hold that nobody freezes or releases in
time (the command is stuck) ends by itself, and its owner learns at release whether it was
still frozen.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import trio

from lhfs.core.errors import Busy, InvalidArgument, LhfsError, WrongState
from lhfs.engine.engine import Engine

log = logging.getLogger("lhfs.hold")

MAX_SECONDS = 600.0
PREPARED_LEASE = 600.0  # a prepared hold nobody freezes (or releases) ends by itself


class _Hold:
    """One hold's state, owned by its task (``IoHold._run``)."""

    def __init__(self, hold_id: str) -> None:
        self.id = hold_id
        self.frozen = False  # I/O is held (between the freeze and the end)
        self.freeze = trio.Event()
        self.answered = trio.Event()  # the freeze was answered (``error`` if it failed)
        self.end = trio.Event()
        self.error: LhfsError | None = None
        self.timing = (0.0, 0.0)  # drain, lease of the freeze
        self.inside = trio.Lock()  # held by a snapshot taken inside: the hold ends after it


class IoHold:
    """At most one hold at a time on one engine."""

    def __init__(self, engine: Engine, nursery: trio.Nursery) -> None:
        self.engine = engine
        self.nursery = nursery
        self._hold: _Hold | None = None

    async def prepare(self, wait: Any) -> str:
        """Take the engine's structural lock (within ``wait`` seconds) and flush, I/O still
        flowing; the hold's id. (Times come from a control request: checked here.)"""
        wait = _seconds(wait)
        if self._hold is not None:
            raise Busy("this volume's I/O is held already (another system backup?)")
        hold = self._hold = _Hold(secrets.token_hex(6))
        try:
            await self.nursery.start(self._run, hold, wait)
        except BaseException:
            if self._hold is hold:
                self._hold = None
            raise
        return hold.id

    async def freeze(self, hold_id: str, drain: Any, lease: Any) -> None:
        """Hold I/O once what is in flight is answered (within ``drain`` seconds, else
        nothing stays held), until ``release`` or ``lease`` seconds from now."""
        drain, lease = _seconds(drain), _seconds(lease)
        hold = self._find(hold_id)
        if hold.freeze.is_set():
            raise WrongState("this hold was frozen already")
        hold.timing = (drain, lease)
        hold.freeze.set()
        await hold.answered.wait()
        if hold.error is not None:
            raise hold.error

    def release(self, hold_id: str) -> bool:
        """End the hold ``hold_id``; whether its I/O was still held (its lease not run out)."""
        hold = self._hold
        if hold is None or hold.id != hold_id:
            return False
        self._hold = None  # (a snapshot naming it is refused from now on)
        hold.end.set()
        hold.freeze.set()  # (one released before its freeze wakes up to end)
        return hold.frozen

    def abandon(self, hold_id: str) -> None:
        """The asker of hold ``hold_id`` has gone (its connection closed) without releasing
        it: end it now rather than at the end of its lease."""
        if self._hold is not None and self._hold.id == hold_id:
            log.warning("I/O hold %s ended: the command that took it has gone", hold_id)
            self.release(hold_id)

    @contextlib.asynccontextmanager
    async def inside(self, hold_id: str) -> AsyncIterator[None]:
        """For a snapshot taken inside the hold ``hold_id``: raises unless I/O is held, and
        the hold does not end (even when its lease runs out) until the block is over."""
        hold = self._find(hold_id)
        async with hold.inside:
            if not hold.frozen:
                raise WrongState("this volume's I/O is not held (its hold ran out?): try again")
            yield

    def _find(self, hold_id: str) -> _Hold:
        if self._hold is None or self._hold.id != hold_id:
            raise WrongState("no such hold on this volume: it ran out or was released")
        return self._hold

    async def _run(self, hold: _Hold, wait: float, task_status: Any) -> None:
        engine = self.engine
        try:
            locked = False
            with trio.move_on_after(wait):
                await engine.structural.acquire()
                locked = True
            if not locked:
                raise Busy(
                    f"another operation on the volume (a snapshot removal?) went on for more "
                    f"than {wait:g}s"
                )
            try:
                await engine.flush()  # (what the snapshots flush while I/O waits: less)
                task_status.started()
                await self._frozen_until_end(hold)
            finally:
                engine.structural.release()
        finally:
            if self._hold is hold:
                self._hold = None
            hold.frozen = False
            hold.answered.set()

    async def _frozen_until_end(self, hold: _Hold) -> None:
        """After ``prepare``: never raises (it runs in the engine's nursery)."""
        with trio.move_on_after(PREPARED_LEASE):
            await hold.freeze.wait()
        if hold.end.is_set() or not hold.freeze.is_set():
            if not hold.end.is_set():
                log.warning("I/O hold %s ended: it was never frozen nor released", hold.id)
            hold.error = WrongState("the hold ended before it was frozen")
            return
        drain, lease = hold.timing
        try:
            with trio.fail_after(drain):
                await self.engine.quiesce()
        except trio.TooSlowError:
            hold.error = LhfsError(f"the I/O in flight was not answered within {drain:g}s")
            return
        hold.frozen = True
        hold.answered.set()
        try:
            with trio.move_on_after(lease):
                await hold.end.wait()
            if not hold.end.is_set():
                log.warning(
                    "I/O hold %s ended by itself: nobody let it go within %gs", hold.id, lease
                )
            async with hold.inside:  # (a snapshot under way ends first)
                hold.frozen = False
        finally:
            hold.frozen = False
            self.engine.resume()


def _seconds(value: Any) -> float:
    """A hold's time as asked: a number of seconds from 0 to ``MAX_SECONDS`` (NaN fails)."""
    if type(value) not in (int, float) or not 0 < value <= MAX_SECONDS:
        raise InvalidArgument(f"a hold's times are from 0 to {MAX_SECONDS:g} seconds")
    return float(value)
