"""Checking what a request carries before anything uses it.

A replica answers an authenticated peer, but a peer may still be buggy, old or compromised:
every field is checked for its type and range here, so that a bad request becomes one error
answer (``InvalidArgument``) and never an exception deep in the store, a traceback in the log or
work without bound.
"""

from __future__ import annotations

import struct
from typing import Any

from lhfs.core.errors import InvalidArgument, LhfsError
from lhfs.core.units import MAX_SIZE, TIME_RE
from lhfs.store.backing import IMAGE_ID
from lhfs.wire import protocol as p

MAX_NAMES = 65_536  # snapshot names one rebuild may list
MAX_VOLUME = MAX_SIZE  # 1 PiB: beyond any file a replica's disk can hold


def call_of(payload: bytes | memoryview) -> tuple[str, dict[str, Any]]:
    """``(method, args)`` of a CALL frame's JSON ``{"method": str, "args": {...}}``."""
    call = p.decode_json(payload)
    if not isinstance(call, dict):
        raise InvalidArgument("a call is a JSON object {method, args}")
    method, args = call.get("method"), call.get("args", {})
    if not isinstance(method, str) or len(method) > 64 or not isinstance(args, dict):
        raise InvalidArgument("a call is a JSON object {method: string, args: object}")
    return method, args


def method_of(payload: bytes | memoryview) -> str | None:
    """The method a CALL frame names, or None when it is malformed (it is then answered with
    the error in order, like any quick request)."""
    try:
        return call_of(payload)[0]
    except LhfsError:
        return None


def text(args: dict[str, Any], name: str, limit: int = 256) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidArgument(f"argument {name!r} must be a non-empty string of at most {limit}")
    return value


def integer(args: dict[str, Any], name: str, low: int, high: int) -> int:
    value = args.get(name)
    if type(value) is not int or not low <= value <= high:  # (bool is not a number here)
        raise InvalidArgument(f"argument {name!r} must be an integer from {low} to {high}")
    return value


def texts(args: dict[str, Any], name: str, limit: int = MAX_NAMES) -> list[str]:
    value = args.get(name)
    if not isinstance(value, list) or len(value) > limit:
        raise InvalidArgument(f"argument {name!r} must be a list of at most {limit} strings")
    if not all(isinstance(item, str) and 0 < len(item) <= 256 for item in value):
        raise InvalidArgument(f"argument {name!r} must be a list of non-empty strings")
    return value


def times(args: dict[str, Any], name: str, count: int) -> list[str] | None:
    """An optional list of ``count`` RFC 3339 UTC times (``2026-12-05T19:53:44Z``)."""
    if args.get(name) is None:
        return None
    value = texts(args, name, count)
    if len(value) != count or not all(TIME_RE.fullmatch(item) for item in value):
        raise InvalidArgument(f"argument {name!r} must be a list of {count} RFC 3339 UTC times")
    return value


def branches(args: dict[str, Any], name: str) -> list[tuple[str, str | None, str]]:
    """An optional list of snapshots off a chain: ``[name, parent name or null, time]`` each."""
    value = args.get(name) or []
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise InvalidArgument(f"argument {name!r} must be a list of at most {MAX_NAMES} entries")
    out = []
    for entry in value:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and 0 < len(entry[0]) <= 256
            and (entry[1] is None or (isinstance(entry[1], str) and 0 < len(entry[1]) <= 256))
            and isinstance(entry[2], str)
            and TIME_RE.fullmatch(entry[2])
        ):
            raise InvalidArgument(f"argument {name!r}: each entry is [name, parent, time]")
        out.append((entry[0], entry[1], entry[2]))
    return out


def image_id(value: str) -> str:
    """A backing image's content id (``<xxh3-128 hex>-<size>``)."""
    if not IMAGE_ID.fullmatch(value):
        raise InvalidArgument(f"not a backing image id: {value[:80]!r}")
    return value


def layer_name(payload: memoryview, start: int, end: int | None = None) -> str:
    """A layer id or snapshot name carried in a binary request."""
    raw = bytes(payload[start:end])
    if not 0 < len(raw) <= 256:
        raise InvalidArgument("a layer name of 1 to 256 bytes is expected")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("a layer name must be UTF-8") from None


def exact(fmt: struct.Struct, payload: memoryview) -> tuple[Any, ...]:
    if len(payload) != fmt.size:
        raise InvalidArgument(f"request payload is {len(payload)} bytes, expected {fmt.size}")
    return fmt.unpack(payload)


def header(fmt: struct.Struct, payload: memoryview) -> tuple[Any, ...]:
    if len(payload) < fmt.size:
        raise InvalidArgument(f"request payload of {len(payload)} bytes is too short")
    return fmt.unpack_from(payload)
