"""A backup being read (a restore, a DR standby's increment) is left alone by removals; what a
removal cut short leaves is said, and so is a backup deleted under a DR standby."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse, restore_killed_half_way

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, write_at
from lhfs.volumes.standby import follower_pid
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    upstream = urlparse(s3_endpoint)
    relay = FaultProxy((upstream.hostname, upstream.port))
    try:
        yield relay
    finally:
        relay.close()


def _name(url: str) -> str:
    return url.split("backup=")[1]


def _source(cli: Cli, tmp_path: Path, size: int = 4) -> tuple[Path, random.Random]:
    """A volume ``src`` of ``size`` MiB, attached, filled with random data."""
    cli.run("volume", "create", "src", "--size", f"{size}M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    rng = random.Random(7)
    write_at(device, 0, rng.randbytes(size * MIB))
    return device, rng


def _backup(cli: Cli, target: str) -> str:
    args = ("backup", "create", "src", "--target", target, "--create-bucket", "--quiet")
    return cli.run(*args, "--block-size", "64K").stdout.split()[-1]


def _readers(target: str) -> list[str]:
    """The reader markers in the store (what a restore writes while it reads a backup)."""
    parsed = Target.parse(target)
    return [o.object_name for o in Bucket(parsed).list(parsed.key("locks", "read") + "/")]


def _slow_restore(cli: Cli, proxy: FaultProxy, url: str, name: str) -> object:
    """``backup restore URL NAME`` through the throttled proxy, once it writes."""
    proxy.rate = 256 << 10
    restore = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}).start(
        "backup", "restore", url, name, "--quiet", "--replicas", "1"
    )
    wait_for(
        lambda: name in volumes.list_names(cli.root) and cli.info(name)["state"] == "restoring",
        60,
        "the restore to start writing",
    )
    return restore


def test_a_backup_being_restored_is_not_removed_nor_pruned(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://guard-rm/p"
    device, rng = _source(cli, tmp_path)
    first_sum = cli.checksum("src")
    first = _backup(cli, target)
    write_at(device, 0, rng.randbytes(MIB))
    second = _backup(cli, target)
    restore = _slow_restore(cli, proxy, first, "copy")
    try:
        (marker,) = _readers(target)
        assert f"/src/{_name(first)}/" in marker
        refused = cli.run("backup", "rm", first, check=False)
        assert refused.returncode == 1, refused
        line = refused.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"a restore of backup {_name(first)} of volume src (pid {restore.pid} on " in line
        assert "try again once it is done" in line
        pruned = cli.json(
            "backup", "prune", "--target", target, "--volume", "src", "--keep-last", "1"
        )
        assert pruned["removed"] == []
        (kept,) = [k for k in pruned["kept"] if k["name"] == _name(first)]
        assert any(r.startswith("being read: a restore of backup") for r in kept["reasons"])
        listed = cli.json("backup", "ls", "--target", target, "--volume", "src")
        assert [b["url"] for b in listed] == [first, second]
    finally:
        proxy.rate = None
        assert restore.wait(120) == 0, restore.stderr.read()
    assert cli.checksum("copy") == first_sum
    assert _readers(target) == []  # (removed at the end)
    done = cli.json("backup", "rm", first)
    assert done["collected"] > 0 and done["deferred"] is None


def test_a_killed_restore_holds_nothing_back_and_gc_sweeps_its_marker(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://guard-kill/p"
    _source(cli, tmp_path)
    url = _backup(cli, target)
    restore_killed_half_way(cli, s3_endpoint, url, "copy")
    assert len(_readers(target)) == 1  # the killed restore's, dead at once on its own host
    cli.run("volume", "rm", "copy")
    done = cli.json("backup", "rm", url)
    assert done["collected"] > 0 and done["deferred"] is None
    swept = cli.json("backup", "gc", "--target", target)
    assert swept["swept"] == 1
    assert _readers(target) == []


def test_a_backup_removed_under_a_restore_is_said_removed_not_damaged(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://guard-gone/p"
    _source(cli, tmp_path)
    url = _backup(cli, target)
    restore = _slow_restore(cli, proxy, url, "copy")
    try:  # (removed as a store without lhfs's readers' markers sees it: by hand)
        parsed = Target.parse(target)
        bucket = Bucket(parsed)
        bucket.delete(parsed.key("volumes", "src", f"{_name(url)}.json"))
        for obj in list(bucket.list(parsed.key("blocks") + "/")):
            bucket.delete(obj.object_name)
    finally:
        proxy.rate = None
    assert restore.wait(120) == 1
    err = restore.stderr.read().strip().splitlines()[-1]
    assert f"backup {_name(url)} of volume src was removed from {target} during the restore" in err
    assert "the store is not damaged" in err
    assert "copy" not in volumes.list_names(cli.root)


def test_a_removal_cut_short_is_said_by_rm_and_check(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://guard-cut/p"
    _source(cli, tmp_path)
    url = _backup(cli, target)
    store = BackupStore(Bucket(Target.parse(target)))
    store.forget("src", _name(url))  # what a 'backup rm' killed before its collection left
    again = cli.run("backup", "rm", url, check=False)
    assert again.returncode == 1
    assert f"no backup '{_name(url)}'" in again.stderr
    assert f"'lhfs backup gc --target {target}' collects the blocks it left" in again.stderr
    checked = cli.run("backup", "check", "--target", target)
    assert "no problem" in checked.stdout
    assert "note: 64 block(s) (4M) that no backup names" in checked.stdout, checked.stdout
    assert f"'lhfs backup gc --target {target}' collects them" in checked.stdout
    report = cli.json("backup", "check", "--target", target)
    assert report["unreferenced_blocks"] == 64 and report["unreferenced_bytes"] > 0
    assert cli.json("backup", "gc", "--target", target)["collected"] == 64
    assert "note:" not in cli.run("backup", "check", "--target", target).stdout


def _standby(cli: Cli, proxy: FaultProxy, target: str, name: str) -> Cli:
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    standby.run(
        "dr", "create", name, "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    return standby


def test_a_backup_deleted_under_a_standby_is_said_and_the_lag_goes_on(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://guard-dr/p"
    device, rng = _source(cli, tmp_path)
    first_sum = cli.checksum("src")
    first = _backup(cli, target)
    standby = _standby(cli, proxy, target, "dsb")
    assert standby.checksum("dsb") == first_sum
    write_at(device, 0, rng.randbytes(4 * MIB))
    proxy.rate = 256 << 10
    second = _backup(cli, target)
    wait_for(
        lambda: standby.json("dr", "status", "dsb")["applying"] == _name(second),
        60,
        "the standby to apply the second backup",
    )
    # (its follower held there, so that the increment is still under way for what follows)
    follower = follower_pid(volumes.load(cli.root, "dsb"))
    assert follower is not None
    os.kill(follower, signal.SIGSTOP)
    try:
        refused = cli.run("backup", "rm", second, check=False)
        assert refused.returncode == 1
        assert f"a DR standby's increment of backup {_name(second)}" in refused.stderr
        # deleted as by hand (or by an lhfs that does not look for readers): its blocks too
        parsed = Target.parse(target)
        bucket = Bucket(parsed)
        store = BackupStore(bucket)
        first_blocks = store.manifest("src", _name(first))["blocks"]
        keep = {store.keys.block_name(d) for d in first_blocks if d}
        bucket.delete(parsed.key("volumes", "src", f"{_name(second)}.json"))
        deleted_at = time.time()
        for obj in list(bucket.list(parsed.key("blocks") + "/")):
            if obj.object_name.rsplit("/", 1)[1] not in keep:
                bucket.delete(obj.object_name)
    finally:
        os.kill(follower, signal.SIGCONT)
    status = wait_for(
        lambda: (s := standby.json("dr", "status", "dsb"))["deleted_while_applied"] and s,
        60,
        "the standby to give the deleted backup up",
    )
    assert status["deleted_while_applied"]["backup"] == _name(second)
    checked = status["last_checked"]
    status = wait_for(  # (two polls later: the lag still counts from before the deletion)
        lambda: (s := standby.json("dr", "status", "dsb"))["last_checked"] != checked and s,
        30,
        "a poll",
    )
    assert status["state"] == "standby" and status["applying"] is None
    assert status["last_restored_backup"] == _name(first)
    assert status["lag_seconds"] >= time.time() - deleted_at - 1
    text = standby.run("dr", "status", "dsb").stdout
    assert "applying" not in text
    assert f"backup {_name(second)} was deleted from the store while it was applied" in text
    proxy.rate = None
    third = _backup(cli, target)  # a newer backup applied: current again
    after = standby.dr_restored("dsb", third)
    assert after["deleted_while_applied"] is None and after["lag_seconds"] < 30
    standby.run("dr", "stop", "dsb")
    third_sum = cli.checksum("src")
    done = standby.json("dr", "activate", "dsb", "--offline", "--quiet")
    assert done["backup"] == _name(third)
    assert cli.checksum("dsb") == third_sum


def test_replica_add_on_a_standby_names_dr_activate(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://guard-add/p"
    _source(cli, tmp_path)
    url = _backup(cli, target)
    standby = _standby(cli, proxy, target, "dsa")
    cli.dr_restored("dsa", url)
    before = [r["id"] for r in cli.info("dsa")["replicas"]]
    added = cli.run("replica", "add", "dsa", check=False)
    assert added.returncode == 1
    line = added.stderr.strip()
    assert "\n" not in line and "not attached" not in line
    assert "volume dsa is a DR standby: adding a replica waits for 'lhfs dr activate dsa'" in line
    assert [r["id"] for r in cli.info("dsa")["replicas"]] == before
    standby.run("dr", "stop", "dsa")
