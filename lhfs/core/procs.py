"""Start lhfs processes and wait for them without sleeping blindly.

Used by the engine (its local replicas), volume management, the tests and the benchmarks:
every wait has a condition and a deadline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# How lhfs starts its own processes (engine, replicas, DR follower): the installed command,
# never ``python -m lhfs``, which would first look for a package named ``lhfs`` in the
# directory the operator ran the command from (a root service importing whatever lies in
# /tmp/lhfs).
LHFS = str(Path(sys.executable).with_name("lhfs"))
_PR_SET_PDEATHSIG = 1


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), or
    None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


PID_MAX = 1 << 22  # the kernel's largest pid (PID_MAX_LIMIT)


def is_pid(pid: Any) -> bool:
    return type(pid) is int and 0 < pid <= PID_MAX


def alive(pid: Any) -> bool:
    """Whether ``pid`` is a live process (not a zombie); anything but a pid (read from a
    damaged file) is no process, never an error."""
    if not is_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = process_state(pid)
    return state is not None and state != "Z"  # (a zombie is not alive)


def is_lhfs(pid: Any) -> bool:
    """Whether ``pid`` is a live lhfs command. What a record keeps the pid of (a restore, a
    backup's hold, an activation) is an lhfs process; after a reboot or a wrap of the pids
    the number may name anything, which must not pass for it: a volume's removal was refused
    for good "being restored by pid N", N some daemon an operator might then have killed."""
    return any(arg == b"lhfs" or arg.endswith(b"/lhfs") for arg in argv_of(pid)[:3])


def argv_of(pid: Any) -> list[bytes]:
    """The command line of the live process ``pid`` (nothing for no such process): what
    tells which process a recorded pid names now."""
    if not alive(pid):
        return []
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): it answers nothing until it
    is continued, so nobody waits for it (one such engine made every 'volume ls' wait 30 s,
    then fail, and a detach 80 s)."""
    return process_state(pid) in ("T", "t")


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies, so a killed engine leaves no
    replica holding its directory. Must be used from the parent's main thread."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "LHFS_BACKUP_PASSWORD")


def child_env(store: bool = False) -> dict[str, str]:
    """The environment for a child process: without the S3 credentials and backup secrets
    unless it talks to the store (``store``). An engine and its replicas never do, so a dump of
    their environment (``/proc/PID/environ``, a core file) holds none."""
    env = dict(os.environ)
    if not store:
        for name in list(env):
            if name.startswith("AWS_") or name in SECRET_VARIABLES:
                del env[name]
    return env


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


def boot_id() -> str | None:
    """This boot's id (None where the kernel does not say): a pid means the same process
    only within one boot of one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[N]``; None where the kernel does not say): a pid
    names a process only within its namespace (containers sharing the host's name and boot
    id each have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def here() -> str:
    """This host's boot and this PID namespace, as a short token: what a pid recorded in a
    file name is judged against (a pid of another boot or namespace is not this one's)."""
    return hashlib.blake2s(f"{boot_id()} {pid_namespace()}".encode(), digest_size=4).hexdigest()
