"""Online rebuild of one replica from a healthy one, by per-chunk checksum comparison.

The steps, each visible in the replica's ``rebuild_progress`` and the engine's log:

1. *prepare*: initialise an empty target, give it the backing image if it lacks one with the
   same content id (sent chunk by chunk, adopted only if its content hashes to that id);
2. *barrier*: with I/O drained, a snapshot is taken on every healthy replica, the target reshapes
   its chain to the same snapshot names and starts a fresh head, and joins as WO: from this
   instant it receives every write;
3. *sync*: layer by layer, bottom up, the target's chunk checksums (recomputed from its disk) are
   compared with the source's and only differing chunks are copied. The target pulls them
   straight from the source, so the data crosses the network once and the engine only directs;
   if the target cannot reach the source by the address the engine knows (another network),
   the engine relays the rest itself;
4. *verify*: every layer's checksums and the backing image id must now be equal;
5. *finish*: the target merges the writes it received during the sync, and becomes RW.

A source that fails, in whichever step, is marked ERR and replaced by another healthy replica
and the rebuild goes on (what was copied stays copied); a target that fails is marked ERR.
Nothing here raises into the engine.
Every request has a deadline (``_watch``): the target and the source must show life within
the volume's I/O timeout, however long a request takes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from lhfs.core.errors import (
    ConnectionLost,
    CorruptState,
    LhfsError,
    NoAnswer,
    NoSpace,
    PullFailed,
)
from lhfs.engine.engine import RW, WO, Engine, ReplicaLink
from lhfs.store.layer import ABSENT
from lhfs.wire.client import ReplicaClient, SumsUnavailable, merged_layer_sums

log = logging.getLogger("lhfs.rebuild")

T = TypeVar("T")

IN_FLIGHT = 8
# Once the target could not pull from the source, the engine relays the data; a pull is tried
# again after this many seconds, so that a passing failure does not slow the rest of a long
# rebuild (and a lasting one costs one worker a connect timeout now and then).
RETRY_PULL_AFTER = 30.0


@dataclass
class RebuildStats:
    """What a rebuild moved, for ``replica ls`` and for tests that check it moved little."""

    chunks_compared: int = 0
    chunks_copied: int = 0
    bytes_copied: int = 0
    bytes_relayed: int = 0  # of those, the bytes that had to pass through the engine
    backing_bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _SourceFailed(Exception):
    pass


class SourceError(LhfsError):
    """A rebuild failed on the side of its source (or the other replicas it snapshots), not
    of its target: a replica just added is never given back for it (another attempt, perhaps
    from another source, may well succeed)."""


def _lost(source: ReplicaLink, error: BaseException | None) -> bool:
    """Whether a source's failure (``error``) says it is gone (its connection lost or silent,
    or the engine marked it failed meanwhile, perhaps for this very loss) rather than that it
    answered with an error: a lost source is replaced, an error is the rebuild's end."""
    client = source.client
    return isinstance(error, ConnectionLost) or source.mode != RW or client is None or client.broken


def _drop_source(engine: Engine, source: ReplicaLink, error: BaseException | None) -> None:
    """Give up ``source`` for another one if it is lost (it is marked ERR, as the I/O path
    would at its next write); ``SourceError`` if it answered with an error."""
    if not _lost(source, error):
        raise _source_error(source, error) from None
    engine.fail(source, str(error))


def _source_error(source: ReplicaLink, error: BaseException | None) -> SourceError:
    """What a rebuild fails with when its source answered ``error``: the source's error, of
    whatever kind (an added target is not given back for it)."""
    return SourceError(f"rebuild source {source.id}: {error}")


async def _ask_source(
    engine: Engine, target: ReplicaLink, ask: Callable[[ReplicaLink], Awaitable[T]]
) -> T:
    """``ask(source)`` of a healthy replica; one lost meanwhile is replaced by the next healthy
    one, asked again. Without this a source cut while the rebuild prepared or took its barrier
    ended the rebuild, although another replica could serve it, and the target waited for
    the next attempt (seconds, growing) while the volume had one replica fewer."""
    while True:
        source = _source(engine, target)
        try:
            return await ask(source)
        except LhfsError as exc:
            _drop_source(engine, source, exc)


def _source(engine: Engine, target: ReplicaLink) -> ReplicaLink:
    """``_pick_source``, whose failure (none left) is not the target's (``SourceError``)."""
    try:
        return _pick_source(engine, target)
    except SourceError:
        raise
    except LhfsError as exc:
        raise SourceError(str(exc)) from None


async def rebuild(engine: Engine, target: ReplicaLink) -> RebuildStats:
    """Bring ``target`` (connected, not yet serving) up to date and make it RW."""
    stats = RebuildStats()
    target.rebuild_progress = 0.0
    target.rebuild_stats = stats
    try:
        async with engine.rebuild_lock:  # one at a time: each joins the others' chain as it is
            watching = trio.CancelScope()
            engine.nursery.start_soon(_watch, engine, target, watching)
            try:
                return await _rebuild(engine, target, stats)
            finally:
                watching.cancel()
    except LhfsError as exc:
        _say_relayed(target, stats)
        client = target.client  # (a request that timed out may surface as another error)
        silent = isinstance(exc, NoAnswer) or (client is not None and client.timed_out)
        engine.fail(target, f"rebuild failed: {exc}", slow=silent)
        target.error = f"rebuild failed: {exc}"  # also when it was not serving yet
        target.slow = target.slow or silent
        target.rebuild_progress = None
        engine.mode_changed(target)
        raise


async def _watch(engine: Engine, target: ReplicaLink, scope: trio.CancelScope) -> None:
    """The deadline of a rebuild's requests: while it runs, the target and its source must
    show life within the volume's I/O timeout. A request may take longer (hashing a large
    layer takes minutes, a transfer on a slow link as long as bytes come), so a replica silent
    for a while is asked something it answers at once (``ping``); bytes of any answer show it
    alive. A silent target fails the rebuild (its requests fail: it is marked ERR and brought
    back later); a silent source is marked ERR, as the I/O watchdog would mark it at the next
    write, and another one takes over. Without this a peer that took a connection and fell
    silent held a rebuild, and every snapshot, for ever: the I/O watchdog counts I/O only,
    and a target that does not serve yet gets none."""
    with scope:
        since: dict[ReplicaClient, float] = {}  # when the watch first saw each connection
        while True:
            tick = min(1.0, engine.io_timeout / 4)
            await trio.sleep(tick)
            now = trio.current_time()
            try:
                links = [target, _pick_source(engine, target)]
            except LhfsError:  # (no source: the rebuild says so itself)
                links = [target]
            for link in links:
                client = link.client
                if client is None or client.broken:
                    continue
                silent = now - max(client.heard, since.setdefault(client, now))
                if silent < engine.io_timeout:
                    if silent >= tick:
                        client.ping()
                elif link is target:
                    why = f"replica {link.id} ({link.address}) answered nothing"
                    error = NoAnswer(f"{why} for {engine.io_timeout:.0f}s")
                    engine.nursery.start_soon(client.aclose, True, error)
                else:
                    engine.fail(link, f"no answer within {engine.io_timeout:.0f}s")


async def _rebuild(engine: Engine, target: ReplicaLink, stats: RebuildStats) -> RebuildStats:
    started = trio.current_time()
    await _prepare(engine, target, stats)
    stats.phases["prepare"] = round(trio.current_time() - started, 3)
    names = await _barrier(engine, target)
    stats.layers = names
    log.info("rebuilding replica %s from %s", target.id, _source(engine, target).id)
    while True:
        source = _source(engine, target)
        try:
            await _sync(engine, source, target, names, stats)
            mark = trio.current_time()
            await _verify(source, target, names, -(-engine.size // engine.chunk_size))
            stats.phases["verify"] = round(trio.current_time() - mark, 3)
            break
        except _SourceFailed as exc:
            _drop_source(engine, source, exc.__cause__ or exc)
            log.info("rebuilding replica %s from %s", target.id, _source(engine, target).id)
    async with engine.structural:
        await target.client.call("rebuild_finish")
        target.mode, target.error = RW, None
    target.rebuild_progress = None
    engine.mode_changed(target)
    stats.seconds = round(trio.current_time() - started, 3)
    _say_relayed(target, stats)
    log.info("replica %s rebuilt: %s", target.id, json.dumps(stats.public()))
    return stats


def _say_relayed(target: ReplicaLink, stats: RebuildStats) -> None:
    """Say what passed through the engine, once the copy is over and only if anything did: a
    target that cannot pull from its source is fed by the engine, run by run, and a failed
    pull says nothing of what was relayed after it (perhaps nothing: the copy failed, or
    the runs left held no data)."""
    if stats.bytes_relayed:
        log.info(
            "replica %s: %d of the %d bytes copied were relayed through the engine (the "
            "replica could not pull them from its source)",
            target.id,
            stats.bytes_relayed,
            stats.bytes_copied,
        )


def _run_length(chunk_size: int) -> int:
    """Chunks per copy request: about 2 MiB, so that per-request costs stay small."""
    return max(1, (2 << 20) // chunk_size)


def _runs(chunks: list[int], limit: int) -> list[tuple[int, int]]:
    """Sorted chunk numbers as (first, count) runs of neighbours, at most ``limit`` long."""
    runs: list[tuple[int, int]] = []
    for chunk in sorted(chunks):
        if runs and runs[-1][0] + runs[-1][1] == chunk and runs[-1][1] < limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((chunk, 1))
    return runs


def _pick_source(engine: Engine, target: ReplicaLink) -> ReplicaLink:
    """A healthy replica to copy from; for a target on another host, one it can reach itself
    if there is one (a replica this host serves on loopback is not), so that it pulls the
    data rather than have the engine relay it."""
    healthy = [link for link in engine.replicas if link.mode == RW and link is not target]
    if not healthy:
        raise LhfsError("no healthy replica to rebuild from")
    if not _loopback(target.address):
        return next((link for link in healthy if not _loopback(link.address)), healthy[0])
    return healthy[0]


async def fit(engine: Engine, client: ReplicaClient) -> None:
    """Make an initialised target the volume's size: one that missed an expansion (it was
    away, or the volume grew while detached) grows first, as the volume did; one of another
    chunk size, or larger than the volume, is another volume's shape and is refused."""
    info = await client.info()
    check_shape(engine, info)
    if info["size"] < engine.size:
        await client.call("expand", size=engine.size)


def check_shape(engine: Engine, info: dict[str, Any]) -> None:
    """``WrongShape`` for a replica (its ``info``) of another chunk size, or larger than the
    volume: another volume's shape, that no rebuild can make the volume's."""
    if info["chunk_size"] != engine.chunk_size:
        raise WrongShape(
            f"its chunk size is {info['chunk_size']}, the volume's {engine.chunk_size}: give "
            "it an empty directory"
        )
    if info["size"] > engine.size:
        raise WrongShape(f"it holds {info['size']} bytes, more than the volume's {engine.size}")


class WrongShape(LhfsError):
    """A replica whose geometry is not the volume's: rebuilding it cannot succeed."""


class Stranger(LhfsError):
    """Another directory answers at the target's address (another replica's, a copy): it is
    neither rebuilt over nor served from, until the operator acts (the replica's own
    directory back there, or the replica replaced); the engine keeps looking, quietly."""


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


async def _serving_bytes(engine: Engine, target: ReplicaLink) -> int:
    """What the rebuild of ``target`` needs on its disk (``rebuild_need``), from what each
    replica that serves says it takes."""
    known = []
    for link in engine.replicas:
        if link is target or link.mode != RW or link.client is None or link.client.broken:
            continue
        with trio.move_on_after(10), contextlib.suppress(LhfsError):
            held = (await link.client.info()).get("disk_bytes")
            if type(held) is int and held >= 0:
                known.append(held)
    return rebuild_need(known, engine.size)


REBUILD_SPARE = 4 << 20  # bytes a damaged replica's disk keeps free beyond its rebuild


def rebuild_need(held: list[int], size: int) -> int:
    """About what a damaged replica's rebuild needs on its disk, beside its directory set
    aside: what a replica that serves takes there (the same layers, chunks and indexes; the
    most of those ``held``), and ``REBUILD_SPARE``. Not the volume's ``size``: a thin
    volume's rebuild writes far less, and one with snapshots may write more; that size only
    when no replica's is known."""
    return (max(held) if held else size) + REBUILD_SPARE


async def _set_aside(engine: Engine, target: ReplicaLink, hello: dict[str, Any]) -> None:
    """A replica served damaged (its directory does not open: ``ReplicaServer``) is asked to
    set its directory aside, kept on its host, and start an empty one, rebuilt as a wiped
    replica is. Only while another replica serves RW (never the last copy), and only the
    directory this engine recorded as the replica's (by identity: another one answering
    there is not this volume's to set aside)."""
    _pick_source(engine, target)  # (none serves: ``LhfsError``, nothing asked)
    damaged, uid = str(hello["damaged"])[:400], target.uid
    if not uid or hello.get("uid") != uid:
        raise Stranger(
            f"replica {target.id} answers at its address with a damaged directory ({damaged}) "
            f"not known as its own (id {str(hello.get('uid'))[:40]}, expected {uid}): it is "
            "not set aside"
        )
    need = await _serving_bytes(engine, target)
    try:
        answer = await target.client.call("set_aside", uid=uid, need=need)
    except NoSpace as exc:  # (not final: room may be made; the rejoiner asks again)
        target.error = (
            f"its directory is damaged ({damaged}); {str(exc)[:600]}; or replace it: lhfs "
            f"replica rm {engine.volume} {target.id}, then lhfs replica add {engine.volume} "
            "--address ADDRESS (a disk with room)"
        )
        raise LhfsError(target.error) from None
    aside = answer.get("aside") if isinstance(answer, dict) else None
    if not isinstance(aside, str):
        raise LhfsError(f"replica {target.id} answered set_aside with {answer!r:.80}")
    target.error = (
        f"its directory was damaged ({damaged}): set aside as {aside[:1024]} on its host, rebuilt"
    )
    log.error("replica %s: %s", target.id, target.error)


async def _prepare(engine: Engine, target: ReplicaLink, stats: RebuildStats) -> None:
    client = target.client
    hello = await client.call("hello")
    if hello.get("damaged"):
        await _set_aside(engine, target, hello)
        hello = await client.call("hello")
    if hello["initialised"]:
        check_shape(engine, await client.info())  # (never to be the volume's: given up at once)
        stranger = engine.stranger(target, hello.get("uid"), -1, serving=False)
        if stranger is not None:  # (a copy, another replica's directory: not the rebuild's to
            raise Stranger(f"replica {target.id} {stranger}")  # change; tried again later)
    target.uid = hello.get("uid") or target.uid  # (a wiped directory is another one now)
    if not hello["initialised"]:
        await client.call("init", size=engine.size, chunk_size=engine.chunk_size)
    else:
        await fit(engine, client)
    if target.rotten_backing:  # (its file would be trusted by its id: let go of it first)
        await client.call("verify_backing", repair=True)
        target.rotten_backing = False
    want = (await _ask_source(engine, target, _info))["backing_image"]
    have = (await client.info())["backing_image"]
    if want and (not have or have["id"] != want["id"]):
        image_id = want["id"]
        size = int(image_id.rsplit("-", 1)[1])
        chunks = -(-size // engine.chunk_size)
        per_run = _run_length(engine.chunk_size)
        for first in range(0, chunks, per_run):
            count = min(per_run, chunks - first)
            _states, data = await _ask_source(
                engine, target, functools.partial(_backing_run, first=first, count=count)
            )
            await client.backing_upload(image_id, first, data)
            stats.backing_bytes += len(data)
        await client.call("backing_commit", id=image_id)


async def _barrier(engine: Engine, target: ReplicaLink) -> list[str]:
    """Snapshot everywhere with I/O drained and let the target join the write stream."""
    name = f"rebuild-{target.id}-{trio.current_time():.0f}".replace(".", "-")
    async with engine.structural:
        await engine.quiesce()
        try:
            try:  # (the serving replicas, each marked ERR if it fails: the target takes no part)
                await engine.fanout_call("snapshot", name=name)
            except LhfsError as exc:
                raise SourceError(f"the replicas serving the volume: {exc}") from exc
            # (any RW replica holds that snapshot now, and I/O waits: a lost source's layers
            # are asked of the next one)
            layers, revision = await _ask_source(engine, target, _layers)
            target.synced = -1  # (it takes the source's revision: perhaps below its own)
            snapshots = [layer for layer in layers if layer["active"] and layer["name"]]
            names = [layer["name"] for layer in snapshots]
            created = [layer["created"] for layer in snapshots]
            branches = _branches(layers)
            shaped = await target.client.call(
                "rebuild_begin", names=names, revision=revision, created=created, branches=branches
            )
            if branches and shaped.get("branches") != len(branches):  # (an older replica)
                log.warning(
                    "replica %s keeps no snapshot off the chain (it runs an older lhfs): "
                    "%s not rebuilt there",
                    target.id,
                    ", ".join(b[0] for b in branches),
                )
                branches = []
            target.mode, target.error = WO, None
            if target not in engine.replicas:
                engine.replicas.append(target)
            engine.mode_changed(target)
        finally:
            engine.resume()
    return [*(b[0] for b in branches), *names]


async def _backing_run(source: ReplicaLink, first: int, count: int) -> tuple[bytes, memoryview]:
    return await source.client.read_layer_run("backing", first, count)


async def _info(source: ReplicaLink) -> dict[str, Any]:
    return await source.client.info()


async def _layers(source: ReplicaLink) -> tuple[list[dict[str, Any]], int]:
    """A source's layers and revision, as the barrier left them."""
    layers = await source.client.call("list_layers")
    return layers, (await source.client.info())["revision"]


def _branches(layers: list[dict[str, Any]]) -> list[list[Any]]:
    """The snapshots off the source's chain (a revert keeps the newer ones) as the target
    shapes them: ``[name, parent name, time]``, each after its parent (oldest first)."""
    names = {layer["id"]: layer["name"] for layer in layers}

    def parent(layer: dict[str, Any]) -> str | None:
        return names.get(layer["parent"], "?") if layer["parent"] else None

    off = [layer for layer in layers if not layer["active"] and layer["name"]]
    out, placed = [], {None, *(layer["name"] for layer in layers if layer["active"])}
    pending = sorted(off, key=lambda layer: layer["created"])
    while pending:  # (times are to the second: a parent may sort after its child)
        ready = [layer for layer in pending if parent(layer) in placed]
        if not ready:  # (a parent that is no snapshot: those are not carried)
            break
        for layer in ready:
            out.append([layer["name"], parent(layer), layer["created"]])
            placed.add(layer["name"])
            pending.remove(layer)
    return out


async def _sync(
    engine: Engine, source: ReplicaLink, target: ReplicaLink, names: list[str], stats: RebuildStats
) -> None:
    """Walk each layer's checksums on both sides (``_compare``) and copy the chunks that differ
    while the walk goes on: a large volume's comparison never sits whole in memory, and the
    copy starts with the first differing run."""
    mark = trio.current_time()
    try:
        layers = await source.client.call("list_layers")
    except LhfsError as exc:
        raise _SourceFailed("source lost before the copy") from exc
    ids = {layer["name"]: layer["id"] for layer in layers}
    direct = True
    retry_pull_at = 0.0
    failure: list[BaseException] = []
    send, receive = trio.open_memory_channel[tuple[str, int, int]](IN_FLIGHT)

    async def copy(name: str, first: int, count: int) -> int:
        nonlocal direct, retry_pull_at
        if direct or trio.current_time() >= retry_pull_at:
            if not direct:  # one worker tries; the others go on relaying
                retry_pull_at = trio.current_time() + RETRY_PULL_AFTER
            try:
                answer = await target.client.call(
                    "pull_run",
                    source=source.address,
                    source_layer=ids[name],
                    layer=name,
                    first=first,
                    count=count,
                    ca=engine.tls_cas.get(source.address),
                )
                if not direct:
                    log.info("replica %s pulls from %s again", target.id, source.id)
                    direct = True
                return int(answer["bytes"])
            except PullFailed as exc:
                if direct:  # (what it did instead is said once done: ``_say_relayed``)
                    log.warning("replica %s cannot pull from %s: %s", target.id, source.id, exc)
                direct, retry_pull_at = False, trio.current_time() + RETRY_PULL_AFTER
        try:
            states, data = await source.client.read_layer_run(name, first, count)
        except LhfsError as exc:
            raise _SourceFailed("source lost during the copy") from exc
        await target.client.write_layer_run(name, first, states, data)
        stats.bytes_relayed += len(data)
        return len(data)

    async def worker(nursery: trio.Nursery, items: trio.MemoryReceiveChannel) -> None:
        async for name, first, count in items:
            try:
                moved = await copy(name, first, count)
            except (LhfsError, _SourceFailed) as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()
                return
            stats.chunks_copied += count
            stats.bytes_copied += moved

    per_run = _run_length(engine.chunk_size)
    chunks = -(-engine.size // engine.chunk_size)
    compared: float | None = None
    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(worker, nursery, receive.clone())
        async with send:
            try:
                for k, name in enumerate(names):
                    runs = _compare(source, target, name, chunks, per_run, stats)
                    async for kind, first, count in runs:
                        if compared is None:  # the first run found: both sides have hashed
                            compared = trio.current_time()
                        if kind == "gone":
                            absent = bytes([ABSENT]) * count
                            await target.client.write_layer_run(name, first, absent, b"")
                        else:
                            await send.send((name, first, count))
                        progress = (k + (first + count) / max(1, chunks)) / len(names)
                        target.rebuild_progress = round(min(99.0, 100 * progress), 1)
            except (LhfsError, _SourceFailed) as exc:  # raised below as itself, not in a group
                failure.append(exc)
                nursery.cancel_scope.cancel()
        await receive.aclose()
    if failure:
        raise failure[0]
    if compared is None:  # nothing differed
        compared = trio.current_time()
    stats.phases["compare"] = round(compared - mark, 3)
    stats.phases["copy"] = round(trio.current_time() - compared, 3)
    mark = trio.current_time()
    await target.client.flush()  # the copied chunks reach the target's disk
    stats.phases["flush"] = round(trio.current_time() - mark, 3)
    target.rebuild_progress = 100.0


async def _compare(
    source: ReplicaLink,
    target: ReplicaLink,
    name: str,
    chunks: int,
    per_run: int,
    stats: RebuildStats,
) -> AsyncIterator[tuple[str, int, int]]:
    """Runs of neighbouring chunks to copy (``"copy"``: the source's checksum differs) or to
    drop (``"gone"``: the source does not hold them), at most ``per_run`` long. The target's
    checksums are recomputed from its disk (what it holds now), the source's are recorded."""
    run: list = []  # [kind, first, count] of the run being built
    async for chunk, (want, have) in _sums(source, target, name, True, chunks):
        stats.chunks_compared += 1
        kind = "gone" if want is None else "copy" if want != have else None
        if run and (run[0] != kind or run[1] + run[2] != chunk or run[2] == per_run):
            yield run[0], run[1], run[2]
            run = []
        if kind is None:
            continue
        if run:  # same kind, next chunk, room left
            run[2] += 1
        else:
            run = [kind, chunk, 1]
    if run:
        yield run[0], run[1], run[2]


async def _sums(
    source: ReplicaLink, target: ReplicaLink, name: str, fresh: bool, chunks: int
) -> AsyncIterator[tuple[int, list]]:
    """Both sides' checksums of a layer in chunk order; a source that cannot give them is a
    lost source (``_SourceFailed``), a target that cannot, an error of the rebuild."""
    try:
        clients = [source.client, target.client]
        async for row in merged_layer_sums(clients, name, [False, fresh], chunks):
            yield row
    except SumsUnavailable as exc:
        if exc.which == 0:
            raise _SourceFailed("source lost while comparing checksums") from exc.error
        raise exc.error from None


async def _verify(source: ReplicaLink, target: ReplicaLink, names: list[str], chunks: int) -> None:
    for name in names:
        # the target's checksums: recomputed from its disk in the compare step, then updated
        # from the bytes of every chunk it received
        bad = []
        async for chunk, (want, have) in _sums(source, target, name, False, chunks):
            if want != have:
                bad.append(chunk)
                if len(bad) == 5:
                    break
        if bad:
            raise CorruptState(f"layer {name} differs after the sync at chunks {bad}...")
    try:
        want = (await source.client.info())["backing_image"]
    except LhfsError as exc:
        raise _SourceFailed("source lost while verifying") from exc
    have = (await target.client.info())["backing_image"]
    if (want and want["id"]) != (have and have["id"]):
        raise CorruptState("the backing image differs after the sync")
