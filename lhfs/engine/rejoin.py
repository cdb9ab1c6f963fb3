"""Failed replicas come back by themselves.

A remote replica marked ERR is most often on a host that lost its link or rebooted; when its
``replica serve`` answers again, it holds everything it had, and a rebuild copies only what
changed while it was away. A local replica marked ERR most often lost its process (killed, out
of memory): its directory holds everything it had acknowledged, so the engine starts its
process again on it (``restart``) and it comes back the same way. A local process that lives
but leaves ``HUNG_ATTEMPTS`` connections in a row unanswered (stopped, or stuck on a disk that
stalled) would never come back by itself: it is killed and started again the same way. So for
each failed replica the engine keeps trying to reach it (a local one: to start it), backing
off from 1 s to 30 s, and once it answers (a new session: see fencing in
``lhfs.replica.session``) waits the volume's ``rejoin_wait`` (a link that flaps is not
rebuilt at every blink) and rebuilds it. A replica that fails again before it serves waits
longer each time (2, 4 ... 30 s more); one that failed for not answering within the I/O
timeout while it was rebuilt (too slow for the volume's writes: each attempt holds them up to
that timeout) waits 30 s, then 60 ... 600 s, saying so, and one that has not served for longer than
``rejoin_limit`` is left for an operator (``replica add`` / ``replica rm``): after so long a
full copy on a new replica is as good and it may be gone for good; a local one's process, if
it still runs, is stopped then (it holds its directory). A directory that was wiped comes back
uninitialised and the rebuild copies everything. A replica is known by its directory's
identity (``uid``), not its address: another directory answering there (a copy, another
replica's) is neither rebuilt over nor served from; it stays ERR, saying so (in the log once:
it lasts until the operator acts), until the replica's own directory answers again.
What is under way shows in ``replica ls`` (``rejoin``).

When every replica failed (the engine's own host lost its link, or every local process was
killed), the volume is faulted and nothing can be rebuilt: the replica whose failure faulted
it, which holds every acknowledged write, serves again as soon as it answers
(``Engine.revive``), and the others are then rebuilt from it. Any other replica may lack
acknowledged writes and never serves alone; nor does a copy of that one's directory older than
what it last flushed (the engine knows that revision from its answers to flushes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from lhfs.core.errors import Busy, Fenced, LhfsError, NoAnswer, WrongVolume
from lhfs.engine.engine import ERR, Engine, ReplicaLink
from lhfs.wire.client import ReplicaClient

log = logging.getLogger("lhfs.rejoin")

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
HUNG_ATTEMPTS = 2  # connections a live local process leaves unanswered before it is killed
# A replica too slow to be rebuilt (it failed to answer in time before it served, twice in a
# row: once is as likely a link cut for a moment) waits this long before it is tried again,
# doubling up to SLOW_MAX_DELAY: every attempt makes the volume's writes wait the I/O
# timeout for it, so it must not come round every few seconds.
SLOW_DELAY = 30.0
SLOW_MAX_DELAY = 600.0


class Owner(Protocol):
    """What the rejoiner asks of the engine's owner (``lhfs.engine.daemon.Daemon``)."""

    def remote(self, link: ReplicaLink) -> bool:
        """On another host (else the owner runs its process)."""

    async def restart(self, link: ReplicaLink, kill: bool) -> bool:
        """Start a local replica's process again if it has exited (``kill``: kill it first if
        it has not); whether it was started."""

    async def give_up(self, link: ReplicaLink) -> None:
        """``link`` is left for the operator: stop a local one's process if it still runs."""

    async def rebuild_over(self, link: ReplicaLink) -> None:
        """Return once no rebuild of ``link`` is under way."""

    def start_rebuild(self, link: ReplicaLink) -> None:
        """Rebuild ``link`` (connected) in the background."""

    def rejoin_settings(self) -> tuple[float, float]:
        """The volume's ``rejoin_wait`` and ``rejoin_limit``, as they are now."""


class Rejoiner:
    """Watches failed replicas and brings back those that answer again."""

    def __init__(self, engine: Engine, nursery: trio.Nursery, owner: Owner) -> None:
        self.engine = engine
        self.nursery = nursery
        self.owner = owner
        self._watched: set[str] = set()

    def watch(self, link: ReplicaLink, at_once: bool = False) -> None:
        """Start bringing ``link`` back, unless that is under way already; ``at_once``: one
        known to answer well is rebuilt without the volume's ``rejoin_wait``."""
        if link.held is not None:
            link.rejoin = link.held
            return
        if link.id in self._watched or (self.owner.remote(link) and not link.address):
            return
        self._watched.add(link.id)
        self.nursery.start_soon(self._bring_back, link, at_once)

    async def _bring_back(self, link: ReplicaLink, at_once: bool) -> None:
        try:
            await self._attempts(link, at_once)
        finally:
            self._watched.discard(link.id)

    async def _pause(self, link: ReplicaLink, delay: float) -> None:
        """Wait ``delay`` before the next attempt, or only until the rejoin limit is out:
        a replica is left for the operator at its limit, not a backoff step (up to 30 s)
        after it."""
        _, limit = self.owner.rejoin_settings()
        away = trio.current_time() - (link.failed_at or trio.current_time())
        await trio.sleep(max(0.0, min(delay, limit - away)))

    def _gone(self, link: ReplicaLink) -> bool:
        return link not in self.engine.replicas or link.mode != ERR

    async def _attempts(self, link: ReplicaLink, at_once: bool) -> None:
        engine = self.engine
        delay = FIRST_DELAY
        told = None  # the last reason logged (each attempt's is not: one line per change)
        unanswered = 0  # attempts in a row left without an answer (a live local process: hung)
        if link.comebacks >= 2 and link.slow and link.stranger is None:
            await self.owner.rebuild_over(link)  # (its rebuild says last why it failed)
            pause = min(SLOW_DELAY * 2.0 ** (link.comebacks - 2), SLOW_MAX_DELAY)
            link.rejoin = (
                f"too slow to keep up with the volume's writes while rebuilt ({link.error}); "
                f"trying again in {pause:.0f}s"
            )
            log.warning("replica %s: %s", link.id, link.rejoin)
            await self._pause(link, pause)
        elif link.comebacks:  # it failed again since it was last brought back
            pause = min(2.0**link.comebacks, MAX_DELAY)
            link.rejoin = (
                f"another directory answers at its address; looking again in {pause:.0f}s"
                if link.stranger
                else f"failed again after coming back; trying again in {pause:.0f}s"
            )
            await trio.sleep(pause)
        while not self._gone(link):
            if link.held is not None:  # (held since it was watched: the operator decides)
                link.rejoin = link.held
                return
            wait, limit = self.owner.rejoin_settings()
            wait = 0.0 if at_once else wait
            away = trio.current_time() - (link.failed_at or trio.current_time())
            if away > limit:
                link.rejoin = f"away for {away:.0f}s, longer than {limit:.0f}s: replace it"
                log.warning("replica %s is not brought back: %s", link.id, link.rejoin)
                await self.owner.give_up(link)
                return
            if engine.superseded is not None:
                link.rejoin = None
                return
            await self.owner.rebuild_over(link)  # (a failed one may still be unwinding)
            try:
                if not self.owner.remote(link) and await self.owner.restart(
                    link, kill=unanswered >= HUNG_ATTEMPTS
                ):
                    unanswered = 0
                client = await engine.connect(link.address)
            except Fenced as exc:  # another engine has it: this one must stop serving at all
                link.rejoin = f"not rejoining: {exc}"
                engine.taken_over(str(exc))
                return
            except LhfsError as exc:
                unanswered = unanswered + 1 if isinstance(exc, NoAnswer) else 0
                if isinstance(exc, Busy):  # (it answers: a slot frees soon, unlike a host)
                    delay = FIRST_DELAY
                why = engine.named(exc) if isinstance(exc, WrongVolume) else str(exc)
                link.rejoin = f"unreachable ({why}); trying again in {delay:.0f}s"
                if why != told:
                    told = why
                    log.warning("replica %s cannot be brought back yet: %s", link.id, told)
                await self._pause(link, delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            unanswered = 0
            link.rejoin = f"answers again; rebuilding in {wait:.0f}s"
            if link.stranger is None:  # (another directory there, said once: quiet since)
                log.info("replica %s (%s) answers again", link.id, link.address)
            await trio.sleep(wait)
            while engine.state == "faulted" and link.id != engine.last_rw and not self._gone(link):
                link.rejoin = f"answers again; waiting for {engine.last_rw} to serve first"
                await trio.sleep(1.0)  # (the last replica to serve must be back first)
            if self._gone(link) or client.broken:
                await client.aclose()
                delay = FIRST_DELAY
                continue
            faulted = engine.state == "faulted"
            found = refusal = None
            if faulted:  # (to serve by itself: it must be the replica that served last, as it
                # left; one to rebuild is checked by the rebuild, ``rebuild._prepare``)
                found = await _identity(client, engine.io_timeout)
                if found is None:  # (its connection broke, or it did not answer: tried again)
                    refusal = "answers, but does not say what it holds; trying again"
                elif found.damaged:  # (never set aside: it is the one copy left)
                    refusal = (
                        f"answers, but its directory is damaged ({found.damaged}): no copy of "
                        "the volume is served; look at it on its host, or restore from a backup"
                    )
                elif not found.initialised:  # (wiped: no copy of the volume is left)
                    refusal = (
                        "answers, but holds no volume (its directory was wiped?): no copy of "
                        "the volume is left; restore it from a backup"
                    )
                else:  # (a copy, or another replica's directory: it would serve old data)
                    refusal = engine.stranger(link, found.uid, found.revision, serving=True)
            if refusal is not None:
                link.rejoin = refusal
                if told != refusal:
                    told = refusal
                    log.error("replica %s, the last to serve, is not brought back: it %s",
                              link.id, refusal)  # fmt: skip
                await client.aclose()
                await self._pause(link, delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            old, link.client = link.client, client
            if old is not None and old is not client:
                await old.aclose(True)
            link.comebacks += 1
            if faulted:
                assert found is not None
                engine.revive(link, found.uid, found.revision)
                return
            link.rejoin = None
            self.owner.start_rebuild(link)
            return


@dataclass
class _Found:
    """What a replica that answers again holds: a volume at all, its directory's identity,
    and its revision (-1 if it holds none)."""

    initialised: bool
    uid: str | None
    revision: int
    damaged: str | None = None  # why its directory does not open, if it is served damaged


async def _identity(client: ReplicaClient, timeout: float) -> _Found | None:
    """What the replica at the other end of ``client`` is (``_Found``); None if it did not
    say within ``timeout`` or its connection broke: it is tried again."""
    with trio.move_on_after(timeout):
        try:
            hello = await client.call("hello")
            if not hello["initialised"]:
                damaged = str(hello["damaged"])[:400] if hello.get("damaged") else None
                return _Found(False, hello.get("uid"), -1, damaged)
            revision = int((await client.info())["revision"])
            return _Found(True, hello.get("uid"), revision)
        except (LhfsError, KeyError, TypeError, ValueError):  # (an answer not as it should be)
            return None
    return None
