"""The current engine's shared-memory connection, served by a thread of its own.

Why a thread: on the event loop every burst of requests costs a round of the loop (the socket
registered with epoll, a wait, the task rescheduled, then the read). Measured with a ping-pong
over a Unix socket pair, a trio server spends 37 us of CPU per message where a thread blocked in
the kernel spends 15; with three local replicas, each pays that for every burst of the engine's
4 KiB writes, on two cores shared with the engine and the application.

Why it is safe: nothing in the store was written to be used from two threads at once, so the
event loop and this thread take turns on one lock (``StoreLock``). The event loop holds it
whenever it runs and lets go only while it waits for I/O (a trio instrument's
``before_io_wait``/``after_io_wait``); the thread holds it while it serves what one read from
its socket brought. Requests are therefore served exactly as if they ran on the event loop
between two of its steps, which is how they ran before. Only the quick operations (reads,
writes, trims, flushes) are served here; anything else (a call, a checksum request) is handed
to the event loop in arrival order and waited for, so that what needs the loop runs there.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import outcome
import trio

from lhfs.core.errors import ProtocolError
from lhfs.wire import protocol as p

# Answers to a burst of requests go back in groups of at most this many (or this many bytes),
# each sent as soon as it is ready: the client works on one group while this side works on the
# next, instead of each side waiting for the other's whole burst (measured with 16 requests in
# flight: about twice the operations per second for 4 KiB random reads and writes, and half as
# much again for 1 MiB reads, against one send per burst).
GROUP = 8
GROUP_BYTES = 256 << 10  # a large answer (a 1 MiB read) goes alone, not copied into a group


class Group:
    """The answers queued since the last send, counted against ``GROUP``/``GROUP_BYTES`` (the
    event loop's connection loop and the thread send by the same rule)."""

    __slots__ = ("answers", "size")

    def __init__(self) -> None:
        self.answers = self.size = 0

    def full(self, pieces: list[p.Part]) -> bool:
        """Count one answer of ``pieces``; True when they are to be sent (counting anew)."""
        self.answers += 1
        self.size += sum(map(len, pieces))
        if self.answers < GROUP and self.size < GROUP_BYTES:
            return False
        self.answers = self.size = 0
        return True


# What the thread answers itself; everything else goes to the event loop.
QUICK = frozenset({p.WRITE_SHM, p.READ_SHM, p.READ_REPLY, p.WRITE, p.READ, p.TRIM, p.FLUSH})


class StoreLock(trio.abc.Instrument):
    """One lock for the store, held by the event loop except while it waits for I/O, handed
    over in turns.

    A plain lock is not fair: whoever releases it and asks again at once usually gets it
    back before a woken waiter runs. So each side yields to the other: ``waiting`` is set
    while the event loop wants the lock back, and a thread lets it in before taking the lock
    again; ``wanted`` counts threads waiting for it, and the event loop, between two of its
    rounds, lets one that has waited longer than ``PATIENCE`` have its turn first. Without the
    second, a loop kept busy by a long request done in steps (a checksum of the volume, a
    snapshot removal) would take the lock back at every round and leave the engine's I/O
    waiting for the whole request. (Only after ``PATIENCE``: a loop yielding at once, at every
    round, spins on two cores that the engine and the other replicas need: 4 KiB writes to
    three local replicas, 16.2k IOPS against 17.1k with the wait.)"""

    PATIENCE = 0.001

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()  # (guards ``wanted``: several threads may change it)
        self.waiting = False
        self.wanted = 0
        self.turns = 0  # how often a thread took the lock (changed only by its holder)
        self.since = 0.0  # when the first of the threads now waiting began to wait

    def before_io_wait(self, timeout: float) -> None:
        self._lock.release()

    def after_io_wait(self, timeout: float) -> None:
        if self.wanted and time.monotonic() - self.since > self.PATIENCE:  # its turn first
            turn = self.turns
            while self.wanted and self.turns == turn:
                time.sleep(0)
        self.waiting = True
        self._lock.acquire()
        self.waiting = False

    def take(self) -> None:
        """Taken by a thread for a batch of requests, or by the event loop when it starts."""
        while self.waiting:  # (the loop is being woken: a few microseconds)
            time.sleep(0)
        with self._count:
            if not self.wanted:
                self.since = time.monotonic()
            self.wanted += 1
        self._lock.acquire()
        with self._count:
            self.wanted -= 1
        self.turns += 1

    def give(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.take()

    def __exit__(self, *exc: object) -> None:
        self.give()


class Connection:
    """The thread's side of one connection: it reads and parses frames, answers the quick
    ones under the store lock and hands the others to ``slow`` on the event loop."""

    def __init__(
        self,
        fd: int,
        frames: p.FrameBuffer,
        out: p.Outbox,
        lock: StoreLock,
        quick: Callable[[int, int, memoryview], list[p.Part]],
        slow: Callable[[int, int, bytes], Awaitable[None]],
        frame_timeout: float,
    ) -> None:
        self.fd = fd
        self.frames = frames
        self.out = out
        self.lock = lock
        self.quick = quick
        self.slow = slow
        self.frame_timeout = frame_timeout
        self.stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.stop, select.POLLIN)

    async def serve(self) -> None:
        """Run the thread until the peer goes, a frame breaks the rules, or this is
        cancelled (the connection closes or is fenced: the thread is told at once)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                try:
                    ended = await trio.to_thread.run_sync(
                        outcome.capture, self._run, abandon_on_cancel=False
                    )
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            os.close(self.stop)
        ended.unwrap()  # (what ended the thread, raised here as itself, not in a group)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            os.eventfd_write(self.stop, 1)

    def _wait(self, events: int, timeout: float | None) -> bool:
        """Wait without the lock until the socket is ready; False once told to stop."""
        self._poll.register(self.fd, events)
        ready = self._poll.poll(None if timeout is None else timeout * 1000)
        if not ready and timeout is not None:
            raise ProtocolError(f"a frame stayed incomplete for {timeout:.0f}s")
        return not any(fd == self.stop for fd, _ in ready)

    def _run(self) -> None:
        """The thread: as a batch thread for the scheduler while it serves (see ``_batch``)."""
        with _batch():
            self._serve()

    def _serve(self) -> None:
        frames = self.frames
        while True:
            handed = self._serve_buffered()
            if handed is not None:
                trio.from_thread.run(self.slow, *handed)
                continue
            timeout = self.frame_timeout if frames.pending else None
            if not self._wait(select.POLLIN, timeout):
                return
            with self.lock:  # (the receive buffers' shared budget is the event loop's too)
                try:
                    n = frames.read(self.fd)
                except BlockingIOError:
                    continue
            if not n:
                return

    def _serve_buffered(self) -> tuple[int, int, bytes] | None:
        """Answer the complete frames received so far, up to the first that is not quick,
        which is returned (copied) for the event loop."""
        out = self.out
        group = Group()
        with self.lock:
            try:
                for request_id, op, payload in self.frames.frames():
                    if op not in QUICK:
                        return request_id, op, bytes(payload)
                    pieces = self.quick(request_id, op, payload)
                    out.add(pieces)
                    if group.full(pieces):
                        self._send()
            finally:
                self._send()
        return None

    def _send(self) -> None:
        """Send every answer queued, waiting (without the lock) for room if the peer is slow
        to read: a peer that reads no answers gets no more work done."""
        out = self.out
        while not out.send_some():
            self.lock.give()
            try:
                if not self._wait(select.POLLOUT, None):
                    raise trio.ClosedResourceError("the connection is closing")
            finally:
                self.lock.take()


@contextlib.contextmanager
def _batch() -> Iterator[None]:
    """Run the calling thread under ``SCHED_BATCH``, then as before. Why: the engine is the one
    stage every request passes, and each of its sends wakes this thread; a woken thread of the
    normal class may take the engine's core from it at once, which holds up every request in
    flight. A batch thread waits for a free core or for the engine's turn to end. fio through
    the device (``bench/fio_bench.py``, median of 3), 4 KiB random writes and reads: with three
    local replicas 16.9k and 16.8k writes, 38.1k and 34.8k reads against 14.8k and 15.7k
    writes, 32.6k and 35.7k reads as normal threads; with one, 40.7k writes, 38.2k reads against
    38.0k and 37.4k."""
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # (not allowed here: it runs as it is)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, *before)
