"""Volume management as the command line sees it: create, attach, detach, inspect, snapshot.

An attached volume is handled through its engine's control socket; a detached one directly on
its local replica directories (only the replicas not recorded as failed, which all hold the same
data). Every check that can refuse a request runs before anything changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.errors import AlreadyExists, Busy, InvalidArgument, LhfsError, NotFound
from lhfs.core.names import check_name
from lhfs.core.procs import child_env, read_line_matching, wait_for
from lhfs.engine import control
from lhfs.store.chunkstore import ChunkStore
from lhfs.volumes import standby

ATTACH_TIMEOUT = 120.0


# -- create and remove -----------------------------------------------------------------------


def create(
    root: Path,
    name: str,
    size: int,
    chunk_size: int,
    replicas: int,
    backing: Path | None,
    extra: dict[str, Any] | None = None,
) -> volumes.Volume:
    """Create a volume with local replicas; ``extra`` goes into its configuration from the
    start (a DR standby is never visible without its ``dr`` section)."""
    if backing is not None and not backing.is_file():
        raise NotFound(f"backing image file {backing} does not exist")
    vol, tmp = volumes.create(root, name, size, chunk_size, replicas, extra=extra)
    try:
        for replica in vol.replicas:
            store = ChunkStore.create(
                tmp / "replicas" / replica["id"],
                size,
                chunk_size,
                backing,
                f"{replica['id']}-{backing.name}" if backing else "backing.img",
                volume_id=vol.config["volume_id"],
            )
            info = store.info()
            store.close()
        vol.config["backing_image"] = info["backing_image"] and info["backing_image"]["id"]
        vol.save_to(tmp)
        volumes.finish_create(vol, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return vol


def remove(root: Path, name: str) -> None:
    vol = volumes.load(root, name)
    if vol.runtime() is not None:
        raise Busy(f"volume {name} is attached: detach it first")
    standby.remove(vol)  # a standby's follower stops first
    trash = vol.dir.with_name(f".{name}.removing")
    os.rename(vol.dir, trash)
    shutil.rmtree(trash)


def export_key(root: Path, name: str, out: Path) -> None:
    """Write a copy of the volume's key to ``out`` (owner-only), never over an existing file."""
    key = volumes.load(root, name).key()
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"{out} already exists: choose another file")
    if not out.parent.is_dir():
        raise NotFound(f"directory {out.parent} does not exist")
    key.save(out)


# -- attach and detach -----------------------------------------------------------------------


def _check_device(device: Path) -> None:
    """The device must be a regular file (created if missing) that nothing is mounted on."""
    try:
        device.stat()
    except FileNotFoundError:
        if not device.parent.is_dir():
            raise NotFound(f"directory {device.parent} does not exist") from None
        device.touch()
        return
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose engine died
            cleanup_stale_device(device)
            return
        raise
    if device.is_dir():
        raise InvalidArgument(f"device path {device} is a directory; give a file path")
    if is_mountpoint(device):
        raise Busy(f"{device} is already mounted")
    if not device.is_file():
        raise InvalidArgument(f"device path {device} is not a regular file")


def is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def loops_backed_by(device: Path) -> list[str]:
    """Loop devices whose backing file is ``device``."""
    out = []
    target = os.path.abspath(device)
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == target:
            out.append(f"/dev/{entry.name}")
    return out


def cleanup_stale_device(device: Path) -> None:
    """Undo what a killed engine left: mounts of loops on the dead FUSE file, the loops, the
    FUSE mount itself. Only ever unmounts; never touches data."""
    for loop in loops_backed_by(device):
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1] for line in f if line.split()[0] == loop]
        for mountpoint in mounted:
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    subprocess.run(["fusermount3", "-u", "-z", str(device)], capture_output=True)


def attach(root: Path, name: str, device: Path, restoring: bool = False) -> dict[str, Any]:
    """Start the engine on ``device``. Only the restore itself attaches a volume that is being
    restored (``restoring``); anyone else would see a partial volume."""
    vol = volumes.load(root, name)
    runtime = vol.runtime()
    if runtime is not None:
        raise AlreadyExists(f"volume {name} is already attached at {runtime['device']}")
    vol.require_not_standby("attaching it")
    if not restoring:
        vol.require_complete(f"attaching it ('lhfs volume rm {name}' and restore again)")
    device = device.absolute()
    for other in volumes.list_names(root):
        info = volumes.load(root, other).runtime()
        if info and Path(info["device"]) == device:
            raise Busy(f"{device} is the device of volume {other}")
    _check_device(device)
    log_path = vol.dir / "engine.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lhfs", "--root", str(root), "engine-run", name, str(device)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env=child_env(),  # the engine and its replicas never talk to the store
        )
    try:
        line = read_line_matching(proc, r"^(ready|error: .*)$", ATTACH_TIMEOUT).group(1)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise LhfsError(f"the engine did not start ({exc}); see {log_path}") from None
    finally:
        if proc.stdout:
            proc.stdout.close()
    if line != "ready":
        proc.wait(30)
        raise LhfsError(line.removeprefix("error: "))
    return {"name": name, "device": str(device), "pid": proc.pid}


def detach(root: Path, name: str, timeout: float = ATTACH_TIMEOUT) -> None:
    vol = volumes.load(root, name)
    runtime = vol.runtime()
    if runtime is None:
        raise InvalidArgument(f"volume {name} is not attached")
    device = Path(runtime["device"])
    loops = loops_backed_by(device)
    if loops:
        raise Busy(f"{device} is in use by {', '.join(loops)}: unmount it first (lhfs umount)")
    control.call(vol.control_socket, "detach")
    wait_for(lambda: vol.runtime() is None, timeout, f"the engine of {name} to stop")


# -- inspection ------------------------------------------------------------------------------


def healthy_local_dirs(vol: volumes.Volume) -> list[Path]:
    dirs = [
        vol.replica_dir(r) for r in vol.replicas if r.get("mode", "RW") == "RW" and r.get("local")
    ]
    if not dirs:
        raise NotFound(f"volume {vol.name} has no healthy local replica")
    return [d for d in dirs if d is not None]


def freshest_local(vol: volumes.Volume) -> Path:
    best, best_rev = None, -1
    for directory in healthy_local_dirs(vol):
        with ChunkStore.open(directory) as store:
            if store.revision > best_rev:
                best, best_rev = directory, store.revision
    assert best is not None
    return best


def info(root: Path, name: str) -> dict[str, Any]:
    vol = volumes.load(root, name)
    base = {
        "name": name,
        "size": vol.size,
        "chunk_size": vol.chunk_size,
        "backing_image": vol.config.get("backing_image"),
        "filesystem": vol.filesystem,
    }
    if vol.config.get("restoring"):  # a restore whose process died leaves it incomplete
        mark = vol.config["restoring"]
        base["restoring"] = {**mark, "interrupted": not volumes.alive(mark["pid"])}
    if vol.runtime() is not None:
        try:
            live = control.call(vol.control_socket, "info", timeout=30)
        except control.NotAttached:
            live = None
        if live is not None:
            snapshots = [_snapshot_entry(s) for s in live.pop("snapshots") if s["name"]]
            if vol.config.get("restoring"):
                live["state"] = "restoring"
            return {**base, **live, "attached": True, "snapshots": snapshots}
    replicas = [
        {
            "id": r["id"],
            "address": r.get("address") if not r.get("local") else None,
            "mode": r.get("mode", "RW"),
            "error": r.get("error"),
            "rebuild_progress": None,
        }
        for r in vol.replicas
    ]
    try:
        with ChunkStore.open(freshest_local(vol)) as store:
            snapshots = [_snapshot_entry(s) for s in store.list_layers() if s["name"]]
    except LhfsError:
        snapshots = []
    state = "restoring" if vol.config.get("restoring") else "detached"
    if vol.config.get("dr"):
        state = "restoring" if standby.load_state(vol)["backup"] is None else "standby"
        base["dr"] = vol.config["dr"]
    return {
        **base,
        "state": state,
        "attached": False,
        "replicas": replicas,
        "snapshots": snapshots,
    }


def _snapshot_entry(layer: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": layer["name"],
        "created": layer["created"],
        "size": layer["size"],
        "active": layer["active"],
    }


def list_volumes(root: Path) -> list[dict[str, Any]]:
    return [info(root, name) for name in volumes.list_names(root)]


def checksum(root: Path, name: str) -> str:
    vol = volumes.load(root, name)
    if vol.runtime() is not None:
        control.call(vol.control_socket, "flush")
        return control.call(vol.control_socket, "checksum")
    with ChunkStore.open(freshest_local(vol)) as store:
        return store.checksum()


# -- changes -----------------------------------------------------------------------------------


def _on_every_replica(vol: volumes.Volume, action: str, *args: Any) -> Any:
    """Apply a store method to every healthy local replica of a detached volume."""
    result = None
    for directory in healthy_local_dirs(vol):
        with ChunkStore.open(directory) as store:
            result = getattr(store, action)(*args)
    return result


def expand(root: Path, name: str, size: int) -> None:
    vol = volumes.load(root, name)
    if size < vol.size:
        raise InvalidArgument(f"cannot shrink volume {name} ({vol.size} bytes) to {size}")
    if size % vol.chunk_size:
        raise InvalidArgument(f"size {size} is not a multiple of the chunk size {vol.chunk_size}")
    vol.require_not_standby("expanding it")
    vol.require_complete("expanding it")
    if vol.runtime() is not None:
        control.call(vol.control_socket, "expand", size=size)
        return
    _on_every_replica(vol, "expand", size)
    vol.update(lambda config: config.update(size=size))


def snapshot_create(root: Path, name: str, snapshot: str | None) -> dict[str, Any]:
    vol = volumes.load(root, name)
    snapshot = check_name(snapshot or time.strftime("snap-%Y%m%d-%H%M%S"), "snapshot name")
    vol.require_not_standby("a snapshot")
    vol.require_complete("a snapshot")
    if vol.runtime() is not None:
        return _snapshot_entry(control.call(vol.control_socket, "snapshot", name=snapshot))
    with contextlib.ExitStack() as opened:
        stores = [opened.enter_context(ChunkStore.open(d)) for d in healthy_local_dirs(vol)]
        for store in stores:  # refuse before changing anything
            if any(s["name"] == snapshot for s in store.list_layers()):
                raise AlreadyExists(f"snapshot {snapshot!r} already exists")
        return _snapshot_entry([store.snapshot(snapshot) for store in stores][-1])


def snapshot_list(root: Path, name: str) -> list[dict[str, Any]]:
    return info(root, name)["snapshots"]


def snapshot_remove(root: Path, name: str, snapshot: str) -> None:
    vol = volumes.load(root, name)
    vol.require_not_standby("removing a snapshot")
    if vol.runtime() is not None:
        control.call(vol.control_socket, "snapshot_rm", name=snapshot, timeout=None)
        return
    _require_snapshot(vol, snapshot)
    _on_every_replica(vol, "remove_snapshot", snapshot)


def snapshot_revert(root: Path, name: str, snapshot: str) -> None:
    vol = volumes.load(root, name)
    if vol.runtime() is not None:
        raise Busy(f"volume {name} is attached: detach it before reverting")
    vol.require_not_standby("a revert")
    _require_snapshot(vol, snapshot)
    _on_every_replica(vol, "revert", snapshot)


def _require_snapshot(vol: volumes.Volume, snapshot: str) -> None:
    for directory in healthy_local_dirs(vol):
        with ChunkStore.open(directory) as store:
            if not any(s["name"] == snapshot for s in store.list_layers()):
                raise NotFound(f"volume {vol.name} has no snapshot {snapshot!r}")


# -- replicas --------------------------------------------------------------------------------


def _attached(vol: volumes.Volume, what: str) -> None:
    if vol.runtime() is None:
        raise InvalidArgument(f"volume {vol.name} is not attached: {what} runs online")


def replica_add(root: Path, name: str, address: str | None) -> dict[str, Any]:
    """Add a replica to an attached volume, or to one being restored: the restore is asked
    to attach it and goes on through its engine, which rebuilds the new replica online."""
    vol = volumes.load(root, name)
    restoring = vol.config.get("restoring")
    if vol.runtime() is None and restoring and volumes.alive(restoring["pid"]):
        vol.update(lambda config: config["restoring"].update(attach=True))

        def answered() -> bool:
            now = volumes.load(root, name)
            done = not now.config.get("restoring") or not volumes.alive(restoring["pid"])
            return done or now.runtime() is not None

        wait_for(answered, ATTACH_TIMEOUT, f"the restore of {name} to attach it")
    _attached(vol, "a rebuild")
    return control.call(vol.control_socket, "replica_add", address=address)


def replica_remove(root: Path, name: str, replica_id: str) -> None:
    vol = volumes.load(root, name)
    if vol.runtime() is not None:
        control.call(vol.control_socket, "replica_rm", id=replica_id)
        return
    entry = vol.replica(replica_id)
    vol.require_not_standby("removing a replica")
    others = [r for r in vol.replicas if r["id"] != replica_id and r.get("mode", "RW") == "RW"]
    if entry.get("mode", "RW") == "RW" and not others:
        raise InvalidArgument(f"{replica_id} is the last healthy replica: it cannot be removed")
    vol.update(lambda c: c.update(replicas=[r for r in c["replicas"] if r["id"] != replica_id]))
    if entry.get("local"):
        shutil.rmtree(vol.dir / "replicas" / replica_id, ignore_errors=True)


def scrub(root: Path, name: str) -> dict[str, Any]:
    vol = volumes.load(root, name)
    _attached(vol, "a scrub")
    return control.call(vol.control_socket, "scrub", timeout=None)


def replica_state(root: Path, name: str, replica_id: str) -> dict[str, Any]:
    for replica in info(root, name)["replicas"]:
        if replica["id"] == replica_id:
            return replica
    raise NotFound(f"replica {replica_id} is gone from volume {name}")
