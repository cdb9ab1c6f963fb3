"""The backup store against a real S3 server over HTTP (moto here, MinIO when configured)."""

from __future__ import annotations

import itertools
import random
import socket
import threading

import pytest

import backupstore.store
from backupstore.s3 import Bucket, StoreUnavailable, Target
from backupstore.store import BackupStore
from lhfs.core.errors import CorruptState, InvalidArgument, NotFound
from lhfs.core.procs import wait_for

_names = itertools.count()


@pytest.fixture
def store(s3_endpoint: str) -> BackupStore:
    bucket = Bucket(Target.parse(f"s3://lhfs-test-{next(_names)}/some/prefix"), deadline=10)
    bucket.ensure(create=True)
    return BackupStore(bucket)


def reader(blocks: list[bytes]):
    """``read_block`` over a list of blocks."""
    return lambda index, block_size: blocks[index]


def volume_of(blocks: list[bytes]):
    return len(blocks) * len(blocks[0]), reader(blocks)


def test_backup_restore_and_incremental_uploads(store: BackupStore) -> None:
    rng = random.Random(1)
    bs = 64 << 10
    blocks = [rng.randbytes(bs // 2) + bytes(bs // 2) for _ in range(6)] + [bytes(bs)]
    size, read = volume_of(blocks)
    manifest, stats = store.create("vol", "b1", size, read, block_size=bs)
    assert (stats.uploaded, manifest["blocks"][-1]) == (6, None)
    assert stats.uploaded_bytes < 6 * bs  # half-zero blocks compress
    restored = bytearray(size)

    def write(index: int, data: bytes) -> None:
        restored[index * bs : (index + 1) * bs] = data

    store.restore("vol", "b1", write)
    assert bytes(restored) == b"".join(blocks)

    _, again = store.create("vol", "b2", size, read, block_size=bs)
    assert again.uploaded == 0 and again.reused == 6
    blocks[3] = rng.randbytes(bs)
    _, third = store.create("vol", "b3", size, read, block_size=bs)
    assert third.uploaded == 1
    assert [b["name"] for b in store.list("vol")] == ["b1", "b2", "b3"]
    assert {b["state"] for b in store.list()} == {"complete"}


def test_block_count_arithmetic_and_collection(store: BackupStore) -> None:
    a, b, c, d = (bytes([n]) * 4096 for n in (1, 2, 3, 4))
    for name, first in (("b0", a), ("b1", c), ("b2", d)):
        store.create("v", name, 8192, reader([first, b]), block_size=4096)
    assert store.block_count() == 4
    assert store.delete("v", "b0").removed == 1 and store.block_count() == 3
    assert store.delete("v", "b1").removed == 1 and store.block_count() == 2
    assert store.delete("v", "b2").removed == 2 and store.block_count() == 0
    with pytest.raises(NotFound):
        store.delete("v", "b2")


def test_nothing_is_collected_while_a_backup_runs(store: BackupStore) -> None:
    store.create("v", "old", 8192, reader([b"\1" * 4096, b"\2" * 4096]), block_size=4096)
    store.create("v", "other", 4096, reader([b"\3" * 4096]), block_size=4096)
    release, reading = threading.Event(), threading.Event()

    def slow_read(index: int, block_size: int) -> bytes:
        reading.set()
        assert release.wait(60)
        return b"\1" * 4096  # reuses a block that only "old" references

    running = threading.Thread(
        target=store.create, args=("v", "running", 4096, slow_read), kwargs={"block_size": 4096}
    )
    running.start()
    try:
        assert reading.wait(60)
        assert {b["name"]: b["state"] for b in store.list("v")}["running"] == "in_progress"
        deferred = store.delete("v", "old")  # a backup runs: no block is collected
        assert deferred.removed == 0 and "backup running of volume v is running" in (
            deferred.deferred or ""
        ), deferred
        assert store.block_count() == 3
    finally:
        release.set()
        running.join(60)
    restored = {}
    store.restore("v", "running", restored.__setitem__)
    assert restored == {0: b"\1" * 4096}
    assert store.collect().removed == 1  # now the orphan of "old" ("\2") goes
    assert store.block_count() == 2


def test_same_content_twice_at_once_completes_both(store: BackupStore) -> None:
    rng = random.Random(2)
    blocks = [rng.randbytes(8192) for _ in range(16)]
    results = {}

    def backup(name: str) -> None:
        results[name] = store.create("img", name, 16 * 8192, reader(blocks), block_size=8192)

    threads = [threading.Thread(target=backup, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == {"x", "y"}
    for name in ("x", "y"):
        restored = {}
        store.restore("img", name, restored.__setitem__)
        assert [restored[i] for i in range(16)] == blocks
    assert {b["state"] for b in store.list("img")} == {"complete"}
    _, stats = store.create("img", "z", 16 * 8192, reader(blocks), block_size=8192)
    assert stats.uploaded == 0


def test_a_corrupt_block_fails_the_restore(store: BackupStore) -> None:
    manifest, _ = store.create("v", "b", 4096, reader([b"\7" * 4096]), block_size=4096)
    digest = manifest["blocks"][0]
    store.bucket.put(store._block_key(digest), b"\0" * 4096, {"lhfs-compression": "none"})
    with pytest.raises(CorruptState, match="does not match"):
        store.restore("v", "b", lambda i, d: None)
    store.bucket.put(store._block_key(digest), b"\1" * 64, {"lhfs-compression": "zstd"})
    with pytest.raises(CorruptState, match="cannot be decompressed"):
        store.restore("v", "b", lambda i, d: None)


def test_unreachable_store_is_not_an_empty_store(s3_endpoint: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import os

    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        bucket = Bucket(Target.parse("s3://nowhere/x"), deadline=1.0, first_delay=0.05)
        store = BackupStore(bucket)
        with pytest.raises(StoreUnavailable, match="did not answer"):
            store.list("v")
        with pytest.raises(StoreUnavailable):
            store.manifest("v", "b")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved


def test_backup_and_restore_survive_the_proxys_faults(s3_endpoint: str) -> None:
    import os
    from urllib.parse import urlparse

    from tools.faultproxy import FaultProxy

    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), reset_after=3000)
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        bucket = Bucket(
            Target.parse(f"s3://lhfs-faults-{next(_names)}/p"), deadline=60, first_delay=0.01
        )
        store = BackupStore(bucket, workers=4)
        proxy.schedule(["refuse", "503", "refuse"])  # the very first requests fail
        bucket.ensure(create=True)
        proxy.fail_every(3, ["reset", "503", "refuse", "delay"])
        proxy.delay = 0.2
        rng = random.Random(9)
        blocks = [rng.randbytes(8192) for _ in range(40)]
        store.create("v", "b", 40 * 8192, reader(blocks), block_size=8192)
        restored: dict[int, bytes] = {}
        store.restore("v", "b", restored.__setitem__)
        assert [restored[i] for i in range(40)] == blocks
        assert proxy.faults >= 6
        proxy.stop()  # the endpoint goes away: a bounded wait, then a clear error
        quick = BackupStore(Bucket(bucket.target, deadline=0.5, first_delay=0.05))
        with pytest.raises(StoreUnavailable):
            quick.list("v")
        proxy.resume()
        assert [b["state"] for b in store.list("v")] == ["complete"]
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.close()


def test_a_backup_waits_for_a_running_collection(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other half of the lock: a backup that starts while a collection runs reuses
    nothing until the collection's marker is gone, and says what it waits for at once and
    again while it waits (here every half second; a marker that names nobody: an earlier
    lhfs's)."""
    store.create("v", "b0", 4096, reader([b"\1" * 4096]), block_size=4096)
    marker = store.target.key("locks", "collect-test")
    store.bucket.put(marker, b"")
    monkeypatch.setattr(backupstore.store, "_WAIT_NOTICE", 0.5)
    said: list[str] = []
    store.notice = said.append
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (
            store.create("v", "b1", 8192, reader([b"\1" * 4096, b"\2" * 4096])),
            done.set(),
        )
    )
    thread.start()
    try:
        wait_for(lambda: len(said) >= 2, 30, "the backup to say twice that it waits")
        assert said[0].startswith("waiting for a collection of unreferenced blocks to finish")
        assert said[1].startswith("still waiting (") and f"/{marker}, last refreshed" in said[1]
        assert store.block_count() == 1 and not done.is_set()
        assert {b["name"]: b["state"] for b in store.list("v")}["b1"] == "in_progress"
    finally:
        store.bucket.delete(marker)
        thread.join(60)
    assert done.is_set() and store.block_count() == 2
    assert store.collect().removed == 0  # both referenced; the collection's own marker is gone
    assert list(store.bucket.list(store.target.key("locks") + "/")) == []


def test_block_size_is_fixed_per_volume_and_a_base_limits_reads(store: BackupStore) -> None:
    rng = random.Random(4)
    blocks = [rng.randbytes(4096) for _ in range(8)]
    full, _ = store.create("v", "b0", 8 * 4096, reader(blocks), block_size=4096)
    with pytest.raises(InvalidArgument, match="use 4K blocks"):
        store.create("v", "b1", 8 * 4096, reader(blocks), block_size=8192)
    reads = []

    def counting(index: int, block_size: int) -> bytes:
        reads.append(index)
        return blocks[index]

    blocks[5] = rng.randbytes(4096)
    manifest, stats = store.create("v", "b1", 8 * 4096, counting, base=("b0", [5]))
    assert reads == [5] and stats.read == 1 and stats.uploaded == 1
    assert manifest["block_size"] == 4096
    assert (
        manifest["blocks"][:5] == full["blocks"][:5]
        and manifest["blocks"][6:] == full["blocks"][6:]
    )
    restored = {}
    store.restore("v", "b1", restored.__setitem__)
    assert [restored[i] for i in range(8)] == blocks

    reads.clear()  # a base that is gone means a full read (nothing new to send)
    store.delete("v", "b0")
    _, stats = store.create("v", "b2", 8 * 4096, counting, base=("b0", []))
    assert reads == list(range(8)) and stats.uploaded == 0


def test_a_large_backup_learns_the_stored_blocks_from_one_listing(store: BackupStore) -> None:
    """Over 64 blocks to read, the store's blocks are listed once instead of asked for one by
    one: another volume's identical blocks are still not sent again."""
    rng = random.Random(6)
    blocks = [rng.randbytes(4096) for _ in range(100)]
    _, first = store.create("a", "b0", 100 * 4096, reader(blocks), block_size=4096)
    assert first.uploaded == 100
    blocks[7] = rng.randbytes(4096)
    _, other = store.create("b", "b0", 100 * 4096, reader(blocks), block_size=4096)
    assert (other.uploaded, other.reused) == (1, 99)
    restored = {}
    store.restore("b", "b0", restored.__setitem__)
    assert [restored[i] for i in range(100)] == blocks


def test_a_dead_collections_marker_does_not_hold_a_backup_back(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker older than ``STALE`` by the server's clock belongs to a process that died: a
    backup goes on past it (here every marker is made to look that old)."""
    store.bucket.ensure()
    store.bucket.put(store.target.key("locks", "collect-dead"), b"")
    monkeypatch.setattr(backupstore.store, "STALE", -1.0)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (
            store.create("v", "b0", 4096, reader([b"\1" * 4096]), block_size=4096),
            done.set(),
        ),
        daemon=True,
    )
    thread.start()
    thread.join(60)
    assert done.is_set() and store.block_count() == 1


def test_a_running_backup_keeps_its_marker_fresh_while_blocked(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker that holds collections back is refreshed by a heartbeat, also while the
    backup itself is stuck (here: on a read that does not return)."""
    monkeypatch.setattr(backupstore.store, "HEARTBEAT", 0.3)
    release, reading = threading.Event(), threading.Event()

    def stuck_read(index: int, block_size: int) -> bytes:
        reading.set()
        assert release.wait(60)
        return b"\1" * 4096

    thread = threading.Thread(target=store.create, args=("v", "slow", 4096, stuck_read))
    thread.start()
    try:
        assert reading.wait(60)
        marker = store._key("v", "slow", "running")
        first = store.bucket.modified(marker)
        wait_for(lambda: store.bucket.modified(marker) > first, 30, "the marker to be refreshed")
    finally:
        release.set()
        thread.join(60)
    assert not store.bucket.exists(marker)  # gone with the backup
    assert [b["state"] for b in store.list("v")] == ["complete"]


def test_an_incremental_backup_reads_only_its_base_manifest(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many backups a volume has, an incremental one reads one manifest, its base's:
    the blocks it names are the ones known present (no HEAD needed, none sent again)."""
    rng = random.Random(7)
    blocks = [rng.randbytes(4096) for _ in range(8)]
    for n in range(5):
        blocks[n] = rng.randbytes(4096)
        store.create("v", f"b{n}", 8 * 4096, reader(blocks), block_size=4096)
    read: list[str] = []
    real = BackupStore.manifest
    monkeypatch.setattr(
        BackupStore, "manifest", lambda self, vol, name: read.append(name) or real(self, vol, name)
    )
    blocks[6] = rng.randbytes(4096)
    _, stats = store.create("v", "b5", 8 * 4096, reader(blocks), base=("b4", [6]))
    assert read == ["b4"]
    assert (stats.read, stats.uploaded, stats.reused) == (1, 1, 0)


def test_a_listing_leaves_out_a_backup_deleted_while_it_reads(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = [random.Random(8).randbytes(4096) for _ in range(2)]
    for name in ("b0", "b1"):
        store.create("v", name, 2 * 4096, reader(blocks), block_size=4096)
    real = BackupStore.manifest

    def deleted_meanwhile(self: BackupStore, vol: str, name: str) -> dict:
        if name == "b0":
            self.bucket.delete(self._key(vol, name, "json"))
        return real(self, vol, name)

    monkeypatch.setattr(BackupStore, "manifest", deleted_meanwhile)
    assert [b["name"] for b in store.list("v")] == ["b1"]


def test_a_block_held_in_several_places_is_fetched_once(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    a, b = rng.randbytes(4096), rng.randbytes(4096)
    blocks = [a, b, a, bytes(4096), a]
    store.create("v", "b0", 5 * 4096, reader(blocks), block_size=4096)
    fetched: list[str] = []
    real = BackupStore.get_block
    monkeypatch.setattr(
        BackupStore, "get_block", lambda self, digest: fetched.append(digest) or real(self, digest)
    )
    restored: dict[int, bytes] = {}
    progress: list[float] = []
    store.restore("v", "b0", restored.__setitem__, lambda percent, *_: progress.append(percent))
    assert len(fetched) == 2
    assert restored == {0: a, 1: b, 2: a, 4: a}
    assert progress[-1] == 100.0


def test_an_increment_sends_changed_blocks_without_asking_a_full_read_asks(
    store: BackupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks an increment reads are new content: they go without a HEAD each, except those
    whose content the base already names (reused, not sent). A full read asks, and reuses what
    another volume stored."""
    rng = random.Random(9)
    blocks = [rng.randbytes(4096) for _ in range(6)]
    store.create("v", "b0", 6 * 4096, reader(blocks), block_size=4096)
    asked: list[str] = []
    real = Bucket.exists
    monkeypatch.setattr(Bucket, "exists", lambda self, key: asked.append(key) or real(self, key))
    blocks[1], blocks[4] = rng.randbytes(4096), blocks[0]  # one new, one the base holds
    _, stats = store.create("v", "b1", 6 * 4096, reader(blocks), base=("b0", [1, 4]))
    assert asked == []
    assert (stats.read, stats.uploaded, stats.reused) == (2, 1, 1)
    _, stats = store.create("w", "c0", 6 * 4096, reader(blocks), block_size=4096)
    # six blocks, five contents: each asked for, and again before the manifest names it
    assert len(asked) == 10 and len(set(asked)) == 5
    assert (stats.uploaded, stats.reused) == (0, 6)
    assert store.get_block(store.manifest("v", "b1")["blocks"][1]) == blocks[1]
