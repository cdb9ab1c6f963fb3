"""What a metrics endpoint does with clients that misbehave, and what it costs at most."""

from __future__ import annotations

import logging
import socket
import struct
import threading

import pytest
from prometheus_client.core import GaugeMetricFamily

from lhfs.core.procs import wait_for
from lhfs.engine.metrics import serve


class Counted:
    """A collector that counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> list[GaugeMetricFamily]:
        self.calls += 1
        return [GaugeMetricFamily("lhfs_test_one", "one", value=1)]


def handlers() -> int:
    """Threads serving a metrics connection now (in this process)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_clients_that_reset_before_the_answer_log_nothing(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty clients that ask and reset the connection at once: nothing on standard error
    (each wrote a 23-line traceback into the service's log) and no log line."""
    host, port = serve("127.0.0.1:0", Counted())
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    wait_for(lambda: handlers() == 0, 20, "the connections to be served")
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("lhfs")], caplog.text


def test_a_scrape_that_fails_here_is_logged_in_one_line_a_minute(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that fails: five scrapes make one log line, without a traceback."""

    class Failing:
        def collect(self) -> list[GaugeMetricFamily]:
            raise RuntimeError("no view")

    host, port = serve("127.0.0.1:0", Failing())
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert sock.recv(1 << 16) == b""  # (closed: no answer)
    wait_for(lambda: handlers() == 0, 20, "the scrapes to be served")
    assert "Traceback" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lhfs")]
    assert len(lines) == 1 and "no view" in lines[0] and "\n" not in lines[0], lines
