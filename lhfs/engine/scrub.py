"""Scrub: find silent corruption in the replicas' immutable layers and repair it.

Each healthy replica checks its backing image against its content id, and every snapshot of
the chain against the checksums it recorded
(bytes that rotted after the recording), and the recorded checksums are compared across
replicas (bytes that were already wrong when recorded: a record is made when a snapshot's
checksums are first needed, from what its disk holds then): a replica that disagrees with the
others, or with its own record, is named, taken out of I/O at once (reads never return bytes
known to be corrupt) and rebuilt from a healthy one, which copies exactly the damaged chunks.
A replica whose own record shows a chunk changed is no witness for that chunk in the comparison:
with two replicas, its damage would otherwise dispute the other's good copy (below), and
nothing would be repaired.

Where no majority says which data is right (two replicas that disagree, or three that all
differ), nothing is repaired in an arbitrary direction: the chunks are reported as
``disputed``, and while there are any, a replica found damaged is taken out of I/O and held,
not rebuilt (a rebuild copies every chunk that differs from its source, disputed ones too);
held survives a detach; the operator decides (``replica rm`` keeps the others' data; a backup
may hold the right one).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from lhfs.core.errors import InvalidArgument, LhfsError
from lhfs.engine.engine import RW, Engine
from lhfs.wire.client import SumsUnavailable, merged_layer_sums

log = logging.getLogger("lhfs.scrub")


async def scrub(
    engine: Engine,
    task: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Verify every snapshot of every healthy replica; ``task`` follows the progress, in
    bytes of layers checked (a layer counts the volume's size, on each replica and once more
    for the comparison of three or more)."""
    healthy = [r for r in engine.replicas if r.mode == RW]
    if not healthy:
        raise LhfsError("no healthy replica to scrub")
    layers = await healthy[0].client.call("list_layers")
    names = [layer["name"] for layer in layers if layer["active"] and layer["name"]]
    damaged: dict[str, list[str]] = {}
    disputed: dict[str, list[int]] = {}  # layer -> chunks on which no majority agrees
    chunks = -(-engine.size // engine.chunk_size)
    clients = [link.client for link in healthy]
    task = {} if task is None else task
    steps = len(healthy) + (1 if len(healthy) > 1 else 0)
    task.update(done=0, total=len(names) * steps * engine.size)
    for link in healthy:  # the backing image: bit rot changes neither its size nor its time
        try:
            found = await link.client.call("verify_backing")
        except InvalidArgument:  # (a replica of an older lhfs: its image is not checked)
            log.warning("scrub: replica %s cannot check its backing image", link.id)
            continue
        if found["id"] and found["found"] != found["id"]:
            damaged.setdefault(link.id, []).append(f"backing image: holds {found['found']}")
            link.rotten_backing = True
    for name in names:
        flagged: dict[str, set[int]] = {}  # chunks each replica's own record shows changed
        for link in healthy:
            rotten = await link.client.call("verify_layer", layer=name)
            flagged[link.id] = set(rotten)
            task["done"] += engine.size
            if rotten:
                damaged.setdefault(link.id, []).append(f"{name}: {len(rotten)} chunk(s) changed")
        if len(healthy) < 2:
            continue
        walk = merged_layer_sums(clients, name, [False] * len(healthy), chunks)
        try:
            async for chunk, row in walk:
                if Counter(row).most_common(1)[0][1] == len(healthy):
                    continue
                # a replica whose own record shows the chunk changed is no witness for it
                # (found damaged above, and repaired with the rest of its damage)
                votes = [e for r, e in zip(healthy, row, strict=True) if chunk not in flagged[r.id]]
                majority, count = Counter(votes).most_common(1)[0] if votes else (None, 0)
                if count <= len(votes) // 2:  # no majority: which data is right is unknown
                    disputed.setdefault(name, []).append(chunk)
                    continue
                for link, entry in zip(healthy, row, strict=True):
                    if entry != majority and chunk not in flagged[link.id]:
                        damaged.setdefault(link.id, []).append(f"{name}: chunk {chunk} differs")
        except SumsUnavailable as exc:
            raise exc.error from None
        task["done"] += engine.size
    report: dict[str, Any] = {
        "layers": names,
        "replicas": [r.id for r in healthy],
        "damaged": damaged,
        "repaired": [],  # the damaged replicas, rebuilt at once (copying the damaged chunks)
        "disputed": disputed,
        "held": [],  # damaged while chunks are disputed: out of I/O, not rebuilt (see above)
    }
    for link in healthy:
        if link.id in damaged and sum(r.mode == RW for r in engine.replicas) > 1:
            reason = "scrub found corrupt data: " + "; ".join(damaged[link.id][:3])
            if disputed:  # (its rebuild would copy the disputed chunks from its source too)
                link.held = (
                    f"{reason}; the replicas disagree elsewhere with no majority: not rebuilt "
                    "from one; 'replica rm' it to keep the others' data"
                )
                engine.fail(link, reason)
                report["held"].append(link.id)
                continue
            engine.fail(link, reason, at_once=True)  # (its owner reconnects and rebuilds it)
            report["repaired"].append(link.id)
    log.info("scrub: %s", json.dumps(report))
    return report
