"""System backups in a store: one record naming a backup of each volume and backing image.

    systems/<name>.json       the record, sealed like a manifest (see ``keys``), written last
    systems/<name>.running    a system backup in progress (refreshed while it runs), with
                              the parts it has completed so far

The parts are ordinary backups (``volumes/<volume>/<backup>.json``); the record only names
them, with the volumes' settings. It is written once every part is complete, so a system
backup that was interrupted has no record and never looks complete: ``list`` shows it as
``interrupted`` once its marker is stale. The parts of one in progress are kept like those of
a complete one (a prune must not take the first part of a system backup still uploading the
last), as long as its marker is there: an interrupted one's until ``backup gc`` sweeps its
marker (by the server's clock; whether one is "fresh" here is by this host's). A second one
of a name under way is refused: its marker is claimed by a conditional write.
"""

from __future__ import annotations

import contextlib
import json
import time
from contextlib import AbstractContextManager
from typing import Any

from lhfs.config import volume as volumes
from lhfs.core.errors import CorruptState, InvalidArgument, NotFound
from lhfs.core.names import IMAGE_BACKUPS, check_name
from lhfs.core.units import rfc3339
from lhfs.store.backing import IMAGE_ID

from . import parse_json
from .store import NEWER, SMALL_OBJECT, BackupStore, Marker

_RECORD_LIMIT = 64 << 20  # a record: some hundred bytes per volume or image it names


def _relative(name: str, suffix: str) -> str:
    return f"systems/{name}.{suffix}"


def running(store: BackupStore, name: str) -> AbstractContextManager[Any]:
    """The marker of a system backup under way (a ``with`` block); one of the same name under
    way already is refused (``AlreadyExists``), before anything is made."""
    key = store.target.key(_relative(name, "running"))
    return Marker(store.bucket, key, claim=f"a system backup named {name}")


def put(store: BackupStore, record: dict[str, Any]) -> None:
    store.put_sealed(_relative(record["name"], "json"), json.dumps(record).encode())


def get(store: BackupStore, name: str) -> dict[str, Any]:
    """A system backup's record, authenticated and checked."""
    found = store.get_sealed(_relative(name, "json"), _RECORD_LIMIT)
    if found is None:
        raise NotFound(f"no system backup {name!r} in {store.target}")
    try:
        record = parse_json(found)
        valid = (
            record["name"] == name
            and type(record["started"]) in (int, float)
            and isinstance(record["created"], str)
            and isinstance(record["volumes"], dict)
            and isinstance(record["images"], dict)
            and all(_volume_part(n, p) for n, p in record["volumes"].items())
            and all(_image_part(n, p) for n, p in record["images"].items())
        )
    except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument):
        valid = False
    if not valid:
        raise CorruptState(f"the record of system backup {name} cannot be parsed")
    return record


def _volume_part(name: str, part: Any) -> bool:
    """Whether a volume's entry holds what a restore uses, of the types it uses them as."""
    check_name(name)
    config = part.get("config") or {}
    settings = config.get("settings") or {}
    replicas = part.get("replicas")
    filesystem = part.get("filesystem")
    return (
        isinstance(part["backup"], str)
        and (replicas is None or (type(replicas) is int and replicas > 0))
        and isinstance(config, dict)
        and isinstance(settings, dict)
        and all(
            type(v) in (int, float) and volumes.check_setting(k, v) is not None
            for k, v in settings.items()
            if k in volumes.SETTINGS  # (one this lhfs does not know is not restored)
        )
        and (filesystem is None or isinstance(filesystem, dict))
        and _image_id(config.get("backing_image"), None)
        and (config.get("backing_image_name") is None or check_name(config["backing_image_name"]))
    )


def _image_id(value: Any, *allowed: Any) -> bool:
    """Whether ``value`` is a backing image's content id (or one of ``allowed``)."""
    return value in allowed or (isinstance(value, str) and IMAGE_ID.fullmatch(value) is not None)


def _image_part(name: str, part: Any) -> bool:
    check_name(name)
    return isinstance(part["backup"], str) and _image_id(part["id"])


def exists(store: BackupStore, name: str) -> bool:
    return store.bucket.exists(store.target.key(_relative(name, "json")))


def delete(store: BackupStore, name: str) -> None:
    store.bucket.delete(store.target.key(_relative(name, "json")))


def listing(store: BackupStore) -> list[dict[str, Any]]:
    """System backups, oldest first: ``complete`` (with their parts), ``in_progress`` or
    ``interrupted`` (a marker its process stopped refreshing, and no record), ``damaged``
    (``reason`` says why: a record that fails authentication or does not parse, its parts
    then unknown (``None``), or one whose parts are not all there any more) or ``newer`` (a
    record a newer lhfs wrote). One damaged record must not stop every command that reads
    them all (``system ls``, prune, ``backup rm``, ``system rm`` of another): each says what
    it does about it. ``written``: when the record was written, by the server's clock (a
    damaged one can only name backups written before it)."""
    prefix = store.target.key("systems") + "/"
    records, markers = {}, {}
    for obj in store.bucket.list(prefix):
        name, _, kind = obj.object_name[len(prefix) :].rpartition(".")
        if kind == "json":
            records[name] = obj
        elif kind == "running":
            markers[name] = obj
    now = time.time()
    out = []
    for name, obj in markers.items():
        if name not in records:
            fresh = store.fresh(obj, now)
            parts, started = _so_far(store, obj)
            out.append(
                {
                    "name": name,
                    "state": "in_progress" if fresh else "interrupted",
                    "created": rfc3339(started),
                    "started": started,
                    "written": None,
                    "volumes": None,
                    "images": None,
                    # (kept while its marker is there, fresh or not: freshness is by this
                    # host's clock; ``backup gc`` sweeps a dead one's marker, by the server's)
                    "parts": parts,
                    "reason": None,
                }
            )
    present = store.complete_backups() if records else set()
    for name, obj in records.items():
        written = obj.last_modified.timestamp()
        try:
            record = get(store, name)
        except NotFound:  # (removed since it was listed)
            continue
        except CorruptState as exc:  # its parts are unknown: kept by those who must know
            out.append(
                {
                    "name": name,
                    "state": "newer" if NEWER in str(exc) else "damaged",
                    "created": rfc3339(written),
                    "started": written,
                    "written": written,
                    "volumes": None,
                    "images": None,
                    "parts": None,
                    "reason": str(exc),
                }
            )
            continue
        parts = sorted(parts_of(record))
        missing = [f"backup {b} of {v}" for v, b in parts if (v, b) not in present]
        out.append(
            {
                "name": name,
                "state": "damaged" if missing else "complete",
                "created": record["created"],
                "started": record["started"],
                "written": written,
                "volumes": sorted(record["volumes"]),
                "images": sorted(record["images"]),
                "parts": parts,
                "reason": (
                    f"its part(s) {', '.join(missing)} are missing: it cannot be restored whole"
                    if missing
                    else None
                ),
            }
        )
    return sorted(out, key=lambda s: (s["started"], s["name"]))


def problems(store: BackupStore) -> list[str]:
    """What ``backup check`` says of the system records: each damaged one (it fails
    authentication, does not parse, or names a part that is gone), in a line."""
    return [
        f"system backup {s['name']}: {s['reason']}"
        for s in listing(store)
        if s["state"] in ("damaged", "newer")
    ]


def _so_far(store: BackupStore, obj: Any) -> tuple[list[tuple[str, str]], float]:
    """The parts a system backup in progress says it has completed (``note(parts=...)``) and
    when it started (its marker's time is its last beat); none, and that time, from a marker
    that is not what lhfs writes (it is only ever a reason to keep)."""
    try:
        found = store.bucket.get(obj.object_name, SMALL_OBJECT)
    except CorruptState:  # (larger than lhfs writes one)
        found = None
    body: Any = {}
    with contextlib.suppress(ValueError):
        body = parse_json(found[0]) if found else {}
    beat = obj.last_modified.timestamp()
    started = body.get("started") if isinstance(body, dict) else None
    if type(started) not in (int, float) or not 0 < started <= beat + 3600:  # (clocks)
        started = beat
    parts: list[tuple[str, str]] = []
    with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
        found_parts = body["parts"]
        if all(isinstance(v, str) and isinstance(b, str) for v, b in found_parts):
            parts = sorted((v, b) for v, b in found_parts)
    return parts, started


def parts_of(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(volume, backup)`` of each part of a system backup (a backing image's backups are
    those of the volume ``image-<name>``). Prune keeps them; ``system rm`` lets them go."""
    parts = [(volume, p["backup"]) for volume, p in record["volumes"].items()]
    return parts + [(IMAGE_BACKUPS + image, p["backup"]) for image, p in record["images"].items()]
