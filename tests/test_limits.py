"""Limits lifted: what used to be left for later, or said only in part."""

from __future__ import annotations

import socket
from pathlib import Path

from lhfs.core.procs import wait_for
from lhfs.wire import protocol as p
from lhfs.wire.client import parse_address


def _handshake_once(address: str, hello: bytes) -> None:
    """Send ``hello`` to a replica and wait until it closes the connection (it has logged
    whatever it logs about it by then)."""
    with socket.create_connection(parse_address(address), timeout=10) as sock:
        sock.sendall(hello)
        while sock.recv(4096):
            pass


def test_handshake_failures_are_logged_a_line_a_minute_per_kind(
    tmp_path: Path, replica_factory
) -> None:
    """Failed handshakes from one source are logged a line a minute per kind: a second kind in
    the same minute is said (it was held back behind the first), a second of a kind is not."""
    replica = replica_factory(tmp_path / "r")
    lines = lambda: [  # noqa: E731
        line for line in replica.log.read_text().splitlines() if "during the handshake" in line
    ]
    _handshake_once(replica.address, b"HTTP/1")
    wait_for(lambda: len(lines()) == 1, 10, "the first failed handshake to be logged")
    _handshake_once(replica.address, b"GET / ")
    other = p.HELLO.pack(p.MAGIC, p.VERSION, b"\x01" * 16, bytes(32))
    _handshake_once(replica.address, other)
    wait_for(lambda: len(lines()) == 2, 10, "the other kind to be logged")
    said = lines()
    assert "not an lhfs client" in said[0] and "another volume" in said[1], said
