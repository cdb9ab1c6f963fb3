"""Attaching a volume, and letting it go whatever state it is in.

``attach`` starts the engine (``lhfs engine-run``) on a device file. ``detach`` stops it, and
``release`` undoes whatever an attachment left behind: a file system mounted on a loop device on
the FUSE file, the loop device, the FUSE mount, the engine, its runtime files. Letting go must
always work: a faulted volume (no replica answers), an engine that was killed, a loop device or
a mount that is already gone are all let go, and what was cleaned up is said. Only ever
unmounts and stops processes; never touches data.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shlex
import signal
import subprocess
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core import locks, logs
from lhfs.core.durable import drop_device
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    WrongState,
)
from lhfs.core.mounts import kernel_path, loops_backed_by, mount_table, mounted_at
from lhfs.core.mounts import unescape as unescape  # (read by ``mount``)
from lhfs.core.procs import LHFS, child_env, read_line_matching, stopped, wait_for
from lhfs.engine import control
from lhfs.wire.client import parse_address

ATTACH_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
STATE_TIMEOUT = 20.0


def is_mountpoint(path: Path, look: bool = True) -> bool:
    """Whether ``path`` is a mount point (the kernel lists real paths: a link to a mount
    point is one). Not ``look``: found without looking at ``path`` itself, only at its
    directory (a volume's device: a FUSE mount whose device a stuck process holds answers
    nothing, and whoever looks waits; lhfs never makes a device that is a link)."""
    if look:
        target = os.path.realpath(path)
    else:
        path = Path(os.path.abspath(path))
        target = os.path.join(os.path.realpath(path.parent), path.name)
    return any(point == target for _, point in mount_table())


def loop_holders(loop: str) -> list[str]:
    """The processes of other mount namespaces that still mount ``loop`` ("PID (COMMAND)"):
    a process started in its own mount namespace while the file system was mounted (``ip
    netns exec``, ``unshare -m``) keeps a copy of that mount, which unmounting here does not
    end: the loop device stays until they end or unmount it. Each namespace's table is read
    once (the first of its processes found)."""
    try:
        dev = os.stat(loop).st_rdev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        own = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    namespaces: dict[str, tuple[bool, list[str]]] = {}  # namespace -> (mounts it, pids)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            namespace = os.readlink(entry / "ns" / "mnt")
            if namespace == own:
                continue
            if namespace not in namespaces:
                with open(entry / "mountinfo") as f:
                    holds = any(line.split()[2] == wanted for line in f)
                namespaces[namespace] = (holds, [])
            if namespaces[namespace][0]:
                command = (entry / "comm").read_text().strip()
                namespaces[namespace][1].append(f"{entry.name} ({command})")
        except (OSError, IndexError):  # (ended meanwhile, or not ours to read)
            continue
    return [pid for holds, pids in namespaces.values() if holds for pid in pids]


def device_holders(device: Path) -> list[str]:
    """The processes that hold ``device`` open ("PID (COMMAND)"), as their descriptors in
    /proc name it (read as links: the device itself is never looked at, and a stuck one
    holds nobody up). A detach under them would break their I/O mid-way."""
    target = kernel_path(device)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            if any(link in (target, target + " (deleted)") for link in links):
                found.append(f"{entry.name} ({(entry / 'comm').read_text().strip()})")
        except OSError:  # (ended meanwhile, or a descriptor closed as it was read)
            continue
    return found


def named(pids: list[str]) -> str:
    """Processes ("PID (COMMAND)") in a few words: five at most, then how many more."""
    return ", ".join(pids[:5]) + (f" and {len(pids) - 5} more" if pids[5:] else "")


def autoclear(loop: str) -> bool:
    """Whether ``loop`` is freed by itself once its last user lets go (``losetup -d`` of a
    busy loop device sets that, and there is nothing more it can do)."""
    try:
        return Path(f"/sys/block/{Path(loop).name}/loop/autoclear").read_text().strip() == "1"
    except OSError:
        return False


def held_how(loops: list[str]) -> str:
    """What to do about loop devices that are still in use with nothing mounted on them
    here: who holds them in other mount namespaces (they go when those end or unmount
    them), or ``losetup -d`` where that is still to be done."""
    holders = sorted({pid for loop in loops for pid in loop_holders(loop)})
    if holders:
        return (
            f"mounted in another mount namespace by process(es) {named(holders)}: the loop "
            "device is freed when they end or unmount it"
        )
    if all(autoclear(loop) for loop in loops):
        return (
            "the loop device is freed once its last user lets go (something holds it open: "
            f"'fuser -v {' '.join(loops)}' shows what)"
        )
    return f"let go of it first (losetup -d {' '.join(loops)})"


def leftovers(device: Path) -> dict[str, Any]:
    """What an attachment on ``device`` left: file systems mounted on its loop devices, the
    loop devices, whether the FUSE file is still mounted."""
    loops = loops_backed_by(device)
    return {
        "mounts": [m for loop in loops for m in mounted_at(loop)],
        "loops": loops,
        "fuse_mount": is_mountpoint(device, look=False) or _disconnected(device),
    }


def describe(left: dict[str, Any], device: Path | str) -> str:
    """``leftovers`` in words ("" when nothing was left)."""
    words = [f"{m} mounted" for m in left["mounts"]] + [f"loop device {x}" for x in left["loops"]]
    if left["fuse_mount"]:
        words.append(f"the dead FUSE mount {device}")
    return ", ".join(words)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``."""
    top = os.path.realpath(directory)
    return [p for _, p in mount_table() if p == top or p.startswith(top.rstrip("/") + "/")]


def _disconnected(device: Path) -> bool:
    try:
        device.stat()
    except OSError as exc:
        return exc.errno == errno.ENOTCONN  # a FUSE mount whose engine died
    return False


def release(device: Path, fuse: bool = True, settled: Collection[str] = ()) -> list[str]:
    """Unmount the file systems on ``device``'s loop devices (lazily if they are busy or
    their device no longer answers), free the loops and, with ``fuse`` (its engine is gone),
    unmount the FUSE file itself; what was done. ``settled``: loop devices an earlier release
    of this command waited for and said stay (an ``umount``'s, before its detach): not
    waited for again, nor said again unless they are gone now."""
    done = []
    loops = loops_backed_by(device)
    for loop in loops:
        for mountpoint in mounted_at(loop):
            if subprocess.run(["umount", mountpoint], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
            done.append(f"unmounted {mountpoint}")
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    # (they stay: not waited for; /proc is read only for a loop device still there)
    held = {loop for loop in loops_backed_by(device) if loop in settled or loop_holders(loop)}
    # (a loop device nothing uses goes at once; one that stays a few seconds is held: by an
    # open file of a lazily unmounted file system, say, and it is said so, not waited for)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not set(loops_backed_by(device)) - held, 5, "the loop devices to go")
    left = set(loops_backed_by(device))  # (only what is gone is said freed)
    done += [
        f"freed {x}" if x not in left else f"{x} stays: {held_how([x])}"
        for x in loops
        if x not in settled or x not in left
    ]
    if fuse and (is_mountpoint(device, look=False) or _disconnected(device)):
        subprocess.run(["fusermount3", "-u", "-z", str(device)], capture_output=True)
        done.append(f"unmounted the device {device}")
    return done


def engine_alive(vol: volumes.Volume, record: dict[str, Any]) -> bool:
    """Whether the process of a runtime record is this volume's engine still (a pid may have
    been reused by anything since the engine died: it must never be signalled)."""
    return volumes.is_engine(record.get("pid"), vol.name)


def _clear_dead_engine(vol: volumes.Volume, settled: Collection[str] = ()) -> list[str]:
    """Clean up after an engine that died (its runtime record names a dead process), and
    wait until its replica processes, which die with it, have let go of their directories.
    ``settled``: as for ``release``."""
    record = vol.runtime_record()
    if record is None or engine_alive(vol, record):
        return []
    done = release(Path(record["device"]), settled=settled)
    if record.get("device_made"):
        drop_device(Path(record["device"]))
    vol.runtime_path.unlink(missing_ok=True)
    vol.control_socket.unlink(missing_ok=True)
    held = [
        d
        for d in map(vol.replica_dir, vol.replicas)
        if d is not None and (d / "lock").exists() and not _unlocked(d)
    ]
    if held:
        done += _end_orphans(record.get("pid", -1), held)
    return done


def _end_orphans(engine: int, held: list[Path]) -> list[str]:
    """Wait until the replica processes of the dead engine of pid ``engine`` let go of the
    directories ``held``. Each was sent SIGTERM when the engine died (``procs.die_with_parent``)
    and ends once it has flushed; one that is stopped, or still there after ``STOP_TIMEOUT``,
    is stuck, and may hold the volume's FUSE device (whose users then wait for ever) and its
    directory (no attach until it ends): it is killed. What was done."""
    done = []

    def free() -> bool:
        return all(map(_unlocked, held))

    for patient in (False, True):
        if patient:
            with contextlib.suppress(TimeoutError):
                wait_for(free, STOP_TIMEOUT, "the replicas to end")
        for pid in _orphans(engine, held) if not free() else []:
            if patient or stopped(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                done.append(f"killed its replica process {pid}, which did not end with it")
    with contextlib.suppress(TimeoutError):
        wait_for(free, STOP_TIMEOUT, "the replicas to end")
    return done


def _orphans(engine: int, held: list[Path]) -> list[int]:
    """The local replica processes that the engine of pid ``engine`` started on the
    directories ``held`` and that still run: known by the local socket name it gave them
    (``daemon._local_name``) and by their directory (the pid of a dead engine may be another
    volume's engine's by now: its replicas are not these)."""
    prefix, dirs = f"lhfs-{engine}-".encode(), {str(d).encode() for d in held}

    def option(argv: list[bytes], name: bytes) -> bytes:
        return next(iter(argv[argv.index(name) + 1 :][:1]), b"") if name in argv else b""

    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if option(argv, b"--local").startswith(prefix) and option(argv, b"--dir") in dirs:
            found.append(int(entry.name))
    return found


def _unlocked(directory: Path) -> bool:
    fd = os.open(directory / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _check_device(device: Path) -> bool:
    """The device must be an empty regular file (created if missing: then True) that nothing
    is mounted on, and not a symbolic link (one that led nowhere had its target made, and
    left behind)."""
    if device.is_symlink():
        raise InvalidArgument(
            f"device path {device} is a symbolic link (to {os.readlink(device)}): give the "
            "path itself"
        )
    try:
        device.stat()
    except FileNotFoundError:
        if not device.parent.is_dir():
            raise NotFound(f"directory {device.parent} does not exist") from None
        device.touch()
        return True
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose engine died
            release(device)
            return False
        raise
    if device.is_dir():
        raise InvalidArgument(f"device path {device} is a directory; give a file path")
    if is_mountpoint(device):
        raise Busy(f"{device} is already mounted")
    if not device.is_file():
        raise InvalidArgument(f"device path {device} is not a regular file")
    if device.stat().st_size:  # (the volume would hide it while attached: a typo, surely)
        raise InvalidArgument(
            f"device path {device} is a file that is not empty: give a new path or an empty file"
        )
    return False


_held: set[Path] = set()  # (the volumes whose command lock this process holds)
COMMAND_WAIT = 300.0  # seconds a command waits for another's attach, mount or detach
FORCE_WAIT = 5.0  # ...and a --force detach or umount, before it goes on without


@contextlib.contextmanager
def exclusive(
    vol: volumes.Volume, force: bool = False, wait: float | None = None, busy: str | None = None
) -> Iterator[None]:
    """One command at a time attaches, mounts, unmounts or detaches a volume: two ``lhfs
    mount`` at once each saw it detached and started an engine (the second one's lock on
    its replicas then failing, or worse). The later one waits, then sees what the first
    did. Held once per process (``mount`` attaches under it). ``force`` (a ``--force``
    detach or umount, the way out of an engine that hangs, which may hang the command
    holding the lock too, in mkfs or mount): waits ``FORCE_WAIT``, then goes on without.
    ``wait`` and ``busy``: another wait, and what to say after it (``{pid}``: the holder's)
    for a caller that must not wait five minutes (a system backup, before it holds I/O)."""
    if vol.dir in _held:
        yield
        return
    try:
        fd = locks.take(
            vol.dir / "command.lock",
            wait if wait is not None else FORCE_WAIT if force else COMMAND_WAIT,
            busy
            or f"another command{{pid}} has been attaching, mounting, detaching or working on "
            f"the replicas of volume {vol.name} for {COMMAND_WAIT:.0f}s: try again once it is "
            "done (--force does not wait for it)",
        )
    except FileNotFoundError:  # (removed meanwhile, or while this waited for its lock)
        raise NotFound(f"no volume named {vol.name!r} (under {vol.root})") from None
    except Busy:
        if not force:
            raise
        yield  # (the holder is stuck on the volume: what --force is for)
        return
    _held.add(vol.dir)
    try:
        yield
    finally:
        _held.discard(vol.dir)
        os.close(fd)


def place_held(
    root: Path, path: Path, kind: str, doing: str
) -> contextlib.AbstractContextManager[None]:
    """Hold a place in the file system (``kind``: "device path", "mount point") for the
    block, whatever the volume: two attaches of two volumes on one device path at once each
    found it free, and both mounted it (stacked FUSE mounts, the writes reaching one); two
    mounts on one mount point the same. The second is refused at once, naming the first;
    once the first is done the place is in use, and said so. The lock is keyed by the real
    path under the root's volumes directory, and goes with the block (``locks.name_held``)."""
    real = os.path.realpath(path)
    key = hashlib.sha256(f"{kind}\0{real}".encode()).hexdigest()[:24]
    base = volumes.volumes_dir(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = base / f".{kind.replace(' ', '-')}@{key}.lock"  # (no volume's: '@' is in no name)
    return locks.name_held(lock, f"{kind} {real}", doing)


def attach(
    root: Path,
    name: str,
    device: Path,
    restoring: bool = False,
    metrics: str | None = None,
) -> dict[str, Any]:
    """Start the engine on ``device`` (see ``_attach``), one command at a time, and one
    attach at a time on a device path."""
    vol = volumes.load(root, name)
    with exclusive(vol), place_held(root, device.absolute(), "device path", "attached on"):
        return _attach(root, name, device, restoring, metrics)


def _attach(
    root: Path,
    name: str,
    device: Path,
    restoring: bool,
    metrics: str | None,
) -> dict[str, Any]:
    """Start the engine on ``device``. Only the restore itself attaches a volume that is being
    restored (``restoring``); anyone else would see a partial volume. What an engine that died
    left behind is cleaned up first."""
    vol = volumes.load(root, name)
    runtime = vol.runtime()
    if runtime is not None:
        raise AlreadyExists(f"volume {name} is already attached at {runtime['device']}")
    vol.require_not_standby("attaching it")
    if not restoring:
        vol.require_complete(f"attaching it ('lhfs volume rm {name}' and restore again)")
    unservable = volumes.unservable(vol)
    if unservable is not None:
        raise CorruptState(unservable)
    device = device.absolute()
    real = Path(os.path.realpath(device))
    # the device files lhfs itself puts there (``lhfs mount``'s, a restore's) and no other
    own = {Path(os.path.realpath(vol.dir / f)) for f in ("device", "restore.dev")}
    if real.is_relative_to(os.path.realpath(volumes.volumes_dir(root))) and real not in own:
        raise InvalidArgument(
            f"device path {device} is inside lhfs's own directories: choose a path outside "
            f"{volumes.volumes_dir(root)}"
        )
    for other in volumes.readable(root):
        info = other.runtime()
        if info and Path(info["device"]) == device:
            raise Busy(f"{device} is the device of volume {other.name}")
    if metrics:
        parse_address(metrics)  # (a typo is said here, before anything is made)
    _clear_dead_engine(vol)
    made = _check_device(device)
    log_path = vol.engine_log
    with open(log_path, "ab") as log_file:
        command = [LHFS, "--root", str(root), "engine-run", name]
        command += ["--log", str(log_path)]
        if metrics:
            command += ["--metrics", metrics]
        if made:
            command.append("--device-made")
        try:
            proc = subprocess.Popen(
                [*command, str(device)],
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
                env=child_env(),  # the engine and its replicas never talk to the store
            )
        except BaseException:
            if made:
                drop_device(device)
            raise
    try:
        line = read_line_matching(proc, r"^(ready|error: .*)$", ATTACH_TIMEOUT).group(1)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        proc.wait(30)
        if made:
            drop_device(device)
        raise LhfsError(f"the engine did not start ({exc}); see {log_path}") from None
    finally:
        if proc.stdout:
            proc.stdout.close()
    if line != "ready":
        proc.wait(30)
        if made:
            drop_device(device)
        raise LhfsError(line.removeprefix("error: "))
    record = vol.runtime_record() or {}
    return {"name": name, "device": str(device), "pid": proc.pid, "metrics": record.get("metrics")}


def _stray_loops(vol: volumes.Volume, device: Path) -> bool:
    """Whether the loop devices on ``device`` are only what an ``lhfs mount`` or ``umount``
    killed between its loop device and its mount left: on lhfs's own device file (never an
    operator's), nothing mounted on them and nothing stacked on them (no holders). The
    detach frees them, where it would otherwise refuse ("in use by /dev/loopN")."""
    loops = loops_backed_by(device)
    if not loops or os.path.realpath(device) != os.path.realpath(vol.dir / "device"):
        return False
    return not any(
        mounted_at(loop) or any(Path(f"/sys/block/{Path(loop).name}/holders").iterdir())
        for loop in loops
    )


def engine_state(vol: volumes.Volume) -> str:
    """The attached volume's state as its engine says it, or ``not answering``."""
    try:
        return str(control.call(vol.control_socket, "info", timeout=STATE_TIMEOUT)["state"])
    except LhfsError:
        return "not answering"


def stopped_engine(vol: volumes.Volume, record: dict[str, Any], force: bool, then: str) -> bool:
    """Whether the engine of a runtime record is stopped (SIGSTOP, a debugger), which is
    refused (``then``: what to run once it is resumed) unless ``force``, which kills it
    (True). Asked before anything waits on it: a stopped engine answers nothing, and what
    touches its device (an unmount's last writes) waits in the kernel for ever."""
    pid = record.get("pid", -1)
    if not (engine_alive(vol, record) and stopped(pid)):
        return False
    if not force:
        raise WrongState(
            f"the engine of {vol.name} (pid {pid}) is stopped: 'kill -CONT {pid}' resumes it, "
            f"then {then}; --force kills it (writes not yet flushed are lost)"
        )
    _kill(pid, vol.name)
    return True


def _kill(pid: int, name: str) -> None:
    """SIGKILL the engine ``pid`` of volume ``name`` and wait for it to be gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not volumes.alive(pid), STOP_TIMEOUT, f"the engine of {name}")


def detach(
    root: Path, name: str, force: bool = False, settled: Collection[str] = ()
) -> dict[str, Any]:
    """Stop the engine of ``name`` (see ``_detach``), one command at a time."""
    vol = volumes.load(root, name)
    with exclusive(vol, force):
        return _detach(root, name, force, settled)


def _detach(
    root: Path, name: str, force: bool = False, settled: Collection[str] = ()
) -> dict[str, Any]:
    """Stop the engine of ``name`` and clean up; returns what happened (``state``: now
    ``detached``; ``was``: the state the volume was in; whether the last flush reached the
    replicas; what was cleaned up). ``settled``: loop devices the caller's own release
    waited for already (see ``release``).

    A healthy engine whose device a loop device uses is refused (``lhfs umount`` first);
    a faulted one, one that does not answer, or (``force``) any, is let go with what is
    mounted on it: nothing more can reach its replicas anyway."""
    vol = volumes.load(root, name)
    record = vol.runtime_record()
    report: dict[str, Any] = {"name": name, "state": None, "was": None, "flushed": None}
    report["cleaned"] = []
    if record is None:
        raise WrongState(f"volume {name} is not attached")
    device = Path(record["device"])
    pid = record.get("pid", -1)
    # (a stopped one would answer nothing: each wait below in turn, 80 s, for nothing)
    if stopped_engine(vol, record, force, "detach"):
        report["was"], report["flushed"] = "not answering", False
        report["cleaned"].append(f"killed its engine (pid {pid}), which was stopped")
    elif engine_alive(vol, record):
        state = engine_state(vol)
        report["was"] = state
        if _stray_loops(vol, device):  # (an 'lhfs mount' or 'umount' cut short left them)
            report["cleaned"] += release(device, fuse=False, settled=settled)
        if loops_backed_by(device) and state != "faulted" and not force:
            loops = ", ".join(loops_backed_by(device))
            if state == "not answering":
                raise Busy(
                    f"the engine of {name} does not answer and {device} is in use by {loops}: "
                    "try again, or --force lets go of it (writes not yet flushed are lost)"
                )
            mounted = [m for loop in loops_backed_by(device) for m in mounted_at(loop)]
            fix = (
                f"unmount it first (lhfs --root {shlex.quote(str(root))} umount {mounted[0]})"
                if mounted
                else held_how(loops_backed_by(device))
            )
            raise Busy(f"{device} is in use by {loops}: {fix}")
        holders = device_holders(device) if state != "faulted" and not force else []
        if holders:
            raise Busy(
                f"{device} is open in process(es) {named(holders)}: detaching would break "
                "their I/O; let them close it, or --force lets go of it (their I/O fails)"
            )
        if loops_backed_by(device):  # (the FUSE file: the engine's)
            report["cleaned"] += release(device, fuse=False, settled=settled)
        try:
            answer = control.call(vol.control_socket, "detach", timeout=STOP_TIMEOUT)
            report["flushed"] = answer["flushed"] if isinstance(answer, dict) else True
        except LhfsError:
            report["flushed"] = False
        try:
            wait_for(lambda: not volumes.alive(pid), STOP_TIMEOUT, f"the engine of {name}")
        except TimeoutError:
            _kill(pid, name)
            report["cleaned"].append(f"killed its engine (pid {pid})")
    else:
        report["was"] = "crashed"
        report["flushed"] = False
    report["cleaned"] += _clear_dead_engine(vol, settled)
    report["cleaned"] = list(dict.fromkeys(report["cleaned"]))  # (each thing once)
    report["state"] = "detached"
    if report["was"] in ("crashed", "not answering") or any(
        done.startswith("killed its engine") for done in report["cleaned"]
    ):  # (an engine that ends by itself logs its end; a dead or killed one cannot)
        cleaned = "; ".join(report["cleaned"]) or "nothing was left to clean up"
        logs.note(vol.engine_log, "lhfs.command", f"let go ({report['was']}): {cleaned}")
    if record.get("device_made"):
        drop_device(device)
    return report
