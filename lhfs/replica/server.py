"""The replica process: one chunk store served over TCP with trio.

Per connection, everything that arrived is parsed at once and the quick operations (read, write,
trim, flush, small calls) run inline, in arrival order, with their answers sent back in groups of
up to eight per system call (``protocol.Outbox``, which does not wait for a round of the event
loop): with many requests in flight this batches system calls in both
directions, and the client works on one group while the next is prepared, which is what makes a
Python replica fast. Operations that take long (removing a snapshot) run as tasks that
yield between steps, so I/O keeps flowing; structural operations are serialised by one lock.

A peer that breaks the protocol (bad handshake, oversized or malformed frame) loses its
connection; a request that fails gets an error answer. Neither touches other connections or the
data on disk. SIGTERM and SIGINT stop the server cleanly: connections close, the store flushes.
"""

from __future__ import annotations

import logging
import signal
import socket
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
import xxhash

from lhfs.core.errors import (
    Busy,
    InvalidArgument,
    LhfsError,
    NotInitialised,
    ProtocolError,
    PullFailed,
    StorageError,
)
from lhfs.store.chunkstore import ChunkStore
from lhfs.wire import protocol as p
from lhfs.wire.client import ReplicaClient

T = TypeVar("T")
log = logging.getLogger("lhfs.replica")

_HANDSHAKE_TIMEOUT = 10
# Answers to a burst of requests go back in groups of at most this many (or this many bytes),
# each sent as soon as it is ready: the client works on one group while this side works on the
# next, instead of each side waiting for the other's whole burst (measured with 16 requests in
# flight: about twice the operations per second for 4 KiB random reads and writes, and half as
# much again for 1 MiB reads, against one send per burst).
_GROUP = 8
_GROUP_BYTES = 256 << 10  # a large answer (a 1 MiB read) goes alone, not copied into a group
_PULL_TIMEOUT = 60
_PEER_RETRY_AFTER = 5.0  # a peer that could not be reached is not asked again before this
_WRITEBACK_EVERY = 64 << 20  # bytes pulled into the replica between background data syncs


class ReplicaServer:
    """Serves one replica directory; the directory may be empty until a client calls ``init``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.store: ChunkStore | None = None
        if (self.dir / "volume.json").exists():
            self.store = ChunkStore.open(self.dir)
        self._structural = trio.Lock()
        self._hashing = trio.Lock()  # one checksum computation at a time, off the event loop
        self._unsynced = 0
        self._writing_back = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        local: str | None = None,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until SIGTERM/SIGINT or cancellation, then flush and close the store."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if local:
            listeners.append(await local_listener(local))
        bound = listeners[0].socket.getsockname()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await nursery.start(trio.serve_listeners, self._connection, listeners)
                task_status.started((bound[0], bound[1]))
        finally:
            self.close()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                scope.cancel()
                return

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # -- connections --------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT):
                await self._handshake(stream)
            async with trio.open_nursery() as nursery:
                try:
                    await self._requests(stream, nursery)
                except _PEER_GONE:
                    pass
                except ProtocolError as exc:
                    log.warning("closing connection: %s", exc)
                nursery.cancel_scope.cancel()
        except _PEER_GONE:
            pass
        except (ProtocolError, trio.TooSlowError) as exc:
            log.warning("closing connection during handshake: %s", exc or "timeout")
        except Exception:  # a bug in one connection must not stop the replica
            log.exception("connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        hello = b""
        while len(hello) < p.HELLO.size:
            data = await stream.receive_some(p.HELLO.size - len(hello))
            if not data:
                raise ProtocolError("connection closed during handshake")
            hello += data
        magic, version = p.HELLO.unpack(hello)
        if magic != p.MAGIC:
            raise ProtocolError("not an lhfs client")
        ok = version == p.VERSION
        await stream.send_all(p.HELLO_REPLY.pack(p.MAGIC, p.VERSION, 0 if ok else 1))
        if not ok:
            raise ProtocolError(f"client speaks protocol version {version}, not {p.VERSION}")

    async def _requests(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        p.tune_stream(stream)
        frames = p.FrameBuffer()
        gone: list[OSError] = []
        out = p.Outbox(stream.socket, gone.append)
        nursery.start_soon(out.drain)
        peers = _Peers(nursery)  # live as long as this connection
        while not gone:
            if not await frames.receive(stream.socket):
                return
            answers = size = 0
            for request_id, op, payload in frames.frames():
                if op == p.CALL and _method_of(payload) in _LONG:
                    nursery.start_soon(self._long_call, out, request_id, bytes(payload), peers)
                    continue
                if op == p.LAYER_SUMS:
                    nursery.start_soon(self._layer_sums, out, request_id, bytes(payload))
                    continue
                if gone:  # the peer is gone: what is left of the batch has nobody to go to
                    return
                pieces = self._answer(request_id, op, payload)
                out.queue += pieces
                answers += 1
                size += sum(len(piece) for piece in pieces)
                if answers == _GROUP or size >= _GROUP_BYTES:
                    out.push()
                    answers = size = 0
            out.push()
            await out.sent()  # a client that reads no answers gets no more work done

    def _answer(self, request_id: int, op: int, payload: memoryview) -> list[p.Part]:
        try:
            parts = self._dispatch(op, payload)
            return p.frame_pieces(request_id, p.OK, *parts, owned=True)
        except Exception as exc:  # every failure becomes an error answer
            return [p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))]

    # -- operations ---------------------------------------------------------------------------

    def _require_store(self) -> ChunkStore:
        if self.store is None:
            raise NotInitialised(f"replica {self.dir} holds no volume yet (call init)")
        return self.store

    def _dispatch(self, op: int, payload: memoryview) -> tuple[bytes | bytearray, ...]:
        if op == p.CALL:
            call = p.decode_json(payload)
            return (p.encode_json(self._call(call)),)
        store = self._require_store()
        if op == p.READ:
            offset, length = _unpack(p.RANGE, payload)
            if length > p.MAX_IO:
                raise InvalidArgument(f"read of {length} bytes exceeds the limit of {p.MAX_IO}")
            return (store.read(offset, length),)
        if op == p.WRITE:
            (offset,) = p.U64.unpack_from(_at_least(payload, p.U64.size))
            store.write(offset, payload[p.U64.size :])
            return (p.U64.pack(store.revision),)
        if op == p.TRIM:
            offset, length = _unpack(p.TRIM_RANGE, payload)
            store.trim(offset, length)
            return (p.U64.pack(store.revision),)
        if op == p.FLUSH:
            store.flush()
            return (p.U64.pack(store.revision),)
        if op == p.WRITE_LAYER_RUN:
            first, count, n = p.WRITE_RUN.unpack_from(_at_least(payload, p.WRITE_RUN.size))
            start = p.WRITE_RUN.size
            layer_id = bytes(payload[start : start + n]).decode(errors="replace")
            states = bytes(payload[start + n : start + n + count])
            store.write_layer_run(layer_id, first, states, payload[start + n + count :])
            return ()
        if op == p.BACKING_UPLOAD:
            chunk, n = p.UPLOAD.unpack_from(_at_least(payload, p.UPLOAD.size))
            image_id = bytes(payload[p.UPLOAD.size : p.UPLOAD.size + n]).decode(errors="replace")
            store.backing_upload(image_id, chunk, bytes(payload[p.UPLOAD.size + n :]))
            return ()
        if op == p.READ_SNAPSHOT:
            offset, length = p.RANGE.unpack_from(_at_least(payload, p.RANGE.size))
            if length > p.MAX_IO:
                raise InvalidArgument(f"read of {length} bytes exceeds the limit of {p.MAX_IO}")
            layer_id = bytes(payload[p.RANGE.size :]).decode(errors="replace")
            return (store.read_snapshot(layer_id, offset, length),)
        if op == p.READ_LAYER_RUN:
            first, count = p.RUN.unpack_from(_at_least(payload, p.RUN.size))
            layer_id = bytes(payload[p.RUN.size :]).decode(errors="replace")
            return store.read_layer_run(layer_id, first, count)
        raise InvalidArgument(f"unknown operation {op}")

    def _call(self, call: Any) -> Any:
        if not isinstance(call, dict) or not isinstance(call.get("args", {}), dict):
            raise InvalidArgument("a call is a JSON object {method, args}")
        method, args = call.get("method"), call.get("args", {})
        if method == "hello":
            return {"initialised": self.store is not None, "dir": str(self.dir)}
        if method == "init":
            if self.store is not None:
                raise Busy(f"replica {self.dir} already holds a volume")
            self.store = ChunkStore.create(self.dir, int(args["size"]), int(args["chunk_size"]))
            return self.store.info()
        if self._structural.locked() and method in _STRUCTURAL:
            raise Busy(f"replica is busy with {self._require_store().operation or 'an operation'}")
        store = self._require_store()
        handlers = {
            "info": store.info,
            "list_layers": store.list_layers,
            "changed_blocks": lambda: store.changed_blocks(
                str(args["base"]), str(args["top"]), int(args["block_size"])
            ),
            "snapshot": lambda: store.snapshot(str(args["name"])),
            "revert": lambda: store.revert(str(args["name"])),
            "expand": lambda: store.expand(int(args["size"])),
            "is_blank": store.is_blank,
            "rebuild_begin": lambda: store.rebuild_begin(
                [str(n) for n in args["names"]], int(args["revision"])
            ),
            "rebuild_finish": store.rebuild_finish,
            "backing_commit": lambda: store.backing_commit(str(args["id"])),
        }
        if method not in handlers:
            raise InvalidArgument(f"unknown method {method!r}")
        try:
            return handlers[method]()
        except KeyError as exc:
            raise InvalidArgument(f"method {method!r} needs argument {exc}") from None

    async def _long_call(
        self, out: p.Outbox, request_id: int, payload: bytes, peers: _Peers
    ) -> None:
        try:
            call = p.decode_json(payload)
            args = call.get("args", {})
            if not isinstance(args, dict):
                raise InvalidArgument("a call is a JSON object {method, args}")
            try:
                if call["method"] == "pull_run":
                    result = await self._pull_run(args, peers)
                elif call["method"] == "checksum":
                    result = await self._checksum()
                elif call["method"] == "verify_layer":
                    store = self._require_store()
                    result = await self._hash(partial(store.verify_job, str(args["layer"])))
                else:
                    result = await self._remove_snapshot(str(args["name"]))
            except KeyError as exc:
                raise InvalidArgument(f"method {call['method']!r} needs argument {exc}") from None
            answer = p.frame(request_id, p.OK, p.encode_json(result))
        except Exception as exc:  # every failure becomes an error answer
            answer = p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))
        out.queue.append(answer)
        out.push()

    async def _layer_sums(self, out: p.Outbox, request_id: int, payload: bytes) -> None:
        """Per-chunk checksums of a layer, answered out of order. Hashing an immutable layer
        that has none recorded reads all of it (a minute or more for a large volume): it runs in
        a thread (``_hash``), so that the replica keeps serving I/O meanwhile (an engine would
        otherwise time out on it and mark it failed). The head is hashed at once."""
        try:
            view = memoryview(payload)
            first, span, fresh = p.SUMS_REQ.unpack_from(_at_least(view, p.SUMS_REQ.size))
            layer_id = bytes(view[p.SUMS_REQ.size :]).decode(errors="replace")
            store = self._require_store()
            fresh = bool(fresh) and first == 0
            sums = await self._hash(partial(store.sums_job, layer_id, fresh, first, span))
            answer = p.frame(request_id, p.OK, b"".join(p.SUM_ENTRY.pack(*e) for e in sums))
        except Exception as exc:  # every failure becomes an error answer
            answer = p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))
        out.queue.append(answer)
        out.push()

    async def _checksum(self) -> str:
        """The whole volume's checksum, read a few MiB at a time with other requests served in
        between (reading a large volume takes minutes). A volume written to meanwhile gives a
        checksum of no single moment, as any read of a volume in use would."""
        digest = xxhash.xxh3_128()
        for piece in self._require_store().content():
            digest.update(piece)
            await trio.sleep(0)
        return digest.hexdigest()

    async def _hash(self, resolve: Callable[[], Callable[[], T]]) -> T:
        """Run a job that hashes immutable layers in a thread, one at a time, never alongside
        a snapshot removal (which rewrites them): a removal under way holds ``_hashing``. The
        job is resolved once the lock is held, on the event loop: a removal that ran while it
        waited may have removed the layer it names (it is then not found)."""
        async with self._hashing:
            job = resolve()
            return await trio.to_thread.run_sync(job)

    async def _remove_snapshot(self, name: str) -> None:
        """Coalesce a snapshot away, in steps with I/O served in between. A checksum job under
        way (a scrub, a rebuild's comparison) is waited for, not refused: the engine takes a
        refusal from one replica for a failure of that replica."""
        store = self._require_store()
        async with self._hashing:
            if self._structural.locked():
                raise Busy(f"replica is busy with {store.operation or 'an operation'}")
            async with self._structural:
                for _ in store.remove_snapshot_steps(name):
                    await trio.sleep(0)

    async def _pull_run(self, args: dict[str, Any], peers: _Peers) -> dict[str, int]:
        """Copy a run of an immutable layer's chunks straight from the rebuild source into this
        replica, so that the data of a rebuild does not pass through the engine. The source is
        named by the address the engine knows it by and its layer by the id it has there: if
        that address leads elsewhere from here, no such layer answers and the pull fails
        (``PullFailed``), it never copies other data."""
        store = self._require_store()
        address, source_layer = str(args["source"]), str(args["source_layer"])
        first, count = int(args["first"]), int(args["count"])
        try:
            with trio.fail_after(_PULL_TIMEOUT):
                client = await peers.get(address)
                states, data = await client.read_layer_run(source_layer, first, count)
        except (LhfsError, trio.TooSlowError) as exc:
            raise PullFailed(f"cannot copy from {address}: {exc or 'no answer'}") from None
        layer = str(args["layer"])
        store.write_layer_run(layer, first, states, data)
        self._unsynced += len(data)
        if self._unsynced >= _WRITEBACK_EVERY and not self._writing_back:
            job = store.writeback_job(layer)
            if job is not None:
                self._unsynced, self._writing_back = 0, True
                peers.nursery.start_soon(self._writeback, job)
        return {"bytes": len(data)}

    async def _writeback(self, job: Callable[[], None]) -> None:
        try:
            with trio.CancelScope(shield=True):  # once asked for, it runs (and closes its file)
                await trio.to_thread.run_sync(job)
        except OSError as exc:  # the flush that follows the copy reports it, if it persists
            log.warning("background data sync failed: %s", exc)
        finally:
            self._writing_back = False


class _Peers:
    """Connections from this replica to others (rebuild sources), one per address, opened on
    first use and closed with the connection that asked for them."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self._clients: dict[str, ReplicaClient] = {}
        self._failed: dict[str, tuple[float, LhfsError]] = {}
        self._lock = trio.Lock()

    async def get(self, address: str) -> ReplicaClient:
        """The connection to ``address``. Many pulls arrive at once and wait here for one
        connection; when it cannot be made, those waiting get the same failure at once instead
        of each trying in turn (with an unreachable source, one connect timeout per pull)."""
        async with self._lock:
            failed = self._failed.get(address)
            if failed is not None and trio.current_time() < failed[0]:
                raise failed[1]
            client = self._clients.get(address)
            if client is None or client.broken:
                try:
                    client = await ReplicaClient.connect(address, self.nursery)
                except LhfsError as exc:
                    self._failed[address] = (trio.current_time() + _PEER_RETRY_AFTER, exc)
                    raise
                self._failed.pop(address, None)
                self._clients[address] = client
            return client


_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
_STRUCTURAL = {"snapshot", "revert", "expand"}
_LONG = {"remove_snapshot", "pull_run", "verify_layer", "checksum"}


def _method_of(payload: memoryview) -> str | None:
    try:
        call = p.decode_json(payload)
    except ProtocolError:
        return None
    return call.get("method") if isinstance(call, dict) else None


def _at_least(payload: memoryview, size: int) -> memoryview:
    if len(payload) < size:
        raise InvalidArgument(f"request payload of {len(payload)} bytes is too short")
    return payload


def _unpack(fmt: struct.Struct, payload: memoryview) -> tuple[int, ...]:
    if len(payload) != fmt.size:
        raise InvalidArgument(f"request payload is {len(payload)} bytes, expected {fmt.size}")
    return fmt.unpack(payload)


def _as_lhfs_error(exc: Exception) -> LhfsError:
    """The one place where a failure inside the replica becomes a typed answer."""
    if isinstance(exc, LhfsError):
        return exc
    if isinstance(exc, OSError):
        return StorageError(f"replica disk error: {exc.strerror or exc}")
    if isinstance(exc, (ValueError, TypeError, KeyError, struct.error, UnicodeError)):
        return InvalidArgument(f"bad request: {exc}")
    log.exception("unexpected error")
    return LhfsError(f"internal replica error: {type(exc).__name__}: {exc}")


async def local_listener(name: str) -> trio.SocketListener:
    """A listener on the abstract Unix socket ``name``: the engine's way to its own local
    replicas. Sending to a Unix socket costs the sender about a third less than TCP over
    loopback (measured: 1 MiB to three receivers, 500 against 750 us), and an engine spends
    most of its time sending. An abstract name leaves no file behind and has no path length
    limit; like the loopback port, it is reachable by any process on the host."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind("\0" + name)
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot listen on local socket {name!r}: {exc.strerror}") from None
    sock.listen(64)
    return trio.SocketListener(sock)


async def run(
    directory: Path, host: str, port: int, ready: Any = None, local: str | None = None
) -> None:
    """Entry point of ``lhfs replica serve``: announces the bound address, then serves."""
    server = ReplicaServer(directory)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, host, port, local)
        if ready is not None:
            ready(bound)
