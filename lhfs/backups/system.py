"""System backups: every volume and backing image of a root, in one named backup.

``lhfs system backup`` takes a snapshot of every volume first, at one instant: the I/O of
every attached volume is held while they are taken (``lhfs.engine.hold``), so that together
they are crash-consistent, as one disk would be, and the detached ones are held against other
commands from before that (``_detached_held``). Then it backs each up as an ordinary backup,
then every backing image, then writes the system record naming them all with the volumes'
settings (never a key or a credential). Each part reports its progress to 100%, also a part
whose content the store already holds (it sends nothing and is complete at once), or the
whole fails naming the part and why. Interrupted, it leaves no record: nothing that looks
complete (see ``backupstore.systems``).

``lhfs system restore`` recreates the backing images and the volumes under a root where none
of those names exist, each volume with its recorded settings, replica count and file system
record (so that ``lhfs mount`` mounts it and never formats it).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from backupstore import systems
from backupstore.s3 import RETRY_TIMEOUT, Target, check_url_text
from backupstore.store import NEWER
from lhfs.backups import backup, image_backups
from lhfs.config import volume as volumes
from lhfs.core.errors import (
    AlreadyExists,
    Busy,
    CorruptState,
    InvalidArgument,
    LhfsError,
    NotFound,
    UsageError,
    WrongState,
)
from lhfs.core.names import IMAGE_BACKUPS, MAX_IMAGE_NAME, check_name, image_name_fits
from lhfs.core.units import rfc3339
from lhfs.engine import housekeeping
from lhfs.volumes import attachment, images, manage

# part ("volume NAME", "image NAME"), percent, bytes done, bytes in all
PartProgress = Callable[[str, float, int | None, int | None], None]

# what a volume's record keeps of its configuration (nothing secret, nothing of a host)
_KEPT = ("size", "chunk_size", "settings", "backing_image", "backing_image_name")


def system_url(target: Target, name: str) -> str:
    return f"{target}?{urlencode({'system': name})}"


def parse_system_url(url: str) -> tuple[Target, str]:
    """``s3://BUCKET/PREFIX?system=NAME``, checked (one line, exit 2)."""
    check_url_text(url, "s3://BUCKET/PREFIX?system=NAME")
    parsed = urlparse(url)
    try:
        query = parse_qs(parsed.query, strict_parsing=True)
    except ValueError:
        query = {}
    if set(query) != {"system"} or len(query["system"]) != 1 or "#" in url:
        raise UsageError(f"not a system backup URL: {url!r} (s3://BUCKET/PREFIX?system=NAME)")
    target = Target.parse(url.split("?", 1)[0])
    return target, check_name(query["system"][0], "system backup name in the URL")


def create(
    root: Path,
    url: str,
    name: str | None,
    progress: PartProgress,
    create_bucket: bool = False,
    retry_timeout: float = RETRY_TIMEOUT,
    notice: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    target = Target.parse(url)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = check_name(name or f"system-{stamp}-{secrets.token_hex(2)}", "system backup name")
    store = backup.open_store(target, retry_timeout, notice)
    store.bucket.ensure(create=create_bucket)
    store.init()
    if systems.exists(store, name):
        raise AlreadyExists(f"{target} already holds a system backup named {name}")
    too_long = [i["name"] for i in images.list_images(root) if not image_name_fits(i["name"])]
    if too_long:  # (registered by an earlier lhfs: refused before anything is taken)
        raise WrongState(
            f"backing image {too_long[0]}'s name is too long for its backups (image-NAME, 64 "
            f"characters at most): register it again under at most {MAX_IMAGE_NAME} characters"
        )
    chosen, skipped = [], {}
    for volume in volumes.list_names(root):
        try:
            vol = volumes.load(root, volume)
            vol.filesystem  # noqa: B018 (read now: a damaged record is said here, not half-way)
        except CorruptState as exc:  # (the others are backed up all the same)
            skipped[volume] = f"damaged: {exc}"
            continue
        except NotFound:  # (removed since it was listed)
            continue
        if vol.config.get("dr"):
            skipped[vol.name] = "a DR standby: its source's backups are what it holds"
        elif vol.config.get("restoring"):
            skipped[vol.name] = "an unfinished restore"
        else:
            chosen.append(vol)
    started = time.time()
    record: dict[str, Any] = {
        "format": 1,
        "name": name,
        "created": rfc3339(started),
        "started": started,
        "volumes": {},
        "images": {},
        "skipped": skipped,
    }
    with systems.running(store, name) as marker, contextlib.ExitStack() as held:
        snapshots = {vol.name: f"backup-{stamp}-{secrets.token_hex(2)}" for vol in chosen}
        for vol in chosen:
            held.enter_context(housekeeping.hold(vol, snapshots[vol.name]))
        with (
            _detached_held(chosen) as locked,
            manage.io_held(chosen) as holds,
            ThreadPoolExecutor(8) as pool,
        ):
            # every snapshot first, at one instant, before any upload
            taken = [
                pool.submit(_snapshot, root, vol, snapshots[vol.name], holds.get(vol.name), locked)
                for vol in chosen
            ]
            for future in taken:
                future.result()
        for vol in chosen:
            part = f"volume {vol.name}"
            part_url, stats = _part(
                part,
                backup.create,
                root,
                vol.name,
                url,
                snapshots[vol.name],
                _of(part, progress),
                retry_timeout=retry_timeout,
                notice=_told(part, notice),
            )
            now = volumes.load(root, vol.name)
            record["volumes"][vol.name] = {
                "backup": backup.parse_backup_url(part_url)[2],
                "snapshot": snapshots[vol.name],
                "replicas": len(now.config["replicas"]),
                "uploaded_bytes": stats.uploaded_bytes,
                "config": {key: now.config.get(key) for key in _KEPT},
                "filesystem": now.filesystem,
            }
            marker.note(parts=systems.parts_of(record))  # (kept from now on: see systems)
        for image in images.list_images(root):
            if "error" in image:  # (its record is damaged: the others are backed up)
                record["skipped"][f"image {image['name']}"] = f"damaged: {image['error']}"
                continue
            part = f"image {image['name']}"
            part_url = _part(
                part,
                image_backups.backup,
                root,
                image["name"],
                url,
                _of(part, progress),
                retry_timeout=retry_timeout,
                notice=_told(part, notice),
            )
            record["images"][image["name"]] = {
                "backup": backup.parse_backup_url(part_url)[2],
                "id": image["id"],
                "size": image["size"],
            }
            marker.note(parts=systems.parts_of(record))
        systems.put(store, record)
    return {**record, "url": system_url(target, name)}


BUSY_WAIT = 10.0  # seconds a system backup waits for another command on a detached volume


@contextlib.contextmanager
def _detached_held(vols: list[volumes.Volume]) -> Iterator[set[str]]:
    """Hold the command lock of each detached volume of ``vols`` for the block (the names
    held): taken before any attached volume's I/O is held (``manage.io_held``), so that
    nothing inside that hold waits for a lock. Taken inside, behind a detached backup of one
    of them (which holds its lock while it reads), every attached volume's writes waited
    until the hold's lease ran out, and the system backup failed. Each lock is taken again
    by its snapshot (``manage.snapshot_create``; ``attachment.exclusive`` is re-entrant in
    a process). One that another command keeps beyond ``BUSY_WAIT`` is refused in one line,
    before any I/O is held."""
    with contextlib.ExitStack() as stack:
        held = set()
        for vol in vols:
            if vol.runtime() is not None:  # (its engine takes its snapshot, inside the hold)
                continue
            busy = f"volume {vol.name} is busy with another command{{pid}}: try again once it "
            busy += "is done"  # (an attach, a detached backup: not waited for five minutes)
            stack.enter_context(attachment.exclusive(vol, wait=BUSY_WAIT, busy=busy))
            held.add(vol.name)
        yield held


def _snapshot(
    root: Path, vol: volumes.Volume, snapshot: str, hold: str | None, locked: set[str]
) -> None:
    """One volume's snapshot of a system backup: inside its hold, or detached (no I/O) with
    its command lock held (``locked``); never one that waits for a lock inside the hold."""
    if hold is None and vol.name not in locked:  # (detached since: its lock is not ours)
        raise WrongState(f"volume {vol.name} was detached during the system backup: try again")
    _part(f"volume {vol.name}", manage.snapshot_create, root, vol.name, snapshot, True, hold)


def _of(part: str, progress: PartProgress) -> Callable[..., None]:
    def update(percent: float, done: int | None = None, total: int | None = None) -> None:
        progress(part, percent, done, total)

    return update


def _told(part: str, notice: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``notice`` of one part: the line names it."""
    return None if notice is None else lambda text: notice(f"{part}: {text}")


def _part(part: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one part; a failure names it."""
    try:
        return call(*args, **kwargs)
    except LhfsError as exc:
        exc.args = (f"{part}: {exc}",)
        raise


def listing(url: str, retry_timeout: float = RETRY_TIMEOUT) -> list[dict[str, Any]]:
    target = Target.parse(url)
    store = backup.open_store(target, retry_timeout)
    store.bucket.ensure()
    return [{**s, "url": system_url(target, s["name"])} for s in systems.listing(store)]


def restore(
    root: Path,
    url: str,
    only: list[str] | None,
    progress: PartProgress,
    retry_timeout: float = RETRY_TIMEOUT,
) -> dict[str, Any]:
    target, name = parse_system_url(url)
    if only is not None and not any(only):  # ('--volumes ""': not a list of one '')
        raise InvalidArgument("--volumes is empty: name the volumes to restore (VOL1,VOL2,...)")
    if only is not None and not all(only):
        raise InvalidArgument(
            f"--volumes names an empty volume name: {','.join(only)!r} (VOL1,VOL2,...)"
        )
    if only is not None and len(set(only)) != len(only):
        raise InvalidArgument(f"--volumes names each volume once: {','.join(only)!r}")
    store = backup.open_store(target, retry_timeout)
    store.bucket.ensure()
    record = systems.get(store, name)
    wanted = list(record["volumes"]) if only is None else only
    unknown = [v for v in wanted if v not in record["volumes"]]
    if unknown:  # (a missing thing, as a volume not in a store is)
        raise NotFound(
            f"system backup {name} holds no volume {', '.join(unknown)} (it holds "
            f"{', '.join(sorted(record['volumes'])) or 'none'})"
        )
    existing = set(volumes.list_names(root))
    clash = sorted(set(wanted) & existing)
    if clash:
        raise AlreadyExists(f"volume(s) {', '.join(clash)} already exist under {root}")
    present = {i["name"]: i for i in images.list_images(root)}
    # content id: a name, of the images an image of the backup may be linked to (not one
    # whose file changed since it was registered: what it holds is not what its id says)
    registered = {n: i["id"] for n, i in present.items() if "id" in i and i["changed"] is not True}
    local = {i: n for n, i in sorted(registered.items(), reverse=True)}
    stood_on = {_stood_on(record["volumes"][v]) for v in wanted} - {None}
    if only is None:
        image_names = list(record["images"])
    else:  # the images the volumes stand on that the root lacks (each content once)
        needed = {p["id"]: n for n, p in sorted(record["images"].items(), reverse=True)}
        image_names = sorted(needed[i] for i in stood_on if i in needed and i not in local)
    passed: dict[str, str] = {}  # images not restored (a name taken by other content): why
    for image in image_names:
        if image in present and "error" in present[image]:  # (its content is unknown)
            raise CorruptState(
                f"backing image {image} is registered with a damaged record "
                f"({present[image]['error']}): 'lhfs backing-image rm {image}' clears it"
            )
        if image in present and present[image]["id"] != record["images"][image]["id"]:
            if only is None:
                raise AlreadyExists(f"backing image {image} exists under {root} with other content")
            passed[image] = f"a backing image {image} of other content is under {root}"
    done: dict[str, Any] = {
        "name": name,
        "volumes": [],
        "images": [],
        "skipped_images": [],
        "on_images": {},  # volume: the image it was restored on
        "whole": {},  # volume: why it holds its image's content as its own data
    }
    for image in image_names:
        if image in passed:
            continue
        image_id = record["images"][image]["id"]
        if image in present:  # the same content is there already
            done["skipped_images"].append(image)
            continue
        part = f"image {image}"
        if image_id in local:  # the same content under another name: linked, not fetched
            _part(part, _link_image, root, image, local[image_id], _of(part, progress))
        else:
            part_url = backup.backup_url(
                target, IMAGE_BACKUPS + image, record["images"][image]["backup"]
            )
            _part(
                part,
                image_backups.restore_into,
                root,
                store,
                part_url,
                image,
                _of(part, progress),
                image_id,
            )
        local.setdefault(image_id, image)
        done["images"].append(image)
    for volume in wanted:
        entry = record["volumes"][volume]
        part = f"volume {volume}"
        part_url = backup.backup_url(target, volume, entry["backup"])
        replicas = max(1, min(16, int(entry.get("replicas") or 3)))
        image_id = _stood_on(entry)
        backing = None
        if image_id is not None:  # (chosen as any restore chooses: see images.of_content)
            backing, why = images.of_content(
                root,
                image_id,
                entry["config"].get("backing_image_name"),  # (the name it was made from)
                f"its backing image {image_id} is neither in the system backup nor under {root}",
            )
            known = [n for n, p in record["images"].items() if p["id"] == image_id and n in passed]
            if backing is not None:
                done["on_images"][volume] = backing["name"]
            else:
                done["whole"][volume] = (
                    f"its backing image {known[0]} was not restored ({passed[known[0]]})"
                    if known
                    else str(why)
                ) + ": restored with the image's content as its own data"
        _part(
            part,
            backup.restore,
            root,
            part_url,
            volume,
            replicas,
            _of(part, progress),
            retry_timeout,
            backing=backing,
            kind="system",
        )
        restored = volumes.load(root, volume)
        if backing is not None and not restored.config.get("backing_image"):
            # (its image's file found changed in place as its copy was made: whole instead)
            del done["on_images"][volume]
            done["whole"][volume] = (
                f"{backup.changed_said(backing['name'])}: restored with the image's content as "
                "its own data"
            )
        saved = entry.get("config") or {}

        def settle(config: dict[str, Any], saved: dict[str, Any] = saved) -> None:
            if isinstance(saved.get("settings"), dict):
                config["settings"] = {
                    key: volumes.check_setting(key, float(value))
                    for key, value in saved["settings"].items()
                    if key in volumes.SETTINGS
                }

        restored.update(settle)
        filesystem = entry.get("filesystem")
        if isinstance(filesystem, dict) and filesystem.get("state") == "formatted":
            # (what lhfs mount made: mounted again, never formatted again; a record of a
            # mkfs that never completed is not carried over)
            restored.record_filesystem(
                {key: str(filesystem.get(key)) for key in ("type", "uuid", "state")}
            )
        done["volumes"].append(volume)
    return done


def _stood_on(entry: dict[str, Any]) -> str | None:
    """The content id of the backing image a system backup's volume was made on (None:
    none)."""
    return (entry.get("config") or {}).get("backing_image")


def _link_image(root: Path, name: str, same: str, progress: Callable[..., None]) -> None:
    """Register image ``name`` as the content the root holds already as image ``same``
    (``images.create`` keeps one content once: ``name`` is a link to its file), checked to be
    the content ``same`` is registered with (its file may have changed meanwhile)."""
    wanted = images.get(root, same)
    made = images.create(root, name, Path(wanted["path"]))
    if made["id"] != wanted["id"]:
        images.remove(root, name)
        raise CorruptState(
            f"backing image {same}'s file no longer holds the content it was registered "
            f"with: {name} not made from it"
        )
    progress(100.0)


def remove(url: str, retry_timeout: float = RETRY_TIMEOUT) -> dict[str, Any]:
    """Delete a system backup: its record, then each of its parts no other system backup
    names, then unreferenced blocks. What the other system backups name is known before the
    record is deleted: a failure there must not leave a record gone and its parts behind (a
    rerun would say there is no such system backup). A record that cannot be read (damaged)
    is deleted alone: its parts are unknown, and stay as ordinary backups. A part that another
    unreadable record may name (written before it) is kept, and said."""
    target, name = parse_system_url(url)
    store = backup.open_store(target, retry_timeout)
    store.bucket.ensure()
    damaged = None
    try:
        parts = systems.parts_of(systems.get(store, name))
    except CorruptState as exc:
        if NEWER in str(exc):  # (sound, of a newer lhfs: only that one knows its parts)
            raise WrongState(f"{exc} to remove it") from None  # ("...: upgrade lhfs")
        parts, damaged = [], str(exc)
    except NotFound as exc:  # (one that never finished has a marker, no record)
        marker = next((s for s in systems.listing(store) if s["name"] == name), None)
        if marker is None:
            raise
        if marker["state"] == "interrupted":
            raise NotFound(
                f"{exc}: one of that name was interrupted; 'lhfs backup gc --target "
                f"{target}' removes its marker and lets its parts go"
            ) from None
        raise WrongState(f"system backup {name} is under way: it has no record yet") from None
    others = [s for s in systems.listing(store) if s["name"] != name]
    still = {tuple(part) for other in others for part in other["parts"] or ()}
    maybe: dict[tuple[str, str], str] = {}  # parts an unreadable record may name
    unknown = [s for s in others if s["parts"] is None and s["written"] is not None]
    for volume in sorted({v for v, _ in parts}) if unknown else ():
        for part, when in store.complete_written(volume).items():
            for other in unknown:
                if (volume, part) in parts and when <= other["written"]:
                    maybe.setdefault((volume, part), other["name"])
    doomed = [(v, p) for v, p in parts if (v, p) not in still and (v, p) not in maybe]
    read = store.reader_of(doomed)  # (as 'backup rm' refuses a backup being read)
    if read is not None:
        raise Busy(
            f"{read} is under way: system backup {name} not removed; try again once it is done"
        )
    systems.delete(store, name)
    removed = []
    for volume, part in doomed:
        with contextlib.suppress(NotFound):  # (deleted by hand before)
            store.forget(volume, part)
            removed.append(f"{volume}/{part}")
    collected = store.collect()
    return {
        "name": name,
        "removed_backups": removed,
        # (its record could not be read: its parts, unknown, stay as ordinary backups)
        "damaged": damaged,
        "kept_backups": [
            {"backup": f"{volume}/{part}", "system": other}
            for (volume, part), other in sorted(maybe.items())
        ],
        "collected": collected.removed,
        "deferred": collected.deferred,
    }
