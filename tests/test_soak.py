"""Soak: hundreds of SIGKILLs through the data path (``make soak``; not part of ``make test``).

One volume with three local replicas (shared memory, each served by its hot-path thread),
fio --verify through its loop device, and in every round something dies at a random moment:
a replica while fio writes, a replica while fio reads back what it wrote, or every tenth round
the engine itself, just after a flushed write of a known pattern. After a replica's death fio
must finish without a verify error and the dead one comes back by itself (its engine starts it
again and rebuilds what changed); after the engine's, the volume attaches again and the flushed
pattern is there. At the end a scrub finds
every replica equal. ``LHFS_SOAK_ROUNDS`` sets the number of rounds (default 200).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from lhfs.core.procs import wait_for
from lhfs.testing import Cli, fio_verify, kill_engine, loop_attach, read_direct, write_direct

pytestmark = pytest.mark.soak

MIB = 1 << 20
FIO_REGION = 64 * MIB  # fio's writes; the flushed pattern goes after it
WRITES = FIO_REGION // 4096  # fio writes each block once, then reads each back


def test_kills_at_random_moments_lose_nothing(cli: Cli, tmp_path: Path) -> None:
    rounds = int(os.environ.get("LHFS_SOAK_ROUNDS", "200"))
    rng = random.Random(int(os.environ.get("LHFS_SOAK_SEED", "1")))
    cli.run("volume", "create", "s", "--size", "128M", "--replicas", "3", "--rejoin-wait", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "s", "--device", str(device))
    counts = {"replica killed writing": 0, "replica killed reading": 0, "engine killed": 0}
    flushed: dict[int, bytes] = {}  # offset -> the pattern written there before an engine kill
    try:
        for number in range(rounds):
            kind = (
                "engine killed"
                if number % 10 == 9
                else rng.choice(["replica killed writing", "replica killed reading"])
            )
            _round(cli, device, kind, rng, flushed)
            counts[kind] += 1
        sums = cli.json("volume", "scrub", "s")
        assert sums["damaged"] == {}, sums
        for offset, pattern in flushed.items():  # (through every later kill and rebuild)
            assert read_direct(device, offset, MIB) == pattern, f"lost at {offset}"
    finally:
        print(f"soak: {rounds} rounds planned; done: {counts}")
        cli.run("volume", "detach", "s", check=False)


def _round(
    cli: Cli, device: Path, kind: str, rng: random.Random, flushed: dict[int, bytes]
) -> None:
    loop = loop_attach(device)
    fio = fio_verify(loop, f"{FIO_REGION}", "--iodepth=32")
    try:
        if kind == "replica killed reading":
            reads = _counts(cli)[1] + rng.randrange(100, WRITES // 4)
            wait_for(lambda: fio.poll() is not None or _counts(cli)[1] > reads, 300, "reads")
        else:
            writes = _counts(cli)[0] + rng.randrange(100, WRITES * 3 // 4)
            wait_for(lambda: fio.poll() is not None or _counts(cli)[0] > writes, 300, "writes")
        assert fio.poll() is None, f"fio ended before the kill ({kind})"
        if kind == "engine killed":
            pattern = rng.randbytes(MIB)
            offset = FIO_REGION + rng.randrange(0, 32) * MIB
            write_direct(device, offset, pattern)  # flushed: it must survive the kill
            flushed[offset] = pattern
            kill_engine(cli, "s")
            fio.wait(timeout=120)  # (it fails: its device is gone)
            subprocess.run(["losetup", "-d", loop], check=False)
            cli.run("volume", "attach", "s", "--device", str(device))
            assert read_direct(device, offset, MIB) == pattern, "a flushed write was lost"
            # (replicas that missed writes in flight at the kill are rebuilt from the others)
            wait_for(lambda: cli.live("s")["state"] == "healthy", 120, "the volume healthy")
            return
        victim = rng.choice([r for r in cli.live("s")["replicas"] if r["mode"] == "RW"])
        os.kill(victim["pid"], signal.SIGKILL)
        out, err = fio.communicate(timeout=600)
        assert fio.returncode == 0 and "verify" not in err.lower(), (kind, out + err)
        wait_for(
            lambda: _replica(cli, victim["id"])["pid"] not in (None, victim["pid"]),
            60,
            "the replica started again",
        )
        info = wait_for(
            lambda: (i := cli.live("s"))["state"] == "healthy" and i, 120, "the replica back"
        )
        assert [r["mode"] for r in info["replicas"]] == ["RW"] * 3, info
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)  # (if still)


def _counts(cli: Cli) -> tuple[int, int]:
    """Writes and reads the engine served (a read through shared memory is one or the other
    of the two read counters)."""
    info = cli.live("s")
    return info["writes"], info["shared_reads"] + info["replica_answered_reads"]


def _replica(cli: Cli, replica_id: str) -> dict:
    return next(r for r in cli.live("s")["replicas"] if r["id"] == replica_id)
