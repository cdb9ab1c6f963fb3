"""Start lhfs processes and wait for them without sleeping blindly.

Used by the engine (its local replicas), the tests and the benchmarks: every wait has a
condition and a deadline, and every
process started here is stopped by the caller's finaliser.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LHFS = str(Path(sys.executable).with_name("lhfs"))
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies, so a killed engine leaves no
    replica holding its directory. Must be used from the parent's main thread."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def read_line_matching(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    """Read ``proc``'s stdout until a line matches ``pattern``; fail if it exits or times out.

    Reads the pipe's descriptor directly: a buffered reader could hold the awaited line while
    the descriptor shows nothing more to read."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    pending = b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            match = regex.search(line.decode(errors="replace"))
            if match:
                return match
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                status = proc.wait()
                raise RuntimeError(f"process exited ({status}) before printing {pattern!r}")
            pending += data


class ReplicaProcess:
    """A ``lhfs replica serve`` child process on a free loopback port; with ``local``, also on
    a Unix socket of that name for its engine (see ``replica_server.local_listener``)."""

    def __init__(
        self,
        directory: Path,
        port: int = 0,
        log: Path | None = None,
        tied_to_parent: bool = False,
        host: str = "127.0.0.1",
        wait: bool = True,
        local: str | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.log = log or self.dir.with_name(self.dir.name + ".log")
        self.local = local
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        command = [LHFS, "replica", "serve", "--dir", str(self.dir), "--listen", f"{host}:{port}"]
        self.proc = subprocess.Popen(
            command + (["--local", local] if local else []),
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent if tied_to_parent else None,
        )
        self.address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> str:
        """Block until the replica listens; its address. (Blocking: from a thread in trio.)"""
        match = read_line_matching(self.proc, r"serving .* on (\S+):(\d+)")
        self.address = f"{match.group(1)}:{match.group(2)}"
        return self.address

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush or clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode
