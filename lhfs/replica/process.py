"""A ``lhfs replica serve`` child process: what an engine starts for each local replica, and
what the tests and benchmarks start on loopback. Every process started here is stopped by its
owner (the engine's shutdown, a test's finaliser)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lhfs.core import logs
from lhfs.core.procs import LHFS, child_env, die_with_parent, read_line_matching
from lhfs.wire.auth import VolumeKey
from lhfs.wire.client import format_address


class ReplicaProcess:
    """A ``lhfs replica serve`` child process on a free loopback port; with ``local``, also on
    a Unix socket of that name for its engine (see ``lhfs.replica.server.local_listener``)."""

    def __init__(
        self,
        directory: Path,
        key_file: Path,
        port: int = 0,
        log: Path | None = None,
        tied_to_parent: bool = False,
        host: str = "127.0.0.1",
        wait: bool = True,
        local: str | None = None,
        tls: tuple[Path, Path] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.dir = Path(directory)
        self.key = VolumeKey.load(key_file)  # what a client of this replica must hold
        self.log = log or self.dir.with_name(self.dir.name + ".log")
        self.local = local
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - lives as long as the process
        command = [
            *wrap,  # (another host: ``ip netns exec HOST``)
            LHFS,
            "replica",
            "serve",
            "--dir",
            str(self.dir),
            "--listen",
            format_address(host, port),
            "--key-file",
            str(key_file),
            "--log",
            str(self.log),
        ]
        if tls:
            command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.proc = subprocess.Popen(
            command + (["--local", local] if local else []),
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env={**child_env(), "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent if tied_to_parent else None,
        )
        self.address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> str:
        """Block until the replica listens; its address. (Blocking: from a thread in trio.)
        One that exits first raises ``RuntimeError`` with the last line it logged (its error)."""
        try:
            match = read_line_matching(self.proc, r"serving .* on (\S+):(\d+)")
        except RuntimeError:
            said = logs.last_line(self.log)
            raise RuntimeError(f"it exited ({self.proc.returncode}): {said}") from None
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
