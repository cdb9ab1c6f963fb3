"""Delta blocks: an increment that changed a few small pieces of a large block stores only them.

Large backup blocks (2 MiB) keep a store's object count low and its restores fast, but a
volume written in small scattered pieces changes many blocks a little: 1% of its 64 KiB chunks
changed at random touch a quarter of its 2 MiB blocks. For such a block, an increment stores a
*delta*: the changed units (the volume's chunks) of the block, applied on a *base* block that
the store holds whole. The manifest still names the block by the digest of its whole content
and adds a recipe for it:

    "deltas": {"<block index>": {"base": <digest>, "delta": <digest>, "units": [3, 17]}},
    "delta_unit": 65536

A delta always applies to a whole block, never to another delta: the next increment that
changes the block again stores the union of the units changed since that base (the recipe
says which), until they pass ``SHARE`` of the block and the whole block is stored again, the
new base. A full backup (no base) stores whole blocks again. A delta is an ordinary object of
the store (content-addressed by the digest of its bytes, compressed, sealed like a block), and
a restore checks the rebuilt block against the digest of its whole content.

Delta bytes: ``LHD1``, the unit and the number of units (u32 each), the unit indexes (u32
each), then the units' bytes in that order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from lhfs.core.errors import CorruptState

SHARE = 0.25  # a delta of more than this share of its block is stored as a whole block
_MAGIC = b"LHD1"
_HEAD = struct.Struct("<4sII")


def pack(data: bytes | bytearray, unit: int, units: list[int]) -> bytes:
    """The delta of ``units`` (sorted indexes of ``unit``-byte pieces) of the block ``data``."""
    view = memoryview(data)
    index = struct.pack(f"<{len(units)}I", *units)
    pieces = [view[u * unit : (u + 1) * unit] for u in units]
    return _HEAD.pack(_MAGIC, unit, len(units)) + index + b"".join(pieces)


def apply(base: bytes, delta: bytes, what: str) -> bytes:
    """``base`` with the units of ``delta`` written over it."""
    try:
        magic, unit, count = _HEAD.unpack_from(delta)
        units = struct.unpack_from(f"<{count}I", delta, _HEAD.size)
    except struct.error:
        raise CorruptState(f"{what}: its delta cannot be read") from None
    start = _HEAD.size + 4 * count
    if magic != _MAGIC or len(delta) != start + count * unit:
        raise CorruptState(f"{what}: its delta cannot be read")
    out = bytearray(base)
    for k, u in enumerate(units):
        if (u + 1) * unit > len(out):
            raise CorruptState(f"{what}: its delta writes past the block")
        out[u * unit : (u + 1) * unit] = delta[start + k * unit : start + (k + 1) * unit]
    return bytes(out)


def valid(recipe: Any, block_size: int, unit: int, is_digest: Callable[[Any], bool]) -> bool:
    """Whether a manifest's recipe is well formed (its digests, its units: distinct, sorted,
    within the block) for ``unit``, a unit its manifest was found to name rightly."""
    if not isinstance(recipe, dict):
        return False
    units = recipe.get("units")
    return (
        is_digest(recipe.get("base"))
        and is_digest(recipe.get("delta"))
        and isinstance(units, list)
        and all(type(u) is int and 0 <= u < block_size // unit for u in units)
        and units == sorted(set(units))
    )


def plan(
    index: int,
    previous: list[str | None],
    recipes: dict[int, dict[str, Any]],
    changed_units: set[int] | None,
    unit: int,
    block_size: int,
) -> dict[str, Any] | None:
    """The recipe of block ``index`` as a delta on its base, or None when the whole block is
    to be stored: nothing to apply it on, units unknown, or too many of them."""
    if changed_units is None or index >= len(previous) or previous[index] is None:
        return None
    before = recipes.get(index)
    base = before["base"] if before else previous[index]
    units = set(changed_units) | set(before["units"] if before else ())
    if len(units) * unit > block_size * SHARE:
        return None
    return {"base": base, "units": sorted(units)}
