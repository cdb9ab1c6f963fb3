"""``lhfs doctor``: a preflight check of what lhfs needs, each thing said with what to do.

Every check gives ``ok``, ``warn`` (works, but something is off) or ``fail`` (the operation that
needs it will not work), a detail, and for a warning or a failure what to do. The checks are
independent: a failing one does not hide the others. Nothing is changed, but for a probe object
written to the bucket and removed at once.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lhfs.config import disks
from lhfs.config import root as roots
from lhfs.config import volume as volumes
from lhfs.core.errors import InvalidArgument, LhfsError, WrongVolume
from lhfs.core.units import format_size, format_sizes
from lhfs.store.chunkstore import disk_bytes, largest_file, replica_size, replica_volume_id
from lhfs.volumes import attachment, manage, standby

OK, WARN, FAIL = "ok", "warn", "fail"
REACH_TIMEOUT = 5.0
SKEW_WARN, SKEW_FAIL = 60.0, 600.0  # S3 refuses signatures more than 15 minutes off


@dataclass
class Check:
    check: str
    status: str
    detail: str
    hint: str | None = None


def run(
    root: Path, volume: str | None, target: str | None, retry_timeout: float = REACH_TIMEOUT
) -> list[Check]:
    checks = [*_host(root)]
    if volume is not None:
        checks += _volume(root, volume)
    if target is not None:
        checks += _store(target, retry_timeout)
    return checks


def report(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]


# -- this host -----------------------------------------------------------------------------


def _host(root: Path) -> list[Check]:
    out = []
    if os.geteuid() == 0:
        out.append(Check("root", OK, "running as root"))
    else:
        out.append(Check("root", FAIL, "not root", "attaching, loop devices and mounts need root"))
    out.append(_device("fuse", Path("/dev/fuse"), "install fuse3 and load the fuse module"))
    out.append(_device("loop", Path("/dev/loop-control"), "load the loop module (modprobe loop)"))
    out += _capabilities()
    for tool, status, hint in TOOLS:
        found = shutil.which(tool)
        out.append(
            Check(f"tool {tool}", OK, found)
            if found
            else Check(f"tool {tool}", status, f"{tool} is not installed", hint)
        )
    out += _root(root)
    return out


# What ``lhfs mount``, ``umount`` and ``volume expand`` run, found on $PATH as they find them:
# a missing one of the first kind fails every mount (or every ext4 one), of the second only
# what it is for.
_EXT4_GROW = "volume expand cannot grow a mounted ext4, nor a mount one expanded meanwhile"
TOOLS = (
    ("fusermount3", FAIL, "install fuse3"),
    ("losetup", FAIL, "install util-linux"),
    ("blkid", FAIL, "install util-linux"),
    ("blockdev", FAIL, "install util-linux (a format is flushed with it)"),
    ("mount", FAIL, "install mount"),
    ("umount", FAIL, "install mount"),
    ("mkfs.ext4", FAIL, "install e2fsprogs (ext4 is the default file system)"),
    ("dumpe2fs", FAIL, "install e2fsprogs (every ext4 mount reads its size with it)"),
    ("e2fsck", WARN, f"install e2fsprogs: without it {_EXT4_GROW}"),
    ("resize2fs", WARN, f"install e2fsprogs: without it {_EXT4_GROW}"),
    ("mkfs.xfs", WARN, "install xfsprogs to format volumes as xfs"),
    ("xfs_growfs", WARN, "install xfsprogs: without it an xfs volume is not grown"),
)


# (capability, check, status without it, held, lacked, hint)
_CAPABILITIES = (
    (
        "CAP_SYS_ADMIN",
        "cap_sys_admin",
        FAIL,
        "held: file systems and FUSE can be mounted",
        "this process lacks CAP_SYS_ADMIN: nothing can be mounted (attach, mount)",
        "run lhfs with it (a container: --cap-add SYS_ADMIN, or privileged)",
    ),
    (
        "CAP_SYS_RESOURCE",
        "cap_sys_resource",
        WARN,
        "held: a mounted ext4 can be grown online",
        "this process lacks CAP_SYS_RESOURCE: volume expand cannot grow a mounted ext4 online "
        "(xfs it can)",
        "run lhfs with it (a container: --cap-add SYS_RESOURCE); else 'lhfs umount' and "
        "'lhfs mount' grow it offline",
    ),
)


def _capabilities() -> list[Check]:
    """What root may still lack (a container's root): CAP_SYS_ADMIN, without which nothing
    is mounted, and CAP_SYS_RESOURCE, which the kernel wants to grow a mounted ext4 (the
    commands lhfs runs inherit this process's capabilities)."""
    from lhfs.volumes import mount

    if os.geteuid() != 0:
        return []  # (the root check fails already: a user has none of them)
    return [
        Check(check, OK, held)
        if mount.capable(getattr(mount, capability))
        else Check(check, status, lacked, hint)
        for capability, check, status, held, lacked, hint in _CAPABILITIES
    ]


def _device(name: str, path: Path, hint: str) -> Check:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return Check(name, FAIL, f"cannot open {path}: {exc.strerror}", hint)
    return Check(name, OK, f"{path} can be opened")


def _root(root: Path) -> list[Check]:
    existing = root
    while not existing.exists():
        existing = existing.parent
    out = []
    if root.exists():
        mode = root.stat().st_mode & 0o777
        try:
            to_make_private = roots.check(root)
        except LhfsError as exc:  # (what every other command refuses)
            out.append(Check("root dir", FAIL, str(exc), "give lhfs a directory of its own"))
        else:
            if to_make_private:
                hint = f"chmod 700 {shlex.quote(str(root))} (the next lhfs command does it)"
                out.append(
                    Check("root dir", WARN, f"{root} is readable by others ({mode:o})", hint)
                )
            else:
                out.append(Check("root dir", OK, f"{root} ({mode:o})"))
    else:
        out.append(Check("root dir", OK, f"{root} does not exist yet: made at the first volume"))
    for name in manage.removals_cut_short(root):  # (out of sight otherwise, its files kept)
        lhfs = f"lhfs --root {shlex.quote(str(root))}"
        detail = f"the removal of volume {name} was cut short: its files are still there"
        out.append(Check("removal", WARN, detail, f"{lhfs} volume rm {name}"))
    free = shutil.disk_usage(existing).free
    growth = _may_grow(root)
    detail = f"{format_size(free)} free under {existing}"
    if growth:
        detail += f"; the local replicas here may still grow by {format_size(growth)}"
    out.append(
        Check("free space", OK, detail)
        if free >= max(growth, 1 << 30)
        else Check(
            "free space",
            WARN,
            detail,
            "volumes are thin: once the disk is full their writes are refused (no space), "
            "until room is made",
        )
    )
    try:
        largest = largest_file(existing)
        out.append(Check("file size", OK, f"files up to {format_size(largest)} under {existing}"))
    except OSError as exc:
        out.append(Check("file size", FAIL, f"cannot probe {existing}: {exc.strerror}"))
    return out


def _may_grow(root: Path) -> int:
    """How much more the local replicas under ``root`` may take if every volume were written
    whole (their files are sparse): what thin volumes promise beyond the disk's free space."""
    total = 0
    for name in volumes.list_names(root) if root.exists() else []:
        try:
            vol = volumes.load(root, name)
            for replica in vol.replicas:
                directory = vol.replica_dir(replica) if replica.get("local") else None
                if replica.get("disk"):
                    continue  # (not on the root's disk)
                if directory is not None and directory.is_dir():
                    total += max(0, vol.size - disk_bytes(directory))
        except (LhfsError, OSError):
            continue  # (the volume check says what is wrong with it)
    return total


# -- a volume ------------------------------------------------------------------------------


def _volume(root: Path, name: str) -> list[Check]:
    lhfs = f"lhfs --root {shlex.quote(str(root))}"  # (each hint runs as it is written)
    try:
        vol = volumes.load(root, name)
    except InvalidArgument:  # (a name no volume can have: a usage mistake)
        raise
    except LhfsError as exc:
        return [Check("volume", FAIL, str(exc), f"{lhfs} volume ls")]
    out = []
    unservable = volumes.unservable(vol)
    if unservable is not None:
        out.append(Check("volume", FAIL, unservable, f"{lhfs} volume info {name}"))
    try:
        largest = largest_file(vol.dir)
        if vol.size > largest:
            out.append(
                Check(
                    "volume size",
                    FAIL,
                    "{} > files up to {} here".format(*format_sizes(vol.size, largest)),
                    "move the root",
                )
            )
    except OSError:
        pass
    restoring = vol.config.get("restoring")
    if restoring:  # (it holds part of a backup: nothing may take it for data)
        out.append(_restoring(lhfs, name, restoring))
    if vol.config.get("dr"):
        out.append(_standby(lhfs, vol))
    runtime = vol.runtime()
    record = vol.runtime_record()
    live: dict[str, Any] = {}  # what the engine says, if it runs
    if runtime is None and record is not None:  # (its engine died, and left what it left)
        device = Path(record["device"])
        left = attachment.describe(attachment.leftovers(device), device)
        out.append(
            Check(
                "engine",
                FAIL,
                f"crashed: its engine died{' and left ' + left if left else ''}",
                f"{lhfs} volume detach {name} (then attach or mount it again)",
            )
        )
    if runtime is not None:
        from lhfs.engine import control

        try:
            live = control.call(vol.control_socket, "info", timeout=REACH_TIMEOUT)
            state = live["state"]
        except LhfsError as exc:
            state = f"not answering ({exc})"
        status = OK if state == "healthy" else WARN if state == "degraded" else FAIL
        out.append(
            Check(
                "engine",
                status,
                f"attached, {state}",
                None if status == OK else f"{lhfs} replica ls {name}",
            )
        )
        refusal = live.get("last_refusal")
        if refusal:
            out.append(
                Check(
                    "refused writes",
                    WARN,
                    f"{live['refused_writes']} since attach, the last at {refusal['at']}: "
                    f"{refusal['reason']}",
                    "make room on its replicas' disks: it takes writes again by itself",
                )
            )
    try:
        key = vol.key()
    except LhfsError as exc:  # (a lost key.json: said as a check, the others still made)
        key = None
        out.append(Check("key", FAIL, str(exc), None))
    for replica in vol.replicas:
        label = f"replica {replica['id']}"
        seen = next((r for r in live.get("replicas", []) if r["id"] == replica["id"]), None)
        if replica.get("local"):
            directory = vol.replica_dir(replica)
            disk = replica.get("disk")
            try:
                disks.ready(vol, replica)
            except LhfsError as exc:
                hint = (
                    "mount it (the replica comes back by itself), or "
                    f"{lhfs} replica rm {name} {replica['id']}"
                )
                out.append(Check(label, FAIL, f"local: {exc}", hint))
                continue
            if directory is not None:  # (damaged directories kept for a look take room)
                for aside in sorted(directory.parent.glob(f"{directory.name}.damaged-*")):
                    out.append(
                        Check(
                            label,
                            WARN,
                            f"{aside}: its damaged directory, set aside and kept for a look "
                            f"({format_size(disk_bytes(aside))})",
                            f"rm -r {shlex.quote(str(aside))} once it is looked at",
                        )
                    )
            owner = None if directory is None else replica_volume_id(directory)
            if key is not None and owner not in (None, key.id_hex):
                out.append(
                    Check(
                        label,
                        FAIL,
                        f"{directory} holds a replica of another volume (id {owner}); the "
                        f"volume's key.json is for id {key.id_hex} (swapped or copied?)",
                        f"put back the key.json of volume {name}: {vol.dir / 'key.json'}",
                    )
                )
                continue
            short = None if directory is None else _smaller(vol, replica, directory, lhfs)
            if short is not None:
                out.append(short)
                continue
            if directory is not None and (directory / "volume.json").exists():
                free = format_size(shutil.disk_usage(directory).free)
                where = f", on disk {disk} ({free} free)" if disk else ""
                out.append(
                    _as_seen(Check(label, OK, f"local, {directory}{where}"), seen, lhfs, name)
                )
            else:
                out.append(
                    Check(
                        label,
                        FAIL,
                        f"local directory {directory} holds no replica",
                        f"{lhfs} replica rm {name} {replica['id']}",
                    )
                )
            continue
        if key is None:  # (nothing to prove itself with: said once, as the key's check)
            continue
        check = _reach(label, replica["address"], key, replica.get("tls_ca"), vol.root)
        # (it answers this check, a new connection; the engine's own may be stuck)
        out.append(_as_seen(check, seen, lhfs, name, f"{replica['address']} answers this check"))
    return out


def _smaller(
    vol: volumes.Volume, replica: dict[str, Any], directory: Path, lhfs: str
) -> Check | None:
    """A failure if local replica ``replica``, recorded RW, holds less than the size its
    volume's configuration says (edited by hand: lhfs records a size once every replica has
    it), which its attach refuses; read from its ``volume.json``, nothing started. One that
    is ERR may be smaller (it missed an expansion): its rebuild grows it."""
    held = replica_size(directory)
    if replica.get("mode", "RW") != "RW" or held is None or held >= vol.size:
        return None
    config = vol.dir / "config.json"
    shown_held, shown_size = format_sizes(held, vol.size)
    return Check(
        f"replica {replica['id']}",
        FAIL,
        f"local, {directory} holds {shown_held} ({held} bytes), less than the size "
        f"{config} says, {shown_size} ({vol.size} bytes): the attach is refused",
        f"set size in {config} back to {held} (what the replicas hold), then '{lhfs} volume "
        f"expand {vol.name} --size {vol.size}' if it is to be that large",
    )


def _as_seen(
    check: Check, seen: dict[str, Any] | None, lhfs: str, name: str, what: str | None = None
) -> Check:
    """``check`` of a replica that looks sound from here, and what the attached engine has
    it as (``seen``: its mode and error): a directory in place, or an address that answers,
    says nothing of a replica whose process cannot start, whose disk is full, or whose
    directory another process holds. The engine's ERR is a warning (the volume goes on
    with the others), a rebuild under way is said."""
    if check.status != OK or seen is None:
        return check
    if seen["mode"] == "ERR":
        said = "; ".join(str(x) for x in (seen.get("error"), seen.get("rejoin")) if x)
        return Check(
            check.check,
            WARN,
            f"{what or check.detail}, but the engine has it failed: {said or 'no reason'}",
            f"{lhfs} replica ls {name}",
        )
    if seen["mode"] == "WO":
        return Check(check.check, OK, f"{check.detail}; being rebuilt (WO)")
    return check


def _restoring(lhfs: str, name: str, mark: dict[str, Any]) -> Check:
    """A volume marked as being restored: a restore still at it, or one whose process died
    (a kill) and left part of a backup, which only removing the volume undoes."""
    backup, pid = mark.get("backup"), mark.get("pid", -1)
    if volumes.alive(pid):
        return Check("restore", WARN, f"being restored from {backup} (pid {pid})", "wait for it")
    return Check(
        "restore",
        FAIL,
        f"the restore of {backup} was interrupted: the volume holds part of it",
        f"{lhfs} volume rm {name}, then restore it again",
    )


def _standby(lhfs: str, vol: volumes.Volume) -> Check:
    """A DR standby: whether it holds one whole backup, which an offline activation needs
    (an increment a kill cut short is undone only by the next start or activation)."""
    try:
        state = standby.load_state(vol)
    except LhfsError as exc:
        return Check("dr standby", FAIL, str(exc), f"{lhfs} dr status {vol.name}")
    applying, name = state.get("applying"), vol.name
    if applying and standby.follower_pid(vol) is None:
        return Check(
            "dr standby",
            WARN,
            f"the increment to {applying} was cut short: the volume holds part of it",
            f"{lhfs} dr start {name} (or dr activate {name}) undoes it first",
        )
    if standby.UNKNOWN in state["blocks"]:  # (an older lhfs's record of a cut increment)
        return Check(
            "dr standby",
            WARN,
            "holds no whole backup: blocks of an increment cut short are unknown",
            f"{lhfs} dr start {name}: its next increment rewrites them",
        )
    held = state["backup"]
    return Check("dr standby", OK, f"holds backup {held}" if held else "no backup restored yet")


def _reach(label: str, address: str, key: Any, tls_ca: str | None, root: Path) -> Check:
    """Connect to a remote replica and prove the key both ways (a reader session)."""
    from lhfs.wire.client import SyncReplica

    try:
        replica = SyncReplica(address, key, timeout=REACH_TIMEOUT, tls_ca=tls_ca)
    except WrongVolume as exc:  # (named as 'replica add' names it)
        return Check(label, FAIL, exc.naming(volumes.named_by_id(root, exc.volume_id)))
    except LhfsError as exc:
        return Check(label, FAIL, str(exc), "is its host up, its link, its 'replica serve'?")
    try:
        hello = replica.call("hello")
    except LhfsError as exc:
        return Check(label, FAIL, f"{address}: {exc}")
    finally:
        replica.close()
    state = "initialised" if hello.get("initialised") else "empty (to be rebuilt)"
    link = "over TLS" if tls_ca else "over TCP, frames sealed but not encrypted (TLS: --tls-ca)"
    return Check(label, OK, f"{address} answers and holds the volume's key, {link}; {state}")


# -- the store -----------------------------------------------------------------------------


def _store(url: str, retry_timeout: float = REACH_TIMEOUT) -> list[Check]:
    from backupstore.s3 import Bucket, Endpoint, StoreRefused, StoreUnavailable, Target

    out = []
    try:
        target = Target.parse(url)
        endpoint = Endpoint.from_env()
    except LhfsError as exc:
        hint = "set AWS_ENDPOINT_URL (or AWS_REGION), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
        return [Check("s3 settings", FAIL, str(exc), hint)]
    out.append(Check("s3 settings", OK, f"endpoint {endpoint.url}, target {target}"))
    host = urlparse(endpoint.url).hostname or ""
    try:
        socket.getaddrinfo(host, None)
        out.append(Check("s3 name", OK, f"{host} resolves"))
    except OSError as exc:
        out.append(
            Check(
                "s3 name",
                FAIL,
                f"{host} does not resolve ({exc})",
                "check DNS or /etc/hosts, and AWS_ENDPOINT_URL",
            )
        )
        return out
    out.append(_clock(endpoint.url))
    bucket = Bucket(target, deadline=retry_timeout, first_delay=0.5, endpoint=endpoint)
    try:
        bucket.ensure()
        out.append(
            Check(
                "s3 bucket",
                OK,
                f"{endpoint.url} answers as S3; bucket "
                f"{target.bucket!r} exists and the credentials are accepted",
            )
        )
    except StoreUnavailable as exc:
        out.append(Check("s3 bucket", FAIL, str(exc), "is the endpoint up and reachable?"))
        return out
    except StoreRefused as exc:
        if "does not exist" in str(exc):
            hint = f"check its name; lhfs backup init --target {target} --create-bucket makes it"
        else:  # (denied, or not an S3 server: a bucket made elsewhere would not help)
            hint = "check AWS_ENDPOINT_URL and the credentials"
        out.append(Check("s3 bucket", FAIL, str(exc), hint))
        return out
    probe = target.key(f".lhfs-doctor-{secrets.token_hex(6)}")
    try:
        bucket.put(probe, b"lhfs doctor probe")
        bucket.delete(probe)
        out.append(Check("s3 write", OK, f"wrote and removed {probe}"))
    except LhfsError as exc:
        out.append(Check("s3 write", FAIL, str(exc), "backups need write and delete access"))
    return out


def _clock(endpoint: str) -> Check:
    """The skew between this host's clock and the server's ``Date`` (S3 signatures expire)."""
    import urllib3

    try:
        answer = urllib3.PoolManager(timeout=REACH_TIMEOUT, retries=False).request(
            "HEAD", endpoint + "/"
        )
        server = parsedate_to_datetime(answer.headers["Date"]).timestamp()
    except Exception as exc:  # no Date, no answer: the bucket check says more
        return Check("clock", WARN, f"could not read the server's time ({type(exc).__name__})")
    skew = time.time() - server
    if abs(skew) > SKEW_FAIL:
        return Check("clock", FAIL, f"{skew:+.0f}s off the server's", "synchronise the clock")
    if abs(skew) > SKEW_WARN:
        return Check("clock", WARN, f"{skew:+.0f}s off the server's", "synchronise the clock")
    return Check("clock", OK, f"{skew:+.1f}s off the server's")
