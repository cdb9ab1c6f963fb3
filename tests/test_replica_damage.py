"""A replica directory damaged behind lhfs's back (a layer's data file cut) is refused, named
in one line, never served: its missing bytes would read as zeros, the volume's data to every
read spread onto it, and to a replica rebuilt from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.core.errors import CorruptState
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, read_direct, write_direct

CHUNK = 4096
MIB = 1 << 20


def _store_with_snapshot(directory: Path) -> tuple[bytes, bytes]:
    """A store holding ``a`` in snapshot s1 and ``b`` over part of it in the head."""
    a, b = os.urandom(4 * CHUNK), os.urandom(2 * CHUNK)
    with ChunkStore.create(directory, 64 * CHUNK, CHUNK) as store:
        store.write(0, a)
        store.snapshot("s1")
        store.write(CHUNK, b)
    return a, b


def _layer_ids(directory: Path) -> tuple[str, str]:
    meta = json.loads((directory / "volume.json").read_text())
    head = meta["head"]
    return head, meta["layers"][head]["parent"]


@pytest.mark.parametrize("which", ["head", "snapshot"])
@pytest.mark.parametrize("length", [0, 3 * CHUNK + 100])
def test_a_cut_data_file_is_refused_at_open_naming_it(
    tmp_path: Path, which: str, length: int
) -> None:
    directory = tmp_path / "r"
    _store_with_snapshot(directory)
    head, snap = _layer_ids(directory)
    cut = directory / f"{head if which == 'head' else snap}.data"
    os.truncate(cut, min(length, cut.stat().st_size - 1))
    with pytest.raises(CorruptState, match=str(cut)):
        ChunkStore.open(directory)
    assert cut.exists()  # nothing changed


def test_a_data_file_cut_while_open_fails_reads_instead_of_serving_zeros(tmp_path: Path) -> None:
    directory = tmp_path / "r"
    a, b = _store_with_snapshot(directory)
    _, snap = _layer_ids(directory)
    with ChunkStore.open(directory) as store:
        assert store.read(0, 4 * CHUNK) == a[:CHUNK] + b + a[3 * CHUNK :]
        os.truncate(directory / f"{snap}.data", 0)
        for offset, length in ((0, CHUNK), (0, 4 * CHUNK), (3 * CHUNK, 10)):
            with pytest.raises(CorruptState, match=f"{snap}.data"):
                store.read(offset, length)
        with pytest.raises(CorruptState, match=f"{snap}.data"):
            store.layer_sums(snap, fresh=True)


def test_a_rebuild_cut_short_leaves_a_replica_that_opens(tmp_path: Path) -> None:
    """A write into part of a chunk while a rebuild fills the layers below lands as it is; a
    crash before the rebuild ends must not leave a data file shorter than its index says."""
    directory = tmp_path / "r"
    with ChunkStore.create(directory, 64 * CHUNK, CHUNK) as store:
        store.rebuild_begin(["s1"], 5)
        store.write(40 * CHUNK + 10, b"x" * 100)  # (past the end of the head's file)
        store.flush()  # ... and the process dies before ``rebuild_finish``
    with ChunkStore.open(directory) as store:
        assert store.read(40 * CHUNK + 10, 100) == b"x" * 100


@needs_fuse
def test_a_replica_with_a_cut_layer_is_not_served(cli: Cli, tmp_path: Path) -> None:
    """r1's snapshot layer is cut to nothing: before, it opened, the volume was healthy and
    reads spread onto r1 returned zeros. Now r1 is ERR naming the file, r2 serves."""
    device = tmp_path / "v.dev"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(device))
    data = os.urandom(MIB)
    write_direct(device, 0, data)
    cli.run("snapshot", "create", "v", "s1")
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    _, snap = _layer_ids(r1)
    os.truncate(r1 / f"{snap}.data", 0)
    cli.run("volume", "attach", "v", "--device", str(device))
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, MIB) == data
    replica = cli.replica("v", "r1")
    assert replica["mode"] == "ERR", replica
    assert f"{snap}.data holds 0 bytes" in replica["error"], replica
    cli.run("volume", "detach", "v")
    assert (r1 / f"{snap}.data").stat().st_size == 0  # kept for a look, not deleted
    line = one_line(cli.run("replica", "inspect", "--dir", str(r1), check=False))
    assert f"{snap}.data" in line, line
