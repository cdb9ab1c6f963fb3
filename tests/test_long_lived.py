"""What builds up over a long life: big and many logs, replicas and backup targets come and
gone. Each cost must stay in proportion to what is asked, and nothing must be kept for ever."""

from __future__ import annotations

import time
from pathlib import Path

from lhfs.core import logs

LINE = b"2026-12-06T16:00:00.000Z lhfs.engine: replica r2 failed: connection lost (detail)\n"


def test_following_a_burst_costs_its_size(tmp_path: Path) -> None:
    """A follower stopped while 8 MiB were logged reads them at once, in time linear in
    their size (each line appended to what was read so far took minutes of CPU)."""
    path = tmp_path / "engine.log"
    path.write_bytes(b"")
    merger = logs.Merger([logs.Follower("engine", path)], window=0)
    count = (8 << 20) // len(LINE)
    with open(path, "ab") as f:
        f.write(LINE * count + b"2026-12-06T16:00:00.001Z half a li")
    began = time.monotonic()
    shown = merger.poll(now=time.time() + 10)
    took = time.monotonic() - began
    assert shown.count(b"\n") == count
    assert shown.endswith(b"[engine] " + LINE)
    assert took < 8, f"8 MiB followed in {took:.1f} s"
    with open(path, "ab") as f:
        f.write(b"ne\n")
    assert merger.poll(now=time.time() + 10) == b"[engine] 2026-12-06T16:00:00.001Z half a line\n"
