"""What an attached volume exposes to Prometheus, and how it counts without slowing I/O.

The I/O path only adds to plain integers (``IoStats``: a few additions and one bisect per
request; a Prometheus client metric takes a lock and costs ten times as much). The numbers
become metrics only when they are scraped: ``VolumeCollector`` reads them, with the engine's
state, its replicas' modes and rebuild progress, and the last scrub and backup, when
Prometheus asks (once a second at most: ``Answers``). Names follow Prometheus' conventions:
the ``lhfs_`` prefix, ``_total`` for counters, ``_bytes`` and ``_seconds`` for units; every
series has the ``volume`` label.

The HTTP server (the standard library's, in a thread, with ``prometheus_client``'s
encoders; see ``serve`` for its bounds) is started only when an address is given (``volume
attach --metrics HOST:PORT``); its import costs nothing otherwise.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from lhfs.core.errors import Busy, LhfsError

log = logging.getLogger("lhfs.metrics")

OPS = ("read", "write", "trim", "flush")
# latency bucket bounds (seconds): from a page-cache hit to a replica timing out
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STATES = ("healthy", "degraded", "faulted")
MODES = ("RW", "WO", "ERR")


class IoStats:
    """Counters of the requests a volume served, updated from the I/O path."""

    __slots__ = ("buckets", "bytes", "errors", "inflight", "ops", "seconds")

    def __init__(self) -> None:
        self.ops = dict.fromkeys(OPS, 0)
        self.bytes = dict.fromkeys(OPS, 0)
        self.errors = dict.fromkeys(OPS, 0)
        self.seconds = dict.fromkeys(OPS, 0.0)
        self.buckets = {op: [0] * (len(BUCKETS) + 1) for op in OPS}
        self.inflight = 0

    def started(self) -> float:
        self.inflight += 1
        return time.monotonic()

    def done(self, op: str, nbytes: int, since: float, failed: bool) -> None:
        elapsed = time.monotonic() - since
        self.inflight -= 1
        self.ops[op] += 1
        self.bytes[op] += nbytes
        self.seconds[op] += elapsed
        self.buckets[op][bisect_left(BUCKETS, elapsed)] += 1
        if failed:
            self.errors[op] += 1


class VolumeCollector:
    """Metrics of one attached volume, made when scraped; ``snapshot()`` says what the
    engine knows now (see ``daemon.Daemon.metrics_view``)."""

    def __init__(self, volume: str, stats: IoStats, snapshot: Callable[[], dict[str, Any]]):
        self.volume = volume
        self.stats = stats
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        vol, stats = self.volume, self.stats
        ops = CounterMetricFamily("lhfs_io_operations", "Requests served", labels=["volume", "op"])
        moved = CounterMetricFamily(
            "lhfs_io_bytes", "Bytes read, written or trimmed", labels=["volume", "op"]
        )
        errors = CounterMetricFamily(
            "lhfs_io_errors", "Requests that failed", labels=["volume", "op"]
        )
        latency = HistogramMetricFamily(
            "lhfs_io_latency_seconds", "Time to answer a request", labels=["volume", "op"]
        )
        for op in OPS:
            ops.add_metric([vol, op], stats.ops[op])
            moved.add_metric([vol, op], stats.bytes[op])
            errors.add_metric([vol, op], stats.errors[op])
            cumulative, total = [], 0
            for bound, count in zip((*BUCKETS, float("inf")), stats.buckets[op], strict=True):
                total += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
            latency.add_metric([vol, op], cumulative, stats.seconds[op])
        yield from (ops, moved, errors, latency)
        yield gauge("lhfs_io_inflight", "Requests being served", [([vol], stats.inflight)])
        view = self.snapshot()
        yield gauge(
            "lhfs_volume_state",
            "1 for the volume's state",
            [([vol, s], int(view["state"] == s)) for s in STATES],
            ["state"],
        )
        yield gauge("lhfs_volume_size_bytes", "The volume's size", [([vol], view["size"])])
        refused = CounterMetricFamily(
            "lhfs_volume_refused_writes",
            "Writes, trims and flushes every healthy replica refused (their disks were full)",
            labels=["volume"],
        )
        refused.add_metric([vol], view["refused_writes"])
        yield refused
        modes, progress, copied, held, free = [], [], [], [], []
        failures = CounterMetricFamily(
            "lhfs_replica_failures", "Times a replica was marked ERR", labels=["volume", "replica"]
        )
        restarts = CounterMetricFamily(
            "lhfs_replica_restarts",
            "Times the engine started a local replica's process again",
            labels=["volume", "replica"],
        )
        for replica in view["replicas"]:
            rid = replica["id"]
            modes += [([vol, rid, m], int(replica["mode"] == m)) for m in MODES]
            progress.append(([vol, rid], replica["rebuild_progress"] or 0.0))
            copied.append(([vol, rid], (replica["rebuild_stats"] or {}).get("bytes_copied", 0)))
            failures.add_metric([vol, rid], replica["failures"])
            restarts.add_metric([vol, rid], replica["restarts"])
            if replica.get("disk_bytes") is not None:
                held.append(([vol, rid], replica["disk_bytes"]))
            if replica.get("disk_free") is not None:
                free.append(([vol, rid], replica["disk_free"]))
        yield gauge("lhfs_replica_mode", "1 for each replica's mode", modes, ["replica", "mode"])
        yield from (failures, restarts)
        yield gauge(
            "lhfs_replica_disk_bytes", "What a replica's directory takes on its disk", held,
            ["replica"],
        )  # fmt: skip
        yield gauge(
            "lhfs_replica_disk_free_bytes",
            "What a replica's disk has free to others than root (statvfs f_bavail)",
            free,
            ["replica"],
        )
        yield gauge(
            "lhfs_rebuild_progress_percent",
            "Progress of a replica's rebuild",
            progress,
            ["replica"],
        )
        yield gauge(
            "lhfs_rebuild_copied_bytes",
            "Bytes the last rebuild of a replica copied",
            copied,
            ["replica"],
        )
        scrub = view.get("scrub") or {}
        yield gauge(
            "lhfs_scrub_last_timestamp_seconds",
            "When the last scrub ended",
            [([vol], scrub.get("finished", 0.0))],
        )
        yield gauge(
            "lhfs_scrub_damaged_replicas",
            "Replicas the last scrub found corrupt",
            [([vol], len(scrub.get("damaged", {})))],
        )
        backups = view.get("backups") or []
        for name, help_text in (
            ("lhfs_backup_last_timestamp_seconds", "When the last backup to a target ended"),
            ("lhfs_backup_last_duration_seconds", "How long the last backup to a target took"),
            ("lhfs_backup_last_uploaded_bytes", "What the last backup to a target sent"),
        ):
            key = name.split("_last_")[1].removesuffix("_seconds").removesuffix("_bytes")
            rows = [([vol, b["target"]], b.get(key) or 0) for b in backups]
            yield gauge(name, help_text, rows, ["target"])
        restore = view.get("restored") or {}
        yield gauge(
            "lhfs_restore_duration_seconds",
            "How long the restore that made the volume took",
            [([vol], restore.get("duration", 0.0))],
        )
        yield gauge(
            "lhfs_restore_bytes",
            "What the restore that made the volume fetched",
            [([vol], restore.get("bytes", 0))],
        )


def gauge(
    name: str, help_text: str, rows: list[tuple[list[str], float]], labels: list[str] = ()
) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, help_text, labels=["volume", *labels])
    for values, value in rows:
        family.add_metric(values, value)
    return family


PLAIN = "text/plain; charset=utf-8"
FRESH_FOR = 1.0  # seconds an answer is served again before it is made anew
MAX_SCRAPES = 32  # connections served at once; more are closed at once
SCRAPE_TIMEOUT = 5.0  # seconds a connection may take to send its request
ERRORS_EVERY = 60.0  # seconds between two log lines of a scrape that failed on our side


class Answers:
    """What a scrape is answered, made at most once a ``FRESH_FOR`` per format and by one
    thread at a time: a flood of scrapes (no client is authenticated) then costs the engine
    one collection a second, not one each, while Prometheus (every 15 s) sees it fresh."""

    def __init__(self, registry: Any) -> None:
        import threading

        self.registry = registry
        self.lock = threading.Lock()
        self.made: dict[tuple[str, bool], tuple[float, bytes]] = {}

    def get(self, accept: str | None, encoding: str | None) -> tuple[str, bool, bytes]:
        """(content type, gzipped, body) for a request's ``Accept`` and ``Accept-Encoding``."""
        import gzip

        from prometheus_client.exposition import choose_encoder, gzip_accepted

        # (one of two answers, whatever the client's Accept says: its version and escaping
        # text came back in the content type, a key per request, each answer kept for ever)
        openmetrics = choose_encoder(accept)[1].startswith("application/openmetrics-text")
        encoder, content_type = choose_encoder(
            "application/openmetrics-text" if openmetrics else None
        )
        zipped = gzip_accepted(encoding)
        with self.lock:
            made, body = self.made.get((content_type, zipped), (-FRESH_FOR, b""))
            if time.monotonic() - made >= FRESH_FOR:
                body = encoder(self.registry)
                body = gzip.compress(body) if zipped else body
                self.made[content_type, zipped] = (time.monotonic(), body)
        return content_type, zipped, body


def serve(address: str, collector: Any) -> tuple[str, int]:
    """Serve ``collector`` on ``address`` (``HOST:PORT``; port 0 picks one) from a thread;
    the address bound (an IPv6 host in brackets). Bounded: a client that opens connections
    and sends half a request holds a thread each (the library's own server has neither a
    limit nor a timeout), and answers are made once a second at most (``Answers``)."""
    import contextlib
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    from prometheus_client import CollectorRegistry

    from lhfs.wire.client import parse_address

    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    open_now: dict[Any, float] = {}  # connection -> when it is cut, whatever it is doing

    answers = Answers(registry)

    class Handler(BaseHTTPRequestHandler):
        timeout = SCRAPE_TIMEOUT  # (each read; the whole exchange: ``reap``)

        def do_GET(self) -> None:
            """``/metrics``; ``/`` says where they are; any other path is not found (all
            were answered with the metrics, ``/../../etc/passwd`` too)."""
            path = urlsplit(self.path).path
            if path != "/metrics":
                self.answer(200 if path == "/" else 404, PLAIN, b"metrics: /metrics\n")
                return
            content_type, zipped, body = answers.get(
                self.headers.get("Accept"), self.headers.get("Accept-Encoding")
            )
            self.answer(200, content_type, body, zipped)

        def answer(self, status: int, content_type: str, body: bytes, zipped: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if zipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Log nothing: a line per request would let any client flood the log."""

        def setup(self) -> None:
            super().setup()
            open_now[self.connection] = time.monotonic() + 2 * SCRAPE_TIMEOUT

        def finish(self) -> None:
            open_now.pop(self.connection, None)
            with contextlib.suppress(OSError):
                super().finish()

    def reap() -> None:  # (a client trickling a byte at a time is let go all the same)
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            for connection, deadline in list(open_now.items()):
                if now > deadline:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = MAX_SCRAPES  # (5: a burst of connections waited a second each)
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        slots = threading.BoundedSemaphore(MAX_SCRAPES)
        quiet_until = 0.0  # (until when a failed scrape is not logged)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            """Log a failed scrape in one line a minute at most, and a client that left
            early not at all: the library printed a traceback to standard error (the
            service's log) for each, so anyone who could connect could flood the log and
            rotate its history away."""
            exc = sys.exc_info()[1]
            if isinstance(exc, ConnectionError | TimeoutError):
                return
            now = time.monotonic()
            if now >= Server.quiet_until:
                Server.quiet_until = now + ERRORS_EVERY
                log.warning("a metrics scrape from %s failed: %r", client_address[0], exc)

    try:
        server = Server((host, port), Handler)
    except OSError as exc:  # (taken, or a name or address not this host's: refused, exit 1)
        kind = Busy if exc.errno == errno.EADDRINUSE else LhfsError
        raise kind(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    threading.Thread(target=reap, daemon=True, name="metrics-reaper").start()
    bound = server.server_address
    host = str(bound[0])  # (an IPv6 address in brackets: HOST:PORT and URLs stay whole)
    return (f"[{host}]" if ":" in host else host), int(bound[1])
