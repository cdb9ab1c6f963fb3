"""The local control endpoint of a running engine: a Unix socket under the volume's directory.

One request per connection: a JSON line ``{"op": ..., "args": {...}}`` answered by a JSON line
``{"ok": true, "result": ...}`` or ``{"ok": false, "kind": ..., "message": ...}``. Each request
runs as its own task in the engine, so several CLI commands at once are safe; the engine itself
serialises what must not overlap. A request that takes something for its asker (a hold on the
volume's I/O) keeps its connection after the answer (``Kept``, ``kept``): the engine lets what
it took go as soon as the connection closes, which the kernel does for an asker that is killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lhfs.core.errors import LhfsError, NotFound, from_wire, sole
from lhfs.core.procs import stopped

if TYPE_CHECKING:
    import trio

log = logging.getLogger("lhfs.control")

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
_MAX_REQUEST = 1 << 20
STOPPED_CHECK = 2.0  # seconds of silence after which the asker looks whether the engine stopped


class NotAttached(NotFound):
    """No engine runs for the volume."""


class EngineGone(LhfsError):
    """The engine's connection broke before it answered: it died, or went away, during the
    request (what the volume is now, ``lhfs volume info`` says)."""


class EngineSilent(LhfsError):
    """The engine took the request but did not answer in the time given: it is stopped,
    stuck, or (a long request) still at it."""


class Kept:
    """A handler's answer whose request lives on: ``result`` is answered, the connection is
    kept, and ``on_close`` is called once the asker closes it (or dies) or the engine stops,
    so that what the request took never waits on a lease alone."""

    def __init__(self, result: Any, on_close: Callable[[], None]) -> None:
        self.result = result
        self.on_close = on_close


async def serve(path: Path, handler: Handler, *, task_status: Any = None) -> None:
    """Accept control requests on ``path`` until cancelled (start it with ``nursery.start``)."""
    import trio  # here, not at the top: commands that only call an engine start faster

    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    if task_status is not None:
        task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _one(stream, handler), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _one(stream: trio.SocketStream, handler: Handler) -> None:
    import trio

    holding: Kept | None = None
    try:
        data = b""
        while not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data)
            op, args = str(request["op"]), dict(request.get("args") or {})
        except (ValueError, KeyError, TypeError):
            answer: dict[str, Any] = {
                "ok": False,
                "kind": "ProtocolError",
                "message": "bad request",
            }
        else:
            try:
                result = await handler(op, args)
                if isinstance(result, Kept):
                    holding, result = result, result.result
                answer = {"ok": True, "result": result}
            except Exception as exc:  # report, never let one request stop the engine
                # (a refusal raised in a task of the handler's nursery comes wrapped in a
                # group: it is answered as itself, in its own words, not as an internal error)
                error = sole(exc)
                if isinstance(error, LhfsError):
                    answer = {"ok": False, "kind": type(error).__name__, "message": str(error)}
                else:
                    log.exception("control request %s failed", op)
                    answer = {
                        "ok": False,
                        "kind": "LhfsError",
                        "message": f"internal error: {error}",
                    }
        await stream.send_all(json.dumps(answer).encode() + b"\n")
        if holding is not None:  # (the asker sends nothing more: its closing is what counts)
            while await stream.receive_some(4096):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        try:
            if holding is not None:
                holding.on_close()
        except Exception:  # (never let it stop the control socket, nor leave the stream)
            log.exception("control request %s: letting go of what it held failed", op)
        finally:
            await trio.aclose_forcefully(stream)


def call(path: Path, op: str, timeout: float | None = 600.0, **args: Any) -> Any:
    """Ask the engine listening on ``path``; ``NotAttached`` when none listens."""
    with _connected(path, timeout) as sock:
        return _ask(sock, path, op, timeout, args)


@contextlib.contextmanager
def kept(path: Path, op: str, timeout: float | None = 600.0, **args: Any) -> Iterator[Any]:
    """``call`` for a request whose answer the engine keeps (``Kept``): its result, for the
    block; what it took is let go when the block ends, or when this process dies."""
    with _connected(path, timeout) as sock:
        yield _ask(sock, path, op, timeout, args)


@contextlib.contextmanager
def _connected(path: Path, timeout: float | None) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotAttached(f"volume {path.parent.name} is not attached (any more)") from None
        yield sock


def _ask(
    sock: socket.socket, path: Path, op: str, timeout: float | None, args: dict[str, Any]
) -> Any:
    """Send one request and read its answer. A connection the engine closed or reset before
    answering (it died meanwhile) is said as such, naming the volume (the directory of its
    socket), never as the system's bare "Connection reset by peer". An engine that is
    stopped (SIGSTOP, a debugger) answers nothing until it is continued: a request to one is
    refused before it is sent, and one that stopped after is given up once it has been silent
    ``STOPPED_CHECK`` seconds, saying it may yet be carried out (a snapshot or an expansion
    waited for it for ever)."""
    name = path.parent.name
    gone = EngineGone(
        f"the engine of {name} died (or went away) during {op!r}: see 'lhfs volume info {name}'"
    )
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    _refuse_stopped(sock, name, None)
    try:
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        while not data.endswith(b"\n"):
            left = STOPPED_CHECK if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(min(left, STOPPED_CHECK))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                _refuse_stopped(sock, name, op)
                continue
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise EngineSilent(f"the engine did not answer {op!r} within {timeout}s") from None
    except (ConnectionResetError, BrokenPipeError):
        raise gone from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise gone from None
    if not answer.get("ok"):
        raise from_wire(answer.get("kind", "LhfsError"), answer.get("message", "failed"))
    return answer.get("result")


def _refuse_stopped(sock: socket.socket, name: str, sent: str | None) -> None:
    """Raise ``EngineSilent`` if the engine at the other end of ``sock`` is stopped, saying
    that request ``sent`` (if any) is carried out should it resume."""
    pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    if pid > 0 and stopped(pid):
        pending = f" ({sent!r} was sent: it is carried out if it resumes)" if sent else ""
        raise EngineSilent(
            f"the engine of {name} (pid {pid}) is stopped{pending}: 'kill -CONT {pid}' resumes "
            f"it; 'lhfs volume detach --force {name}' kills it instead (writes not yet flushed "
            "are lost)"
        )


Progress = Callable[[float, int | None, int | None], None]


def call_watched(path: Path, op: str, progress: Progress | None, task: str, **args: Any) -> Any:
    """A long request (no time limit) whose progress the engine keeps under ``task``: it is
    asked for every 0.2 s while the request runs, and given to ``progress(percent, done,
    total)``."""
    if progress is None:
        return call(path, op, timeout=None, **args)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(call, path, op, None, **args)
        while True:
            try:
                result = running.result(timeout=0.2)
                break
            except concurrent.futures.TimeoutError:
                pass
            try:
                state = call(path, "progress", timeout=5, task=task)
            except LhfsError:
                continue
            if state and state.get("total"):
                done, total = int(state["done"]), int(state["total"])
                progress(min(99.9, 100 * done / total), done, total)
    progress(100, None, None)
    return result
