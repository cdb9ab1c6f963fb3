"""The chunk store against the simplest possible model: a bytearray per volume and per snapshot.

Tiny chunk sizes and unaligned I/O put every alignment edge in reach of a few random steps, on
top of a random backing image. Every step compares the whole volume with the model.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from lhfs.store.chunkstore import ChunkStore


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="lhfs-model-"))
        self.store: ChunkStore | None = None
        self.model = bytearray()
        self.snaps: dict[str, bytes] = {}
        self.counter = 0

    @initialize(
        chunk_size=st.sampled_from([1, 2, 4, 8, 16]),
        chunks=st.integers(1, 24),
        backing=st.one_of(st.none(), st.binary(min_size=1, max_size=200)),
    )
    def setup(self, chunk_size: int, chunks: int, backing: bytes | None) -> None:
        size = chunk_size * chunks
        image = None
        if backing is not None:
            backing = backing[:size]
            image = self.tmp / "image.raw"
            image.write_bytes(backing)
        self.store = ChunkStore.create(self.tmp / "replica", size, chunk_size, image)
        self.model = bytearray(size)
        if backing:
            self.model[: len(backing)] = backing

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, size - offset), label="length")
        return offset, length

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        payload = random.Random(data.draw(st.integers(0, 1 << 30))).randbytes(length)
        self.store.write(offset, payload)
        self.model[offset : offset + length] = payload

    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        self.store.trim(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def snapshot(self) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        self.store.snapshot(name)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def remove_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.store.remove_snapshot(name)
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def remove_snapshot_with_writes_between_steps(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        for _ in self.store.remove_snapshot_steps(name, batch=1):
            if data.draw(st.booleans(), label="write between steps"):
                self.write(data)
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.store.revert(name)
        content = self.snaps[name]
        self.model = bytearray(content) + bytes(len(self.model) - len(content))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def read_snapshot(self, data: st.DataObject) -> None:
        """A snapshot reads as it was taken, through its own chain, whatever came since."""
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        content = self.snaps[name]
        offset = data.draw(st.integers(0, len(content) - 1), label="offset")
        length = data.draw(st.integers(1, len(content) - offset), label="length")
        got = self.store.read_snapshot(name, offset, length)
        assert bytes(got) == content[offset : offset + length]

    @rule(extra=st.integers(1, 4))
    def expand(self, extra: int) -> None:
        size = len(self.model) + extra * self.store.chunk_size
        self.store.expand(size)
        self.model += bytes(size - len(self.model))

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = ChunkStore.open(self.tmp / "replica")

    @invariant()
    def content_matches(self) -> None:
        if self.store is not None:
            assert self.store.size == len(self.model)
            assert bytes(self.store.read(0, len(self.model))) == bytes(self.model)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


StoreModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase
