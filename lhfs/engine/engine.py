"""The engine: one attached volume served by several replicas.

Replicas this host started are reached by their local socket and share memory with the engine
(``lhfs.wire.shm``): a write whose data the FUSE channel read into the engine's pool reaches
each of them as a descriptor of where it lies, and a read is read by the replica into memory
the engine maps; replicas elsewhere get the bytes over their connection.

Every write and trim is submitted to all replicas that take writes (RW, and WO while being
rebuilt) before the engine waits for any of them: the replicas work in parallel, and because a
connection delivers requests in order and a replica applies them in order, all replicas apply
concurrent writes in the same order. A write completes when every such replica answered. Reads
go to one RW replica (large ones round robin, small ones to one replica: see
``submit_read``). A replica that errors, disconnects or misses the deadline is
marked ERR, dropped from I/O and recorded in the volume's configuration; the volume is
``degraded`` while one RW replica remains and ``faulted`` (I/O errors, never wrong data) after.

On attach, only a replica that holds every acknowledged write may serve: those recorded RW
(or, if the volume faulted, the one it waited for: ``last_rw``), and of those the highest
revision serves, the others are stale and marked ERR; never one below the revision recorded
for it (``Recorded.synced``): an older copy of its directory; never, beside the others, one
whose snapshot chain differs from theirs (``_chain_to_serve``). If none of them can be
reached the attach is refused (``Faulted``): another replica would serve older data, and then
be the source every other one is rebuilt from. Only when none is recorded so (an older
configuration) is the freshest reachable one salvaged, never one that was added and never
completed a rebuild.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from lhfs.core.errors import (
    Busy,
    ConnectionLost,
    CorruptState,
    Fenced,
    InvalidArgument,
    LhfsError,
    NoSpace,
    NotInitialised,
    WrongVolume,
    is_refusal,
)
from lhfs.core.units import rfc3339
from lhfs.wire import protocol as p
from lhfs.wire import shm
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import ReplicaClient

log = logging.getLogger("lhfs.engine")

RW, WO, ERR = "RW", "WO", "ERR"
IO_TIMEOUT = 8.0  # (Longhorn's engine-replica timeout; a volume setting)
CONTROL_TIMEOUT = 60.0
TRIM_SPAN = 1024  # chunks per TRIM request (what a replica takes at once: MAX_TRIM_CHUNKS)
CONNECT_TIMEOUT = 10.0  # a handshake's deadline at most; the I/O timeout if shorter
CONNECT_FLOOR = 5.0  # (a handshake under load, TLS included: never a deadline shorter than this)
REFUSALS_TOLD_EVERY = 60.0  # seconds between log lines about refused writes
LARGE_READ = 256 << 10  # a read this large goes to the next replica (spread)


class Faulted(LhfsError):
    """No replica can serve the volume any more."""


Done = Callable[[Exception | None], None]
ReadDone = Callable[[Exception | None, memoryview | bytes | None], None]


# what an attach says of a replica that answers below the revision recorded for it
OLDER = "an older copy of its directory"


@dataclass
class ReplicaLink:
    """The engine's view of one replica."""

    id: str
    address: str
    mode: str = ERR
    client: ReplicaClient | None = None
    revision: int = -1
    error: str | None = None
    since: str = field(default_factory=lambda: rfc3339())
    rebuild_progress: float | None = None
    rebuild_stats: Any = None
    # (trio clock) when it last stopped serving: a failure while it was being brought back
    # keeps the time it was lost, so that ``rejoin_limit`` ends a replica that never serves again
    failed_at: float | None = None
    comebacks: int = 0  # times brought back since it last served (each fails: longer waits)
    # it last failed for not answering in time before it served (too slow to be rebuilt)
    slow: bool = False
    failures: int = 0  # times marked ERR since attach (a replica that flaps shows here)
    restarts: int = 0  # times its process was started again (a local replica) since attach
    rejoin: str | None = None  # what the engine does to bring it back, if anything
    held: str | None = None  # why it is not brought back at all (the operator decides)
    rotten_backing: bool = False  # a scrub found its backing image rotten: rebuilt with a new one
    # what the replica is (its directory's identity, from its answers): one replica reached
    # by two addresses is still one replica
    uid: str | None = None
    # the revision it last said it holds durably (its answer to a flush; recorded in the
    # configuration): whatever answers at its address below that is an older copy of it
    synced: int = -1
    # why another directory answering at its address was refused, as last logged: a
    # condition that lasts until the operator acts is said once, not at every attempt
    stranger: str | None = None
    # started by this host from a directory the configuration names by its path: known by
    # that path, so an identity made again there (its id file lost) is its own
    local: bool = False
    # the size it held when the attach's handshake asked it (None if it did not answer):
    # what the configured size is checked against, with no second question
    attached_size: int | None = None

    def public(self) -> dict[str, Any]:
        """What ``info`` shows. A replica whose rebuild is in its first steps (a new one
        receiving the backing image) is not serving yet, and is shown WO like the rest of its
        rebuild, not ERR: nothing failed, and the operator and doctor would be told it had."""
        preparing = self.mode == ERR and self.rebuild_progress is not None
        return {
            "id": self.id,
            "address": self.address,
            "mode": WO if preparing else self.mode,
            "revision": self.revision,
            "error": None if preparing else self.error,
            "since": self.since,
            "rebuild_progress": self.rebuild_progress,
            "rebuild_stats": self.rebuild_stats.public() if self.rebuild_stats else None,
            "rejoin": self.rejoin,
            "failures": self.failures,
            "restarts": self.restarts,
            "shared_memory": bool(self.client and self.client.shared and not self.client.broken),
            "link": self.client.link if self.client and not self.client.broken else None,
        }


@dataclass
class Recorded:
    """What the volume's configuration says of a replica, for ``Engine.attach``."""

    id: str
    address: str  # ("" when its process did not start: ``away`` says why)
    # it holds every acknowledged write: recorded RW, or the replica a faulted volume waits for
    trusted: bool
    built: bool = True  # False: added and never completed a rebuild (it holds nothing to save)
    uid: str | None = None  # its directory's identity, as recorded
    synced: int = -1  # the revision it is known to hold durably at least (as recorded)
    local: bool = False  # a directory of this host, named by its path (``ReplicaLink.local``)
    waited_for: bool = False  # the replica the volume, faulted, waited for (``last_rw``)
    away: str | None = None  # why it has no address

    def trust(self) -> str:
        """How the record vouches for it, in a refusal's words."""
        return (
            "the last replica to serve before the volume faulted"
            if self.waited_for
            else "recorded healthy"
        )


class Engine:
    """Fans I/O out to replicas; see the module docstring."""

    def __init__(
        self,
        size: int,
        chunk_size: int,
        nursery: trio.Nursery,
        key: VolumeKey,
        on_mode_change: Callable[[ReplicaLink], None] | None = None,
        io_timeout: float = IO_TIMEOUT,
        epoch: int = 0,
        pool: shm.Region | None = None,
        device: int | None = None,
    ) -> None:
        self.size = size
        self.pool = pool  # the memory local replicas share with the FUSE channel and this
        self.device = device  # the FUSE device, on which local replicas answer reads (shm)
        self.key = key
        # The session epoch: above every earlier session of this volume at its replicas, and
        # raised for each new one (see ``lhfs.replica.session``).
        self.epoch = epoch
        # told of each epoch before a session asks a replica for it: the owner keeps it, so
        # that the next attach starts above every epoch a replica may have recorded
        self.on_epoch: Callable[[int], None] = lambda epoch: None
        # a replica of another volume refused, in words that name that volume (its owner
        # knows the volumes of the root by name; the engine knows their ids only)
        self.named: Callable[[WrongVolume], str] = str
        self.volume = "VOLUME"  # its name, for the commands a refusal names (set by its owner)
        self.owner = secrets.token_bytes(8)  # this engine's identity in its sessions' epochs
        self.chunk_size = chunk_size
        self.replicas: list[ReplicaLink] = []
        self.nursery = nursery
        self._on_mode_change = on_mode_change or (lambda link: None)
        self.io_timeout = io_timeout
        self._next_reader = 0  # which RW replica reads (modulo their number)
        self._inflight = 0
        self._drained = trio.Event()
        self._drained.set()
        self._resumed = trio.Event()
        self._resumed.set()
        self._parked: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.structural = trio.Lock()  # snapshot, expand, rebuild barrier: one at a time
        self.rebuild_lock = trio.Lock()
        self.writes = 0  # requests the replicas acknowledged since attach (status and tests)
        self.refused_writes = 0  # writes, trims, flushes every RW replica refused (full disks)
        self.last_refusal: tuple[str, str] | None = None  # when, why
        self._refusals_told = (-math.inf, 0)  # when the log last said so, and the count then
        self.shared_writes = 0  # writes sent to a replica as a descriptor into the pool
        self.shared_reads = 0  # reads a replica answered into shared memory
        self.replica_answered_reads = 0  # ... of which it answered the kernel itself
        self.local_names: dict[str, str] = {}  # address -> local socket of a local replica
        self.tls_cas: dict[str, str] = {}  # address -> CA (PEM) of a replica served over TLS
        # told of every replica marked ERR, and whether to rebuild it at once (its owner brings
        # it back: ``lhfs.engine.rejoin``)
        self.on_failed: Callable[[ReplicaLink, bool], None] = lambda link, at_once: None
        self.last_rw: str | None = None  # the replica whose failure faulted the volume
        self.superseded: str | None = None  # why another engine holds the replicas now
        self.granted: dict[str, int] = {}  # address -> the epoch its replica last granted
        self.closing = False  # (connections closed on purpose are not failures; stalls are)

    @property
    def control_timeout(self) -> float:
        """How long a control call (a snapshot: it flushes first) may take: longer than I/O."""
        return max(self.io_timeout, CONTROL_TIMEOUT)

    @property
    def handshake_timeout(self) -> float:
        """How long a replica's handshake may take: the I/O timeout, within bounds."""
        return min(CONNECT_TIMEOUT, max(self.io_timeout, CONNECT_FLOOR))

    async def run(self) -> None:
        """The engine's own background work (the I/O deadline), until cancelled."""
        await self._watchdog()

    # -- replicas -----------------------------------------------------------------------------

    async def connect(self, address: str, takeover: bool = False) -> ReplicaClient:
        """A new session with a replica for this engine's I/O: by its local socket if it is one
        this host started (``local_names``), else by TCP. It fences any older session of this
        volume at that replica (a connection marked failed, with writes still on their way):
        the replica resets every engine session it held before, this engine's own too.
        ``takeover`` (attach) asks for a new epoch, above the replica's, fencing whatever engine
        held it. Otherwise (a replica brought back, or added) the session asks for the epoch
        this engine last held at that address (else its own, as it stands), never a newer one:
        a replica that another engine took over since refuses it (``Fenced``), however long this
        one was away. Why: an engine cut off from its replicas, raising its epoch at each attempt
        to reach them, came back above the engine attached meanwhile and took the replicas
        back from it, writing over what it had acknowledged. The handshake
        has the I/O timeout (10 s at most): a replica that leaves it unanswered that long is as
        stuck as one that leaves I/O unanswered, and a hung local one is killed sooner."""
        local = self.local_names.get(address)
        earlier = [r.client for r in self.replicas if r.address == address and r.client]
        asked = self.granted.get(address, self.epoch)
        if takeover:
            if self.epoch + 1 >= p.MAX_EPOCH:  # (never asked for, nor kept: replicas refuse it)
                raise CorruptState(
                    f"session epoch {self.epoch + 1} is out of range (epochs stay below "
                    f"{p.MAX_EPOCH})"
                )
            self.epoch = asked = self.epoch + 1
            self.on_epoch(self.epoch)
        try:
            client = await self._session(address, local, asked, takeover)
        except Fenced:
            mine = None if takeover else await self._held_here(address)
            if mine is None or mine == asked:
                raise
            client = await self._session(address, local, mine, takeover)
        if client.epoch > self.epoch:  # (a takeover: granted above the replica's)
            self.epoch = client.epoch
            try:
                self.on_epoch(self.epoch)
            except LhfsError as exc:  # (the session is held already: kept at attach's end)
                log.warning("session epoch %d not kept yet: %s", self.epoch, exc)
        self.granted[address] = client.epoch
        if self.pool is not None:  # the new session fenced the old ones: nothing they were
            for old in earlier:  # sent is carried out any more, so their slots are free
                self.pool.forget(old)
        return client

    async def _session(
        self, address: str, local: str | None, epoch: int, takeover: bool
    ) -> ReplicaClient:
        return await ReplicaClient.connect(
            address,
            self.nursery,
            self.key,
            self.handshake_timeout,
            local,
            epoch=epoch,
            takeover=takeover,
            tls_ca=self.tls_cas.get(address),
            owner=self.owner,
            dead_after=self.io_timeout,
            pool=self.pool,
            device=self.device,
        )

    async def _held_here(self, address: str) -> int | None:
        """The epoch this engine holds at the replica at ``address``, asked in a reader
        session (which fences nothing), if the replica says this engine holds it: one that
        refused the epoch this engine last held at that address as older is then not another
        engine's but another of this engine's replicas, answering there since (a local one
        started again on a port another one had, a replica moved), in an epoch of its own
        session. None when another engine holds it (or the replica is of an lhfs that does
        not say), or it does not answer: the refusal stands."""
        try:
            reader = await ReplicaClient.connect(
                address,
                self.nursery,
                self.key,
                self.handshake_timeout,
                self.local_names.get(address),
                role=p.READER,
                tls_ca=self.tls_cas.get(address),
            )
        except LhfsError:
            return None
        try:
            with trio.move_on_after(self.io_timeout):
                hello = await reader.call("hello")
                epoch, owner = hello.get("epoch"), hello.get("owner")
                if owner == self.owner.hex() and type(epoch) is int and 0 < epoch <= self.epoch:
                    return epoch
        except LhfsError:
            pass
        finally:
            await reader.aclose()
        return None

    async def attach(
        self,
        replicas: list[Recorded] | list[tuple[str, str, bool]],
        held: set[str] | None = None,
        removing: Iterable[str] = (),
    ) -> None:
        """Connect to the replicas (``Recorded``, or (id, address, recorded_failed)) and pick
        the freshest that holds every acknowledged write to serve (see the module docstring);
        never one of ``held`` (a scrub found it corrupt where no copy can be trusted), not
        even as the last one that answers. ``Faulted`` if none can: one line saying why.
        ``removing``: snapshots whose removal was cut short (some replicas hold them, some
        not, and it is finished next): left out of the chains compared."""
        held = held or set()
        going = set(removing)
        records = [
            r if isinstance(r, Recorded) else Recorded(r[0], r[1], trusted=not r[2])
            for r in replicas
        ]
        pairs: list[tuple[ReplicaLink, Recorded]] = []
        answered: set[str] = set()  # the ids of those that answered as themselves
        chains: dict[str, tuple[str, ...]] = {}  # their snapshot chains (an older lhfs: none)
        strangers: set[str] = set()  # ... and of those whose address another one answers at
        for record in records:
            link = ReplicaLink(
                record.id, record.address, uid=record.uid, synced=record.synced, local=record.local
            )
            self.replicas.append(link)
            pairs.append((link, record))
            if not record.address:
                link.error = record.away or "replica process did not start"
                continue
            try:
                link.client = await self.connect(record.address, takeover=True)
                info = await link.client.info()
            except WrongVolume as exc:
                link.error = self.named(exc)
                continue
            except NotInitialised:  # (wiped, or the wrong directory: rebuilt if another serves)
                link.error = await self._empty(link)
                strangers.add(link.id)
                continue
            except LhfsError as exc:
                link.error = str(exc)
                continue
            stranger = self.stranger(link, info.get("uid"), info["revision"], serving=True)
            if stranger is not None:
                link.error = stranger
                strangers.add(link.id)
                if not link.local and info.get("uid") and link.uid and info["uid"] != link.uid:
                    # another directory: not this replica, it neither serves nor is rebuilt
                    client, link.client = link.client, None
                    await client.aclose()
                else:  # an older copy of its own: never served, rebuilt if another serves
                    link.revision = info["revision"]
                    log.warning("replica %s %s", link.id, stranger)
                continue
            link.attached_size = info["size"]
            if info["size"] != self.size:
                # a replica expanded while others were not: the others are behind
                self.size = max(self.size, info["size"])
            link.revision = info["revision"]
            link.uid = info.get("uid") or link.uid  # (None from a replica of an older lhfs)
            link.error = None if record.trusted else "recorded as failed"
            answered.add(link.id)
            if isinstance(info.get("chain"), list):
                chains[link.id] = tuple(n for n in map(str, info["chain"]) if n not in going)
        trusted = [(link, record) for link, record in pairs if record.trusted]
        if trusted:
            # Only these hold every write the volume acknowledged: if none answers, another
            # would serve older data, and the others would later be rebuilt from it.
            candidates = [link for link, _ in trusted if link.id in answered - held]
            if not candidates:
                others = len(trusted) < len(pairs)
                raise Faulted(_unreachable(self.volume, trusted, held, strangers, others))
        else:
            # None is recorded so (a configuration of an older lhfs, or one whose record could
            # not be written): salvage the freshest that answers and ever served.
            candidates = [
                link for link, record in pairs if link.id in answered - held and record.built
            ]
            if not candidates:
                raise Faulted(_nothing_to_salvage(pairs, answered, held))
            log.warning(
                "no replica recorded healthy; salvaging the freshest one of %s",
                ", ".join(r.id for r in candidates),
            )
        best = max(r.revision for r in candidates)
        chain = _chain_to_serve([chains.get(c.id) for c in candidates if c.revision == best])
        for link in self.replicas:
            freshest = any(link is c for c in candidates) and link.revision == best
            if freshest and chains.get(link.id, chain) != chain:
                link.error = (
                    f"its snapshot chain ({_chain_text(chains[link.id])}) differs from the "
                    f"others' ({_chain_text(chain)}): not served, rebuilt from one that holds it"
                )
                log.warning("replica %s: %s", link.id, link.error)
            elif freshest:
                link.mode, link.error = RW, None
            elif link.client is not None and link.error is None:
                link.error = f"stale: revision {link.revision} < {best}"
            self.mode_changed(link)
        log.info("attached: %s", ", ".join(f"{r.id}={r.mode}" for r in self.replicas))

    async def _empty(self, link: ReplicaLink) -> str:
        """What an empty replica directory answering at ``link``'s address is: the replica's
        own (its recorded identity: a damaged directory set aside there and made anew, its
        rebuild not yet begun), which is rebuilt once another replica serves; else another
        directory, the replica's own to be served there instead. Why: the replica's own, it
        was said to be another, sending the operator after a directory set aside."""
        with contextlib.suppress(LhfsError):
            if link.client is not None and link.uid:
                hello = await link.client.call("hello")
                if isinstance(hello, dict) and hello.get("uid") == link.uid:
                    return (
                        "answers at its address with its own directory, empty (made anew in "
                        "place of a damaged one set aside, or wiped): rebuilt from a replica "
                        "that serves"
                    )
        return (
            "answers at its address with an empty replica directory, not the volume's "
            "replica: serve the replica's own directory there, or give it up with "
            "'lhfs replica rm'"
        )

    def stranger(
        self, link: ReplicaLink, uid: str | None, revision: int, serving: bool
    ) -> str | None:
        """Why the replica answering at ``link``'s address (directory ``uid``, at
        ``revision``) is not ``link``'s replica as this engine knows it, if it is not: another
        directory (a copy, another replica's), or, to serve (``serving``), an older copy of
        its own than it last flushed. A replica of an older lhfs (no identity) is not told
        apart; one about to be rebuilt may be older (the rebuild brings it up to date). A
        local replica is known by its directory's path: a new identity there (its id file
        lost or damaged, and made again) is adopted, said in the log, unless it is older."""
        if link.uid and uid and uid != link.uid:
            if not link.local:
                return (
                    f"answers at its address with another replica's directory (id {uid}, "
                    f"expected {link.uid})"
                )
            if not (serving and 0 <= revision < link.synced):
                log.warning(
                    "replica %s: its directory has a new identity %s (was %s: its id file was "
                    "lost or damaged); adopted, as the directory the volume names",
                    link.id,
                    uid,
                    link.uid,
                )
                link.uid = uid
        if serving and 0 <= revision < link.synced:
            return (
                f"answers at its address with {OLDER} (revision {revision}, below the "
                f"{link.synced} it last flushed)"
            )
        return None

    def fail(
        self, link: ReplicaLink, reason: str, at_once: bool = False, slow: bool = False
    ) -> None:
        """Take ``link`` out of I/O, for its owner to bring back. ``at_once``: the replica
        answers well (it refused what the others did, a scrub found it corrupt), so it is
        rebuilt without waiting for it to prove it stays reachable. ``slow``: it did not
        answer in time; one that was not serving yet (being rebuilt) is brought back later
        than others (``lhfs.engine.rejoin``): each attempt would hold the volume's writes."""
        if link.mode == ERR or link not in self.replicas:  # (removed: nothing to bring back)
            return
        link.slow = slow and link.mode != RW
        log.warning("replica %s (%s) failed: %s", link.id, link.address, reason)
        if link.mode == RW and not any(r.mode == RW for r in self.replicas if r is not link):
            # the volume faults with it: it holds every write ever acknowledged, and is the one
            # replica that may serve again by itself if it comes back (see ``revive``)
            self.last_rw = link.id
        if link.mode == RW or link.failed_at is None:
            link.failed_at, link.comebacks = trio.current_time(), 0
        link.mode = ERR
        link.error = reason
        link.since = rfc3339()
        link.failures += 1
        if link.client is not None:  # reset: what is still queued on it is never delivered
            # (its requests fail with the reason, not as a mere closed connection: a rebuild
            # under way says why it failed)
            why = ConnectionLost(f"replica {link.id} ({link.address}) failed: {reason}")
            self.nursery.start_soon(link.client.aclose, True, why)
        self.mode_changed(link)
        self.on_failed(link, at_once)

    def taken_over(self, reason: str) -> None:
        """Another engine holds this volume's replicas now (a replica refused a new session
        of this one): stop serving it altogether rather than go on with the replicas it still
        reaches, which would make two volumes of one."""
        if self.superseded is None:
            log.error("this engine was superseded: %s", reason)
            self.superseded = reason
        for link in self.replicas:
            self.fail(link, f"another engine took the volume over: {reason}")

    def revive(self, link: ReplicaLink, uid: str | None, revision: int) -> None:
        """A faulted volume's last RW replica is back (reconnected; its directory ``uid`` at
        ``revision``, as it answered): it serves again, and the others are rebuilt from it.
        Only that one: any other may lack acknowledged writes; and only if it is that one
        (``stranger``), not another directory answering at its address."""
        if self.superseded is not None:
            raise InvalidArgument(f"this engine was superseded: {self.superseded}")
        if self.state != "faulted" or link.id != self.last_rw or link.client is None:
            raise InvalidArgument(f"replica {link.id} cannot serve the volume by itself")
        stranger = self.stranger(link, uid, revision, serving=True)
        if stranger is not None:
            raise InvalidArgument(f"replica {link.id} {stranger}")
        log.warning("replica %s, the last to serve, is back: the volume serves again", link.id)
        link.mode, link.error, link.rejoin = RW, None, None
        self.last_rw = None
        self.mode_changed(link)

    def mode_changed(self, link: ReplicaLink) -> None:
        """Tell the owner (who records modes durably) that a replica's mode changed. A record
        that cannot be written (a full or read-only disk) is logged: the engine's own view is
        what decides I/O, and failing here would leave the request being answered unanswered.
        A replica removed meanwhile (a rebuild's source) has nothing left to record."""
        if link not in self.replicas:
            return
        try:
            self._on_mode_change(link)
        except Exception:
            log.exception("could not record that replica %s is %s", link.id, link.mode)

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
            "refused_writes": self.refused_writes,
            "last_refusal": None
            if self.last_refusal is None
            else {"at": self.last_refusal[0], "reason": self.last_refusal[1]},
            "shared_writes": self.shared_writes,
            "shared_reads": self.shared_reads,
            "replica_answered_reads": self.replica_answered_reads,
            # (the local socket of a replica this host runs: lhfs's own readers on this host
            # use it, where only this user is let in, rather than TCP, where strangers are)
            "replicas": [
                {**r.public(), "local_socket": self.local_names.get(r.address)}
                for r in self.replicas
            ],
        }

    # -- I/O gate: snapshots drain in-flight I/O ----------------------------------------------

    def _enter(self) -> None:
        self._inflight += 1
        if self._inflight == 1:
            self._drained = trio.Event()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def quiesce(self) -> None:
        """Hold new I/O back (it is parked, in order) and wait for what is in flight. If the
        wait is cancelled, I/O resumes: nothing may stay parked behind a caller that left.
        Callers hold ``structural``: one hold at a time (``lhfs.engine.hold`` too)."""
        assert self.structural.locked()
        self._resumed = trio.Event()
        try:
            await self._drained.wait()
        except BaseException:
            self.resume()
            raise

    def resume(self) -> None:
        """Let I/O flow again: the parked requests leave first, in the order they came."""
        self._resumed.set()
        parked, self._parked = self._parked, []
        for submit, args in parked:
            submit(*args)
        self.push()

    def _park(self, submit: Callable[..., None], *args: Any) -> bool:
        if self._resumed.is_set():
            return False
        self._parked.append((submit, args))
        return True

    # -- I/O ----------------------------------------------------------------------------------
    #
    # The submit_* methods queue a request and call ``done`` with its outcome later, from the
    # task that receives the replicas' answers: the FUSE frontend submits a whole burst of
    # requests, then calls ``push`` once. ``done(error)`` (reads: ``done(error, data)``, where
    # data is valid only during the call) gets None or the exception to report.

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside the volume ({self.size})")

    def push(self) -> None:
        """Send every queued request to its replica (one system call per replica)."""
        for link in self.replicas:
            if link.client is not None:
                link.client.push()

    def _healthy(self) -> bool:
        return any(r.mode == RW for r in self.replicas)

    def _submit_all(
        self,
        op: int,
        parts: tuple[p.Part, ...],
        done: Done,
        shared: tuple[bytes, int] | None = None,
    ) -> None:
        """One request to every replica taking writes; ``done`` once each answered or failed.
        Replicas that fail are marked ERR; none left RW is ``Faulted``. A write whose data
        lies in the pool has ``shared``: its descriptor (``WRITE_SHM``) and where it lies,
        sent instead to the replicas that share the pool."""
        targets = [r for r in self.replicas if r.mode in (RW, WO)]
        if not any(r.mode == RW for r in targets):
            done(Faulted("volume is faulted: no healthy replica"))
            return
        self._enter()
        fan = _Fanout(self, len(targets), done, op == p.FLUSH)
        for link in targets:
            client = link.client
            try:
                if shared is not None and client.shared:
                    descriptor, at = shared
                    answered = partial(self._shared_answered, fan, link, client, at)
                    client.submit(p.WRITE_SHM, (descriptor,), answered, quick=True, owned=True)
                    self.shared_writes += 1
                else:
                    client.submit(op, parts, partial(fan.answered, link), quick=True, owned=True)
            except LhfsError as exc:
                fan.answered(link, exc, b"")

    def _shared_answered(
        self,
        fan: _Fanout,
        link: ReplicaLink,
        client: ReplicaClient,
        at: int,
        error: LhfsError | None,
        payload: memoryview | bytes,
    ) -> None:
        """A write sent as a descriptor was answered; if the connection was lost instead, the
        replica may still read the slot (slow, not dead): it is held for that connection."""
        if isinstance(error, ConnectionLost):
            self.pool.taint(at // self.pool.slot_size, client)
        fan.answered(link, error, payload)

    def submit_write(self, offset: int, data: bytes | memoryview, done: Done) -> None:
        """Write ``data`` (at most ``protocol.MAX_IO`` bytes), which the caller leaves
        unchanged until ``done``: it is sent from where it lies, not copied. Data in the
        pool (a FUSE request read there) reaches replicas sharing it as a descriptor."""
        if not self._park(self.submit_write, offset, data, done):
            at = self.pool.locate(data) if self.pool is not None else None
            shared = None if at is None else (p.SHM_WRITE.pack(offset, at, len(data)), at)
            self._submit_all(p.WRITE, (p.U64.pack(offset), data), done, shared)

    def submit_trim(self, offset: int, length: int, done: Done) -> None:
        """Trim a range; one larger than a replica takes in one request (``TRIM_SPAN`` chunks)
        goes as several, one after the other (each sent once the one before was answered by
        every replica), ``done`` once the last was, or at the first error. Why one at a time:
        each request has the I/O timeout to be answered from when it is sent, and a piece
        holding data costs a replica up to half a second (a hole punched per chunk), so a
        whole-volume discard sent at once (mkfs, fstrim: gigabytes) left its last pieces
        waiting longer than the timeout behind the others, and every replica was failed."""
        span = TRIM_SPAN * self.chunk_size
        if length <= span:
            if not self._park(self.submit_trim, offset, length, done):
                self._submit_all(p.TRIM, (p.TRIM_RANGE.pack(offset, length),), done)
            return

        def rest(error: Exception | None) -> None:
            if error is not None:
                done(error)
                return
            self.submit_trim(offset + span, length - span, done)
            self.push()  # (sent from an answer: no caller pushes it)

        self.submit_trim(offset, span, rest)

    def submit_flush(self, done: Done) -> None:
        """Durable on every RW replica when ``done`` is called without an error."""
        if not self._park(self.submit_flush, done):
            self._submit_all(p.FLUSH, (), done)

    def submit_read(
        self, offset: int, length: int, done: ReadDone, unique: int | None = None
    ) -> None:
        """Read from one RW replica; a replica that fails it is marked ERR and the next one is
        asked. With ``unique`` (the kernel's FUSE request), a local replica holding the FUSE
        device answers the kernel itself and ``done`` gets None for data (``shm``).
        Which replica: large reads go round the replicas, so that they read them in
        parallel; small ones stay with the replica the last large read went to (or the next
        RW one, if it failed). Small reads kept on one replica cost its process one receive
        and a few sends per burst, where spread they woke every replica for a few reads each:
        on two cores, 4 KiB random reads with 3 replicas gave 27-29k IOPS spread per request
        or per burst, 31.5-32k on one replica. Handing them on to the next replica every
        32 MiB (a few times a second) still cost about a tenth (31.2-31.7k against 33.4-35.3k
        staying, alternating runs; the page cache refaulted nothing: the likely cost is the
        scheduler placing a newly busy process again)."""
        if self._park(self.submit_read, offset, length, done, unique):
            return
        self._enter()
        if length >= LARGE_READ:
            self._next_reader += 1
        self._read_from_next((offset, length, unique), done)

    def _read_from_next(self, request: tuple[int, int, int | None], done: ReadDone) -> None:
        while True:
            healthy = [r for r in self.replicas if r.mode == RW]
            if not healthy:
                self._leave()
                done(Faulted("volume is faulted: no healthy replica"), b"")
                return
            link = healthy[self._next_reader % len(healthy)]
            client = link.client
            region = client.region
            slot = region.take() if region is not None else None
            offset, length, unique = request
            try:
                if slot is None:
                    answered = partial(self._read_answer, link, request, done)
                    client.submit(p.READ, (p.RANGE.pack(offset, length),), answered, True)
                    return
                at = slot * region.slot_size
                if unique is not None and client.answers_reads:
                    op, described = p.READ_REPLY, p.SHM_READ_REPLY.pack(offset, length, at, unique)
                else:
                    op, described, unique = p.READ_SHM, p.SHM_READ.pack(offset, length, at), None
                answered = partial(self._shared_read, link, region, slot, request, unique, done)
                client.submit(op, (described,), answered, True)
                return
            except LhfsError as exc:
                if slot is not None:
                    region.give(slot)
                self.fail(link, str(exc))
                self._next_reader += 1

    def _read_answer(
        self,
        link: ReplicaLink,
        request: tuple[int, int, int | None],
        done: ReadDone,
        error: LhfsError | None,
        data: memoryview | bytes,
    ) -> None:
        if error is None:
            self._leave()
            done(None, data)
            return
        self.fail(link, str(error))
        self._read_from_next(request, done)
        self.push()

    def _shared_read(
        self,
        link: ReplicaLink,
        region: shm.Region,
        slot: int,
        request: tuple[int, int, int | None],
        unique: int | None,
        done: ReadDone,
        error: LhfsError | None,
        payload: memoryview | bytes,
    ) -> None:
        """A read the replica answered into its read region: handed on from there, or, with
        ``unique``, already answered to the kernel by the replica. The slot is free again once
        answered; after a lost connection it is not (the replica may still fill it), and the
        region goes with the connection. Asked again of another replica, a read the first
        one answered meanwhile is answered twice: the kernel refuses the second."""
        if error is None:
            self.shared_reads += 1
            self._leave()
            try:
                if unique is None:
                    done(None, region.view(slot, request[1]))
                else:
                    self.replica_answered_reads += 1
                    done(None, None)
            finally:
                region.give(slot)
            return
        if not isinstance(error, ConnectionLost):
            region.give(slot)
        self._read_answer(link, request, done, error, b"")

    async def _watchdog(self) -> None:
        """Mark ERR a replica that has left I/O unanswered for longer than the deadline, or
        whose connection ended while nothing was asked of it (a replica killed while the
        volume is idle shows as failed within a second, not at the next write)."""
        while True:
            await trio.sleep(min(1.0, self.io_timeout / 4))
            now = trio.current_time()
            for link in self.replicas:
                client = link.client
                if link.mode == ERR or client is None:
                    continue
                if client.failure is not None and not self.closing:
                    self.fail(link, client.failure, slow=client.timed_out)
                elif client.stalled(now, self.io_timeout):
                    self.fail(link, f"no answer within {self.io_timeout:.0f}s", slow=True)

    # The same operations, awaited (control requests, tools and tests).

    async def _wait(self, submit: Callable[..., None], *args: Any) -> bytes:
        done = trio.Event()
        outcome: list[Any] = []

        def finished(error: Exception | None, data: memoryview | bytes = b"") -> None:
            outcome[:] = [error, bytes(data)]
            done.set()

        submit(*args, finished)
        self.push()
        await done.wait()
        if outcome[0] is not None:
            raise outcome[0]
        return outcome[1]

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        data = bytes(data)
        for start in range(0, len(data), p.MAX_IO):
            await self._wait(self.submit_write, offset + start, data[start : start + p.MAX_IO])

    async def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        await self._wait(self.submit_trim, offset, length)

    async def flush(self) -> None:
        """Durable on every RW replica before it returns."""
        await self._wait(self.submit_flush)

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return await self._wait(self.submit_read, offset, length)

    async def _fanout(
        self, op: int, *parts: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> list[bytes]:
        """A control request to every replica taking writes, awaited: the answers of those
        that did it. A replica that fails it (its connection, its disk), or has not answered
        within ``timeout``, is marked ERR; none left RW is ``Faulted``. A refusal (see
        ``errors.is_refusal``) is an answer: refused by all, it is raised and nothing changed;
        refused by some while the others did it, those differ now and are marked ERR for a
        rebuild (``on_failed``)."""
        targets = [r for r in self.replicas if r.mode in (RW, WO)]
        if not any(r.mode == RW for r in targets):
            raise Faulted("volume is faulted: no healthy replica")
        answers: list[bytes] = []
        refused: list[tuple[ReplicaLink, LhfsError]] = []
        pending = {link.id for link in targets}
        done = trio.Event()
        did = []  # RW replicas that did it (a WO one doing it decides nothing)

        def answered(link: ReplicaLink, error: LhfsError | None, payload: memoryview | bytes):
            if link.id not in pending:
                return
            pending.discard(link.id)
            if error is None:
                answers.append(bytes(payload))
                if link.mode == RW:
                    did.append(link)
            elif is_refusal(error):
                refused.append((link, error))
            else:
                self.fail(link, str(error))
            if not pending:
                done.set()

        for link in targets:
            try:
                link.client.submit(op, parts, partial(answered, link))
            except LhfsError as exc:
                answered(link, exc, b"")
        self.push()
        timeout = self.control_timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            await done.wait()
        for link in targets:
            if link.id in pending:
                pending.discard(link.id)
                self.fail(link, f"no answer within {timeout:.0f}s")
        self._settle_refusals(refused, bool(did))
        if not self._healthy():
            raise Faulted("volume is faulted: no healthy replica")
        return answers

    def _settle_refusals(self, refused: list[tuple[ReplicaLink, LhfsError]], done: bool) -> None:
        """Refused everywhere: raise the refusal (nothing changed). Done elsewhere: the
        replicas that refused no longer match the others; they are rebuilt."""
        if not refused:
            return
        if not done:
            raise refused[0][1]
        for link, error in refused:
            log.warning("replica %s refused what the others did: %s", link.id, error)
            self.fail(
                link, f"refused what the other replicas did ({error}): rebuilding", at_once=True
            )

    def _settle_io(
        self, took: list[ReplicaLink], refused: list[tuple[ReplicaLink, LhfsError]]
    ) -> LhfsError | None:
        """Settle the refusals of a write, trim or flush: ``NoSpace``, a replica's disk is
        full and it wrote nothing (the only error answer on this path that is not a failure).
        Taken by an RW replica: the request is done, and the replicas that refused it lack it
        now, so they are rebuilt (replicas sharing a disk mostly refuse the same request, but
        the last free blocks may go to the first that asks). Refused by every RW replica:
        they are all as they were, the request fails with the refusal and the volume serves
        on (reads, writes into space it holds); a replica being rebuilt that took it is
        unlike them now and is rebuilt again. Returns the refusal to answer, if any."""
        if any(link.mode == RW for link in took):
            self._settle_refusals(refused, True)
            return None
        for link in took:
            self.fail(link, "took a write the healthy replicas refused: rebuilding", at_once=True)
        if not self._healthy():
            return None
        error = refused[0][1]
        self.refused_writes += 1
        self.last_refusal = (rfc3339(), str(error))
        now = trio.current_time()
        if now >= self._refusals_told[0] + REFUSALS_TOLD_EVERY:  # (a full disk: not every one)
            log.warning(
                "%d write(s) refused by %s: %s (the volume serves reads, and writes into "
                "space its replicas hold)",
                self.refused_writes - self._refusals_told[1],
                ", ".join(sorted(link.id for link, _ in refused)),
                error,
            )
            self._refusals_told = (now, self.refused_writes)
        return error

    # -- whole-volume operations --------------------------------------------------------------

    async def fanout_call(self, method: str, **args: Any) -> list[Any]:
        """A control call on the RW replicas only (the caller holds ``structural`` and has
        drained I/O, which waits meanwhile: hence the deadline); a replica that fails it, or
        does not answer in time, is marked ERR; refusals as in ``_fanout``."""
        call = p.encode_json({"method": method, "args": args})
        rw = [r for r in self.replicas if r.mode == RW]
        answers = []
        refused: list[tuple[ReplicaLink, LhfsError]] = []
        for link in rw:
            try:
                with trio.fail_after(self.control_timeout):
                    answers.append(p.decode_json(await link.client.request(p.CALL, call)))
            except trio.TooSlowError:
                self.fail(link, f"no answer within {self.control_timeout:.0f}s")
            except LhfsError as exc:
                if is_refusal(exc):
                    refused.append((link, exc))
                else:
                    self.fail(link, str(exc))
        self._settle_refusals(refused, bool(answers))
        if not any(r.mode == RW for r in self.replicas):
            raise Faulted("volume is faulted: no healthy replica")
        return answers

    def refuse_during_rebuild(self, what: str) -> None:
        """Structural changes wait for a rebuild: it joins the chain as the barrier left it."""
        if self.rebuild_lock.locked():
            raise Busy(
                f"a replica is being rebuilt: {what} is refused until it is RW (lhfs replica ls)"
            )

    async def call_all(self, method: str, held: bool = False, **args: Any) -> list[Any]:
        """A control call on every replica taking writes, with I/O drained around it, so that
        the replicas are at the same point of the write stream (crash-consistent snapshots).
        ``held``: the caller's hold owns ``structural`` and holds I/O already
        (``lhfs.engine.hold``)."""
        call = p.encode_json({"method": method, "args": args})
        if held:
            return [p.decode_json(a) for a in await self._fanout(p.CALL, call)]
        async with self.structural:
            await self.quiesce()
            try:
                return [p.decode_json(a) for a in await self._fanout(p.CALL, call)]
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

    async def snapshot(self, name: str, held: bool = False) -> dict[str, Any]:
        """``held``: inside a hold of the volume's I/O (``lhfs.engine.hold``), which flushed
        before it held; flushed here first otherwise, so that I/O waits less."""
        self.refuse_during_rebuild("a snapshot")
        if not held:
            await self.flush()
        return (await self.call_all("snapshot", held=held, name=name))[0]

    async def remove_snapshot(
        self, name: str, missing_ok: bool = False, begin: Callable[[], None] | None = None
    ) -> None:
        """Coalesce a snapshot away on every replica; I/O goes on meanwhile (no deadline: the
        replicas report progress and a dead replica still fails the call at once).
        ``missing_ok``: a removal begun before, that some replicas finished then. ``begin``:
        called once nothing refuses it any more, right before the replicas are asked."""
        self.refuse_during_rebuild("removing a snapshot")
        async with self.structural:
            self.refuse_during_rebuild("removing a snapshot")  # (one may have begun meanwhile)
            if begin is not None:
                begin()
            args = {"name": name, **({"missing_ok": True} if missing_ok else {})}
            call = p.encode_json({"method": "remove_snapshot", "args": args})
            await self._fanout(p.CALL, call, timeout=float("inf"))

    async def expand(self, size: int) -> None:
        self.refuse_during_rebuild("expanding")
        await self.call_all("expand", size=size)
        self.size = size

    async def close(self) -> None:
        """Flush what can be flushed and close the connections."""
        self.closing = True
        if any(r.mode == RW for r in self.replicas):
            try:
                await self.flush()
            except LhfsError as exc:
                log.warning("final flush failed: %s", exc)
        for link in self.replicas:
            if link.client is not None:
                await link.client.aclose()


class _Fanout:
    """One write, trim or flush on its way to several replicas: ``done`` runs once every one
    of them answered or failed (a replica that failed it is marked ERR first; refusals are
    settled at the end, see ``Engine._settle_io``). An answer is counted once per replica,
    whatever a connection delivers."""

    __slots__ = ("answered_by", "done", "engine", "flush", "refused", "remaining", "took")

    def __init__(self, engine: Engine, count: int, done: Done, flush: bool = False) -> None:
        self.engine = engine
        self.remaining = count
        self.done = done
        self.flush = flush  # (a flush's answer is the revision the replica now holds durably)
        self.answered_by: set[str] = set()
        self.took: list[ReplicaLink] = []
        self.refused: list[tuple[ReplicaLink, LhfsError]] = []

    def answered(self, link: ReplicaLink, error: LhfsError | None, payload: Any) -> None:
        if link.id in self.answered_by:
            return
        self.answered_by.add(link.id)
        engine = self.engine
        self.remaining -= 1
        if error is None:
            self.took.append(link)
            if self.flush and len(payload) == p.U64.size:
                link.synced = max(link.synced, p.U64.unpack(payload)[0])
        elif isinstance(error, NoSpace):  # (any other error answer here is a failure)
            self.refused.append((link, error))
        else:
            engine.fail(link, str(error))
        if self.remaining == 0:
            engine._leave()
            refusal = engine._settle_io(self.took, self.refused) if self.refused else None
            if not engine._healthy():
                self.done(Faulted("volume is faulted: no healthy replica"))
            elif refusal is not None:
                self.done(refusal)
            else:
                engine.writes += 1
                self.done(None)


def _chain_to_serve(chains: list[tuple[str, ...] | None]) -> tuple[str, ...] | None:
    """The snapshot chain the freshest replicas are served with, of theirs (in the order of
    the configuration; None where a replica of an older lhfs did not say): the one most of
    them hold; between as many, the longer (a layer lost from a replica's metadata shortens
    its chain, and a rebuild from the shorter one would drop the other's snapshots); then the
    first. Replicas that take every snapshot together hold the same chain: one that differs
    was damaged or replaced, and served beside the others it would answer reads with other
    data."""
    said = [chain for chain in chains if chain is not None]
    if not said:
        return None
    return max(dict.fromkeys(said), key=lambda chain: (said.count(chain), len(chain)))


def _chain_text(chain: tuple[str, ...] | None) -> str:
    return ", ".join(chain) if chain else "no snapshots"


def _unreachable(
    volume: str,
    trusted: list[tuple[ReplicaLink, Recorded]],
    held: set[str],
    strangers: set[str],
    others: bool,
) -> str:
    """Why an attach is refused: none of the replicas that hold every acknowledged write
    answers as itself (one line: each, how the record vouches for it, and why; and, if the
    volume has ``others``, why none of those serves instead)."""
    parts = [
        f"{link.id} ({record.trust()}) "
        + (
            "is held: a scrub found it damaged"
            if link.id in held and link.error is None
            else link.error
            if link.id in strangers
            else f"cannot be reached: {link.error}"
        )
        for link, record in trusted
    ]
    again = "it is" if len(trusted) == 1 else "one of them is"
    instead = "; the other replicas may lack acknowledged writes, so none serves instead"
    said = "; ".join(parts) + (instead if others else "")
    # (the freshest of the older copies: accepting another would rebuild it from an older one)
    older = [
        link.id
        for link, _ in sorted(trusted, key=lambda pair: -pair[0].revision)
        if link.id in strangers and OLDER in (link.error or "")
    ]
    if older and len(older) == len(trusted):  # (each answers, as an older copy of itself)
        return (
            f"not attached: {said}: bring back the directory holding its newer revision and "
            f"attach again (if that is lost for good, 'lhfs replica accept {volume} "
            f"{older[0]}' serves the older copy as it is, losing the writes after it)"
        )
    return (
        f"not attached: {said}: attach again once {again} back (if it is lost for good, "
        "'lhfs replica rm --accept-loss' gives it up, and the writes only it holds)"
    )


def _nothing_to_salvage(
    pairs: list[tuple[ReplicaLink, Recorded]], answered: set[str], held: set[str]
) -> str:
    """Why an attach with no replica recorded healthy is refused: none that answers may be
    salvaged (each one that answers, and why not)."""
    why = [
        f"{link.id} is held: a scrub found it damaged"
        if link.id in held
        else f"{link.id} never completed a rebuild (it holds nothing to serve)"
        for link, record in pairs
        if link.id in answered and (link.id in held or not record.built)
    ]
    said = f" that may serve: {'; '.join(why)}" if why else ""
    return f"no replica of the volume can be reached{said}"
