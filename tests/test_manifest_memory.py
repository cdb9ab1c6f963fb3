"""Commands over every backup of a store, and a DR follower, hold a bounded number of
manifests at once, whatever the number of backups kept (against a real S3 server)."""

from __future__ import annotations

import gc
import itertools
import random
import threading
import weakref
from typing import Any

import pytest

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.backups.dr import newest_backup

_names = itertools.count()
WORKERS = 2
BACKUPS = 12
BS = 64 << 10


class Manifest(dict):
    """A manifest that can be watched: a plain dict takes no weak reference."""


class CountingStore(BackupStore):
    """The real store, each manifest it reads watched: ``peak`` is the most that were alive
    at once when one more was read."""

    def __init__(self, bucket: Bucket) -> None:
        super().__init__(bucket, workers=WORKERS)
        self.alive = 0
        self.peak = 0
        self.reads = 0
        self._lock = threading.Lock()

    def manifest(self, volume: str, name: str) -> dict[str, Any]:
        watched = Manifest(super().manifest(volume, name))
        with self._lock:
            self.alive += 1
            self.reads += 1
            self.peak = max(self.peak, self.alive)
        weakref.finalize(watched, self._dropped)
        return watched

    def _dropped(self) -> None:
        with self._lock:
            self.alive -= 1

    def restart(self) -> None:
        gc.collect()
        self.peak, self.reads = self.alive, 0


@pytest.fixture
def store(s3_endpoint: str) -> CountingStore:
    bucket = Bucket(Target.parse(f"s3://lhfs-test-mem-{next(_names)}/p"), deadline=10)
    bucket.ensure(create=True)
    found = CountingStore(bucket)
    rng = random.Random(5)
    blocks = [rng.randbytes(BS) for _ in range(4)]
    for index in range(BACKUPS):
        blocks[index % 4] = rng.randbytes(BS)
        found.create("vol", f"b{index:02}", len(blocks) * BS, lambda i, _: blocks[i], block_size=BS)
    found.restart()
    return found


# (the reads run on WORKERS threads and one is handed on while the next is read)
BOUND = WORKERS + 2


def test_list_reads_manifests_one_at_a_time(store: CountingStore) -> None:
    listed = store.list()
    assert [b["name"] for b in listed] == [f"b{i:02}" for i in range(BACKUPS)]
    assert {(b["state"], b["blocks"], b["size"]) for b in listed} == {("complete", 4, 4 * BS)}
    assert store.reads == BACKUPS
    assert store.peak <= BOUND, f"{store.peak} manifests held at once"


def test_collections_read_manifests_one_at_a_time(store: CountingStore) -> None:
    done = store.delete("vol", "b00")
    assert (done.removed, done.deferred) == (1, None)  # b00's own block, no other's
    assert store.reads == BACKUPS - 1 and store.peak <= BOUND, f"{store.peak} at once"
    store.restart()
    report = store.prune("vol", {"last": 3})
    assert [b["name"] for b in report["kept"]] == ["b09", "b10", "b11"]
    assert report["collected"] == 8  # the blocks only the removed backups held
    assert store.peak <= BOUND, f"{store.peak} manifests held at once"
    assert len(store.list()) == 3


def test_a_damaged_manifest_still_stops_a_collection(store: CountingStore) -> None:
    store.bucket.put(store.target.key("volumes", "vol", "b05.json"), b"not a manifest")
    store.restart()
    done = store.delete("vol", "b00")
    assert done.removed == 0 and ("vol", "b05") in done.damaged
    assert store.peak <= BOUND
    assert {b["name"]: b["state"] for b in store.list()}["b05"] == "damaged"


def test_follower_keeps_one_whole_manifest(store: CountingStore) -> None:
    cache: dict[str, dict[str, Any]] = {}
    newest = newest_backup(store, "vol", cache)
    assert newest is not None and newest["name"] == f"b{BACKUPS - 1:02}"
    assert len(newest["blocks"]) == 4
    assert [name for name, m in cache.items() if "blocks" in m] == [newest["name"]]
    gc.collect()
    assert store.alive == 1, f"{store.alive} manifests kept"
    assert store.peak <= 2  # (the newest so far, and the one just read)
    store.restart()
    assert newest_backup(store, "vol", cache)["name"] == newest["name"]
    assert store.reads == 0  # nothing read again while nothing changed
    # the newest deleted: the one before it is read whole again, and none other
    del newest
    store.forget("vol", f"b{BACKUPS - 1:02}")
    again = newest_backup(store, "vol", cache)
    assert again["name"] == f"b{BACKUPS - 2:02}" and len(again["blocks"]) == 4
    assert store.reads == 1
    assert [name for name, m in cache.items() if "blocks" in m] == [again["name"]]


class ScannedCache(dict):
    """A follower's cache that counts the entries its scans visit (``values``)."""

    visited = 0

    def values(self):  # type: ignore[override]
        self.visited += len(self)
        return super().values()


def test_a_follower_starting_over_many_backups_scans_its_cache_a_bounded_number_of_times(
    store: CountingStore,
) -> None:
    """A first look over the store reads every manifest once and visits each cached entry a
    bounded number of times, whatever the number of backups: the cache was scanned whole
    after each manifest read, a time in the square of the number of backups."""
    cache = ScannedCache()
    newest = newest_backup(store, "vol", cache)
    assert newest is not None and newest["name"] == f"b{BACKUPS - 1:02}"
    assert store.reads == BACKUPS
    assert [name for name, m in cache.items() if "blocks" in m] == [newest["name"]]
    assert cache.visited <= 2 * BACKUPS, f"{cache.visited} entries visited"
