"""Who a replica talks to: the handshake's replica side, session epochs and fencing.

A connection becomes a *session* only once the peer proved it holds the volume's key (see
``lhfs.wire.auth``); until then nothing it sends is read as a request. Handshakes are bounded:
a few at a time, each within a deadline, so that strangers cannot hold the replica's memory or
its connection slots. A connection that meets a bound is told the replica is busy (which
bound), so that an engine tells busy from gone; and when the bound is one of handshakes, the
oldest of them is cut to make room if it has lasted long (an honest handshake takes
milliseconds): whoever holds connections open must keep making new ones to keep a slot.

**Epochs.** An engine session asks for an epoch, a number the replica keeps durably in the
file ``epoch`` of its directory (with the identity of the engine that holds it) and which only
grows. A session older than the replica's (a lower epoch, or the same one from another engine)
is refused at the handshake, and one that becomes older (a newer engine session came in: a
re-attach, an engine elsewhere, the replica re-added after a partition) is *fenced*: its
connection is reset at once and every request still arriving on it is refused. So a write that
sat in a socket buffer during a partition can never land after the replica rejoined, and of two
engines that reach one replica only the newer writes. Reader sessions (backups, rebuild peers)
change nothing and carry no epoch.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lhfs.core.durable import atomic_write
from lhfs.core.errors import CorruptState, Fenced, ProtocolError
from lhfs.wire import auth, tls
from lhfs.wire import protocol as p
from lhfs.wire.seal import Seal, pair

log = logging.getLogger("lhfs.replica")

EPOCH_FILE = "epoch"
HANDSHAKE_TIMEOUT = 5.0
CUT_AFTER = HANDSHAKE_TIMEOUT / 2  # a handshake under way this long may be cut for a newcomer
BUSY_WAIT = 1.0  # how long a refused peer may take to say hello before it is told it is busy
REFUSED = 0  # what ``admit`` says of a connection refused without a word (another local user)
MAX_HANDSHAKES = 64  # TCP connections proving themselves at once...
PER_SOURCE = 8  # ...of them from one source (an address; loopback, an IPv6 /64: one each)
LOCAL_HANDSHAKES = 16  # on the local socket, apart (strangers on TCP cannot crowd the engine)
MAX_SESSIONS = 64  # authenticated connections at once
LOG_EVERY = 60.0  # seconds between two lines about refused or failed strangers of one source


# How a TLS connection starts: a handshake record (22) of TLS 1.x (3).
TLS_HELLO = b"\x16\x03"


class Probe(ProtocolError):
    """A client whose TLS handshake failed asks whether the replica answers without TLS,
    to tell its operator so (``client.answers_plain``): its hello names no volume. Not
    logged: the TLS handshake it follows was, and it is no other volume's engine."""


@dataclass(eq=False)
class Session:
    """One authenticated connection."""

    role: int
    epoch: int
    owner: bytes
    stream: trio.SocketStream | trio.SSLStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    fenced: bool = False
    tasks: int = 0  # long requests under way
    shared: tuple[Any, Any] | None = None  # (pool, read region) mapped from the engine (shm)
    device: int = -1  # the engine's FUSE device, on which reads are answered (READ_REPLY)
    seals: tuple[Seal, Seal] | None = None  # (sending, receiving) on TCP without TLS: ``seal``

    def unshare(self) -> None:
        """Unmap what the engine shared and close its FUSE device (the connection is over:
        an engine that died must leave no process holding its FUSE connection open)."""
        for region in self.shared or ():
            with contextlib.suppress(BufferError):
                region.close()
        self.shared = None
        if self.device >= 0:
            with contextlib.suppress(OSError):
                os.close(self.device)
            self.device = -1


@dataclass(eq=False)
class _Slot:
    """One handshake under way: where from, since when, and the scope that ends it."""

    source: str
    started: float
    scope: trio.CancelScope
    cut: bool = False  # ended to make room for a newer connection


class Sessions:
    """The replica's key, its durable epoch, and the sessions it serves."""

    def __init__(self, directory: Path, key: auth.VolumeKey) -> None:
        self.dir = Path(directory)
        self.key = key
        self.epoch, self.owner = self._load_epoch()
        self.live: set[Session] = set()
        self._slots: dict[str, list[_Slot]] = {}  # handshakes under way per source ("": local)
        self._answering = 0  # refused connections being told that the replica is busy
        self.said = Quiet()

    def _load_epoch(self) -> tuple[int, bytes]:
        """The epoch and engine the file records. A damaged one (garbage, an epoch at or past
        the limit no session may reach) stops the replica from serving, as any damage of its
        directory: taken as it is, an epoch no engine can go above would have every engine
        refused as older, which its volume takes for another engine's takeover (and faults)."""
        path = self.dir / EPOCH_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0, p.NO_OWNER
        except OSError as exc:
            raise CorruptState(f"{path} cannot be read: {os.strerror(exc.errno or 0)}") from None
        except ValueError:  # (not text)
            raise CorruptState(f"{path} is damaged: not an epoch and an engine") from None
        fields = text.split()
        try:
            epoch, owner = int(fields[0]), bytes.fromhex(fields[1])
        except (ValueError, IndexError):
            owner = b""
        if len(fields) != 2 or len(owner) != len(p.NO_OWNER):
            raise CorruptState(f"{path} is damaged: {text[:40]!r}")
        if not 0 <= epoch < p.MAX_EPOCH:
            raise CorruptState(
                f"{path} is damaged: epoch {epoch} is out of range (epochs stay below "
                f"{p.MAX_EPOCH})"
            )
        return epoch, owner

    def _record_epoch(self, epoch: int, owner: bytes) -> None:
        """Durable before the session that asked for it is accepted: after a crash the
        replica still refuses every older session. Into the directory as it is, never made
        here (``serve`` made it): one moved aside by a set-aside not finished would be made
        anew holding only this file, and the new directory, waiting to take its place, could
        never be put there (the replica a stranger to its engine from its next start)."""
        atomic_write(self.dir / EPOCH_FILE, f"{epoch} {owner.hex()}\n".encode())
        self.epoch, self.owner = epoch, owner

    def keep_epoch(self, directory: Path) -> None:
        """Record the epoch in ``directory``, made to take the place of the one set aside."""
        atomic_write(directory / EPOCH_FILE, f"{self.epoch} {self.owner.hex()}\n".encode())

    def current(self, epoch: int, owner: bytes) -> bool:
        return (epoch, owner) == (self.epoch, self.owner)

    def admit(self, stream: trio.SocketStream) -> int | None:
        """None if a new connection may start a handshake; else what it met: a bound
        (``protocol.BUSY_*``), or ``REFUSED`` (a local peer of another user). Bounded, so that
        a crowd of strangers cannot crowd the engine out: at a bound of handshakes, the oldest
        one is cut instead if it lasted ``CUT_AFTER`` (``_cut``)."""
        sock = stream.socket
        source = source_of(sock)
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                self.said.warning(f"uid {uid}", "refused a local connection from uid %d", uid)
                return REFUSED
        tcp = [slot for key, slots in self._slots.items() if key for slot in slots]
        mine = self._slots.get(source, [])
        busy = None
        if len(self.live) >= MAX_SESSIONS:
            busy = p.BUSY_SESSIONS
        elif not source:
            busy = None if len(mine) < LOCAL_HANDSHAKES or self._cut(mine) else p.BUSY_HANDSHAKES
        elif len(mine) >= PER_SOURCE and not self._cut(mine):
            busy = p.BUSY_SOURCE
        elif len(tcp) >= MAX_HANDSHAKES and not self._cut(tcp):
            busy = p.BUSY_HANDSHAKES
        if busy is not None:
            self.said.warning(
                f"refused {source} {busy}",  # (a line a minute per source and bound met)
                "refused a connection from %s: %s",
                source or "a local peer",
                _BOUNDS[busy],
            )
        return busy

    def _cut(self, slots: list[_Slot]) -> bool:
        """End the oldest of ``slots`` if it has lasted ``CUT_AFTER`` (an honest handshake takes
        milliseconds; one held open on purpose is the likeliest to be the oldest); whether one
        was. Its connection is closed as it unwinds; its slot is free at once."""
        oldest = min(slots, key=lambda slot: slot.started)
        if trio.current_time() - oldest.started < CUT_AFTER:
            return False
        oldest.cut = True
        oldest.scope.cancel()
        self._drop(oldest)
        return True

    def _drop(self, slot: _Slot) -> None:
        slots = self._slots.get(slot.source, [])
        if slot in slots:
            slots.remove(slot)
            if not slots:
                del self._slots[slot.source]

    async def refuse(self, stream: trio.SocketStream, busy: int, plain: bool) -> None:
        """Tell a connection that met a bound that the replica is busy (``HS_BUSY``, the bound
        in its epoch field) once it said hello, so that an engine tells busy from gone and
        tries again soon. Reset instead: a peer refused outright, one that does not say hello
        within ``BUSY_WAIT``, one that expects TLS first (``plain`` false: its TLS handshake
        is the work a bound spares), and any beyond ``MAX_HANDSHAKES`` being answered."""
        if busy == REFUSED or not plain or self._answering >= MAX_HANDSHAKES:
            abort(stream)
            return
        self._answering += 1
        try:
            with trio.move_on_after(BUSY_WAIT) as waited:
                await _exactly(stream, p.HELLO.size)
                await _challenge(stream, p.HS_BUSY, b"", b"", b"", busy)
            if waited.cancelled_caught:
                abort(stream)
        except (ProtocolError, OSError, trio.BrokenResourceError):
            abort(stream)
        finally:
            self._answering -= 1

    async def handshake(
        self, stream: trio.SocketStream, context: ssl.SSLContext | None = None
    ) -> Session:
        """Run the replica's side of the handshake (see ``protocol``), over TLS first when a
        ``context`` is given and the peer came by TCP; the session, or an error once the peer
        was told why (the caller closes the connection)."""
        now = trio.current_time()
        slot = _Slot(
            source_of(stream.socket), now, trio.CancelScope(deadline=now + HANDSHAKE_TIMEOUT)
        )
        self._slots.setdefault(slot.source, []).append(slot)
        try:
            with slot.scope:
                if context is not None and stream.socket.family != socket.AF_UNIX:
                    await _refuse_plain(stream)
                    try:
                        stream = await tls.wrap_server(stream, context)
                    except trio.BrokenResourceError as exc:
                        raise ProtocolError(f"TLS handshake failed: {exc.__cause__}") from None
                return await self._handshake(stream)
            if slot.cut:
                raise ProtocolError(
                    f"handshake cut after {trio.current_time() - now:.1f}s to make room: "
                    "every handshake slot of its source was taken"
                )
            raise ProtocolError("no complete handshake within the deadline")
        finally:
            self._drop(slot)

    async def _handshake(self, stream: trio.SocketStream | trio.SSLStream) -> Session:
        magic, version = p.PREAMBLE.unpack(await _exactly(stream, p.PREAMBLE.size))
        if magic[:2] == TLS_HELLO:  # (said as what it is: the engine's operator has to know)
            raise ProtocolError(
                "a client began a TLS handshake: this replica serves without TLS (an engine "
                "given --tls-ca for it is refused; serve it with --tls-cert/--tls-key)"
            )
        if magic != p.MAGIC:
            raise ProtocolError("not an lhfs client")
        if version != p.VERSION:
            await _challenge(stream, p.HS_VERSION, b"", b"", b"", 0)
            raise ProtocolError(f"client speaks protocol version {version}, not {p.VERSION}")
        rest = await _exactly(stream, p.HELLO.size - p.PREAMBLE.size)
        volume_id, client_nonce = rest[: auth.ID_BYTES], rest[auth.ID_BYTES :]
        key = self.key
        if volume_id != key.id:
            await _challenge(stream, p.HS_WRONG_VOLUME, key.id, b"", b"", 0)
            if volume_id == p.PROBE_VOLUME:  # (no volume's: the TLS handshake just said)
                raise Probe("a client asked whether this replica answers without TLS")
            raise ProtocolError(f"client asked for another volume ({volume_id.hex()})")
        server_nonce = auth.nonce()
        proof = key.server_proof(client_nonce, server_nonce, self.epoch)
        await _challenge(stream, p.HS_OK, key.id, server_nonce, proof, self.epoch)
        client_proof, role, epoch, owner = p.AUTH.unpack(await _exactly(stream, p.AUTH.size))
        expected = key.client_proof(server_nonce, client_nonce, role, epoch, owner)
        if role not in p.ROLES or not auth.same(client_proof, expected):
            await stream.send_all(p.WELCOME.pack(p.HS_DENIED))
            raise ProtocolError("the client could not prove it holds the volume's key")
        if role == p.ENGINE and epoch >= p.MAX_EPOCH:  # (said as such: not as a wrong key)
            await stream.send_all(p.WELCOME.pack(p.HS_EPOCH_RANGE))
            raise ProtocolError(f"refused session epoch {epoch}: out of range")
        if role == p.ENGINE:
            if epoch < self.epoch or (epoch == self.epoch and owner != self.owner):
                await stream.send_all(p.WELCOME.pack(p.HS_STALE))
                log.warning(
                    "refused an engine session of epoch %d (%s): the replica is in epoch %d (%s)",
                    epoch,
                    owner.hex(),
                    self.epoch,
                    self.owner.hex(),
                )
                raise ProtocolError(f"refused an engine of epoch {epoch} <= {self.epoch}")
            if epoch > self.epoch:
                try:
                    self._record_epoch(epoch, owner)
                except OSError as exc:  # (told, so that the engine says why, not "closed")
                    code = exc.errno if exc.errno and exc.errno < 1 << 16 else errno.EIO
                    await stream.send_all(p.WELCOME.pack(p.HS_NO_EPOCH) + p.ERRNO.pack(code))
                    raise ProtocolError(
                        f"cannot record the session epoch {epoch}: {exc.strerror or exc}"
                    ) from None
                log.info("engine session of epoch %d (%s) accepted", epoch, owner.hex()[:12])
            self._fence_older(again=owner != p.NO_OWNER)
        await stream.send_all(p.WELCOME.pack(p.HS_OK))
        if role == p.ENGINE:
            session = Session(role, epoch, owner, stream)
        else:
            session = Session(role, 0, p.NO_OWNER, stream)
        if p.sealed(stream):
            up, down = key.frame_keys(client_nonce, server_nonce)
            session.seals = pair(down, up)
        return session

    def _fence_older(self, again: bool = False) -> None:
        """Reset every engine session older than the replica's epoch now, as a new one is
        accepted, and with ``again`` (an engine's session in the epoch it holds already: it
        connects again, and its old connection, marked failed, may still carry writes it sent
        before) every one of the same epoch too. Nothing still queued on them is read (a
        reset, not a close that lets buffered data in). (Sessions without an engine identity,
        tools', are not engines connecting again: they share epoch 0 side by side.)"""
        for session in list(self.live):
            older = not self.current(session.epoch, session.owner)
            if session.role == p.ENGINE and not session.fenced and (older or again):
                log.warning(
                    "engine session of epoch %d fenced: a session of epoch %d took over; "
                    "whatever it still sends is refused",
                    session.epoch,
                    self.epoch,
                )
                session.fenced = True
                abort(session.stream)
                session.scope.cancel()

    def check(self, session: Session) -> None:
        """Refuse a request of an engine session that a newer one fenced."""
        if session.role == p.ENGINE and (
            session.fenced or not self.current(session.epoch, session.owner)
        ):
            session.fenced = True
            raise Fenced(
                f"this session (epoch {session.epoch}) was replaced by a newer one "
                f"(epoch {self.epoch}); nothing it sends is applied"
            )


def source_of(sock: Any) -> str:
    """Where a TCP peer comes from, as far as bounds go ("" for the local socket): its address,
    but loopback as one (a local stranger has all of 127/8) and IPv6 by /64 (one host has as
    many addresses in it as it likes)."""
    if sock.family == socket.AF_UNIX:
        return ""
    try:
        address = ipaddress.ip_address(str(sock.getpeername()[0]).split("%")[0])
    except (OSError, ValueError):
        return "?"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def kind_of(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, for ``Quiet``: its message up to the first detail (a
    colon or a parenthesis), numbers made one. Kinds come from the handful of messages the
    handshake raises and the errno names of OSError, so a stranger cannot make them many."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "OSError")
    text = re.split(r"[:(]", str(exc), maxsplit=1)[0]
    return re.sub(r"[0-9.]+", "N", text).strip()[:80]


class Quiet:
    """Warnings about strangers, at most one line per kind and source every ``LOG_EVERY``
    seconds, saying how many were not logged: a flood of connections must not flood the log
    (and rotate away what it held)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last said, held back)

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        said, held = self._last.get(key, (-LOG_EVERY, 0))
        if now - said < LOG_EVERY:
            self._last[key] = (said, held + 1)
            return
        if len(self._last) > 4096:  # (bounded: a stranger with many sources)
            self._last.clear()
        self._last[key] = (now, 0)
        more = f" (and {held} more like it since the last line)" if held else ""
        log.warning(message + more, *args)


_BOUNDS = {
    p.BUSY_SOURCE: f"{PER_SOURCE} handshakes from it under way",
    p.BUSY_HANDSHAKES: "every handshake slot taken",
    p.BUSY_SESSIONS: f"{MAX_SESSIONS} sessions served",
}


def abort(stream: trio.SocketStream | trio.SSLStream) -> None:
    """Make the next close of ``stream`` a reset: data still unsent is dropped, not delivered."""
    with contextlib.suppress(OSError):
        sock = p.socket_of(stream)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _challenge(
    stream: trio.SocketStream | trio.SSLStream,
    status: int,
    volume_id: bytes,
    nonce: bytes,
    proof: bytes,
    epoch: int,
) -> None:
    await stream.send_all(
        p.CHALLENGE.pack(p.MAGIC, p.VERSION, status, volume_id, nonce, proof, epoch)
    )


async def _refuse_plain(stream: trio.SocketStream) -> None:
    """On a replica served with TLS, a client that speaks lhfs without TLS is said as such
    (the TLS layer said "wrong version number"), and a probe (``Probe``) is not said at all:
    both are told apart by the first bytes, looked at without taking them."""
    first = await stream.socket.recv(p.HELLO.size, socket.MSG_PEEK)
    if not first.startswith(p.MAGIC):
        return
    # (taken: a connection closed with bytes unread is reset, and the client would not be
    # told that the replica closed it before answering, nor so pointed to --tls-ca)
    await _exactly(stream, len(first))
    probe = p.PREAMBLE.size + len(p.PROBE_VOLUME)
    if len(first) >= probe and first[p.PREAMBLE.size : probe] == p.PROBE_VOLUME:
        raise Probe("a client asked whether this replica answers without TLS")
    raise ProtocolError(
        "a client spoke without TLS: this replica serves TLS only (an engine reaches it with "
        "the CA given to replica add --tls-ca)"
    )


async def _exactly(stream: trio.SocketStream | trio.SSLStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        if not more:
            raise ProtocolError("connection closed during the handshake")
        data += more
    return data
