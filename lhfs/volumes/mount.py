"""``lhfs mount`` / ``lhfs umount``: attach, loop device, format at most once, mount.

Whether a volume may be formatted is decided from two facts, never from memory or a guess:

1. the volume's durable filesystem record (``config.json``), written *before* mkfs runs
   (``formatting``) and updated after mkfs has completed and was flushed (``formatted``);
2. what the device really holds, read through the engine: a filesystem signature (``blkid``),
   and whether the volume was ever written at all (the replicas know: ``is_blank``).

mkfs runs only if there is no record and the volume was never written, or the record says
``formatting`` (mkfs never completed, so nothing was ever mounted or stored). A record of
``formatted`` with a device that shows no such filesystem, or a device that cannot be read, is
an error: formatting then would destroy data that the replicas may still hold.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.durable import atomic_write
from lhfs.core.errors import (
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    StorageError,
    WrongState,
)
from lhfs.core.procs import child_env, wait_for
from lhfs.core.units import format_size
from lhfs.engine import control
from lhfs.volumes import attachment

SUPPORTED = ("ext4", "xfs")
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-U", "{uuid}", "-E", "nodiscard", "{device}"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K", "-m", "uuid={uuid}", "{device}"],
}


# xfs refuses a second file system of the same UUID: volumes made from one backing image
# (or restored from one backup) share it, and each is a file system of its own.
MOUNT_OPTIONS = {"xfs": ["-o", "nouuid"]}
MIN_SIZE = {"xfs": 300 << 20}  # (mkfs.xfs refuses a smaller device)


def _run(args: list[str], what: str) -> str:
    """Run a system tool (without the store's secrets in its environment) to its end; its
    output, or ``LhfsError`` with the line of its error output that says why."""
    result = _to_end(args)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        usage = [n for n, line in enumerate(detail) if line.lower().startswith("usage")]
        detail = detail[: usage[0]] if usage and usage[0] else detail  # the reason, not usage
        detail = [line for line in detail if "dmesg(1) may have more" not in line] or detail
        raise LhfsError(f"{what} failed: {detail[-1] if detail else result.returncode}")
    return result.stdout


def _to_end(args: list[str]) -> subprocess.CompletedProcess:
    """Run a tool to its end: in a session of its own (a Ctrl-C at the terminal does not
    reach it), and waited for when this command is interrupted (SIGTERM, Ctrl-C), which then
    goes on unwinding. Killed half-way, mkfs, e2fsck or resize2fs leave a file system
    half-written; ``subprocess.run`` kills its child on any exception."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def probe(device: str) -> dict[str, str] | None:
    """The filesystem signature on ``device`` (``{"TYPE", "UUID"}``), None if there is none;
    an unreadable device is an error, not "empty"."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        raise StorageError(f"cannot open {device}: {exc.strerror}") from None
    aligned = mmap.mmap(-1, 1 << 20)  # O_DIRECT wants an aligned buffer: reads reach the engine
    try:
        os.preadv(fd, [aligned], 0)
    except OSError as exc:
        raise StorageError(f"cannot read {device}: {exc.strerror}") from None
    finally:
        aligned.close()
        os.close(fd)
    result = subprocess.run(
        ["blkid", "-p", "-o", "export", device], capture_output=True, text=True, env=child_env()
    )
    if result.returncode == 2:
        return None
    if result.returncode != 0:
        raise StorageError(f"cannot probe {device}: {result.stderr.strip() or result.returncode}")
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return fields if "TYPE" in fields else None


def decide(record: dict[str, Any] | None, found: dict[str, str] | None, blank: bool) -> str:
    """``format``, ``mount`` or ``adopt`` (mount a filesystem lhfs did not make); raises when
    neither is safe. Pure: the crash tests and the unit tests exercise every branch."""
    if record is None:
        if found is not None:
            return "adopt"
        if blank:
            return "format"
        raise CorruptState(
            "the volume holds data but no filesystem signature, and lhfs never formatted it: "
            "refusing to format (look at it with 'lhfs volume attach'; to format it anyway, run "
            "mkfs on the attached device yourself)"
        )
    if record["state"] == "formatting":
        return "format"
    if found is None:
        raise CorruptState(
            f"the volume was formatted as {record['type']} (UUID {record['uuid']}) but the device "
            "shows no filesystem: refusing to format over it; check the replicas"
        )
    if found.get("TYPE") != record["type"] or found.get("UUID") != record["uuid"]:
        raise CorruptState(
            f"the volume was formatted as {record['type']} {record['uuid']} but the device holds "
            f"{found.get('TYPE')} {found.get('UUID')}: refusing to mount or format"
        )
    return "mount"


def mount(
    root: Path, name: str, mountpoint: Path, fs: str | None = None, metrics: str | None = None
) -> dict[str, Any]:
    """Attach if needed, format if never formatted (as ``fs``: ext4 unless said), mount. A
    volume lhfs formatted is mounted as what its record says; ``fs`` given must agree."""
    if fs is not None and fs not in SUPPORTED:
        raise InvalidArgument(f"unsupported filesystem {fs!r} (choose from {', '.join(SUPPORTED)})")
    if not os.path.exists(mountpoint):
        raise NotFound(f"mount point {mountpoint.absolute()} does not exist")
    # (as the kernel lists it: a link, or '..', is mounted where it leads; a second mount
    # through it must find the first, and every message names that place)
    mountpoint = Path(os.path.realpath(mountpoint))
    if not mountpoint.is_dir():
        raise NotFound(f"mount point {mountpoint} is not a directory")
    own = os.path.realpath(volumes.volumes_dir(root))
    if mountpoint.is_relative_to(own):  # (as attach refuses a device there)
        raise InvalidArgument(
            f"mount point {mountpoint} is inside lhfs's own directories: choose a path "
            f"outside {volumes.volumes_dir(root)}"
        )
    vol = volumes.load(root, name)
    with attachment.place_held(root, mountpoint, "mount point", "mounted on"):
        return _mount(root, vol, mountpoint, fs, metrics)


def _mount(
    root: Path, vol: volumes.Volume, mountpoint: Path, fs: str | None, metrics: str | None
) -> dict[str, Any]:
    """``mount``, holding the mount point."""
    name = vol.name
    record = vol.filesystem
    asked = fs
    if record is not None:  # (formatted, or a format cut short: done again as it began)
        if fs is not None and record["state"] == "formatted" and record["type"] != fs:
            raise WrongState(_holds_another(name, record["type"], fs))
        fs = fs or record["type"]
    fs = fs or "ext4"
    if record is not None and record["state"] == "formatting":  # (said before it is attached)
        _can_format(vol, fs)
    with attachment.exclusive(vol):  # (another mount of it waits, then sees this one's)
        attached_here = False
        runtime = vol.runtime()
        if runtime is not None and metrics is not None:  # (only an engine's start takes it)
            served = (
                f"its engine serves them on {runtime['metrics']}"
                if runtime.get("metrics")
                else "its engine serves none"
            )
            raise WrongState(
                f"volume {name} is attached already: --metrics is for the attach that starts "
                f"its engine ({served})"
            )
        if runtime is None:
            attachment.attach(root, name, vol.dir / "device", metrics=metrics)
            attached_here = True
            runtime = vol.runtime()
            if runtime is None:
                raise LhfsError(f"volume {name} did not stay attached; see {vol.engine_log}")
        try:
            done = _mount_attached(vol, Path(runtime["device"]), mountpoint, fs, asked)
            return {**done, "metrics": runtime.get("metrics")}  # (where, if it serves them)
        except BaseException:
            if attached_here:  # leave things as they were
                _release(Path(runtime["device"]))
                attachment.detach(root, name)
            raise


def _release(device: Path) -> None:
    for loop in attachment.loops_backed_by(device):
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    wait_for(lambda: not attachment.loops_backed_by(device), 30, "the loop device to go")


def _can_format(vol: volumes.Volume, fs: str) -> None:
    """Refuse, before anything is recorded, a format that cannot be done: its mkfs missing,
    or a volume too small for ``fs``. Asked once the volume is known to be formatted (a
    volume with no record may hold a file system lhfs did not make: it is adopted, and
    neither matters)."""
    tool = MKFS[fs][0]
    if not shutil.which(tool):
        raise NotFound(f"{tool} is not installed: it is needed to format a new volume as {fs}")
    if vol.size < MIN_SIZE.get(fs, 0):
        raise InvalidArgument(
            f"{fs} needs a volume of {format_size(MIN_SIZE[fs])} at least and {vol.name} is "
            f"{format_size(vol.size)}: 'lhfs volume expand' it, or format it as ext4"
        )


def _holds_another(name: str, held: str, asked: str) -> str:
    """The refusal of ``--fs asked`` for a volume that holds a file system of another type."""
    return (
        f"volume {name} is formatted {held}, not {asked}: refusing to mount it as {asked} "
        f"(leave --fs out, or give --fs {held}; nothing was changed)"
    )


def _mount_attached(
    vol: volumes.Volume, device: Path, mountpoint: Path, fs: str, asked: str | None = None
) -> dict[str, Any]:
    """Mount the attached volume's ``device`` at ``mountpoint`` through a loop device (its own
    if it has one); a loop device made here is freed again if the mount fails or is refused.
    ``asked``: the file system the command named (``--fs``), which one found must be."""
    loops = attachment.loops_backed_by(device)
    already = attachment.mounted_at(loops[0]) if loops else []
    if already:
        if Path(already[0]) != mountpoint:
            raise Busy(f"volume {vol.name} is already mounted at {already[0]}")
        mounted = {"name": vol.name, "mountpoint": str(mountpoint), "loop": loops[0]}
        return {**mounted, "formatted": False, "grown": False, "todo": None}
    if attachment.is_mountpoint(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point")
    if loops:
        return _format_and_mount(vol, loops[0], mountpoint, fs, asked)
    loop = _run(["losetup", "--direct-io=on", "--find", "--show", str(device)], "losetup").strip()
    try:
        return _format_and_mount(vol, loop, mountpoint, fs, asked)
    except BaseException:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        raise


def _format_and_mount(
    vol: volumes.Volume, loop: str, mountpoint: Path, fs: str, asked: str | None = None
) -> dict[str, Any]:
    """Format ``loop`` if the volume never was (see ``decide``), then mount it; a file system
    lhfs did not make is adopted only if it is what ``asked`` names (when it names one)."""
    record = vol.filesystem
    blank = control.call(vol.control_socket, "blank")
    action = decide(record, probe(loop), blank)
    formatted = False
    if action == "format":
        _can_format(vol, fs)
        record = {"type": fs, "uuid": str(uuid.uuid4()), "state": "formatting"}
        vol.record_filesystem(record)
        try:
            _run([arg.format(uuid=record["uuid"], device=loop) for arg in MKFS[fs]], "mkfs")
        except LhfsError as exc:
            raise LhfsError(f"{exc}; {_not_formatted(vol, mountpoint, fs)}") from None
        _run(["blockdev", "--flushbufs", loop], "flush")
        control.call(vol.control_socket, "flush")
        record["state"] = "formatted"
        vol.record_filesystem(record)
        formatted = True
    elif action == "adopt":
        found = probe(loop) or {}
        if asked is not None and found.get("TYPE") != asked:  # (before anything is recorded)
            raise WrongState(_holds_another(vol.name, str(found.get("TYPE")), asked))
        record = {
            "type": found.get("TYPE", fs),
            "uuid": found.get("UUID", ""),
            "state": "formatted",
        }
        vol.record_filesystem(record)
    assert record is not None
    grown = not formatted and record["type"] == "ext4" and _grow_ext4_unmounted(vol, loop)
    options = MOUNT_OPTIONS.get(record["type"], [])
    _run(["mount", "-t", record["type"], *options, loop, str(mountpoint)], "mount")
    todo = None
    if not formatted and record["type"] == "xfs":
        try:  # (mounted: a grow that fails is said, the mount kept)
            grown = _grow_xfs_mounted(loop, str(mountpoint))
        except LhfsError as exc:
            todo = f"xfs_growfs {mountpoint} ({exc})"
    return {
        "name": vol.name,
        "mountpoint": str(mountpoint),
        "loop": loop,
        "formatted": formatted,
        "grown": grown,
        "todo": todo,
    }


def _ext4_size(loop: str) -> tuple[int, int] | None:
    """(size, block size) of the ext4 on ``loop``, as dumpe2fs says (None: it says no such
    thing, and mount tells what is wrong)."""
    fields = {}
    for line in _run(["dumpe2fs", "-h", loop], "dumpe2fs").splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    try:
        block = int(fields["Block size"])
        return int(fields["Block count"]) * block, block
    except (KeyError, ValueError):
        return None


def _grow_ext4_unmounted(vol: volumes.Volume, loop: str) -> bool:
    """Grow an ext4 smaller than its volume by a block or more (expanded while it was not
    mounted, or mounted where growing online was not allowed) before it is mounted: offline,
    resize2fs needs no capability, only a checked file system (e2fsck -p: 0 clean, 1
    repaired). Any growth, as ``volume expand`` says a mount does it; a few blocks resize2fs
    cannot use (too few for a group of their own) are tried once per device size, recorded
    in ``GROW_TRIED`` (e2fsck -f of a large file system at every mount would cost minutes)."""
    found = _ext4_size(loop)
    capacity = _capacity(loop)
    if found is None or capacity - found[0] < found[1]:
        return False
    tried = vol.dir / GROW_TRIED
    seen = f"{capacity} {found[0]}"  # (a file system made again at this size is tried anew)
    with contextlib.suppress(OSError):
        if tried.read_text().strip() == seen:
            return False
    checked = _to_end(["e2fsck", "-f", "-p", loop])
    if checked.returncode not in (0, 1):
        raise LhfsError(
            f"the ext4 on {loop} is smaller than its volume, and e2fsck found errors it would "
            f"not repair unattended (exit {checked.returncode}): run e2fsck {loop} by hand"
        )
    _run(["resize2fs", loop], "resize2fs")
    after = _ext4_size(loop)
    if after is not None and after[0] > found[0]:
        tried.unlink(missing_ok=True)
        return True
    atomic_write(tried, f"{seen}\n".encode())  # (nothing it could use: not tried again)
    return False


def _xfs_size(mountpoint: str) -> tuple[int, int] | None:
    """(size, block size) of the xfs mounted at ``mountpoint``, as ``xfs_growfs -n`` says
    (None: an answer of another form)."""
    found = re.search(
        r"^data\s*=\s*bsize=(\d+)\s+blocks=(\d+)",
        _run(["xfs_growfs", "-n", mountpoint], "xfs_growfs -n"),
        re.MULTILINE,
    )
    return None if found is None else (int(found[1]) * int(found[2]), int(found[1]))


def _grow_xfs_mounted(loop: str, mountpoint: str) -> bool:
    """Grow an xfs smaller than its volume once mounted (xfs grows only online)."""
    found = _xfs_size(mountpoint)
    if found is None or _capacity(loop) - found[0] < found[1]:
        return False  # (nothing to grow, or an answer of another form: left as it is)
    # (any growth: a few blocks it cannot use change nothing, and it says so)
    return "data blocks changed" in _run(["xfs_growfs", mountpoint], "xfs_growfs")


def _fs_size(fstype: str | None, loop: str, mountpoint: str) -> int | None:
    """The size of the file system of type ``fstype`` mounted from ``loop`` at
    ``mountpoint`` (None: not one lhfs grows, or its tool does not say)."""
    try:
        if fstype == "ext4":
            found = _ext4_size(loop)
        elif fstype == "xfs":
            found = _xfs_size(mountpoint)
        else:
            return None
    except LhfsError:  # (its tool missing or failing: grow says what to do)
        return None
    return None if found is None else found[0]


def fs_behind(device: Path, tried: Path | None = None) -> bool:
    """Whether the file system mounted from a loop device on ``device`` is smaller than that
    loop device by a block or more: an expansion killed (or refused a tool or capability)
    after it grew the loop device and before it grew the file system. Its size is asked of
    its tool (``dumpe2fs``, ``xfs_growfs -n``); a tool that does not answer: behind (``grow``
    then says what is missing). Not behind by a tail its grow tool found nothing to use in,
    at this device size (``tried``: the volume's ``GROW_TRIED``, as a mount reads it)."""
    for loop in attachment.loops_backed_by(device):
        for mountpoint in attachment.mounted_at(loop)[:1]:
            fstype = _fstype_at(mountpoint)
            if fstype not in GROW:
                continue
            size = _fs_size(fstype, loop, mountpoint)
            if size is None:
                return True
            capacity = _capacity(loop)
            if capacity - size >= 4096 and not _tried_at(tried, capacity, size):
                return True
    return False


def _tried_at(tried: Path | None, capacity: int, size: int) -> bool:
    """Whether ``tried`` (``GROW_TRIED``) says a grow found nothing to use in a file system of
    ``size`` on a device of ``capacity``."""
    with contextlib.suppress(OSError):
        return tried is not None and tried.read_text().strip() == f"{capacity} {size}"
    return False


def _not_formatted(vol: volumes.Volume, mountpoint: Path, fs: str) -> str:
    """What a failed mkfs leaves, said with it: no file system, and a record of a format
    begun (``formatting``), which makes a plain ``lhfs mount`` run mkfs as ``fs`` again (and
    fail the same way, if the cause stays) and ``--fs`` choose another; each hint runs as it
    is written."""
    root, point = shlex.quote(str(vol.root)), shlex.quote(str(mountpoint))
    mount = f"lhfs --root {root} mount {vol.name} {point}"
    others = ", ".join(f"'{mount} --fs {other}' as {other}" for other in SUPPORTED if other != fs)
    return f"volume {vol.name} is not formatted: '{mount}' formats it as {fs} again, {others}"


GROW = {"ext4": ["resize2fs", "{loop}"], "xfs": ["xfs_growfs", "{mountpoint}"]}
GROW_TRIED = "grow-tried"  # (the device size at which resize2fs last found nothing to use)


def grow(device: Path, size: int, tried: Path | None = None) -> dict[str, Any]:
    """After the volume behind ``device`` grew to ``size``: grow the loop device on it and the
    file system mounted there, online. Returns ``loop``, ``filesystem``, ``mountpoint`` (what
    was grown) and ``todo``: None, or what an operator still has to run (and why). A grow
    that found nothing to use is recorded in ``tried`` (the volume's ``GROW_TRIED``), as a
    mount records it: ``fs_behind`` does not have it tried again at the same device size."""
    out: dict[str, Any] = {"loop": None, "filesystem": None, "mountpoint": None, "todo": None}
    loops = attachment.loops_backed_by(device)
    if not loops:
        return out  # nothing on top of the device: it already has the new size
    loop = loops[0]
    smaller = _capacity(loop) < size  # (not: only its file system is behind)
    try:
        wait_for(lambda: os.stat(device).st_size == size, 10, "the device file to grow")
        _run(["losetup", "--set-capacity", loop], "losetup --set-capacity")
        wait_for(lambda: _capacity(loop) == size, 10, f"{loop} to grow")
    except (LhfsError, TimeoutError) as exc:
        out["todo"] = f"losetup --set-capacity {loop}, then grow the file system ({exc})"
        return out
    out["loop"] = loop if smaller else None
    mounts = attachment.mounted_at(loop)
    if not mounts:
        return out
    mountpoint = mounts[0]
    fstype = _fstype_at(mountpoint)
    command = GROW.get(fstype or "")
    if command is None:
        out["todo"] = f"grow the {fstype or 'unknown'} file system at {mountpoint} by hand"
        return out
    args = [arg.format(loop=loop, mountpoint=mountpoint) for arg in command]
    if shutil.which(args[0]) is None:
        out["todo"] = f"{' '.join(args)} ({args[0]} is not installed)"
        return out
    if fstype == "ext4" and not capable(CAP_SYS_RESOURCE):
        out["todo"] = (
            f"{' '.join(args)}: growing a mounted ext4 needs the CAP_SYS_RESOURCE capability, "
            "which this process lacks (run it where it has it, or 'lhfs umount' and "
            "'lhfs mount' it again: a mount grows it)"
        )
        return out
    before = _fs_size(fstype, loop, mountpoint)
    try:
        _run(args, args[0])
    except LhfsError as exc:
        out["todo"] = f"{' '.join(args)} ({exc})"
        return out
    after = _fs_size(fstype, loop, mountpoint)
    if before is not None and after is not None and after <= before:
        if tried is not None:  # (a few blocks its tool cannot use: nothing grown, nothing to do)
            atomic_write(tried, f"{_capacity(loop)} {after}\n".encode())
        return out
    return {**out, "filesystem": fstype, "mountpoint": mountpoint}


CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 21, 24  # (linux/capability.h)


def capable(capability: int) -> bool:
    """Whether this process holds ``capability`` (in its effective set: CapEff)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> capability & 1)
    return False


def loop_behind(device: Path, size: int) -> bool:
    """Whether a loop device on ``device`` is smaller than ``size`` (the volume grew, and
    the expansion was killed before it grew what is on top)."""
    return any(_capacity(loop) < size for loop in attachment.loops_backed_by(device))


def _capacity(loop: str) -> int:
    name = Path(loop).name
    return int(Path(f"/sys/block/{name}/size").read_text()) * 512


def _fstype_at(mountpoint: str) -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if attachment.unescape(fields[1]) == mountpoint:  # (a space is \040 there)
                return fields[2]
    return None


def _unmounted_but_attached(root: Path) -> str:
    """What a ``umount`` cut short may have left (its file system unmounted, its volume
    still attached, perhaps with a loop device): said with "nothing is mounted", since the
    mount point no longer leads to the volume, and a rerun would say only that."""
    left = []
    for vol in volumes.readable(root):
        with contextlib.suppress(LhfsError, OSError):
            record = vol.runtime_record()
            if record is None or vol.filesystem is None:
                continue
            device = Path(record["device"])
            loops = attachment.loops_backed_by(device)
            # (its loop device, or the device 'lhfs mount' attaches it on: not one of
            # 'volume attach --device', used as it is)
            if (loops or device == vol.dir / "device") and not any(
                attachment.mounted_at(loop) for loop in loops
            ):
                left.append(vol.name)
    if not left:
        return ""
    detach = " and ".join(f"'lhfs volume detach {name}'" for name in left)
    return f" (attached with no file system mounted: {', '.join(left)}: {detach} lets go)"


def umount(root: Path, mountpoint: Path, force: bool = False) -> dict[str, Any]:
    """Unmount the file system, free the loop device, detach the volume: also when the volume
    is faulted or its engine died (the file system is then unmounted lazily: its device no
    longer answers). A busy file system of a working volume is refused, with the reason, and
    so is one whose engine does not answer, unless ``force``."""
    mountpoint = Path(os.path.realpath(mountpoint))  # (the kernel lists real paths)
    sources = [source for source, point in attachment.mount_table() if point == str(mountpoint)]
    if not sources:
        raise NotFound(f"nothing is mounted at {mountpoint}{_unmounted_but_attached(root)}")
    owner = _owner_of(root, sources[-1])
    if owner is None:
        raise NotFound(f"{mountpoint} is not an lhfs volume of {root}")
    vol, device = owner
    with attachment.exclusive(vol, force):
        return _umount(root, vol, device, mountpoint, force)


def _umount(
    root: Path, vol: volumes.Volume, device: Path, mountpoint: Path, force: bool
) -> dict[str, Any]:
    record = vol.runtime_record()
    state = "crashed"
    if record is not None and attachment.stopped_engine(vol, record, force, "umount"):
        pass  # (killed: its file system is let go lazily below, as a crashed one's)
    elif record is not None and attachment.engine_alive(vol, record):
        state = attachment.engine_state(vol)
    result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    if result.returncode:
        detail = (result.stderr or result.stdout).strip().splitlines()
        why = detail[-1] if detail else str(result.returncode)
        if state == "not answering" and not force:
            raise Busy(
                f"umount failed ({why}) and the engine of {vol.name} does not answer: try "
                "again, or --force lets go of it (writes not yet flushed are lost)"
            )
        if state in ("healthy", "degraded"):
            busy = "busy" in why  # (a shell's directory or an open file there; --force keeps it)
            hint = f": something uses it ('fuser -vm {mountpoint}' shows what)" if busy else ""
            raise LhfsError(f"umount failed: {why}{hint}")
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    done = attachment.release(device, fuse=False)
    # (a loop device that stayed was waited for here: the detach does not wait for it again)
    settled = attachment.loops_backed_by(device)
    try:
        report = attachment.detach(root, vol.name, force=force, settled=settled)
    except Busy as exc:  # (held elsewhere: what was done here is said with it)
        raise Busy(f"unmounted {mountpoint} here; {vol.name} stays attached: {exc}") from None
    if state not in ("healthy", "degraded"):  # (a clean-up: what it freed is said too)
        report["cleaned"] = list(dict.fromkeys([*done, *report["cleaned"]]))
    return {**report, "mountpoint": str(mountpoint)}


def _owner_of(root: Path, loop: str) -> tuple[volumes.Volume, Path] | None:
    """The volume whose device (running engine or one that died) ``loop`` sits on."""
    for vol in volumes.readable(root):
        record = vol.runtime_record()
        for device in {Path(record["device"]) if record else None, vol.dir / "device"}:
            if device is not None and loop in attachment.loops_backed_by(device):
                return vol, device
    return None
