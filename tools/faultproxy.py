"""A fault-injecting TCP proxy to put between lhfs and an S3 server in tests.

Each new connection is relayed to the upstream unless a fault is scheduled for it:

- ``refuse``: closed at once with a reset (what a client sees as refused/reset);
- ``reset``: relayed until either side has sent ``reset_after`` bytes, then reset mid-body;
- ``503``: answered ``503 Service Unavailable`` without reaching the upstream;
- ``delay``: relayed after ``delay`` seconds.

``schedule(modes)`` queues faults for the next connections; ``fail_every(n, modes)`` puts a
fault on every n-th connection, cycling through ``modes``; ``stop()``/``resume()`` refuse all
connections for a while (an endpoint that went away); ``cut()`` stops and also resets every
connection open at that moment (its process died); ``clear()`` drops every scheduled fault.
Setting ``rate`` (bytes per second) throttles every relayed connection's answers, open ones
included, which stretches long transfers for tests that must act in the middle of one;
``send_rate`` does the same to what the clients send (a slow link both ways: set both).

``hold()`` makes the connections open at that moment keep what their client sends instead of
relaying it (a link that stopped delivering, the bytes waiting in a send queue); ``release()``
delivers it all to the upstream, also for connections whose client has gone meanwhile: what TCP
does when a partitioned link comes back. ``delivered``/``undelivered`` count the held bytes that
reached the upstream or found its connection closed. Later connections are relayed as usual.

``tamper(old, new)`` rewrites ``old`` as ``new`` in what the clients of the connections open at
that moment send (a host on the path changing data in flight), or with ``answers`` in what the
upstream sends them; ``tampered`` counts the rewrites. ``connections`` counts the connections
accepted (a test waits on it for a client to have opened its own).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN. Another thread may be blocked reading this socket, which
    keeps it alive past ``close``: shutting the read side down first wakes that thread, and the
    last close then sends the reset."""
    try:  # (closed meanwhile by the thread relaying it: nothing left to reset)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
    finally:
        sock.close()


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        reset_after: int = 2000,
        delay: float = 2.0,
        listen: str = "127.0.0.1",
    ):
        self.upstream = upstream
        self.reset_after = reset_after
        self.delay = delay
        self._queue: deque[str] = deque()
        self._every: tuple[int, itertools.cycle] | None = None
        self._stopped = False
        self._count = 0
        self.faults = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((listen, 0))
        self.host = listen
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self.rate: float | None = None
        self.send_rate: float | None = None
        self._held = threading.Event()  # set: hold what the clients of old connections send
        self._held_upto = 0  # connections up to this number are held
        self._released = threading.Event()
        self.delivered = self.undelivered = 0
        self._tamper: tuple[int, bytes, bytes, bool] | None = None  # (up to, old, new, answers)
        self.tampered = 0
        self._open: set[socket.socket] = set()  # clients of relayed connections (for ``cut``)
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        return self._count

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def schedule(self, modes: Iterable[str]) -> None:
        with self._lock:
            self._queue.extend(modes)

    def fail_every(self, n: int, modes: Iterable[str]) -> None:
        with self._lock:
            self._every = (n, itertools.cycle(list(modes)))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._every = None

    def hold(self) -> None:
        with self._lock:
            self._held_upto = self._count
        self._released.clear()
        self._held.set()

    def tamper(self, old: bytes, new: bytes, answers: bool = False) -> None:
        if len(old) != len(new):
            raise ValueError("a rewrite keeps the length (the stream's framing stays whole)")
        with self._lock:
            self._tamper = (self._count, old, new, answers)

    def _rewrite(self, data: bytes, number: int, answers: bool) -> bytes:
        tamper = self._tamper
        if tamper is None or number > tamper[0] or answers != tamper[3] or tamper[1] not in data:
            return data
        self.tampered += data.count(tamper[1])
        return data.replace(tamper[1], tamper[2])

    def release(self) -> None:
        self._held.clear()
        self._released.set()

    def stop(self) -> None:
        self._stopped = True

    def cut(self) -> None:
        with self._lock:
            self._stopped = self._cut = True
            cut, self._open = self._open, set()
        for client in cut:
            _reset(client)

    def resume(self) -> None:
        self._stopped = self._cut = False

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    def _next_mode(self) -> str:
        with self._lock:
            self._count += 1
            if self._stopped:
                return "refuse"
            if self._queue:
                return self._queue.popleft()
            if self._every and self._count % self._every[0] == 0:
                return next(self._every[1])
            return "pass"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._next_mode()
            if mode != "pass":
                self.faults += 1
            number = self._count
            threading.Thread(target=self._serve, args=(client, mode, number), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str, number: int = 0) -> None:
        if mode == "refuse":
            _reset(client)
            return
        if mode == "503":
            try:
                client.settimeout(10)
                client.recv(65536)
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            except OSError:
                pass
            client.close()
            return
        if mode == "delay":
            time.sleep(self.delay)
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        with self._lock:
            cut = self._cut  # (accepted just before a cut: reset all the same)
            if not cut:
                self._open.add(client)
        if cut:
            upstream.close()
            _reset(client)
            return
        limit = self.reset_after if mode == "reset" else None
        done = threading.Event()
        threading.Thread(
            target=self._pump, args=(upstream, client, limit, done, True, number), daemon=True
        ).start()
        self._pump(client, upstream, limit, done, number=number)
        done.set()
        with self._lock:
            self._open.discard(client)

    def _deliver(self, dst: socket.socket, kept: list[bytes]) -> None:
        data = b"".join(kept)
        kept.clear()
        try:
            dst.sendall(data)
            self.delivered += len(data)
        except OSError:
            self.undelivered += len(data)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        limit: int | None,
        done: threading.Event,
        answers: bool = False,
        number: int = 0,
    ) -> None:
        sent = 0

        def held() -> bool:
            return not answers and self._held.is_set() and number <= self._held_upto

        kept: list[bytes] = []  # what the client sent while held
        try:
            while not done.is_set() or kept:
                if kept and not held():
                    self._deliver(dst, kept)
                    continue
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    if kept:  # the client is gone: what it sent still arrives, on release
                        self._released.wait()
                        self._deliver(dst, kept)
                    break
                data = self._rewrite(data, number, answers)
                if held():
                    kept.append(data)
                    continue
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    _reset(src)
                    _reset(dst)
                    return
                rate = self.rate if answers else self.send_rate
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            done.set()
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
