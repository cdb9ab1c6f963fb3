"""The engine: one attached volume served by several replicas.

Every write and trim is submitted to all replicas that take writes (RW, and WO while being
rebuilt) before the engine waits for any of them: the replicas work in parallel, and because a
connection delivers requests in order and a replica applies them in order, all replicas apply
concurrent writes in the same order. A write completes when every such replica answered. Reads
go to one RW replica, round robin. A replica that errors, disconnects or misses the deadline is
marked ERR, dropped from I/O and recorded in the volume's configuration; the volume is
``degraded`` while one RW replica remains and ``faulted`` (I/O errors, never wrong data) after.

On attach, replica revision counters decide: the highest revision among the replicas not
recorded as failed serves, the others are stale and marked ERR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import protocol as p
from .errors import Busy, ConnectionLost, InvalidArgument, LhfsError
from .replica_client import ReplicaClient

log = logging.getLogger("lhfs.engine")

RW, WO, ERR = "RW", "WO", "ERR"
IO_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


class Faulted(LhfsError):
    """No replica can serve the volume any more."""


@dataclass
class ReplicaLink:
    """The engine's view of one replica."""

    id: str
    address: str
    mode: str = ERR
    client: ReplicaClient | None = None
    revision: int = -1
    error: str | None = None
    since: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    rebuild_progress: float | None = None
    rebuild_stats: Any = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "mode": self.mode,
            "revision": self.revision,
            "error": self.error,
            "since": self.since,
            "rebuild_progress": self.rebuild_progress,
            "rebuild_stats": self.rebuild_stats.public() if self.rebuild_stats else None,
        }


class Engine:
    """Fans I/O out to replicas; see the module docstring."""

    def __init__(
        self,
        size: int,
        chunk_size: int,
        nursery: trio.Nursery,
        on_mode_change: Callable[[ReplicaLink], None] | None = None,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.replicas: list[ReplicaLink] = []
        self.nursery = nursery
        self._on_mode_change = on_mode_change or (lambda link: None)
        self._timeout = io_timeout
        self._next_reader = 0
        self._inflight = 0
        self._drained = trio.Event()
        self._drained.set()
        self._resumed = trio.Event()
        self._resumed.set()
        self.structural = trio.Lock()  # snapshot, expand, rebuild barrier: one at a time
        self.rebuild_lock = trio.Lock()
        self.writes = 0  # acknowledged writes and trims since attach, for status and tests

    # -- replicas -----------------------------------------------------------------------------

    async def connect(self, address: str) -> ReplicaClient:
        """A connection to a replica for this engine's I/O (requests gathered per send)."""
        return await ReplicaClient.connect(address, self.nursery, CONNECT_TIMEOUT, gather=True)

    async def attach(self, replicas: list[tuple[str, str, bool]]) -> None:
        """Connect to (id, address, recorded_failed) replicas and pick the freshest to serve."""
        for replica_id, address, failed in replicas:
            link = ReplicaLink(replica_id, address)
            self.replicas.append(link)
            try:
                link.client = await self.connect(address)
                info = await link.client.info()
                if info["size"] != self.size:
                    # a replica expanded while others were not: the others are behind
                    self.size = max(self.size, info["size"])
                link.revision = info["revision"]
                link.error = "recorded as failed" if failed else None
            except LhfsError as exc:
                link.error = str(exc) if address else "replica process did not start"
        candidates = [r for r in self.replicas if r.client and r.error is None]
        if not candidates:
            # Every replica was recorded as failed: salvage the freshest one that answers.
            candidates = [r for r in self.replicas if r.client]
            if candidates:
                log.warning("no replica recorded healthy; salvaging the freshest one")
        if not candidates:
            raise Faulted("no replica of the volume can be reached")
        best = max(r.revision for r in candidates)
        for link in self.replicas:
            if link in candidates and link.revision == best:
                link.mode, link.error = RW, None
            elif link.client is not None and link.error is None:
                link.error = f"stale: revision {link.revision} < {best}"
            self.mode_changed(link)
        log.info("attached: %s", ", ".join(f"{r.id}={r.mode}" for r in self.replicas))

    def fail(self, link: ReplicaLink, reason: str) -> None:
        if link.mode == ERR:
            return
        log.warning("replica %s (%s) failed: %s", link.id, link.address, reason)
        link.mode = ERR
        link.error = reason
        link.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if link.client is not None:
            self.nursery.start_soon(link.client.aclose)
        self.mode_changed(link)

    def mode_changed(self, link: ReplicaLink) -> None:
        """Tell the owner (who records modes durably) that a replica's mode changed."""
        self._on_mode_change(link)

    @property
    def state(self) -> str:
        modes = [r.mode for r in self.replicas]
        if RW not in modes:
            return "faulted"
        return "healthy" if all(m == RW for m in modes) else "degraded"

    def info(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "state": self.state,
            "writes": self.writes,
            "replicas": [r.public() for r in self.replicas],
        }

    # -- I/O gate: snapshots drain in-flight I/O ----------------------------------------------

    async def _enter(self) -> None:
        while not self._resumed.is_set():
            await self._resumed.wait()
        self._inflight += 1
        if self._inflight == 1:
            self._drained = trio.Event()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def quiesce(self) -> None:
        self._resumed = trio.Event()
        await self._drained.wait()

    def resume(self) -> None:
        self._resumed.set()

    # -- I/O ----------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside the volume ({self.size})")

    async def _fanout(
        self, op: int, *parts: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> list[bytes]:
        """Send one request to every replica taking writes; return the answers of those that
        succeeded. Replicas that fail are marked ERR; no RW replica left is ``Faulted``."""
        targets = [r for r in self.replicas if r.mode in (RW, WO)]
        if not any(r.mode == RW for r in targets):
            raise Faulted("volume is faulted: no healthy replica")
        submitted = []
        for link in targets:
            try:
                submitted.append((link, link.client.submit(op, *parts)))
            except LhfsError as exc:
                self.fail(link, str(exc))
        answers = []
        waiting = list(submitted)
        timeout = self._timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            while waiting:
                link, waiter = waiting[0]
                try:
                    answers.append(await link.client.wait(waiter))
                except LhfsError as exc:
                    self.fail(link, str(exc))
                waiting.pop(0)
        for link, _ in waiting:
            self.fail(link, f"no answer within {timeout:.0f}s")
        if not any(r.mode == RW for r in self.replicas):
            raise Faulted("volume is faulted: no healthy replica")
        return answers

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        await self._enter()
        try:
            for start in range(0, len(data), p.MAX_IO):
                piece = memoryview(data)[start : start + p.MAX_IO]
                await self._fanout(p.WRITE, p.U64.pack(offset + start), piece)
            self.writes += 1
        finally:
            self._leave()

    async def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        await self._enter()
        try:
            await self._fanout(p.TRIM, p.TRIM_RANGE.pack(offset, length))
        finally:
            self._leave()

    async def flush(self) -> None:
        """Durable on every RW replica before it returns."""
        await self._enter()
        try:
            await self._fanout(p.FLUSH)
        finally:
            self._leave()

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        await self._enter()
        try:
            while True:
                healthy = [r for r in self.replicas if r.mode == RW]
                if not healthy:
                    raise Faulted("volume is faulted: no healthy replica")
                self._next_reader = (self._next_reader + 1) % len(healthy)
                link = healthy[self._next_reader]
                try:
                    with trio.fail_after(self._timeout):
                        return await link.client.read(offset, length)
                except trio.TooSlowError:
                    self.fail(link, f"no answer within {self._timeout:.0f}s")
                except LhfsError as exc:
                    self.fail(link, str(exc))
        finally:
            self._leave()

    # -- whole-volume operations --------------------------------------------------------------

    async def fanout_call(self, method: str, **args: Any) -> list[Any]:
        """A control call on the RW replicas only (the caller holds ``structural`` and has
        drained I/O); a replica that fails it is marked ERR."""
        call = p.encode_json({"method": method, "args": args})
        rw = [r for r in self.replicas if r.mode == RW]
        answers = []
        for link in rw:
            try:
                answers.append(p.decode_json(await link.client.request(p.CALL, call)))
            except LhfsError as exc:
                self.fail(link, str(exc))
        if not any(r.mode == RW for r in self.replicas):
            raise Faulted("volume is faulted: no healthy replica")
        return answers

    def _refuse_during_rebuild(self) -> None:
        if self.rebuild_lock.locked():
            raise Busy("a replica is being rebuilt: try again when it is RW (lhfs replica ls)")

    async def call_all(self, method: str, **args: Any) -> list[Any]:
        """A control call on every replica taking writes, with I/O drained around it, so that
        the replicas are at the same point of the write stream (crash-consistent snapshots)."""
        async with self.structural:
            await self.quiesce()
            try:
                answers = await self._fanout(
                    p.CALL, p.encode_json({"method": method, "args": args})
                )
                return [p.decode_json(a) for a in answers]
            finally:
                self.resume()

    async def call_one(self, method: str, **args: Any) -> Any:
        """A read-only control call answered by one healthy replica."""
        for link in [r for r in self.replicas if r.mode == RW]:
            try:
                return await link.client.call(method, **args)
            except ConnectionLost as exc:
                self.fail(link, str(exc))
        raise Faulted("volume is faulted: no healthy replica")

    async def snapshot(self, name: str) -> dict[str, Any]:
        await self.flush()
        return (await self.call_all("snapshot", name=name))[0]

    async def remove_snapshot(self, name: str) -> None:
        """Coalesce a snapshot away on every replica; I/O goes on meanwhile (no deadline: the
        replicas report progress and a dead replica still fails the call at once)."""
        self._refuse_during_rebuild()
        async with self.structural:
            call = p.encode_json({"method": "remove_snapshot", "args": {"name": name}})
            await self._fanout(p.CALL, call, timeout=float("inf"))

    async def expand(self, size: int) -> None:
        await self.call_all("expand", size=size)
        self.size = size

    async def close(self) -> None:
        """Flush what can be flushed and close the connections."""
        if any(r.mode == RW for r in self.replicas):
            try:
                await self.flush()
            except LhfsError as exc:
                log.warning("final flush failed: %s", exc)
        for link in self.replicas:
            if link.client is not None:
                await link.client.aclose()
