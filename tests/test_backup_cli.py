"""Backups of real volumes through the command line, to a real S3 server."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse, restore_killed_half_way

from backupstore.s3 import Bucket, StoreRefused, Target
from backupstore.store import BackupStore, Marker
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


def test_backup_restore_incremental_and_delete(cli: Cli, tmp_path: Path, s3_endpoint: str) -> None:
    target = "s3://cli-backups/site-a"
    cli.run("volume", "create", "src", "--size", "64M")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    rng = random.Random(3)
    with open(device, "r+b") as f:
        for offset in range(0, 24 * MIB, MIB):
            f.seek(offset)
            f.write(rng.randbytes(MIB // 2) + bytes(MIB // 2))
        f.flush()
        os.fsync(f.fileno())
    first_sum = cli.checksum("src")
    out = cli.run("backup", "create", "src", "--target", target, "--create-bucket").stdout
    assert "read 32 of 32 blocks" in out
    first = out.split()[-1]
    assert first.startswith(target + "?volume=src&backup=")
    store = BackupStore(Bucket(Target.parse(target)))
    blocks_after_first = store.block_count()
    assert blocks_after_first == 12  # 24 MiB of data in 2 MiB blocks

    with open(device, "r+b") as f:  # change one block
        f.seek(5 * MIB)
        f.write(rng.randbytes(4096))
        f.flush()
        os.fsync(f.fileno())
    second_sum = cli.checksum("src")
    out = cli.run("backup", "create", "src", "--target", target, "--create-bucket").stdout
    assert "read 1 of 32 blocks, uploaded 1" in out  # changed blocks come from the chain
    second = out.split()[-1]
    assert store.block_count() == blocks_after_first + 1  # a delta: the changed 64 KiB chunk
    recipes = store.manifest("src", second.split("backup=")[1])["deltas"]
    assert list(recipes) == ["2"] and recipes["2"]["units"] == [16]
    cli.run("volume", "detach", "src")

    listed = cli.json("backup", "ls", "--target", target, "--volume", "src")
    assert [b["url"] for b in listed] == [first, second]
    assert {b["state"] for b in listed} == {"complete"}

    cli.run("backup", "restore", first, "copy1", "--replicas", "2")
    assert cli.checksum("copy1") == first_sum
    copy = volumes.load(cli.root, "copy1")
    for replica in copy.replicas:  # the zero halves were not written: the copy is as sparse
        with ChunkStore.open(copy.replica_dir(replica)) as restored:
            held = {chunk for layer in restored.chain for chunk in layer.index}
            assert len(held) == 24 * (MIB // 2) // restored.chunk_size
    cli.run("backup", "restore", second, "copy2", "--replicas", "1")
    assert cli.checksum("copy2") == second_sum

    out = cli.run("backup", "create", "src", "--target", target, "--create-bucket").stdout
    assert "read 0 of 32 blocks" in out  # detached, from a local replica: nothing changed
    detached = out.split()[-1]
    assert store.block_count() == blocks_after_first + 1  # nothing new to send
    base = cli.json("snapshot", "ls", "src")[-1]["name"]
    cli.run("snapshot", "rm", "src", base)  # the base is gone: a full read, nothing sent
    out = cli.run("backup", "create", "src", "--target", target, "--create-bucket").stdout
    assert "read 32 of 32 blocks, uploaded 1" in out  # the delta's block, whole again
    cli.run("backup", "rm", first)
    assert store.block_count() == blocks_after_first + 2  # its block 2: the delta's base
    cli.run("backup", "rm", second)  # the unchanged backup after it names the same recipe
    assert store.block_count() == blocks_after_first + 2
    cli.run("backup", "restore", detached, "copy3", "--replicas", "1")
    assert cli.checksum("copy3") == second_sum


def _filled(cli: Cli, tmp_path: Path, name: str, mib: int, seed: int, replicas: int) -> Path:
    """A new 64 MiB volume, attached, its first ``mib`` MiB random and flushed; its device."""
    cli.run("volume", "create", name, "--size", "64M", "--replicas", str(replicas))
    device = tmp_path / "dev"
    cli.run("volume", "attach", name, "--device", str(device))
    with open(device, "r+b") as f:
        f.write(random.Random(seed).randbytes(mib * MIB))
        os.fsync(f.fileno())
    return device


def test_backup_errors_are_one_line(cli: Cli, s3_endpoint: str) -> None:
    cli.run("volume", "create", "v", "--size", "64M", "--replicas", "1")
    snapshots = cli.json("snapshot", "ls", "v")
    for args, status, message in (
        (("backup", "create", "v", "--target", "http://x"), 2, "not a backup target"),
        (("backup", "create", "v", "--target", "s3://cli-none/p", "--snapshot", "nope"), 1, "nope"),
        (("backup", "create", "v", "--target", "s3://B_/p"), 2, "invalid bucket name 'B_'"),
        (("backup", "rm", "s3://b/p"), 2, "not a backup URL"),
        (
            ("backup", "create", "v", "--target", "s3://cli-none/p", "--block-size", "3M"),
            2,
            "power",
        ),
        # the refused backups above did not even create their bucket
        (("backup", "restore", "s3://cli-none/p?volume=v&backup=x", "new"), 1, "does not exist"),
    ):
        result = cli.run(*args, check=False)
        assert result.returncode == status, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    elsewhere = Cli(cli.root, env={**cli.env, "AWS_ENDPOINT_URL": "ftp://127.0.0.1"})
    result = elsewhere.run("backup", "create", "v", "--target", "s3://cli-b/p", check=False)
    assert result.returncode == 2 and "not an http(s)://HOST[:PORT] URL" in result.stderr
    assert cli.json("volume", "ls")[0]["name"] == "v" and len(cli.json("volume", "ls")) == 1
    assert cli.json("snapshot", "ls", "v") == snapshots  # a refused backup takes no snapshot


def test_a_malformed_endpoint_is_one_line_that_never_shows_its_password(
    cli: Cli, s3_endpoint: str
) -> None:
    """User info, a port out of range or an unclosed IPv6 bracket in AWS_ENDPOINT_URL is bad
    usage said in one line naming the variable (they were tracebacks), the password never
    repeated, nothing made: no snapshot, no standby."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    before = cli.volumes(), cli.json("snapshot", "ls", "v")
    port = urlparse(s3_endpoint).port
    for endpoint, message in (
        (f"http://u:s3cr3t-pw@127.0.0.1:{port}", "AWS_ENDPOINT_URL holds user info"),
        ("http://127.0.0.1:99999", "AWS_ENDPOINT_URL has a port that is not 1-65535"),
        ("http://127.0.0.1:0", "AWS_ENDPOINT_URL has a port that is not 1-65535"),
        ("http://[::1", "AWS_ENDPOINT_URL is not an http(s)://HOST[:PORT] URL"),
        (f"http://127.0.0.1:{port}/path", "AWS_ENDPOINT_URL is not an http(s)://HOST[:PORT] URL"),
    ):
        bad = Cli(cli.root, env={**cli.env, "AWS_ENDPOINT_URL": endpoint})
        verbs = (
            ("backup", "create", "v", "--target", "s3://cli-endpoint/p", "--create-bucket"),
            ("backup", "ls", "--target", "s3://cli-endpoint/p"),
            ("dr", "create", "sb", "--target", "s3://cli-endpoint/p", "--volume", "v"),
        )
        for args in verbs if "s3cr3t" in endpoint else verbs[1:2]:  # (one place checks all)
            result = bad.run(*args, check=False)
            assert result.returncode == 2, (endpoint, args, result.stderr)
            assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
            assert "s3cr3t" not in result.stderr + result.stdout
        doctor = bad.run("doctor", "--target", "s3://cli-endpoint/p", check=False)
        assert message in doctor.stdout and "s3cr3t" not in doctor.stdout + doctor.stderr
        assert "Traceback" not in doctor.stderr
    assert (cli.volumes(), cli.json("snapshot", "ls", "v")) == before


def test_a_backup_killed_half_way_leaves_no_complete_backup(cli: Cli, s3_endpoint: str) -> None:
    import signal

    from lhfs.config import volume as volumes
    from lhfs.core.procs import wait_for
    from lhfs.store.chunkstore import ChunkStore

    cli.run("volume", "create", "big", "--size", "256M", "--replicas", "1")
    vol = volumes.load(cli.root, "big")
    rng = random.Random(4)
    with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as store:
        for offset in range(0, 256 * MIB, MIB):
            store.write(offset, rng.randbytes(MIB))
    target = "s3://killed-backups/p"
    store = BackupStore(Bucket(Target.parse(target)))
    proc = cli.start("backup", "create", "big", "--target", target, "--create-bucket")

    def uploaded() -> int:
        try:
            return store.block_count()
        except StoreRefused:  # no bucket yet
            return 0

    try:
        wait_for(lambda: uploaded() >= 3 or proc.poll() is not None, 120, "uploads")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the backup finished before the kill"
    # (its marker is of this host, its process gone: interrupted at once, not in 10 minutes)
    assert [b["state"] for b in store.list("big")] == ["interrupted"]
    url = cli.run("backup", "create", "big", "--target", target, "--create-bucket").stdout.split()[
        -1
    ]
    states = sorted(b["state"] for b in store.list("big"))
    assert states == ["complete", "interrupted"]
    cli.run("backup", "restore", url, "back", "--replicas", "1")
    assert cli.checksum("back") == cli.checksum("big")

    # Stopped by SIGTERM (a service manager, `timeout`), a backup ends as on Ctrl-C: its
    # marker removed, nothing shown in progress for ten minutes, nothing for gc to sweep.
    store = BackupStore(Bucket(Target.parse(target + "2")))
    proc = cli.start("backup", "create", "big", "--target", target + "2")
    try:
        wait_for(lambda: uploaded() >= 3 or proc.poll() is not None, 120, "uploads")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err.strip().endswith("lhfs: terminated"), err
    assert store.list("big") == []


def test_backing_image_backed_up_again_and_twice_at_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:

    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(5).randbytes(5 * MIB + 77))
    created = cli.run("backing-image", "create", "base", "--from", str(raw)).stdout
    assert "id " in created
    (image,) = cli.json("backing-image", "ls")
    assert image["name"] == "base" and image["size"] == 5 * MIB + 77
    target = "s3://image-backups/p"
    cli.run("backing-image", "backup", "base", "--target", target, "--create-bucket")
    runs = [cli.start("backing-image", "backup", "base", "--target", target) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert out.strip().splitlines()[-1].startswith(target + "?volume=image-base&backup=")
        assert "100%" in err
    backups = cli.json("backup", "ls", "--target", target)
    assert len(backups) == 3 and {b["state"] for b in backups} == {"complete"}
    store = BackupStore(Bucket(Target.parse(target)))
    assert store.block_count() == 3  # 5 MiB in 2 MiB blocks, stored once
    cli.run(
        "volume", "create", "onimage", "--size", "64M", "--backing-image", "base", "--replicas", "1"
    )
    assert cli.info("onimage")["backing_image"] == image["id"]


def test_a_replica_added_during_a_restore(cli: Cli, tmp_path: Path, s3_endpoint: str) -> None:
    """SCENARIOS.md story 1, restore part: the restore starts with one replica, a second one is
    added half-way (the store is throttled until it is, so that the restore is still running);
    the restore ends, the volume is healthy with both replicas and equals the backup."""
    target = "s3://cli-story1/p"
    _filled(cli, tmp_path, "src", 24, seed=7, replicas=1)
    expected = cli.checksum("src")
    url = cli.backup("src", target)
    cli.run("volume", "detach", "src")

    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # per connection: the 24 MiB take many seconds
    proxied = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    restore = proxied.start("backup", "restore", url, "copy", "--replicas", "1")
    try:
        wait_for(
            lambda: (
                "copy" in volumes.list_names(cli.root) and cli.info("copy")["state"] == "restoring"
            ),
            60,
            "the restore to attach its volume",
        )
        assert len(cli.info("copy")["replicas"]) == 1
        refused = cli.run(
            "backup", "create", "copy", "--target", target, "--create-bucket", check=False
        )
        assert refused.returncode == 1 and "unfinished restore" in refused.stderr
        added = cli.run("replica", "add", "copy", "--quiet").stdout
        assert "is RW" in added
        assert restore.poll() is None, "the restore ended before the replica was added"
        proxy.rate = None  # (the rest at full speed)
        out, err = restore.communicate(timeout=300)
        assert "restored" in out
        assert restore.returncode == 0, err
    finally:
        if restore.poll() is None:
            restore.kill()
        proxy.close()
    info = cli.info("copy")
    assert info["state"] == "detached" and [r["mode"] for r in info["replicas"]] == ["RW", "RW"]
    assert cli.checksum("copy") == expected
    cli.run("volume", "attach", "copy", "--device", str(tmp_path / "copy"))
    assert cli.info("copy")["state"] == "healthy"
    assert cli.checksum("copy") == expected


def test_a_block_size_that_does_not_divide_the_volume(cli: Cli, s3_endpoint: str) -> None:
    """The last block is short: it is read short and padded, and restores exactly; the
    volume's block size is then fixed in the target."""
    target = "s3://cli-odd/p"
    cli.run("volume", "create", "odd", "--size", "100M", "--replicas", "1")
    cli.run("snapshot", "create", "odd", "empty")
    expected = cli.checksum("odd")
    url = cli.run(
        "backup",
        "create",
        "odd",
        "--target",
        target,
        "--create-bucket",
        "--block-size",
        "8M",
        "--quiet",
    ).stdout.split()[-1]
    snapshots = cli.json("snapshot", "ls", "odd")
    changed = cli.run(
        "backup",
        "create",
        "odd",
        "--target",
        target,
        "--create-bucket",
        "--block-size",
        "4M",
        check=False,
    )
    assert changed.returncode == 2 and "use 8M blocks" in changed.stderr
    assert len(cli.json("snapshot", "ls", "odd")) == len(snapshots)  # none taken for it
    cli.run("backup", "restore", url, "copy", "--replicas", "1", "--quiet")
    assert cli.json("volume", "info", "copy")["size"] == 100 * MIB
    assert cli.checksum("copy") == expected


def test_a_replica_rebuilt_in_place_is_read_in_full_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A rebuild keeps layers by name but may rewrite them: the next backup from that replica
    cannot trust the chain and reads everything (sending nothing new), then is incremental
    again."""
    target = "s3://cli-rebuilt/p"
    device = _filled(cli, tmp_path, "rb", 16, seed=11, replicas=2)
    out = cli.run("backup", "create", "rb", "--target", target, "--create-bucket").stdout
    assert "read 32 of 32 blocks" in out
    r1 = next(r for r in cli.info("rb")["replicas"] if r["id"] == "r1")
    os.kill(r1["pid"], signal.SIGKILL)
    wait_for(lambda: cli.info("rb")["state"] == "degraded", 60, "r1 to be marked failed")
    cli.run("volume", "detach", "rb")
    cli.run("volume", "attach", "rb", "--device", str(device))  # r1 is rebuilt in place
    wait_for(lambda: cli.info("rb")["state"] == "healthy", 120, "r1 rebuilt")
    out = cli.run("backup", "create", "rb", "--target", target, "--create-bucket").stdout
    assert "read 32 of 32 blocks, uploaded 0" in out
    out = cli.run("backup", "create", "rb", "--target", target, "--create-bucket").stdout
    assert "read 0 of 32 blocks" in out


def test_a_restore_killed_half_way(cli: Cli, tmp_path: Path, s3_endpoint: str) -> None:
    """SIGKILL of the restore: its engine goes with it, and the half-written volume says so,
    cannot be attached or backed up as if it were whole, and goes away with rm."""
    target = "s3://cli-killed-restore/p"
    _filled(cli, tmp_path, "src", 32, seed=8, replicas=1)
    url = cli.backup("src", target)
    restore_killed_half_way(cli, s3_endpoint, url, "half")
    info = cli.info("half")
    assert info["restoring"]["interrupted"] and info["restoring"]["backup"] == url
    for args in (
        ("backup", "create", "half", "--target", target, "--create-bucket"),
        ("snapshot", "create", "half"),
    ):
        refused = cli.run(*args, check=False)
        assert refused.returncode == 1 and "unfinished restore" in refused.stderr
    refused = cli.run("volume", "attach", "half", "--device", str(tmp_path / "h"), check=False)
    assert refused.returncode == 1 and "unfinished restore" in refused.stderr
    cli.run("volume", "rm", "half")
    assert "half" not in volumes.list_names(cli.root)


def test_a_backup_whose_store_goes_away_fails_within_its_retry_timeout(
    cli: Cli, s3_endpoint: str
) -> None:
    """The S3 endpoint goes away (every connection reset, new ones refused) while a full
    backup uploads: the backup fails about --retry-timeout later (every upload queued
    meanwhile retried the whole timeout in turn: several times that), in one line saying that
    the backup failed and what it left, its marker included."""
    cli.run("volume", "create", "big", "--size", "128M", "--replicas", "1")
    vol = volumes.load(cli.root, "big")
    rng = random.Random(5)
    with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as chunks:
        for offset in range(0, 128 * MIB, MIB):
            chunks.write(offset, rng.randbytes(MIB))
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 4000  # (bytes/s of answers: quick to its first upload, not done at once)
    target = "s3://gone-away/p"
    store = BackupStore(Bucket(Target.parse(target)))
    args = ("backup", "create", "big", "--target", target, "--create-bucket", "--quiet")
    backup = Cli(cli.root, {"AWS_ENDPOINT_URL": proxy.endpoint}).start(
        *args, "--retry-timeout", "2"
    )

    def uploaded() -> int:
        try:
            return store.block_count()
        except StoreRefused:  # (no bucket yet)
            return 0

    try:
        wait_for(lambda: uploaded() or backup.poll() is not None, 120, "the first upload")
        proxy.rate = 500  # (the uploads now take seconds, not a moment)
        wait_for(lambda: uploaded() >= 3 or backup.poll() is not None, 120, "uploads")
        assert backup.poll() is None, "the backup ended before its store went away"
        proxy.cut()
        gone = time.monotonic()
        _, err = backup.communicate(timeout=120)
        took = time.monotonic() - gone
    finally:
        if backup.poll() is None:
            backup.kill()
        proxy.close()
    assert backup.returncode == 1 and err.count("\n") == 1, err
    assert took < 2 + 5, (took, err)
    assert err.startswith(f"lhfs: error: backup of big failed: {proxy.endpoint} did not answer")
    assert "p/volumes/big/" in err and ".running could not be removed" in err, err
    assert "snapshot" not in err, err  # (the snapshot taken for it was removed)
    listed = store.list("big")
    assert [b["state"] for b in listed] == ["interrupted"]  # (its marker; its process ended)


def test_a_backup_held_back_by_a_collection_says_so_at_once(cli: Cli, s3_endpoint: str) -> None:
    """The marker of a collection whose process was killed holds backups back until it is
    stale (ten minutes): a backup says at once on stderr what it waits for (the marker, who
    ran the collection and since when, when it counts as dead), and goes on once it is gone."""
    target = "s3://cli-held/p"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    cli.backup("v", target)
    store = BackupStore(Bucket(Target.parse(target)))
    marker = store._collection_marker()
    marker._write()  # (what a collection killed at once leaves: never refreshed, never removed)
    backup = cli.start("backup", "create", "v", "--target", target, "--quiet")
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(backup.stderr), daemon=True)
    reader.start()
    try:
        line = wait_for(
            lambda: next((x for x in said if "waiting for a collection" in x), None),
            30,
            "the backup to say it waits",
        )
        assert backup.poll() is None, said
        assert line.startswith("lhfs: waiting for a collection of unreferenced blocks to finish")
        assert f"s3://cli-held/{marker.key} (pid {os.getpid()} on {socket.gethostname()}" in line
        assert ", last refreshed " in line and "it counts as dead at " in line, line
        store.bucket.delete(marker.key)
        assert backup.wait(60) == 0, said
    finally:
        if backup.poll() is None:
            backup.kill()
    reader.join(10)
    assert backup.stdout is not None and backup.stdout.read().startswith(target + "?volume=v&")


def test_a_collection_killed_on_this_host_holds_no_backup_back(cli: Cli, s3_endpoint: str) -> None:
    """The marker of a collection killed on this host since its boot (its host name and boot
    id, its pid gone) counts as dead at once: a backup goes on without a wait (it waited ten
    minutes). One of another host, or of another PID namespace of this one (where its pid
    names another process), still holds backups back until it is stale."""
    target = "s3://cli-dead-here/p"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    cli.backup("v", target)
    gone = subprocess.Popen(["true"])
    gone.wait()
    store = BackupStore(Bucket(Target.parse(target)))
    here = Marker(store.bucket, store.target.key("locks", "collect-here"), about={"pid": gone.pid})
    here._write()  # (what a collection killed at once leaves: never refreshed, never removed)
    done = cli.run("backup", "create", "v", "--target", target, "--quiet")
    assert "waiting" not in done.stderr and done.stdout.startswith(target), done
    for about in ({"host": "elsewhere"}, {"pidns": "pid:[1]"}):  # (another host, a container)
        elsewhere = Marker(
            store.bucket,
            store.target.key("locks", "collect-elsewhere"),
            about={"pid": gone.pid, **about},
        )
        elsewhere._write()
        backup = cli.start("backup", "create", "v", "--target", target, "--quiet")
        assert backup.stderr is not None
        line = backup.stderr.readline()
        assert "waiting for a collection" in line and f"(pid {gone.pid} on " in line, (about, line)
        store.bucket.delete(elsewhere.key)
        assert backup.wait(60) == 0, backup.communicate()


HIDDEN = """
import sys
from backupstore.store import died_here, writer
print(*(died_here({**writer(), "pid": int(pid)}) for pid in sys.argv[1:]))
"""


@pytest.mark.skipif(
    tuple(map(int, os.uname().release.split(".")[:2])) < (5, 8),
    reason="a /proc of its own with hidepid needs Linux 5.8 (before, every /proc shares one's)",
)
def test_a_marker_of_a_live_process_that_proc_hides_is_not_dead() -> None:
    """Under ``hidepid`` (a /proc that shows a user only their own processes) a live process
    of another user has no entry in /proc: its marker counted as dead at once, and a
    collection swept a running backup's. A signal says it lives (EPERM); the marker of a
    process that is gone is dead at once all the same. Asked by a user that /proc hides
    this one from, in a mount namespace of its own (the host's /proc is left as it is)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    hide = "mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid=65534 "
    hide += '--regid=65534 --clear-groups "$@"'
    ask = [sys.executable, "-c", HIDDEN, str(os.getpid()), str(gone.pid)]
    asked = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh", *ask],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert asked.stdout == "False True\n", asked


def test_a_system_backup_part_and_an_image_backup_say_they_wait_for_a_collection(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A collection's marker holds back a system backup's part and a backing image's backup:
    each says so on stderr at once (the part named), with the marker's key from the listing
    escaped (whoever can write the bucket names it: no control character reaches the
    terminal), and goes on once it is gone."""
    target = "s3://cli-held-parts/p"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(6).randbytes(MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet")
    bucket = Bucket(Target.parse(target))
    key = "p/locks/collect-\x1b[2J\x07"
    bucket.put(key, b"{}")  # (a stray marker: fresh, so it holds backups back)
    runs = {
        "volume v: waiting": cli.start("system", "backup", "--target", target, "--quiet"),
        "waiting": cli.start("backing-image", "backup", "base", "--target", target, "--quiet"),
    }
    said: dict[str, list[str]] = {what: [] for what in runs}
    readers = [
        threading.Thread(target=lambda w=what, r=run: said[w].extend(r.stderr), daemon=True)
        for what, run in runs.items()
    ]
    for reader in readers:
        reader.start()
    try:
        for what, run in runs.items():
            line = wait_for(
                lambda w=what: next((x for x in said[w] if "for a collection" in x), None),
                30,
                f"{what} for a collection",
            )
            assert run.poll() is None, said
            assert line.startswith(f"lhfs: {what} for a collection of unreferenced blocks"), line
            escaped = "s3://cli-held-parts/p/locks/collect-\\x1b[2J\\x07, last refreshed "
            assert escaped in line, line
            assert not any(c < " " or c == "\x7f" for c in line.rstrip("\n")), repr(line)
        bucket.delete(key)
        for run in runs.values():
            assert run.wait(60) == 0, said
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
    for reader in readers:
        reader.join(10)
    assert len(cli.json("system", "ls", "--target", target)) == 1


def test_a_marker_that_cannot_be_removed_after_its_work_succeeded_is_told_not_raised(
    s3_endpoint: str,
) -> None:
    """The store goes away once a backup's work is done (its manifest written), before its
    marker is removed: that is told (a backup's marker is told through the command's notice:
    the backup is complete, and reported so), not raised; a marker with nobody to tell raises,
    and a failed block keeps its own error, saying what it left."""
    from backupstore.s3 import Endpoint
    from backupstore.store import Marker
    from lhfs.core.errors import LhfsError

    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    endpoint = Endpoint.from_env({**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint})
    bucket = Bucket(Target.parse("s3://cli-marker/p"), deadline=1, endpoint=endpoint)
    bucket.ensure(create=True)
    told: list[str] = []
    try:
        for key, to in (("p/told", told.append), ("p/raised", None), ("p/failed", told.append)):
            proxy.resume()
            marker = Marker(bucket, key, told=to)
            marker.__enter__()
            proxy.cut()
            if key == "p/told":
                marker.__exit__(None, None, None)
                (line,) = told
                assert line.startswith("its marker p/told could not be removed ("), line
                until = "it counts as running until this process ends (on other hosts, for 10 "
                assert until + "minutes)" in line, line
            elif key == "p/raised":
                with pytest.raises(LhfsError, match="its marker p/raised could not be removed"):
                    marker.__exit__(None, None, None)
            else:
                failure = LhfsError("the upload failed")
                marker.__exit__(LhfsError, failure, None)
                assert str(failure).startswith("the upload failed; its marker p/failed could")
                assert len(told) == 1  # (the failure says it)
    finally:
        proxy.close()
    left = {obj.object_name for obj in Bucket(Target.parse("s3://cli-marker/p")).list("p/")}
    assert left == {"p/told", "p/raised", "p/failed"}  # (as each said: left behind)
