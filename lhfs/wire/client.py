"""The client side of the replica protocol, for the engine, rebuild, tools and tests.

Many tasks may call one client at once, and the engine submits requests without waiting: each
request gets an id and a callback, and answers may come back in any order. When the connection
breaks, every waiting request and every later one fails with ``ConnectionLost``.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import secrets
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from lhfs.core.errors import (
    ConnectionLost,
    InvalidArgument,
    LhfsError,
    NoAnswer,
    ProtocolError,
)
from lhfs.wire import protocol as p
from lhfs.wire import shm, tls
from lhfs.wire.auth import VolumeKey
from lhfs.wire.seal import Seal

log = logging.getLogger("lhfs.client")
CONNECT_TIMEOUT = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if (
        not sep
        or not host
        or any(c.isspace() for c in host)  # (a stray space is a typo, not a name to look up)
        or not port.isdigit()
        or not 0 <= int(port) < 65536
    ):
        raise InvalidArgument(f"not a HOST:PORT address: {address!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` as ``parse_address`` (and ``--address``) takes it: an IPv6 host in
    brackets, since its own colons would leave the port unclear."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SyncReplica:
    """A blocking, one-request-at-a-time connection, for threads outside trio (a backup reading
    a snapshot from a running replica). A reader by default: it can change nothing."""

    def __init__(
        self,
        address: str,
        key: VolumeKey,
        timeout: float = 60.0,
        role: int = p.READER,
        tls_ca: str | None = None,
        local: str | None = None,
    ) -> None:
        """With ``local``, the replica at ``address`` is reached by its local socket of that
        name (one this host's engine started): neither TLS nor seals, as for the engine."""
        self.address = address
        host, port = parse_address(address)
        handshake = p.ClientHandshake(key, address, role, 0, takeover=False)
        tls_ca = None if local else tls_ca
        wrapping = False  # (a TLS handshake that fails may have met a replica without TLS)
        try:
            if local:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect("\0" + local)
            else:
                self._sock = socket.create_connection((host, port), timeout=timeout)
            if tls_ca:
                wrapping = True
                context = tls.client_context(tls_ca)
                self._sock = context.wrap_socket(self._sock, server_hostname=host)
        except OSError as exc:  # (ssl.SSLError included)
            hint = ""
            if wrapping and not isinstance(exc, ssl.SSLCertVerificationError):
                self._sock.close()
                hint = PLAIN if answers_plain(host, port) else ""
            raise ConnectionLost(f"cannot reach replica {address}: {exc}{hint}") from None
        try:
            self._sock.sendall(handshake.hello())
            challenge = self._recv(p.CHALLENGE.size, first=not tls_ca)
            self._sock.sendall(handshake.answer(challenge))
            welcome = self._recv(p.WELCOME.size)
            handshake.welcome(welcome + self._recv(handshake.welcome_more(welcome)))
        except OSError as exc:
            self._sock.close()
            raise ConnectionLost(f"cannot reach replica {address}: {exc}") from None
        except LhfsError:
            self._sock.close()
            raise
        self._next = 0
        self._frames = p.FrameBuffer()
        self._seal: Seal | None = None
        if not tls_ca and not local:
            self._seal, self._frames.opener = handshake.seals()

    def _recv(self, n: int, first: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data = self._sock.recv(n - len(buf))
            if not data:
                hint = UNANSWERED if first and not buf else ""
                raise ConnectionLost(f"replica {self.address} closed the connection{hint}")
            buf += data
        return bytes(buf)

    def request(self, op: int, *parts: bytes) -> bytes:
        self._next += 1
        frame = p.frame(self._next, op, *parts)
        if self._seal is not None:
            frame += p.seal_frame(self._seal.tag([frame], len(frame)))
        try:
            self._sock.sendall(frame)
            status, payload = self._answer(self._next)
        except OSError as exc:
            why = p.reason(exc)
            raise ConnectionLost(f"connection to replica {self.address} broke: {why}") from None
        if status != p.OK:
            raise p.decode_error(payload)
        return payload

    def _answer(self, request_id: int) -> tuple[int, bytes]:
        """(status, payload) of the answer to ``request_id`` (the replica's frames are cut and
        their seals checked by a ``FrameBuffer``, as the engine's client does)."""
        frames = self._frames
        while True:
            for answered, status, payload in frames.frames():
                if answered == request_id:
                    return status, bytes(payload)
            if not frames.recv_from(self._sock):
                raise ConnectionLost(f"replica {self.address} closed the connection")

    def settimeout(self, timeout: float) -> None:
        """Seconds the replica may stay silent during a request before it fails
        (``ConnectionLost``: the connection is then of no further use)."""
        self._sock.settimeout(timeout)

    def read_snapshot(self, layer: str, offset: int, length: int) -> bytes:
        return self.request(p.READ_SNAPSHOT, p.RANGE.pack(offset, length), layer.encode())

    def call(self, method: str, **args: Any) -> Any:
        return p.decode_json(self.request(p.CALL, p.encode_json({"method": method, "args": args})))

    def close(self) -> None:
        self._sock.close()
        self._frames.release()


Callback = Callable[[LhfsError | None, memoryview | bytes], None]
"""Called once with the answer to a request: ``(None, payload)`` or ``(error, b"")``. The
payload is a view into the connection's receive buffer, valid only during the call."""


class _Waiter:
    """The callback of an awaited request: keeps a copy of the answer and wakes the caller."""

    __slots__ = ("answer", "done", "failed")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: bytes = b""
        self.failed: LhfsError | None = None

    def __call__(self, error: LhfsError | None, payload: memoryview | bytes) -> None:
        if error is None:
            self.answer = bytes(payload)
        else:
            self.failed = error
        self.done.set()


class ReplicaClient:
    """A connection to one replica process; create with ``connect`` inside a nursery.

    Requests are queued by ``submit`` and leave with ``push``, which hands everything queued
    to the socket in one ``writev`` without waiting (``protocol.Outbox``). Answers are routed
    by a reader task to each request's callback. The awaitable calls (``request`` and the
    operations below) push at once; the engine submits a whole burst of requests first and
    pushes once, so that a burst costs one system call per replica.
    """

    def __init__(self, stream: trio.SocketStream | trio.SSLStream, address: str) -> None:
        self.address = address
        self._stream = stream
        self._next_id = 0
        self._waiting: dict[int, Callback] = {}
        # requests under the I/O deadline, with when each was submitted (oldest first)
        self._quick: dict[int, float] = {}
        self._outbox = p.outbox_for(stream, self._send_failed)
        self._broken: LhfsError | None = None
        self._cancel = trio.CancelScope()
        self.heard = trio.current_time()  # when bytes last came from it, sealed yet or not
        self.epoch = 0  # the session epoch the replica granted
        self.shared = False  # the replica maps the engine's pool (``shm``): WRITE_SHM
        self.region: shm.Region | None = None  # this connection's read region: READ_SHM
        self.answers_reads = False  # the replica holds the FUSE device: READ_REPLY
        self._opener: Seal | None = None  # checks answers on a sealed connection (``seal``)
        self.link = "local"  # how the replica is reached: "local" socket, "tls", "sealed" TCP

    @classmethod
    async def connect(
        cls,
        address: str,
        nursery: trio.Nursery,
        key: VolumeKey,
        timeout: float = CONNECT_TIMEOUT,
        local: str | None = None,
        role: int = p.ENGINE,
        epoch: int = 0,
        takeover: bool = False,
        tls_ca: str | None = None,
        owner: bytes = p.NO_OWNER,
        dead_after: float = p.DEAD_AFTER,
        pool: shm.Region | None = None,
        device: int | None = None,
    ) -> ReplicaClient:
        """Connect, authenticate and start the connection's tasks in ``nursery``. With
        ``local``, the replica at ``address`` is reached by its local socket of that name
        instead (a replica this host started with ``--local``). An engine session asks for
        session ``epoch`` (above the replica's own with ``takeover``: see
        ``protocol.ClientHandshake``); the one granted is the client's ``epoch``. With
        ``tls_ca`` (PEM), the connection is TLS and the replica's certificate must be signed
        by that CA for the host of ``address``. With ``pool`` too, an engine session on the
        local socket shares memory with the replica (``shm``): the pool, and a read region
        of its own, and with ``device`` (the engine's FUSE device) the replica answers reads
        to the kernel itself; a replica that cannot is used over the socket alone."""
        host, port = parse_address(address)
        handshake = p.ClientHandshake(key, address, role, epoch, takeover, owner)
        stream: trio.SocketStream | None = None
        region: shm.Region | None = None
        wrapping = False  # (a TLS handshake that fails may have met a replica without TLS)
        try:
            with trio.fail_after(timeout):
                stream = await (_open_local(local) if local else trio.open_tcp_stream(host, port))
                if tls_ca and not local:
                    wrapping = True
                    stream = await tls.wrap_client(stream, tls_ca, host)
                    wrapping = False
                await stream.send_all(handshake.hello())
                challenge = await _receive_exactly(stream, p.CHALLENGE.size, address, True)
                await stream.send_all(handshake.answer(challenge))
                welcome = await _receive_exactly(stream, p.WELCOME.size, address)
                more = await _receive_exactly(stream, handshake.welcome_more(welcome), address)
                handshake.welcome(welcome + more)
                if local and pool is not None and role == p.ENGINE:
                    region = await _share_memory(stream, pool, address, device)
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                why = f"no answer within {timeout}s"
                raise NoAnswer(f"cannot reach replica {address}: {why}") from None
            if isinstance(exc, OSError):
                why = exc.strerror or str(exc)
            elif isinstance(exc, trio.BrokenResourceError):  # reset, or TLS refused
                why = str(exc.__cause__ or exc)
                if wrapping and not isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                    plain = await trio.to_thread.run_sync(answers_plain, host, port)
                    why += PLAIN if plain else ""
            else:
                raise
            raise ConnectionLost(f"cannot reach replica {address}: {why}") from None
        p.tune_stream(stream, dead_after)
        client = cls(stream, address)
        client.epoch = handshake.epoch
        if p.sealed(stream):
            client._outbox.seal, client._opener = handshake.seals()
            client.link = "sealed"
        elif not local:
            client.link = "tls"
        if region is not None:
            client.shared, client.region = True, region
            client.answers_reads = device is not None
        nursery.start_soon(client._run)
        return client

    async def aclose(self, reset: bool = False, why: LhfsError | None = None) -> None:
        """Close the connection; with ``reset``, abort it (RST), dropping whatever the kernel
        still holds unsent: a replica marked failed must never receive it later. Requests
        still waiting fail with ``why`` (by default, that the connection was closed)."""
        self._fail(why or ConnectionLost(f"connection to replica {self.address} closed"))
        if reset:
            with contextlib.suppress(OSError):
                linger = struct.pack("ii", 1, 0)
                p.socket_of(self._stream).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self._cancel.cancel()
        await trio.aclose_forcefully(self._stream)

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def failure(self) -> str | None:
        """Why the connection ended (None while it serves)."""
        return None if self._broken is None else str(self._broken)

    @property
    def timed_out(self) -> bool:
        """Whether the connection ended because the replica did not answer in time."""
        return isinstance(self._broken, NoAnswer)

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether a request that must be answered promptly (I/O) has waited for more than
        ``timeout`` seconds since it was submitted. The deadline is per request, not per
        byte: a slow replica that keeps answering other, earlier requests (or pings) sends
        bytes all the time while the volume's I/O waits behind it far longer than the
        timeout; one busy with a large request at a sane rate answers it within it."""
        oldest = next(iter(self._quick.values()), None)  # (in the order they were submitted)
        return oldest is not None and now - oldest > timeout

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._outbox.drain, nursery.cancel_scope)
                    await self._guard(self._reader, nursery.cancel_scope)
                    nursery.cancel_scope.cancel()
        finally:  # also when the nursery it runs in is cancelled: never a socket left open
            self._fail(ConnectionLost(f"connection to replica {self.address} lost"))
            if self.region is not None:  # (the replica may still fill it: nobody reads it now)
                self.region.close()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def _guard(self, loop: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run the reader or writer; when either ends, fail waiting calls and stop the other."""
        try:
            await loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            why = p.reason(exc)
            self._fail(ConnectionLost(f"connection to replica {self.address} broke: {why}"))
        except ProtocolError as exc:
            self._fail(exc)
        scope.cancel()

    async def _reader(self) -> None:
        frames = p.FrameBuffer()
        frames.opener = self._opener
        try:
            await self._read_answers(frames)
        finally:
            frames.release()

    async def _read_answers(self, frames: p.FrameBuffer) -> None:
        waiting, quick = self._waiting, self._quick
        receive = frames.receiver(self._stream)
        while True:
            if not await receive():
                return
            self.heard = trio.current_time()
            for request_id, status, payload in frames.frames():
                if self._broken is not None:  # failed meanwhile: its requests were answered
                    return
                callback = waiting.pop(request_id, None)
                if callback is None:
                    continue
                quick.pop(request_id, None)
                if status == p.OK:
                    _call(callback, None, payload)
                else:
                    _call(callback, p.decode_error(payload), b"")

    def _fail(self, exc: LhfsError) -> None:
        """Every waiting request gets ``exc``, once: the reader, which may still hold answers
        received before the failure, delivers nothing more (``_broken``)."""
        if self._broken is None:
            self._broken = exc
            self._cancel.cancel()
        waiting = list(self._waiting.values())
        self._waiting.clear()
        self._quick.clear()
        self._outbox.clear()
        for callback in waiting:
            _call(callback, exc, b"")

    def submit(
        self,
        op: int,
        parts: tuple[p.Part, ...],
        callback: Callback,
        quick: bool = False,
        owned: bool = False,
    ) -> None:
        """Queue one request (it leaves with the next ``push``); ``callback`` gets its answer.
        ``quick`` puts it under the deadline that ``stalled`` checks (I/O, not long calls).
        Parts are sent later: one that could still change is copied, unless ``owned`` says
        that the caller leaves them alone until the callback ran.
        The engine submits a write to every replica before it pushes, so the replicas work in
        parallel and see requests in one order."""
        if self._broken is not None:
            raise ConnectionLost(str(self._broken))
        length = p.HEADER.size - p.LENGTH.size + sum(map(len, parts))
        if length > p.MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {p.MAX_FRAME}")
        request_id = self._next_id
        while True:  # after 2**32 requests, ids wrap: never reuse one still waiting
            request_id = (request_id + 1) & 0xFFFFFFFF
            if request_id not in self._waiting:
                break
        self._next_id = request_id
        self._waiting[request_id] = callback
        if quick:
            self._quick[request_id] = trio.current_time()
        header = p.HEADER.pack(length, request_id, op)
        if not owned:
            parts = tuple(part if p.immutable(part) else bytes(part) for part in parts)
        self._outbox.add([header, *parts])

    def push(self) -> None:
        """Send what is queued, as far as the socket takes it without waiting."""
        if self._broken is None:
            self._outbox.push()

    def ping(self) -> None:
        """Ask for something the replica answers at once, whatever else it is doing (its long
        work runs in tasks and threads), and ignore the answer: it shows the replica alive
        (``heard``) to whoever waits on a long request of it."""
        if self._broken is None:
            self.submit(p.CALL, (_PING,), lambda error, payload: None)
            self.push()

    def _send_failed(self, exc: OSError) -> None:
        why = p.reason(exc)
        self._fail(ConnectionLost(f"connection to replica {self.address} broke: {why}"))

    async def request(self, op: int, *parts: p.Part) -> bytes:
        """Send one request and wait for its answer; errors come back as ``LhfsError``."""
        waiter = _Waiter()
        self.submit(op, parts, waiter)
        self.push()
        await waiter.done.wait()
        if waiter.failed is not None:
            raise waiter.failed
        return waiter.answer

    # -- operations ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return await self.request(p.READ, p.RANGE.pack(offset, length))

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write and return the replica's revision counter after it."""
        return p.U64.unpack(await self.request(p.WRITE, p.U64.pack(offset), data))[0]

    async def trim(self, offset: int, length: int) -> int:
        return p.U64.unpack(await self.request(p.TRIM, p.TRIM_RANGE.pack(offset, length)))[0]

    async def flush(self) -> int:
        """Make every earlier write durable; returns the durable revision counter."""
        return p.U64.unpack(await self.request(p.FLUSH))[0]

    async def call(self, method: str, **args: Any) -> Any:
        answer = await self.request(p.CALL, p.encode_json({"method": method, "args": args}))
        return p.decode_json(answer)

    async def info(self) -> dict[str, Any]:
        return await self.call("info")

    async def layer_sums(
        self, layer_id: str, first: int = 0, span: int = 1 << 19, fresh: bool = False
    ) -> list[tuple[int, int, bytes]]:
        """One page of a layer's per-chunk checksums: those of chunks ``first`` to
        ``first + span - 1`` that the layer holds, in chunk order."""
        answer = await self.request(
            p.LAYER_SUMS, p.SUMS_REQ.pack(first, span, fresh), layer_id.encode()
        )
        return list(p.SUM_ENTRY.iter_unpack(answer))

    async def write_layer_run(
        self, layer_id: str, first: int, states: bytes, data: bytes | memoryview
    ) -> None:
        name = layer_id.encode()
        header = p.WRITE_RUN.pack(first, len(states), len(name))
        await self.request(p.WRITE_LAYER_RUN, header, name, states, data)

    async def read_layer_run(
        self, layer_id: str, first: int, count: int
    ) -> tuple[bytes, memoryview]:
        """(one state byte per chunk, the DATA chunks' bytes) of neighbouring chunks; the data
        is a view of the answer, not copied again."""
        answer = await self.request(p.READ_LAYER_RUN, p.RUN.pack(first, count), layer_id.encode())
        view = memoryview(answer)
        return bytes(view[:count]), view[count:]

    async def backing_upload(self, image_id: str, chunk: int, data: bytes | memoryview) -> None:
        name = image_id.encode()
        await self.request(p.BACKING_UPLOAD, p.UPLOAD.pack(chunk, len(name)), name, data)

    async def read_layer_chunk(self, layer_id: str, chunk: int) -> tuple[int, bytes]:
        states, data = await self.read_layer_run(layer_id, chunk, 1)
        return states[0], bytes(data)


# What a replica that closes a plain connection before its first byte most likely is.
UNANSWERED = " (one served with TLS is reached with its CA: --tls-ca)"
# What one that fails a TLS handshake but answers a plain one may be (whoever sits on the
# path could answer so too: said as a possibility).
PLAIN = " (it answers without TLS: if it is served so, add it without --tls-ca)"
_PING = p.encode_json({"method": "hello", "args": {}})
LOCAL_BUFFER = 4 << 20  # a Unix socket's send buffer (its whole in-flight data): room for bursts


def answers_plain(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether the replica at ``host:port`` answers a handshake without TLS: asked once a TLS
    handshake with it failed, to tell a replica served without TLS (its operator's mistake,
    or this one's) from one that is down or refuses. The hello names no volume (zeros) and
    carries a random nonce: what goes in clear tells nothing. (Blocking: from a thread.)"""
    hello = p.HELLO.pack(p.MAGIC, p.VERSION, p.PROBE_VOLUME, secrets.token_bytes(32))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(hello)
            return sock.recv(len(p.MAGIC)) == p.MAGIC
    except OSError:
        return False


def _call(callback: Callback, error: LhfsError | None, payload: memoryview | bytes) -> None:
    """Run a completion callback; one that fails is a bug of its owner, logged, and must not
    break the connection that delivered the answer (nor the other requests on it)."""
    try:
        callback(error, payload)
    except Exception:
        log.exception("a replica request's completion callback failed")


async def _receive_exactly(
    stream: trio.SocketStream, size: int, address: str, magic: bool = False
) -> bytes:
    """``size`` bytes of a handshake; with ``magic``, bytes that cannot start a replica's
    answer are reported as such at once (a web server answering, say), not as a reset."""
    data = b""
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        if not more:
            if magic and not data and not isinstance(stream, trio.SSLStream):
                raise ProtocolError(f"{address} closed the connection before answering{UNANSWERED}")
            raise ProtocolError(f"{address} closed the connection during the handshake")
        data += more
        if magic and data[: len(p.MAGIC)] != p.MAGIC[: len(data)]:
            raise ProtocolError(f"{address} is not an lhfs replica")
    return data


async def _share_memory(
    stream: trio.SocketStream, pool: shm.Region, address: str, device: int | None
) -> shm.Region | None:
    """Offer the replica the engine's pool (read-only) and a read region of this connection:
    ``SHM_ATTACH``, then, once it agreed, one byte carrying both descriptors (and the FUSE
    ``device``, if given). The region, or None if the replica declined (it is served over the
    socket alone)."""
    try:  # (no /proc, no memory for a region: the socket will do)
        read_only = pool.read_only_fd()
    except OSError as exc:
        log.warning("no memory shared with replica %s: %s", address, exc)
        return None
    try:
        region = shm.Region("lhfs-read", shm.READ_SLOTS, shm.READ_SLOT)
    except OSError as exc:
        os.close(read_only)
        log.warning("no memory shared with replica %s: %s", address, exc)
        return None
    try:
        sizes = p.SHM_SIZES.pack(pool.size, region.size)
        await stream.send_all(p.frame(1, p.SHM_ATTACH, sizes))
        if await _answer_ok(stream, address):
            fds = array.array("i", [read_only, region.fd])
            if device is not None:
                fds.append(device)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            await stream.socket.sendmsg([b"F"], ancillary)
            if await _answer_ok(stream, address):
                return region
    except BaseException:
        region.close()
        raise
    finally:
        os.close(read_only)
    region.close()
    return None


async def _answer_ok(stream: trio.SocketStream, address: str) -> bool:
    """One answer frame during the set-up: OK, or an error (logged: the caller goes on
    without what it asked)."""
    header = await _receive_exactly(stream, p.HEADER.size, address)
    length, _request_id, status = p.HEADER.unpack(header)
    if not p.HEADER.size - p.LENGTH.size <= length <= 1 << 16:
        raise ProtocolError(f"{address} sent a malformed answer")
    payload = await _receive_exactly(stream, length - (p.HEADER.size - p.LENGTH.size), address)
    if status == p.OK:
        return True
    log.warning("replica %s shares no memory: %s", address, p.decode_error(payload))
    return False


async def _open_local(name: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_BUFFER)  # capped by wmem_max
    try:
        await sock.connect("\0" + name)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


SUMS_PAGE = 1 << 16  # chunks per request when walking a layer's checksums (at most 1.6 MB)


class SumsUnavailable(LhfsError):
    """One replica could not give a layer's checksums; ``which`` says which one."""

    def __init__(self, which: int, error: LhfsError) -> None:
        super().__init__(str(error))
        self.which = which
        self.error = error


async def merged_layer_sums(
    clients: list[ReplicaClient], layer_id: str, fresh: list[bool], chunks: int
) -> AsyncIterator[tuple[int, list[tuple[int, bytes] | None]]]:
    """A layer's per-chunk checksums on several replicas side by side, for the chunks of a
    volume of ``chunks`` chunks that any of them holds, in chunk order: ``(chunk, [(state,
    digest) or None per replica])``. Read a range of chunks at a time, so that comparing a
    large layer never holds all of it in memory. The first range is asked of all at once (a
    replica that hashes its data for it does so alongside the others). ``fresh[i]`` has
    replica ``i`` hash its data again rather than give its recorded checksums."""
    failed: list[SumsUnavailable] = []
    pages: list[list[tuple[int, int, bytes]]] = [[] for _ in clients]

    async def fill(i: int, first: int) -> None:
        try:
            pages[i] = await clients[i].layer_sums(
                layer_id, first, SUMS_PAGE, fresh=fresh[i] and first == 0
            )
        except LhfsError as exc:  # raised outside the nursery, as itself
            failed.append(SumsUnavailable(i, exc))

    for first in range(0, chunks, SUMS_PAGE):
        async with trio.open_nursery() as nursery:
            for i in range(len(clients)):
                nursery.start_soon(fill, i, first)
        if failed:
            raise failed[0]
        rows: dict[int, list[tuple[int, bytes] | None]] = {}
        for i, page in enumerate(pages):
            for chunk, state, digest in page:
                rows.setdefault(chunk, [None] * len(clients))[i] = (state, digest)
        for chunk in sorted(rows):
            yield chunk, rows[chunk]


@asynccontextmanager
async def open_replica(
    address: str,
    key: VolumeKey,
    timeout: float = CONNECT_TIMEOUT,
    role: int = p.ENGINE,
    epoch: int = 0,
    tls_ca: str | None = None,
) -> AsyncIterator[ReplicaClient]:
    """A client for the duration of a ``async with`` block (tools and tests)."""
    async with trio.open_nursery() as nursery:
        client = await ReplicaClient.connect(
            address, nursery, key, timeout, role=role, epoch=epoch, tls_ca=tls_ca
        )
        try:
            yield client
        finally:
            await client.aclose()
