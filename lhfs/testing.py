"""Helpers for driving lhfs as a user would, shared by the tests, the demo and the benchmarks.

``Cli`` runs the real ``lhfs`` command against one root; ``teardown`` undoes everything a run
may leave behind (mounts, loop devices, FUSE mounts, engine processes), whatever state a failed
test left it in, so that every test can end with it in a finaliser.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import mmap
import os
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.procs import LHFS, wait_for
from lhfs.engine import control
from lhfs.volumes.attachment import loops_backed_by, release
from lhfs.wire import protocol as p
from lhfs.wire.auth import VolumeKey
from lhfs.wire.seal import Seal


class RawSession:
    """A blocking TCP connection to a replica past the handshake, for tests that send frames
    by hand (malformed ones, or many at once), as the authenticated peer: every whole frame
    given to ``sendall`` leaves sealed (``lhfs.wire.seal``), and what follows the first one that
    is not whole (a bad length, half a frame) leaves as it is. ``recv`` returns the replica's
    frames once their seals were checked, without the seals."""

    def __init__(self, sock: socket.socket, seals: tuple[Seal, Seal]) -> None:
        self.sock = sock
        self._seal, opener = seals
        self._frames = p.FrameBuffer()
        self._frames.opener = opener
        self._received = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(self.sealed(data))

    def sealed(self, data: bytes) -> bytes:
        """``data`` as ``sendall`` sends it: each whole frame followed by its seal."""
        out: list[bytes] = []
        pos = 0
        while len(data) - pos >= p.HEADER.size:
            (length,) = p.LENGTH.unpack_from(data, pos)
            end = pos + p.LENGTH.size + length
            if not p.HEADER.size - p.LENGTH.size <= length <= p.MAX_FRAME or end > len(data):
                break
            frame = data[pos:end]
            out += [frame, p.seal_frame(self._seal.tag([frame], len(frame)))]
            pos = end
        out.append(data[pos:])
        return b"".join(out)

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Up to ``size`` bytes of the frames received (all ``size`` with ``MSG_WAITALL``,
        unless the connection ends); b"" once it ended."""
        wanted = size if flags & socket.MSG_WAITALL else 1
        frames = self._frames
        while True:
            for request_id, code, payload in frames.frames():
                length = p.HEADER.size - p.LENGTH.size + len(payload)
                self._received += p.HEADER.pack(length, request_id, code) + payload
            if len(self._received) >= wanted or not frames.recv_from(self.sock):
                break
        data = bytes(self._received[:size])
        del self._received[:size]
        return data

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()
        self._frames.release()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scratch(prefix: str, under: str | Path | None, default: Path) -> Path:
    """A fresh directory for a bench's files, under ``under`` (made if it is missing: a bench
    given a directory that does not exist yet should not stop on it) or else ``default``."""
    base = Path(under) if under else default
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def raw_session(
    address: str,
    key: VolumeKey,
    role: int = p.ENGINE,
    epoch: int = 0,
    timeout: float = 30,
    owner: bytes = p.NO_OWNER,
) -> RawSession:
    """A connection to a replica, past the handshake, for frames sent by hand (``RawSession``)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        handshake = p.ClientHandshake(key, address, role, epoch, False, owner)
        sock.sendall(handshake.hello())
        sock.sendall(handshake.answer(sock.recv(p.CHALLENGE.size, socket.MSG_WAITALL)))
        handshake.welcome(sock.recv(p.WELCOME.size, socket.MSG_WAITALL))
    except BaseException:
        sock.close()
        raise
    return RawSession(sock, handshake.seals())


def make_tls(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``host`` signed by it, made with openssl:
    ``(ca.pem, server.pem, server.key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = partial(subprocess.run, check=True, capture_output=True)
    run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=lhfs test CA"])  # fmt: skip
    run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=lhfs replica"])
    extension = directory / "san.ext"
    kind = "IP" if host.replace(".", "").isdigit() else "DNS"
    extension.write_text(f"subjectAltName={kind}:{host}\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", extension])  # fmt: skip
    return ca, cert, key


class HostName:
    """A name for the S3 endpoint that resolves through an ``/etc/hosts`` line the test can
    take away (a DNS failure as the resolver sees it). Edited in place: the file may be a bind
    mount that a rename would not replace."""

    def __init__(self, address: str = "127.0.0.1", hosts: Path = Path("/etc/hosts")) -> None:
        self.name = f"lhfs-s3-{uuid.uuid4().hex[:12]}"  # dotless: S3 servers see path-style
        self.line = f"{address} {self.name}\n"
        self.hosts = hosts

    def _rewrite(self, keep: bool) -> None:
        with open(self.hosts, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # (tests running side by side edit it too)
            lines = [line for line in f.readlines() if self.name not in line]
            if keep:
                lines.append(self.line)
            f.seek(0)
            f.write("".join(lines))
            f.truncate()

    def resolve(self) -> None:
        self._rewrite(True)

    def drop(self) -> None:
        self._rewrite(False)


class CliError(AssertionError):
    pass


class Cli:
    """``lhfs --root ROOT ...`` as a subprocess."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.env = env or {}

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [LHFS, "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        if check and result.returncode != 0:
            raise CliError(f"lhfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def start(self, *args: str) -> subprocess.Popen:
        """The same command in the background; text pipes for its output. Ctrl-C (SIGINT)
        interrupts it as at a terminal, also where the tests run with SIGINT ignored (a
        shell's background job: its children inherit that, and Python then never turns
        SIGINT into KeyboardInterrupt)."""
        return subprocess.Popen(
            [LHFS, "--root", str(self.root), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **self.env},
            preexec_fn=partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
        )

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def volumes(self) -> list[dict[str, Any]]:
        """``volume ls --json`` without what changes with anything else on the disk (each
        replica's disk's free space): what "nothing changed" compares."""
        listing = self.json("volume", "ls")
        for vol in listing:
            for replica in vol.get("replicas", []):  # (none: a damaged volume's entry)
                replica.pop("disk_free", None)
        return listing

    def info(self, name: str) -> dict[str, Any]:
        return self.json("volume", "info", name)

    def live(self, name: str) -> dict[str, Any]:
        """The attached engine's own ``info``, asked on its control socket: no command line
        started, so it can be polled fast (counters, replica modes and pids)."""
        return control.call(volumes.load(self.root, name).control_socket, "info", timeout=30)

    def replica(self, name: str, replica_id: str) -> dict[str, Any]:
        """One replica's entry in ``volume info``."""
        return next(r for r in self.info(name)["replicas"] if r["id"] == replica_id)

    def checksum(self, name: str) -> str:
        return self.run("volume", "checksum", name).stdout.split()[-1]

    def backup(self, volume: str, target: str) -> str:
        """``backup create`` of a volume; its backup URL."""
        args = ("backup", "create", volume, "--target", target, "--create-bucket", "--quiet")
        return self.run(*args).stdout.split()[-1]

    def dr_restored(self, name: str, backup_url: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the standby ``name`` holds the backup of ``backup_url`` and is idle;
        its ``dr status``."""
        backup = backup_url.split("backup=")[1]
        return wait_for(
            lambda: (
                (s := self.json("dr", "status", name))["last_restored_backup"] == backup
                and s["state"] == "standby"
                and s
            ),
            timeout,
            f"{name} to restore {backup}",
        )

    def engine_log(self, name: str) -> str:
        """What the engine of volume ``name`` logged so far."""
        return volumes.load(self.root, name).engine_log.read_text()

    def engine_pid(self, name: str) -> int | None:
        runtime = volumes.load(self.root, name).runtime()
        return runtime["pid"] if runtime else None


@contextlib.contextmanager
def web_server(answer: Callable[[str, str], tuple[int, str, bytes]]) -> Iterator[str]:
    """A web server on loopback for the duration of the block, its URL: every request gets
    ``answer(method, path)``, a (status, content type, body). What an S3 client meets when
    its endpoint is some other server, or one that refuses it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, kind, body = answer(self.command, self.path)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def write_at(device: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of a volume's device and fsync: on every replica after."""
    with open(device, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_direct(device: Path, offset: int, data: bytes, sync: bool = True) -> None:
    """One O_DIRECT write (from an aligned buffer, as direct I/O wants), then an fsync unless
    ``sync`` is false: it reaches the engine as one request, now."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def read_direct(device: Path, offset: int, length: int) -> bytes:
    """One O_DIRECT read: what the engine answers, no page cache in between."""
    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


@contextlib.contextmanager
def small_disk(mountpoint: Path, size: int) -> Iterator[Path]:
    """A file system of ``size`` bytes (ext4 in an image file on a loop device) mounted at
    ``mountpoint``: a disk a test can fill. Unmounted at the end (lazily if still in use:
    the caller stops what used it first)."""
    image = mountpoint.with_name(mountpoint.name + ".img")
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        image.unlink(missing_ok=True)


def fill(path: Path) -> int:
    """Write a new file at ``path`` until its disk is full, to the last block; its size."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 64 << 10, 4096, 1024):  # (down to the smallest block)
            block = bytes(size)
            with contextlib.suppress(OSError):
                while True:
                    written += f.write(block)
    return written


def loop_attach(path: Path) -> str:
    """A direct-I/O loop device on ``path`` (what a user formats and mounts)."""
    return subprocess.run(
        ["losetup", "--direct-io=on", "--find", "--show", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def fio_verify(target: str, size: str, *extra: str) -> subprocess.Popen:
    """fio writing 4 KiB blocks at random with crc32c verification, 16 in flight; ``extra``
    options after the others (they win)."""
    return subprocess.Popen(
        [
            "fio",
            "--name=verify",
            f"--filename={target}",
            "--rw=randwrite",
            "--bs=4k",
            f"--size={size}",
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=terse",
            "--verify_state_save=0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_engine(cli: Cli, name: str) -> None:
    """SIGKILL the engine of a volume and wait until it is gone (its replicas follow it)."""
    pid = cli.engine_pid(name)
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: cli.engine_pid(name) is None, 30, "the engine to die")


def teardown(root: Path) -> None:
    """Unmount, free loops, stop engines and DR followers of every volume under ``root``;
    never raises."""
    from lhfs.backups import dr

    mountpoints = []
    for vol in volumes.readable(root):  # (a test may leave one damaged: none runs)
        if vol.config.get("dr"):
            with contextlib.suppress(Exception):
                dr.stop_following(root, vol.name)
        devices = {vol.dir / "device"}
        runtime = vol.runtime()
        record = vol.runtime_record()  # (an engine that was killed leaves its FUSE mount)
        if record:
            devices.add(Path(record["device"]))
        for device in devices:
            for loop in loops_backed_by(device):
                with open("/proc/self/mounts") as f:
                    mountpoints += [line.split()[1] for line in f if line.split()[0] == loop]
        for mountpoint in mountpoints:
            subprocess.run(["umount", mountpoint], capture_output=True)
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        for device in devices:
            for loop in loops_backed_by(device):
                subprocess.run(["losetup", "-d", loop], capture_output=True)
        if runtime:
            try:
                os.kill(runtime["pid"], signal.SIGTERM)
                wait_for(lambda vol=vol: vol.runtime() is None, 30, "the engine to stop")
            except (ProcessLookupError, TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(runtime["pid"], signal.SIGKILL)
        for device in devices:  # (a dead FUSE mount does not even exist to lexists)
            release(device)


_MOTO_SERVER = Path(__file__).resolve().parents[1] / "tools" / "moto_server.py"


class S3Server:
    """An embedded S3 endpoint for the demo and the tests: moto's S3 (``tools/moto_server.py``)
    on a free loopback port, its log in a file (a pipe nobody reads would fill up and stall
    it)."""

    def __init__(self, log: Path) -> None:
        import re
        import sys

        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(_MOTO_SERVER), "--host", "127.0.0.1", "--port", "0"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        pattern = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
        found = wait_for(
            lambda: self.proc.poll() is not None or pattern.search(log.read_text()),
            60,
            "the S3 server",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited: {log.read_text()[-500:]}")
        self.endpoint = f"http://127.0.0.1:{found.group(1)}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "lhfs-local",
            "AWS_SECRET_ACCESS_KEY": "lhfs-local-secret",
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def one_line(result: subprocess.CompletedProcess, *statuses: int) -> str:
    """The single stderr line of a command that failed with one of ``statuses`` (1 if none
    is given): bad input and refusals are said in one line, never a traceback."""
    wanted = statuses or (1,)
    assert result.returncode in wanted, (result.args, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def remote_volume(
    cli: Cli, tmp_path: Path, serve: Callable[..., Any], name: str, hosts: int
) -> tuple[Path, list]:
    """An attached volume (on ``tmp_path/NAME.dev``) whose replicas are ``hosts`` remote ones
    (``serve``: the fixture of that name), r2, r3 ...; its key file and their processes."""
    cli.run("volume", "create", name, "--size", "16M", "--replicas", "1", "--rejoin-wait", "0")
    cli.run("volume", "attach", name, "--device", str(tmp_path / f"{name}.dev"))
    key = tmp_path / f"{name}.key"
    cli.run("volume", "key", name, "--out", str(key))
    procs = [serve(tmp_path / f"{name}-host{n}", key) for n in range(hosts)]
    for proc in procs:
        cli.run("replica", "add", name, "--address", proc.address)
    cli.run("replica", "rm", name, "r1")
    return key, procs
