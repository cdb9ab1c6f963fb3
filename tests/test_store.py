"""Chunk store properties the model test does not reach: identity by content, limits, damage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lhfs.core.errors import (
    AlreadyExists,
    BackingImageMismatch,
    Busy,
    CorruptState,
    InvalidArgument,
    NotFound,
)
from lhfs.core.procs import LHFS
from lhfs.core.units import rfc3339
from lhfs.replica.process import ReplicaProcess
from lhfs.store.backing import content_id
from lhfs.store.chunkstore import ChunkStore
from lhfs.store.layer import Layer
from lhfs.testing import raw_session
from lhfs.wire import protocol as p
from lhfs.wire.auth import VolumeKey


def test_backing_image_is_identified_by_content_not_name(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(300_000))
    a = ChunkStore.create(tmp_path / "a", 1 << 20, 4096, image, "ubuntu.img")
    b = ChunkStore.create(tmp_path / "b", 1 << 20, 4096, image, "some-other-name.qcow")
    with a, b:
        assert a.info()["backing_image"]["id"] == b.info()["backing_image"]["id"]
        assert a.info()["backing_image"]["file"] != b.info()["backing_image"]["file"]
        assert a.read(0, 300_000) == image.read_bytes()
        assert a.read(300_000, 10_000) == bytes(10_000)
        assert a.layer_sums("backing") == b.layer_sums("backing")


def test_replica_refuses_a_backing_image_with_other_content(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(100_000))
    ChunkStore.create(tmp_path / "r", 1 << 20, 4096, image, "base.img").close()
    local = tmp_path / "r" / "base.img"
    data = bytearray(local.read_bytes())
    data[5000] ^= 0xFF  # same size, one byte flipped
    local.write_bytes(data)
    with pytest.raises(BackingImageMismatch, match=r"base\.img"):
        ChunkStore.open(tmp_path / "r")
    local.unlink()
    with pytest.raises(NotFound, match="missing"):
        ChunkStore.open(tmp_path / "r")


def test_large_unaligned_writes_land_whole_across_pieces(tmp_path: Path) -> None:
    """Layer data goes to the page cache 64 KiB at a time: a write of several MiB that starts
    and ends inside chunks (and pieces) reads back whole, also after a copy-up and a reopen."""
    with ChunkStore.create(tmp_path / "r", 8 << 20, 64 << 10) as store:
        base = os.urandom(8 << 20)
        store.write(0, base)
        store.snapshot("s")
        data = os.urandom((3 << 20) + 12_345)
        store.write(70_001, data)  # partial first and last chunks: copied up from "s"
        store.flush()
    expected = base[:70_001] + data + base[70_001 + len(data) :]
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(0, 8 << 20) == expected


def test_huge_sparse_volume_costs_memory_only_for_written_chunks(tmp_path: Path) -> None:
    tib = 1 << 40
    with ChunkStore.create(tmp_path / "r", tib, 64 << 10) as store:
        store.write(tib - 5, b"end!!")
        store.write(0, b"start")
        store.snapshot("s")
        store.write(tib // 2, b"middle")
    with ChunkStore.open(tmp_path / "r") as store:
        assert len(store._top) == 3
        assert store.read(tib - 5, 5) == b"end!!"
        assert store.read(tib // 2, 6) == b"middle"
        assert sum(len(layer.index) for layer in store.layers.values()) == 3
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "r").iterdir())
    assert used < 4 << 20


def test_long_chains_have_no_layer_limit(tmp_path: Path) -> None:
    layers = 1200
    with ChunkStore.create(tmp_path / "r", 4096 * 16, 4096) as store:
        for i in range(layers):
            store.write((i % 16) * 4096 + i % 7, i.to_bytes(4, "little"))
            store.snapshot(f"s{i}")
    with ChunkStore.open(tmp_path / "r") as store:
        assert len(store.chain) == layers + 1
        for i in range(layers - 16, layers):
            assert store.read((i % 16) * 4096 + i % 7, 4) == i.to_bytes(4, "little")
        store.remove_snapshot("s600")
        assert store.read(((layers - 1) % 16) * 4096 + (layers - 1) % 7, 4) == (
            layers - 1
        ).to_bytes(4, "little")


def test_torn_index_tail_is_ignored_and_cut(tmp_path: Path) -> None:
    with ChunkStore.create(tmp_path / "r", 1 << 20, 4096) as store:
        store.write(0, b"durable")
        store.flush()
        head = store.head.index_path
    size = head.stat().st_size
    with open(head, "ab") as f:
        f.write(b"LHI1\x05\x00\x00\x00garbage-from-a-crash")
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(0, 7) == b"durable"
    assert head.stat().st_size == size


def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    with ChunkStore.create(tmp_path / "r", 1 << 20, 4096) as store:
        store.write(0, b"keep")
        before = store.checksum()
        for call in (
            lambda: store.write((1 << 20) - 1, b"xx"),
            lambda: store.read(-1, 4),
            lambda: store.trim(0, (1 << 20) + 1),
            lambda: store.expand(1000),
            lambda: store.expand(4096),
            lambda: store.snapshot("a/b"),
            lambda: store.snapshot(".."),
            lambda: store.snapshot("one\n"),
        ):
            with pytest.raises(InvalidArgument):
                call()
        store.snapshot("one")
        with pytest.raises(AlreadyExists):
            store.snapshot("one")
        with pytest.raises(NotFound):
            store.revert("two")
        with pytest.raises(Busy):
            ChunkStore.open(tmp_path / "r")
        assert store.checksum() == before
    with pytest.raises(AlreadyExists):
        ChunkStore.create(tmp_path / "r", 1 << 20, 4096)
    with pytest.raises(InvalidArgument):
        ChunkStore.create(tmp_path / "x", 1 << 20, 3000)


def test_layer_files_are_named_only_from_ids_lhfs_makes(tmp_path: Path) -> None:
    """Behind the check of volume.json: an id that is not one lhfs makes never becomes a path."""
    (tmp_path / "r").mkdir()
    for bad in ("../x", "0123456789abcdef/../../x", "0123456789abcde\0", "0123456789abcdef\n", ""):
        with pytest.raises(CorruptState, match="is not a layer id"):
            Layer.create(tmp_path / "r", bad, 4096)
    assert os.listdir(tmp_path) == ["r"] and os.listdir(tmp_path / "r") == []
    assert Layer.create(tmp_path / "r", "0123456789abcdef", 4096).id == "0123456789abcdef"


def test_cli_errors_are_one_line_with_exit_status(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LHFS, *args], capture_output=True, text=True, timeout=60)

    bad_size = run("replica", "init", "--dir", str(tmp_path / "r"), "--size", "10Q")
    assert bad_size.returncode == 2
    assert len(bad_size.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    unaligned = run("replica", "init", "--dir", str(tmp_path / "r"), "--size", "100000")
    assert unaligned.returncode == 2  # a bad value is bad usage
    assert unaligned.stderr.strip().splitlines() == [
        "lhfs: error: size 100000 is not a positive multiple of the chunk size 65536"
    ]
    assert run("replica", "init", "--dir", str(tmp_path / "r"), "--size", "1M").returncode == 0
    again = run("replica", "init", "--dir", str(tmp_path / "r"), "--size", "1M")
    assert again.returncode == 1 and "already holds a volume" in again.stderr
    assert "Traceback" not in again.stderr
    VolumeKey.new("v").save(tmp_path / "v.key")
    key = ("--key-file", str(tmp_path / "v.key"))
    listen = run("replica", "serve", "--dir", str(tmp_path / "r"), "--listen", "nonsense", *key)
    assert listen.returncode == 2 and "HOST:PORT" in listen.stderr
    no_key = run("replica", "serve", "--dir", str(tmp_path / "r"), "--listen", "127.0.0.1:0")
    assert no_key.returncode == 2 and "--key-file" in no_key.stderr
    assert run("nosuchgroup").returncode == 2
    shown = run("replica", "inspect", "--dir", str(tmp_path / "r"), "--json")
    assert shown.returncode == 0 and '"chunk_size": 65536' in shown.stdout


@pytest.mark.parametrize("seed", range(20))
def test_rebuild_target_merges_writes_received_during_the_sync(tmp_path: Path, seed: int) -> None:
    """A rebuild target receives writes before its lower layers exist; after the layers are
    copied and the partial writes merged, it must equal the source, byte for byte."""
    import random

    from lhfs.store.layer import ABSENT

    rng = random.Random(seed)
    cs, chunks = 8, 32
    size = cs * chunks
    image = tmp_path / "image"
    image.write_bytes(rng.randbytes(rng.randrange(1, size)))
    source = ChunkStore.create(tmp_path / "src", size, cs, image)
    target = ChunkStore.create(tmp_path / "dst", size, cs, image, "other-name.img")
    with source, target:
        for name in ("a", "b"):
            for _ in range(10):
                off = rng.randrange(size)
                source.write(off, rng.randbytes(rng.randrange(1, size - off + 1)))
            source.trim(rng.randrange(size // 2), rng.randrange(1, size // 2))
            source.snapshot(name)
        if seed % 2:  # a target that comes back with an old, partly different chain
            target.write(0, rng.randbytes(size))
            target.snapshot("a")
        when = {i["name"]: i["created"] for i in source.list_layers() if i["name"]}
        when["a"] = "2026-01-02T03:04:05Z"  # (taken long before the rebuild)
        source.meta["layers"][source.layer("a").id]["created"] = when["a"]
        target.rebuild_begin(["a", "b"], source.revision, [when["a"], when["b"]])
        pending = [(n, c) for n in ("a", "b") for c in range(chunks)]
        rng.shuffle(pending)
        for i, (name, chunk) in enumerate(pending):
            if i % 5 == 0:  # the write stream goes on, to both, during the sync
                off = rng.randrange(size)
                data = rng.randbytes(rng.randrange(1, min(20, size - off) + 1))
                if rng.random() < 0.2:
                    source.trim(off, len(data))
                    target.trim(off, len(data))
                else:
                    source.write(off, data)
                    target.write(off, data)
            states, data = source.read_layer_run(name, chunk, 1)
            target.write_layer_run(name, chunk, states, data)
        assert target.read_layer_run("a", 0, chunks)[0] == source.read_layer_run("a", 0, chunks)[0]
        target.rebuild_finish()
        assert target.read(0, size) == source.read(0, size)
        assert {i["name"]: i["created"] for i in target.list_layers() if i["name"]} == when
        assert ABSENT not in source.read_layer_run("backing", 0, 1)[0]
    with ChunkStore.open(tmp_path / "dst") as again, ChunkStore.open(tmp_path / "src") as src:
        assert again.checksum() == src.checksum()


# -- volume.json is checked before anything uses it -----------------------------------------

OUT = "../outside"  # a directory beside the replica's, as a path from inside it


def _add_layer(meta: dict, directory: Path, layer_id: str, **info: object) -> None:
    """A layer as lhfs writes one, its (empty) files included, so only the field under test is
    wrong; ``info`` overrides its fields."""
    head = meta["head"]
    for suffix in ("idx", "data"):
        shutil.copyfile(directory / f"{head}.{suffix}", directory / f"{layer_id}.{suffix}")
    meta["layers"][layer_id] = {**meta["layers"][head], "name": f"s{layer_id[-1]}", **info}


def _rename_head(meta: dict, directory: Path, new_id: str) -> None:
    """Give the head another id, its files planted where that id leads (the old code then
    opened them, wherever they were)."""
    head = meta["head"]
    for suffix in ("idx", "data"):
        if "\0" not in new_id:  # (no file has such a name)
            shutil.copyfile(directory / f"{head}.{suffix}", directory / f"{new_id}.{suffix}")
    meta["layers"][new_id] = meta["layers"].pop(head)
    meta["head"] = new_id


def _cycle(meta: dict, directory: Path) -> None:
    _add_layer(meta, directory, "00000000000000a1", parent="00000000000000a2")
    _add_layer(meta, directory, "00000000000000a2", parent="00000000000000a1")


def _head(**info: object) -> Callable[[dict, Path], None]:
    return lambda meta, _: meta["layers"][meta["head"]].update(info)


def _backing(absolute: bool) -> Callable[[dict, Path], None]:
    """The canary outside as the backing image, its true id recorded (the old code served it)."""

    def plant(meta: dict, directory: Path) -> None:
        canary = directory.parent / "outside" / "canary"
        file = str(canary) if absolute else f"{OUT}/canary"
        meta["backing"] = {"id": content_id(canary), "file": file, "stamp": None}

    return plant


def _drop_key(info: dict, key: str) -> None:
    del info[key]


def _set(**fields: object) -> Callable[[dict, Path], None]:
    return lambda meta, _: meta.update(fields)


def _drop(field: str) -> Callable[[dict, Path], None]:
    def drop(meta: dict, _: Path) -> None:
        del meta[field]

    return drop


# Each case: what the one line must name after "volume.json", and the change to a good file
# (returning the new document, its text, or None when it changed the one it was given).
HOSTILE = [
    pytest.param("layers", lambda m, d: _rename_head(m, d, f"{OUT}/zz"), id="layer-id-outside"),
    pytest.param(
        "layers",
        lambda m, d: _rename_head(m, d, str(d.parent / "outside" / "ab")),
        id="layer-id-absolute",
    ),
    pytest.param("layers", lambda m, d: _rename_head(m, d, "0123456789abcde\0"), id="layer-id-nul"),
    pytest.param("chunk_size", _set(chunk_size="x"), id="chunk-size-text"),
    pytest.param("chunk_size", _set(chunk_size=True), id="chunk-size-bool"),
    pytest.param("chunk size", _set(chunk_size=3 << 12), id="chunk-size-not-power"),
    pytest.param("size", _set(size=2**62), id="size-too-large"),
    pytest.param("size", _set(size=(1 << 20) + 1), id="size-unaligned"),
    pytest.param("size", _drop("size"), id="size-missing"),
    pytest.param("head", _set(head=None), id="head-null"),
    pytest.param("head", _set(head="0123456789abcdef"), id="head-names-no-layer"),
    pytest.param("layers", _drop("layers"), id="layers-missing"),
    pytest.param("layers", lambda m, _: m.update(layers=list(m["layers"])), id="layers-a-list"),
    pytest.param("parents", _cycle, id="parent-cycle"),
    pytest.param("parent", _head(parent="0123456789abcdef"), id="parent-missing"),
    pytest.param(
        "parent", lambda m, _: _drop_key(m["layers"][m["head"]], "parent"), id="parent-key"
    ),
    pytest.param(
        "name",
        lambda m, d: _add_layer(m, d, "00000000000000b1", name="../x"),
        id="snapshot-name-path",
    ),
    pytest.param("created", _head(created=5), id="created-not-a-time"),
    pytest.param("size", _head(size=2 << 20), id="layer-size-larger"),
    pytest.param("revision", _set(revision=-1), id="revision-negative"),
    pytest.param("revision", _set(revision="7"), id="revision-text"),
    pytest.param("format", _set(format=True), id="format-bool"),
    pytest.param("volume_id", _set(volume_id=5), id="volume-id-number"),
    pytest.param("backing.file", _backing(absolute=False), id="backing-file-outside"),
    pytest.param("backing.file", _backing(absolute=True), id="backing-file-absolute"),
    pytest.param(
        "backing.id",
        _set(backing={"file": "b.img", "id": "0-1", "stamp": None}),
        id="backing-id-malformed",
    ),
    pytest.param("JSON object", lambda m, _: [m], id="not-an-object"),
    pytest.param("damaged", lambda m, _: "[" * 100_000, id="nested-too-deep"),
]


@pytest.fixture(scope="module")
def made_by_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One replica directory made by ``lhfs replica init``, copied by each case."""
    directory = tmp_path_factory.mktemp("init") / "r"
    init = [LHFS, "replica", "init", "--dir", str(directory), "--size", "1M"]
    subprocess.run(init, check=True, capture_output=True, timeout=60)
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def _untouched(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Each file's access time and bytes, the time put back after the bytes were read. A time
    of 0 before the file's change moves at the file's next read (relatime too): a file that
    keeps it was not read."""
    out = {}
    for f in sorted(directory.iterdir()):
        st = f.stat()
        out[f.name] = (st.st_atime_ns, f.read_bytes())
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return out


def _age(directory: Path) -> None:
    for f in directory.iterdir():
        os.utime(f, ns=(0, f.stat().st_mtime_ns))


@pytest.mark.parametrize(("field", "change"), HOSTILE)
def test_hostile_metadata_is_refused_in_one_line_touching_nothing(
    made_by_init: Path, tmp_path: Path, field: str, change: Callable
) -> None:
    """A volume.json lhfs could not have written is refused in one line naming the field, by
    the command line and the store alike, before any file is read, made or removed, inside the
    directory or out (the canary and the planted layer files keep their access times)."""
    directory = tmp_path / "r"
    shutil.copytree(made_by_init, directory)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(b"not the replica's\n")
    meta = json.loads((directory / "volume.json").read_text())
    meta = change(meta, directory) or meta
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (directory / "volume.json").write_text(text)
    _age(outside)
    before = (_files(directory), _untouched(outside))

    shown = subprocess.run(
        [LHFS, "replica", "inspect", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode in (1, 2), shown
    lines = shown.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in shown.stderr, shown.stderr
    assert str(directory) in lines[0], lines[0]
    assert field in lines[0].partition("volume.json")[2], lines[0]
    with pytest.raises(CorruptState, match=r"volume\.json"):
        ChunkStore.open(directory)
    assert (_files(directory), _untouched(outside)) == before
    assert sorted(os.listdir(tmp_path)) == ["outside", "r"]


def test_a_replica_on_hostile_metadata_serves_nothing_from_it(
    made_by_init: Path, tmp_path: Path
) -> None:
    """``replica serve`` for an engine on another host keeps running on a directory that does
    not open (for its engine to set it aside), saying why in its log; it reads nothing the
    metadata names, and answers every request for the volume's data with the damage."""
    directory = tmp_path / "r"
    shutil.copytree(made_by_init, directory)
    (tmp_path / "outside").mkdir()
    meta = json.loads((directory / "volume.json").read_text())
    _rename_head(meta, directory, f"{OUT}/zz")
    (directory / "volume.json").write_text(json.dumps(meta))
    _age(tmp_path / "outside")
    before = _untouched(tmp_path / "outside")
    VolumeKey.new("v").save(tmp_path / "v.key")
    serve = ReplicaProcess(directory, tmp_path / "v.key")
    try:
        assert "layer id" in serve.log.read_text()
        with raw_session(serve.address, serve.key, epoch=1) as session:
            session.sendall(p.frame(1, p.READ, p.RANGE.pack(0, 4096)))
            length, _, status = p.HEADER.unpack(session.recv(p.HEADER.size, socket.MSG_WAITALL))
            said = session.recv(length - (p.HEADER.size - p.LENGTH.size), socket.MSG_WAITALL)
            assert status == p.ERROR and b"is damaged" in said, said
    finally:
        serve.stop()
    assert _untouched(tmp_path / "outside") == before


def test_metadata_lhfs_writes_is_accepted_with_or_without_later_fields(tmp_path: Path) -> None:
    """What every lhfs wrote opens: a backing image, snapshots, a rebuilt chain whose times came
    from a peer (with a fraction of a second), and a replica made before revisions, rebuild
    counts, volume ids and backing stamps were recorded."""
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(100_000))
    volume_id = VolumeKey.new("v").id_hex
    with ChunkStore.create(tmp_path / "r", 1 << 20, 4096, image, volume_id=volume_id) as store:
        store.write(0, b"kept")
        store.snapshot("one")
        store.rebuild_begin(["one", "two"], 7, ["2026-01-02T03:04:05.123456Z", rfc3339()])
        store.rebuild_finish()
        store.snapshot("three")
        store.revert("one")
        listed = sorted(store.list_layers(), key=lambda layer: layer["id"])
    path = tmp_path / "r" / "volume.json"
    meta = json.loads(path.read_text())
    assert meta["rebuilds"] == 1 and meta["backing"]["stamp"] and meta["volume_id"] == volume_id
    with ChunkStore.open(tmp_path / "r") as store:
        assert sorted(store.list_layers(), key=lambda layer: layer["id"]) == listed
    for field in ("revision", "rebuilds", "volume_id"):
        del meta[field]
    del meta["backing"]["stamp"]
    path.write_text(json.dumps(meta))
    with ChunkStore.open(tmp_path / "r") as store:
        assert store.read(0, 4) == b"kept" and store.volume_id is None
