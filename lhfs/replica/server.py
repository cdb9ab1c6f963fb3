"""The replica process: one chunk store served over TCP (and a local socket) with trio.

Nothing is read as a request before the peer authenticated (``session``): a connection that
cannot prove it holds the volume's key gets one answer and is closed. Per session, everything
that arrived is parsed at once and the quick operations (read, write, trim, flush, small calls)
run inline, in arrival order, with their answers sent back in groups of up to eight per system
call (``protocol.Outbox``, which does not wait for a round of the event loop): with many
requests in flight this batches system calls in both directions, and the client works on one
group while the next is prepared, which is what makes a Python replica fast. Operations that
take long (removing a snapshot, hashing, finding a backup's changed blocks, adopting a backing
image) run as tasks, their hashing in a thread, so I/O keeps flowing; structural operations are
serialised by one lock. The current engine's connection with shared memory (its own host's) is
served by a thread of its own once the memory is mapped (``hotpath``), which saves the event
loop's round per burst of requests.

Every field of every request is checked before use (``checks``) and what one request may cost
is bounded (the bytes it reads or writes, the chunks it trims, the entries it answers); a
request that breaks a rule gets an error answer. A peer that breaks the framing (an oversized
frame, a frame left half-sent) loses its own connection; neither touches other connections or
the data on disk. SIGTERM and SIGINT stop the server cleanly: connections close, the store
flushes.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
import xxhash

from lhfs.core.durable import atomic_write, fsync_dir
from lhfs.core.errors import (
    Busy,
    CorruptState,
    DamagedLayers,
    DamagedMeta,
    InvalidArgument,
    LhfsError,
    NoSpace,
    NotFound,
    NotInitialised,
    NotPermitted,
    ProtocolError,
    PullFailed,
    StorageError,
    WrongState,
    WrongVolume,
)
from lhfs.core.units import format_sizes
from lhfs.replica import checks, hotpath
from lhfs.replica.session import Probe, Session, Sessions, kind_of, source_of
from lhfs.store.chunkstore import (
    ChunkStore,
    check_geometry,
    damaged_aside,
    lock_directory,
    replica_volume_id,
)
from lhfs.wire import protocol as p
from lhfs.wire import shm, tls
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import ReplicaClient, format_address, parse_address

T = TypeVar("T")
log = logging.getLogger("lhfs.replica")

# The answer to a write: a frame whose payload is the store's revision, packed in one go.
_REVISION_ANSWER = struct.Struct("<IIHQ")
_REVISION_LENGTH = _REVISION_ANSWER.size - p.LENGTH.size
_PULL_TIMEOUT = 60
ID_FILE = "id"  # the replica directory's identity (``directory_id``)
FRESH = ".anew"  # the suffix of the directory a set-aside puts in place of a damaged one
_UID = re.compile(r"[0-9a-f]{32}")
_PEER_RETRY_AFTER = 5.0  # a peer that could not be reached is not asked again before this
_WRITEBACK_EVERY = 64 << 20  # bytes pulled into the replica between background data syncs
FRAME_TIMEOUT = 15.0  # a frame left half-sent this long closes its connection
MAX_TASKS = 16  # long requests (checksums, pulls, removals) under way at once per connection
MAX_TRIM_CHUNKS = 1024  # chunks one TRIM may span (a hole each: up to half a second of work)
MAX_CHANGED_BLOCKS = 1 << 20  # a backup's changed blocks answered as a list, up to this many

# What a reader session (a backup, a rebuild target pulling from its source) may ask.
_READER_OPS = {p.READ_SNAPSHOT, p.READ_LAYER_RUN, p.LAYER_SUMS, p.CALL}
_READER_CALLS = {"hello", "info", "list_layers", "changed_blocks", "is_blank", "checksum"}
_STRUCTURAL = {"snapshot", "revert", "expand"}
_LONG = {
    "remove_snapshot",
    "pull_run",
    "verify_layer",
    "verify_backing",
    "checksum",
    "changed_blocks",
    "backing_commit",
}


class ReplicaServer:
    """Serves one replica directory for the volume whose key it holds; the directory may be
    empty until an engine calls ``init``. With ``keep_damaged`` (a replica served for an
    engine on another host), a directory that does not open for damage (``DamagedLayers``,
    ``DamagedMeta``) is served *damaged*: its engine is told why and may have it set aside
    (``set_aside``) and rebuilt; nothing else is served from it. Why: a process that exits
    cannot take a rebuild, and nobody on the engine's host can reach the directory."""

    def __init__(
        self,
        directory: Path,
        key: VolumeKey,
        tls_context: ssl.SSLContext | None = None,
        keep_damaged: bool = False,
    ) -> None:
        self.dir = Path(directory)
        finish_set_aside(self.dir)
        check_directory(self.dir)
        self.key = key
        self.tls = tls_context  # TLS on TCP connections (the local socket stays plain)
        self.store: ChunkStore | None = None
        self.damaged: str | None = None  # why the directory does not open, served damaged
        self._aside: Path | None = None  # where it was moved by a set-aside not finished
        self._fresh_lock = -1  # the lock of the directory made to take its place, meanwhile
        self._lock_fd = -1  # the directory's lock, held while it is served damaged
        if (self.dir / "volume.json").exists():
            try:
                self.store = ChunkStore.open(self.dir)
            except (DamagedLayers, DamagedMeta) as exc:
                # (another volume's directory is never this volume's to set aside; one whose
                # volume.json does not say whose it is is known by its ``id`` alone: only the
                # engine that recorded that identity for the replica asks)
                # (said first: whose directory it is tells the operator where the mistake is)
                owner = replica_volume_id(self.dir)
                if owner is not None and owner != key.id_hex:
                    raise _another_volume(self.dir, owner, key) from None
                if not keep_damaged:
                    raise
                self.damaged = str(exc).split(": nothing was deleted")[0][:400]
                pinned = _not_movable(self.dir)
                if pinned is not None:  # (said up front: its engine and ``replica ls`` show it)
                    self.damaged = f"{self.damaged}; {pinned}"
                # (held as a store holds it: a second process serving the directory would be
                # asked to set aside what this one's engine had rebuilt there)
                self._lock_fd = lock_directory(self.dir)
                log.error(
                    "%s: nothing is served from this directory; the engine sets it aside "
                    "(kept beside it) and rebuilds the replica once another replica serves",
                    exc,
                )
            else:
                owner = self.store.volume_id
                if owner is None:  # made before volumes had keys: it is this volume's from now
                    self.store.set_volume_id(key.id_hex)
            if owner is not None and owner != key.id_hex:
                self.close()
                raise _another_volume(self.dir, owner, key)
        self.uid: str | None = None  # (``serve`` makes or reads it, once it listens)
        self.sessions = Sessions(self.dir, key)
        self._structural = trio.Lock()
        self._hashing = trio.Lock()  # one checksum computation at a time, off the event loop
        self._unsynced = 0
        self._writing_back = False
        self.store_lock = hotpath.StoreLock()  # the event loop's, shared with hot-path threads

    # -- lifecycle ----------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        local: str | None = None,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until SIGTERM/SIGINT or cancellation, then flush and close the store. A
        replica served for an engine on another host (no ``local`` socket: its engine did not
        start it) whose identity file is damaged is refused before it listens (``kept_id``)."""
        if local is None:
            kept_id(self.dir, self.key.volume)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:  # (taken, or an address not this host's: refused, exit 1)
            kind = Busy if exc.errno == errno.EADDRINUSE else LhfsError
            raise kind(f"cannot listen on {format_address(host, port)}: {exc.strerror}") from None
        if local:
            listeners.append(await local_listener(local))
        # made only now: a replica that cannot listen leaves no directory nor identity behind
        self.uid = directory_id(self.dir)
        bound = listeners[0].socket.getsockname()
        self.store_lock.take()
        trio.lowlevel.add_instrument(self.store_lock)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await nursery.start(trio.serve_listeners, self._connection, listeners)
                task_status.started((bound[0], bound[1]))
        finally:
            self.close()
            trio.lowlevel.remove_instrument(self.store_lock)
            self.store_lock.give()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                scope.cancel()
                return

    def close(self) -> None:
        self._unlock()
        if self._fresh_lock >= 0:
            os.close(self._fresh_lock)
            self._fresh_lock = -1
        if self.store is not None:
            self.store.close()
            self.store = None

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- connections --------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        sessions = self.sessions
        session = None
        try:
            busy = sessions.admit(stream)
            if busy is not None:
                plain = self.tls is None or stream.socket.family == socket.AF_UNIX
                await sessions.refuse(stream, busy, plain)
                return
            session = await sessions.handshake(stream, self.tls)
            sessions.live.add(session)
            with session.scope:
                async with trio.open_nursery() as nursery:
                    try:
                        await self._requests(session, nursery)
                    except _PEER_GONE:
                        pass
                    except ProtocolError as exc:
                        log.warning("closing connection: %s", exc)
                    except OSError as exc:
                        if exc.errno not in _UNREACHABLE:
                            raise
                        log.info("connection lost: %s", exc)
                    nursery.cancel_scope.cancel()
        except (*_PEER_GONE, Probe):
            pass
        except (ProtocolError, OSError) as exc:
            if session is None:  # (a stranger's, most often: a line a minute per source and kind)
                key = f"handshake {source_of(stream.socket)} {kind_of(exc)}"
                sessions.said.warning(key, "closing connection during the handshake: %s", exc)
            else:
                log.warning("closing connection: %s", exc)
        except Exception:  # a bug in one connection must not stop the replica
            log.exception("connection handler failed")
        finally:
            if session is not None:
                sessions.live.discard(session)
                session.unshare()
            await trio.aclose_forcefully(stream)

    async def _requests(self, session: Session, nursery: trio.Nursery) -> None:
        frames = p.FrameBuffer()
        try:
            await self._serve_frames(session, nursery, frames)
        finally:
            frames.release()

    async def _serve_frames(
        self, session: Session, nursery: trio.Nursery, frames: p.FrameBuffer
    ) -> None:
        stream = session.stream
        p.tune_stream(stream)
        gone: list[OSError] = []
        out = p.outbox_for(stream, gone.append)
        if session.seals is not None:
            out.seal, frames.opener = session.seals
        nursery.start_soon(out.drain)
        peers = _Peers(nursery, self.key)  # live as long as this connection
        receive = frames.receiver(stream)
        while not gone:
            if frames.end > frames.start:  # a frame half received: it must not stall for long
                with trio.move_on_after(FRAME_TIMEOUT) as waited:
                    received = await receive()
                if waited.cancelled_caught:
                    raise ProtocolError(f"a frame stayed incomplete for {FRAME_TIMEOUT:.0f}s")
            else:
                received = await receive()
            if not received:
                return
            group = hotpath.Group()
            threaded = False
            for request_id, op, payload in frames.frames():
                if self._started(session, nursery, out, peers, request_id, op, payload):
                    continue
                if gone:  # the peer is gone: what is left of the batch has nobody to go to
                    return
                if op == p.SHM_ATTACH:  # (the engine sends nothing else until it is done)
                    out.push()
                    await self._share_memory(session, out, request_id, bytes(payload))
                    threaded = session.shared is not None
                    if threaded:
                        break
                    continue
                pieces = self._answer(session, request_id, op, payload)
                out.add(pieces)
                if group.full(pieces):
                    out.push()
            out.push()
            await out.sent()  # a client that reads no answers gets no more work done
            if threaded:  # the engine's shared-memory connection: from here on, a thread's
                await self._serve_in_thread(session, nursery, out, frames, peers)
                return

    def _started(
        self,
        session: Session,
        nursery: trio.Nursery,
        out: Any,
        peers: _Peers,
        request_id: int,
        op: int,
        payload: bytes | memoryview,
    ) -> bool:
        """Start a long request as a task (answered later, out of order, a few at a time);
        False if the request is not one."""
        task = None
        if op == p.CALL and checks.method_of(payload) in _LONG:
            task = partial(self._long_call, session, out, request_id, bytes(payload), peers)
        elif op == p.LAYER_SUMS:
            task = partial(self._layer_sums, session, out, request_id, bytes(payload))
        if task is None:
            return False
        if session.tasks >= MAX_TASKS:
            busy = Busy(f"at most {MAX_TASKS} long requests at once per connection")
            out.add([p.frame(request_id, p.ERROR, p.error_payload(busy))])
        else:
            session.tasks += 1
            nursery.start_soon(self._task, session, task)
        return True

    async def _serve_in_thread(
        self,
        session: Session,
        nursery: trio.Nursery,
        out: Any,
        frames: p.FrameBuffer,
        peers: _Peers,
    ) -> None:
        """Serve the rest of the connection from a thread (``hotpath``): it answers reads,
        writes, trims and flushes itself and hands everything else back here, in order."""

        async def slow(request_id: int, op: int, payload: bytes) -> None:
            if not self._started(session, nursery, out, peers, request_id, op, payload):
                if op == p.SHM_ATTACH:
                    await self._share_memory(session, out, request_id, payload)
                    return
                out.add(self._answer(session, request_id, op, memoryview(payload)))
            out.push()
            await out.sent()

        connection = hotpath.Connection(
            p.socket_of(session.stream).fileno(),
            frames,
            out,
            self.store_lock,
            partial(self._answer, session),
            slow,
            FRAME_TIMEOUT,
        )
        await connection.serve()

    def _answer(
        self, session: Session, request_id: int, op: int, payload: memoryview
    ) -> list[p.Part]:
        try:
            if session.role != p.ENGINE or session.epoch != self.sessions.epoch:
                self._permit(session, op, payload)  # (the current engine may ask anything)
            if op == p.WRITE_SHM:  # (the most frequent request: one frame, packed at once)
                return [self._write_shared(session, request_id, payload)]
            if op in (p.READ_SHM, p.READ_REPLY):
                parts = self._shared_io(session, op, payload)
            else:
                parts = self._dispatch(op, payload)
            return p.frame_pieces(request_id, p.OK, *parts, owned=True)
        except Exception as exc:  # every failure becomes an error answer
            return [p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))]

    def _permit(self, session: Session, op: int, payload: bytes | memoryview) -> None:
        """Refuse what this session may not ask: anything from an engine session a newer one
        fenced, and anything but reading from a reader session."""
        self.sessions.check(session)
        if session.role == p.READER:
            if op not in _READER_OPS:
                raise NotPermitted(f"a read-only session may not send operation {op}")
            if op == p.CALL and checks.method_of(payload) not in _READER_CALLS:
                raise NotPermitted("a read-only session may only call what reads")

    async def _share_memory(
        self, session: Session, out: Any, request_id: int, payload: bytes
    ) -> None:
        """Map the engine's pool (read-only) and this connection's read region (``shm``), and
        keep its FUSE device if it sends it (``READ_REPLY``): agree, receive one byte carrying
        the descriptors, check and map them, answer again.
        Only the current engine's session on the local socket may ask; a refusal is an error
        answer and the connection goes on over the socket alone."""

        def answer(error: Exception | None) -> None:
            if error is None:
                out.add([p.frame(request_id, p.OK)])
            else:
                refusal = p.error_payload(_as_lhfs_error(error))
                out.add([p.frame(request_id, p.ERROR, refusal)])
            out.push()

        sock = p.socket_of(session.stream)
        try:
            if session.role != p.ENGINE or sock.family != socket.AF_UNIX:
                raise NotPermitted("memory is shared only with an engine on the local socket")
            if session.shared is not None:
                raise InvalidArgument("this connection shares memory already")
            self.sessions.check(session)
            pool_size, region_size = checks.exact(p.SHM_SIZES, memoryview(payload))
            shm.check_size(pool_size)  # (before the descriptors come)
            shm.check_size(region_size)
        except Exception as exc:
            answer(exc)
            return
        answer(None)
        await out.sent()
        space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
        with trio.move_on_after(FRAME_TIMEOUT):
            data, ancillary, flags, _ = await sock.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, item in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(item[: len(item) - len(item) % fds.itemsize])
            if len(fds) not in (2, 3) or not data or flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("the shared memory's descriptors did not come")
            try:
                pool, region, session.device = _map_shared(fds, pool_size, region_size)
            except ValueError as exc:
                answer(InvalidArgument(str(exc)))
                return
            session.shared = (pool, region)
            answer(None)
            return
        raise ProtocolError(f"the shared memory's descriptors did not come in {FRAME_TIMEOUT}s")

    def _write_shared(self, session: Session, request_id: int, payload: memoryview) -> bytes:
        """A write from the engine's pool; the answer (the store's revision) as one frame."""
        if session.shared is None:
            raise InvalidArgument("this connection shares no memory")
        store = self._require_store()
        offset, at, length = checks.exact(p.SHM_WRITE, payload)
        with _window(session.shared[0], at, length) as data:
            store.write(offset, data)
        return _REVISION_ANSWER.pack(_REVISION_LENGTH, request_id, p.OK, store.revision)

    def _shared_io(
        self, session: Session, op: int, payload: memoryview
    ) -> tuple[bytes | bytearray, ...]:
        """A read into this connection's read region (and to the kernel, for READ_REPLY)."""
        if session.shared is None:
            raise InvalidArgument("this connection shares no memory")
        region = session.shared[1]
        store = self._require_store()
        if op == p.READ_SHM:
            offset, length, at = checks.exact(p.SHM_READ, payload)
            unique = None
        else:
            offset, length, at, unique = checks.exact(p.SHM_READ_REPLY, payload)
            if session.device < 0:
                raise InvalidArgument("this connection shares no FUSE device")
        with _window(region, at, length) as target:
            store.read_into(offset, target)
            if unique is not None:
                shm.answer_fuse(session.device, unique, target)
        return ()

    # -- operations ---------------------------------------------------------------------------

    def _require_store(self) -> ChunkStore:
        if self.damaged is not None:
            raise CorruptState(
                f"replica {self.dir} is damaged ({self.damaged}): nothing is served from it "
                "until its engine sets it aside, while another replica serves"
            )
        if self.store is None:
            raise NotInitialised(f"replica {self.dir} holds no volume yet (call init)")
        return self.store

    def _dispatch(self, op: int, payload: memoryview) -> tuple[bytes | bytearray, ...]:
        if op == p.CALL:
            return (p.encode_json(self._call(*checks.call_of(payload))),)
        store = self._require_store()
        if op == p.READ:
            offset, length = checks.exact(p.RANGE, payload)
            if length > p.MAX_IO:
                raise InvalidArgument(f"read of {length} bytes exceeds the limit of {p.MAX_IO}")
            return (store.read(offset, length),)
        if op == p.WRITE:
            (offset,) = checks.header(p.U64, payload)
            store.write(offset, payload[p.U64.size :])
            return (p.U64.pack(store.revision),)
        if op == p.TRIM:
            offset, length = checks.exact(p.TRIM_RANGE, payload)
            if length > MAX_TRIM_CHUNKS * store.chunk_size:
                raise InvalidArgument(
                    f"a trim spans at most {MAX_TRIM_CHUNKS} chunks: split the range"
                )
            store.trim(offset, length)
            return (p.U64.pack(store.revision),)
        if op == p.FLUSH:
            store.flush()
            return (p.U64.pack(store.revision),)
        if op == p.WRITE_LAYER_RUN:
            first, count, n = checks.header(p.WRITE_RUN, payload)
            start = p.WRITE_RUN.size
            layer_id = checks.layer_name(payload, start, start + n)
            states = bytes(payload[start + n : start + n + count])
            if len(states) != count:
                raise InvalidArgument("layer run states are cut short")
            store.write_layer_run(layer_id, first, states, payload[start + n + count :])
            return ()
        if op == p.BACKING_UPLOAD:
            chunk, n = checks.header(p.UPLOAD, payload)
            image_id = checks.image_id(
                bytes(payload[p.UPLOAD.size : p.UPLOAD.size + n]).decode(errors="replace")
            )
            store.backing_upload(image_id, chunk, bytes(payload[p.UPLOAD.size + n :]))
            return ()
        if op == p.READ_SNAPSHOT:
            offset, length = checks.header(p.RANGE, payload)
            if length > p.MAX_IO:
                raise InvalidArgument(f"read of {length} bytes exceeds the limit of {p.MAX_IO}")
            layer_id = checks.layer_name(payload, p.RANGE.size)
            return (store.read_snapshot(layer_id, offset, length),)
        if op == p.READ_LAYER_RUN:
            first, count = checks.header(p.RUN, payload)
            _check_run(store, count)
            layer_id = checks.layer_name(payload, p.RUN.size)
            return store.read_layer_run(layer_id, first, count)
        raise InvalidArgument(f"unknown operation {op}")

    def _call(self, method: str, args: dict[str, Any]) -> Any:
        if method == "hello":
            hello = {
                "initialised": self.store is not None,
                "dir": str(self.dir),
                "uid": self.uid,
                # (whose session the replica is in: an engine refused as older tells another
                # engine's from one of its own sessions at another replica's old address)
                "epoch": self.sessions.epoch,
                "owner": self.sessions.owner.hex(),
            }
            return {**hello, "damaged": self.damaged} if self.damaged is not None else hello
        if method == "set_aside":
            uid = checks.text(args, "uid", 64)
            return self._set_aside(uid, checks.integer(args, "need", 0, checks.MAX_VOLUME << 2))
        if method == "init":
            if self.damaged is not None:  # (refused, saying why: set aside first)
                self._require_store()
            if self.store is not None:
                raise Busy(f"replica {self.dir} already holds a volume")
            size = checks.integer(args, "size", 1, checks.MAX_VOLUME)
            chunk_size = checks.integer(args, "chunk_size", 1, 64 << 20)
            check_geometry(size, chunk_size)
            self._unlock()  # (the store takes it: one lock per directory, even in one process)
            self.store = ChunkStore.create(self.dir, size, chunk_size, volume_id=self.key.id_hex)
            return self.store.info()
        if self._structural.locked() and method in _STRUCTURAL:
            raise Busy(f"replica is busy with {self._require_store().operation or 'an operation'}")
        store = self._require_store()
        if method == "info":
            return {**store.info(), "uid": self.uid}
        if method == "list_layers":
            return store.list_layers()
        if method == "is_blank":
            return store.is_blank()
        if method == "snapshot":
            return store.snapshot(checks.text(args, "name"))
        if method == "revert":
            return store.revert(checks.text(args, "name"))
        if method == "expand":
            return store.expand(checks.integer(args, "size", 1, checks.MAX_VOLUME))
        if method == "rebuild_begin":
            names = checks.texts(args, "names")
            revision = checks.integer(args, "revision", 0, 1 << 63)
            created = checks.times(args, "created", len(names))
            branches = checks.branches(args, "branches")
            return store.rebuild_begin(names, revision, created, branches)
        if method == "rebuild_finish":
            return store.rebuild_finish()
        raise InvalidArgument(f"unknown method {method!r}")

    def _set_aside(self, uid: str, need: int) -> dict[str, str]:
        """Set the damaged directory aside beside itself (``<dir>.damaged-<time>``, kept
        whole: never anything deleted) and put an empty one in its place with the same
        identity and epoch, for the engine to initialise and rebuild; where it went. Only the
        current engine may ask (``_permit``), naming this directory's identity: the one it
        recorded for the replica, so that no other directory is set aside on its word.
        Refused (``NoSpace``, changing nothing) when its disk has less than ``need`` bytes
        free, what the engine reckons its rebuild writes beside the directory set aside
        (which keeps its space): else the rebuild filled the disk and failed, the damaged
        copy still taking its room.

        The new directory is made whole first, under another name (``FRESH``: locked, its
        identity and epoch synced), then the two renames: made after the damaged one moved,
        a failure (a full disk, a lock held) left the replica cleared of its damage with an
        identity in memory only, a stranger to its engine after a restart, its fencing epoch
        lost. A failure anywhere leaves the replica damaged, asked again; a crash between the
        renames is finished at the next start (``finish_set_aside``); until then no new epoch
        is recorded (``Sessions._record_epoch``)."""
        if self.damaged is None:
            raise WrongState(f"replica {self.dir} is not damaged: nothing is set aside")
        if uid != self.uid:
            raise NotPermitted(f"replica {self.dir} is {self.uid}, not {uid:.40}: not set aside")
        # (the directory itself, not a link to it: the link moved, the rebuild would fill the
        # link's disk, the damaged directory left where it was)
        directory = Path(os.path.realpath(self.dir))
        aside = self._aside  # (moved already by an attempt that failed after it)
        if aside is None:
            self._still_damaged(directory)
            pinned = _not_movable(directory)
            if pinned is not None:
                raise WrongState(pinned)
            free = shutil.disk_usage(directory.parent).free
            if free < need:
                shown_need, shown_free = format_sizes(need, free)
                raise NoSpace(
                    f"{directory} is kept as it is, not set aside: its rebuild needs about "
                    f"{shown_need} beside it on its disk, which has {shown_free} free; make "
                    "room there (it is set aside when its engine asks again)"
                )
            fresh, held = _fresh_directory(directory)
            try:
                self.sessions.keep_epoch(fresh)
                atomic_write(fresh / ID_FILE, f"{self.uid}\n".encode())
                aside = damaged_aside(directory)
                os.rename(directory, aside)
            except BaseException:
                os.close(held)
                raise
            self._aside, self._fresh_lock = aside, held
        fresh = directory.with_name(directory.name + FRESH)
        os.rename(fresh, directory)
        fsync_dir(directory.parent)
        self._unlock()  # (the damaged one's, aside)
        self._lock_fd, self._fresh_lock = self._fresh_lock, -1
        damage, self.damaged, self._aside = self.damaged, None, None
        log.error("%s: set aside as %s, to be rebuilt", damage, aside)
        return {"aside": str(aside)}

    def _still_damaged(self, directory: Path) -> None:
        """Open the directory again right before it is set aside: one repaired by hand while
        served damaged is served from now on and not set aside (``WrongState``). Its lock is
        let go for the store to take it, and taken again while it stays damaged."""
        self._unlock()
        try:
            store = ChunkStore.open(directory)
        except (DamagedLayers, DamagedMeta):
            self._lock_fd = lock_directory(directory)
            return
        except BaseException:
            with contextlib.suppress(LhfsError, OSError):
                self._lock_fd = lock_directory(directory)
            raise
        self.store, self.damaged = store, None
        log.warning("%s opens now: served, not set aside", directory)
        raise WrongState(f"replica {self.dir} opens now (repaired): it is served, not set aside")

    async def _task(self, session: Session, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        finally:
            session.tasks -= 1

    async def _long_call(
        self, session: Session, out: p.Outbox, request_id: int, payload: bytes, peers: _Peers
    ) -> None:
        try:
            self._permit(session, p.CALL, payload)
            method, args = checks.call_of(payload)
            if method == "pull_run":
                result = await self._pull_run(args, peers, session)
            elif method == "checksum":
                result = await self._checksum()
            elif method == "verify_layer":
                store = self._require_store()
                layer = checks.text(args, "layer")
                result = await self._hash(partial(store.verify_job, layer))
            elif method == "verify_backing":
                result = await self._verify_backing(args.get("repair") is True)
            elif method == "changed_blocks":
                result = await self._changed_blocks(args)
            elif method == "backing_commit":
                image_id = checks.image_id(checks.text(args, "id"))
                result = await self._backing_commit(image_id, session)
            else:
                result = await self._remove_snapshot(
                    checks.text(args, "name"), session, args.get("missing_ok") is True
                )
            answer = p.frame(request_id, p.OK, p.encode_json(result))
        except Exception as exc:  # every failure becomes an error answer
            answer = p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))
        await out.sent()  # (a peer that reads no answers gets no more of them queued)
        out.add([answer])
        out.push()

    async def _layer_sums(
        self, session: Session, out: p.Outbox, request_id: int, payload: bytes
    ) -> None:
        """Per-chunk checksums of a layer, answered out of order. Hashing an immutable layer
        that has none recorded reads all of it (a minute or more for a large volume): it runs in
        a thread (``_hash``), so that the replica keeps serving I/O meanwhile (an engine would
        otherwise time out on it and mark it failed). The head is hashed at once."""
        try:
            self._permit(session, p.LAYER_SUMS, payload)
            view = memoryview(payload)
            first, span, fresh = checks.header(p.SUMS_REQ, view)
            if span > SUMS_PAGE_MAX:
                raise InvalidArgument(f"at most {SUMS_PAGE_MAX} checksums per request")
            layer_id = checks.layer_name(view, p.SUMS_REQ.size)
            store = self._require_store()
            if session.role != p.ENGINE:  # a reader neither recomputes (and so replaces) the
                fresh = False  # recorded sums scrub relies on, nor has the head hashed
                if store.layer(layer_id) is store.head:
                    raise NotPermitted("a read-only session gets the checksums of snapshots")
            fresh = bool(fresh) and first == 0
            sums = await self._hash(partial(store.sums_job, layer_id, fresh, first, span))
            answer = p.frame(request_id, p.OK, b"".join(p.SUM_ENTRY.pack(*e) for e in sums))
        except Exception as exc:  # every failure becomes an error answer
            answer = p.frame(request_id, p.ERROR, p.error_payload(_as_lhfs_error(exc)))
        await out.sent()
        out.add([answer])
        out.push()

    async def _changed_blocks(self, args: dict[str, Any]) -> list[int] | None:
        """The blocks a backup must read since its base (see ``ChunkStore.changed_blocks``),
        found in a thread: a large layer's index takes seconds to walk."""
        store = self._require_store()
        base, top = checks.text(args, "base"), checks.text(args, "top")
        block_size = checks.integer(args, "block_size", 4096, 64 << 20)
        if block_size & (block_size - 1):
            raise InvalidArgument("the block size must be a power of two")
        return await self._hash(
            partial(store.changed_blocks_job, base, top, block_size, MAX_CHANGED_BLOCKS)
        )

    async def _backing_commit(self, image_id: str, session: Session) -> None:
        """Adopt an uploaded backing image once its content hashes to ``image_id``; the hashing
        (of up to the whole volume's size) runs in a thread. A session fenced meanwhile
        changes nothing (as after every wait of a long request)."""
        store = self._require_store()
        await self._hash(partial(store.backing_verify_job, image_id))
        self.sessions.check(session)
        store.backing_adopt(image_id)

    async def _checksum(self) -> str:
        """The whole volume's checksum, read a few MiB at a time with other requests served in
        between (reading a large volume takes minutes). A volume written to meanwhile gives a
        checksum of no single moment, as any read of a volume in use would."""
        digest = xxhash.xxh3_128()
        for piece in self._require_store().content():
            digest.update(piece)
            await trio.sleep(0)
        return digest.hexdigest()

    async def _verify_backing(self, repair: bool) -> dict[str, Any]:
        """What the backing image file holds (``found``) against its id; with ``repair`` (a
        rebuild target, out of I/O), one that differs is let go (``backing_drop``), for the
        rebuild to send a good one."""
        store = self._require_store()
        recorded = store.backing.id if store.backing is not None else None
        found = await self._hash(store.backing_check_job)
        dropped = bool(repair and recorded and found != recorded and store.backing is not None)
        if dropped:
            store.backing_drop()
            log.error("backing image rotten (%s, expected %s): let go of it", found, recorded)
        return {"id": recorded, "found": found, "dropped": dropped}

    async def _hash(self, resolve: Callable[[], Callable[[], T]]) -> T:
        """Run a job that hashes immutable layers in a thread, one at a time, never alongside
        a snapshot removal (which rewrites them): a removal under way holds ``_hashing``. The
        job is resolved once the lock is held, on the event loop: a removal that ran while it
        waited may have removed the layer it names (it is then not found)."""
        async with self._hashing:
            job = resolve()
            return await trio.to_thread.run_sync(job)

    async def _remove_snapshot(self, name: str, session: Session, missing_ok: bool) -> None:
        """Coalesce a snapshot away, in steps with I/O served in between. A checksum job under
        way (a scrub, a rebuild's comparison) is waited for, not refused: the engine takes a
        refusal from one replica for a failure of that replica. ``missing_ok``: a removal
        finished again, that this replica may have done before its engine stopped."""
        store = self._require_store()
        if missing_ok and not store.has_snapshot(name):
            return
        async with self._hashing:
            if self._structural.locked():
                raise Busy(f"replica is busy with {store.operation or 'an operation'}")
            async with self._structural:
                self.sessions.check(session)
                for _ in store.remove_snapshot_steps(name):
                    await trio.sleep(0)  # (a step leaves a valid chain: stopping is safe)
                    self.sessions.check(session)

    async def _pull_run(
        self, args: dict[str, Any], peers: _Peers, session: Session
    ) -> dict[str, int]:
        """Copy a run of an immutable layer's chunks straight from the rebuild source into this
        replica, so that the data of a rebuild does not pass through the engine. The source is
        named by the address the engine knows it by and its layer by the id it has there: if
        that address leads elsewhere from here, no such layer answers and the pull fails
        (``PullFailed``), it never copies other data."""
        store = self._require_store()
        address, source_layer = checks.text(args, "source"), checks.text(args, "source_layer")
        layer = checks.text(args, "layer")
        ca = checks.text(args, "ca", tls.MAX_CA_PEM) if args.get("ca") is not None else None
        parse_address(address)
        first = checks.integer(args, "first", 0, checks.MAX_VOLUME)
        count = checks.integer(args, "count", 1, 1 << 16)
        _check_run(store, count)
        try:
            with trio.fail_after(_PULL_TIMEOUT):
                client = await peers.get(address, ca)
                states, data = await client.read_layer_run(source_layer, first, count)
        except (LhfsError, trio.TooSlowError) as exc:
            raise PullFailed(f"cannot copy from {address}: {exc or 'no answer'}") from None
        self.sessions.check(session)  # fenced while it waited: it writes nothing
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


def check_directory(directory: Path) -> None:
    """Refuse, before anything is made, a replica directory that cannot be one: a path that
    is not a directory, or a new one whose parent does not exist. Why: serving makes the
    directory (an engine's new replica is served empty), and a mistyped path was made whole,
    levels and all, then served as an empty replica."""
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise LhfsError(f"{directory} is not a directory")
        return
    if not directory.parent.is_dir():
        raise NotFound(
            f"{directory.parent} is not a directory that exists: a replica directory is made "
            "only in one"
        )


def _another_volume(directory: Path, owner: str, key: VolumeKey) -> WrongVolume:
    """A directory of another volume than the key's, damaged or not: refused, never served."""
    return WrongVolume(
        f"{directory} holds a replica of another volume (id {owner}); the key file is for "
        f"volume {key.volume} (id {key.id_hex})",
        owner,
    )


def _fresh_directory(directory: Path) -> tuple[Path, int]:
    """The empty directory made beside ``directory`` to take its place once it is set
    aside (``FRESH``): made, or the one an attempt that failed left (holding only what a
    set-aside writes in it); a directory holding anything else there is not taken. Locked
    here, with its lock's file descriptor: a lock that failed once the damaged directory
    had moved left the replica with no directory at its path while it served."""
    fresh = directory.with_name(directory.name + FRESH)
    try:
        fresh.mkdir(mode=0o700)
    except FileExistsError:
        found = set(os.listdir(fresh)) if fresh.is_dir() and not fresh.is_symlink() else None
        if found is None or not found <= {ID_FILE, ".id.tmp", "epoch", ".epoch.tmp", "lock"}:
            raise WrongState(
                f"{fresh} is in the way: the damaged directory is set aside only once it is "
                "moved away"
            ) from None
    return fresh, lock_directory(fresh)


def finish_set_aside(directory: Path) -> None:
    """Put the new directory of a set-aside a crash cut between its two renames in place:
    the damaged one moved aside, the new one (``FRESH``, holding the replica's identity)
    not yet in its place. Else served empty under a new identity, a stranger to its engine."""
    real = Path(os.path.realpath(directory))
    fresh = real.with_name(real.name + FRESH)
    if os.path.lexists(real) or not fresh.is_dir() or _read_id(fresh / ID_FILE)[0] is None:
        return
    os.rename(fresh, real)
    fsync_dir(real.parent)
    log.warning("%s: the directory made in place of the damaged one set aside is put there", real)


def _not_movable(directory: Path) -> str | None:
    """Why ``directory`` cannot be set aside by a rename, if it cannot: a file system is
    mounted on it (a disk given to the replica whole, a natural layout). Its content is not
    moved aside within it instead: the new replica would then share its directory with the
    damaged one's files, which a chunk store refuses as unknown layer files."""
    if os.path.ismount(os.path.realpath(directory)):
        return (
            f"{directory} is a mount point and cannot be set aside: serve a subdirectory of "
            "it, or move its content aside by hand"
        )
    return None


def _read_id(path: Path) -> tuple[str | None, str | None]:
    """The identity kept at ``path`` (None: none yet), and what it holds instead if it is
    damaged (None if it is not)."""
    try:
        text = path.read_bytes().strip().decode(errors="replace")
    except FileNotFoundError:
        return None, None
    if _UID.fullmatch(text):
        return text, None
    return None, text


def kept_id(directory: Path, volume: str) -> str | None:
    """The identity kept in ``directory`` (None: none yet). A damaged one is ``CorruptState``,
    saying what to do: served under a new identity, the directory would be a stranger to the
    engine on another host that holds it (which knows it by identity alone), refused there for
    good with nothing to say why; so it is refused here, changing nothing, until the operator
    chooses (a local replica's engine knows it by its path and adopts a new one instead)."""
    kept, damaged = _read_id(directory / ID_FILE)
    if damaged is None:
        return kept
    raise CorruptState(
        f"{directory / ID_FILE}, this replica directory's identity, is damaged "
        f"({damaged[:40]!r}): its engine would not know it under a new one. Remove it and "
        "serve the directory again (it gets a new identity), then replace the replica on "
        f"the engine's host: 'lhfs replica rm {volume} ID' (the replica 'lhfs replica ls "
        f"{volume}' shows at this address), then 'lhfs replica add {volume} --address ADDRESS'"
    )


def directory_id(directory: Path) -> str:
    """The identity of a replica directory: random, made the first time the directory is
    served and kept in it (``ID_FILE``; older directories get one then). An engine tells
    replicas apart by it, never by the address it reaches them at: one host has many
    addresses, and one replica taken twice would be two members of a volume fencing each
    other. A directory it cannot be kept in gets one for this process's life. A damaged one
    (of a local replica: ``serve`` refused any other) is replaced too, said in the log: its
    engine, which knows it by its path, adopts the new one and says so."""
    path = directory / ID_FILE
    kept, damaged = _read_id(path)
    if kept is not None:
        return kept
    if damaged is not None:
        log.warning(
            "the identity file %s was damaged (%.40r): replaced by a new one", path, damaged
        )
    uid = secrets.token_hex(16)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, f"{uid}\n".encode())
    except OSError as exc:
        log.warning(
            "the identity of %s is not kept (%s): it holds for this process only", directory, exc
        )
    return uid


class _Peers:
    """Connections from this replica to others (rebuild sources), one per address, opened on
    first use and closed with the connection that asked for them."""

    def __init__(self, nursery: trio.Nursery, key: VolumeKey) -> None:
        self.nursery = nursery
        self.key = key
        self._clients: dict[str, ReplicaClient] = {}
        self._failed: dict[str, tuple[float, LhfsError]] = {}
        self._lock = trio.Lock()

    async def get(self, address: str, ca: str | None = None) -> ReplicaClient:
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
                    client = await ReplicaClient.connect(
                        address, self.nursery, self.key, role=p.READER, tls_ca=ca
                    )
                except LhfsError as exc:
                    self._failed[address] = (trio.current_time() + _PEER_RETRY_AFTER, exc)
                    raise
                self._failed.pop(address, None)
                self._clients[address] = client
            return client


_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
# How a peer on another host goes away without a reset (not errors of this process):
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
SUMS_PAGE_MAX = 1 << 19  # chunks one LAYER_SUMS request may span (its answer: 13 MB at most)


def _check_run(store: ChunkStore, count: int) -> None:
    """A run of chunks moves at most ``MAX_IO`` bytes (one request, one bounded answer)."""
    if not 0 < count * store.chunk_size <= p.MAX_IO:
        raise InvalidArgument(
            f"a layer run is 1 to {p.MAX_IO // store.chunk_size} chunks, not {count}"
        )


def _map_shared(fds: Any, pool_size: int, region_size: int) -> tuple[Any, Any, int]:
    """Map what an engine shared (its pool read-only, a read region) and check its FUSE
    device if it sent one; every descriptor is closed or kept, also on a refusal
    (``ValueError``)."""
    device = fds[2] if len(fds) == 3 else -1
    pool = region = None
    try:
        pool = shm.map_received(fds[0], pool_size, writable=False)
        region = shm.map_received(fds[1], region_size, writable=True)
        if device >= 0:
            shm.check_fuse_device(device)
        return pool, region, device
    except BaseException:
        for mapped in (pool, region):
            if mapped is not None:
                mapped.close()
        if pool is None:
            os.close(fds[1])
        if device >= 0:
            os.close(device)
        raise


def _window(region: Any, at: int, length: int) -> memoryview:
    """The bytes a descriptor names in a shared region, if they lie inside it."""
    if length > p.MAX_IO or at + length > len(region):
        raise InvalidArgument(
            f"a shared buffer {at}+{length} lies outside the region of {len(region)} bytes"
        )
    return memoryview(region)[at : at + length]


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
        kind = Busy if exc.errno == errno.EADDRINUSE else LhfsError
        raise kind(f"cannot listen on local socket {name!r}: {exc.strerror}") from None
    sock.listen(64)
    return trio.SocketListener(sock)


async def run(
    directory: Path,
    key: VolumeKey,
    host: str,
    port: int,
    ready: Any = None,
    local: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Entry point of ``lhfs replica serve``: announces the bound address, then serves."""
    server = ReplicaServer(directory, key, tls_context, keep_damaged=local is None)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, host, port, local)
        where = format_address(*bound[:2])
        log.info("serving %s on %s%s", directory, where, " (TLS)" if tls_context else "")
        if ready is not None:
            ready(bound)
