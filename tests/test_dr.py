"""DR volumes: a standby follows a source's backups through a real S3 server behind the fault
proxy, through outages, a host name that stops resolving and a SIGKILL, then is activated."""

from __future__ import annotations

import calendar
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.config.volume import alive
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, HostName, teardown, write_at
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


@pytest.fixture
def host_name() -> Iterator[HostName]:
    name = HostName()
    name.resolve()
    try:
        yield name
    finally:
        name.drop()


def _backup(cli: Cli, target: str, volume: str) -> tuple[str, str]:
    """Back ``volume`` up; its URL and the checksum of what it holds (detached: no writes)."""
    return cli.backup(volume, target), cli.checksum(volume)


def _name(url: str) -> str:
    return url.split("backup=")[1]


def test_standby_follows_through_outages_and_a_kill_then_activates(
    cli: Cli, tmp_path: Path, s3_endpoint: str, host_name: HostName
) -> None:
    """SCENARIOS.md story 5. The source backs up straight to the store; the standby reaches it
    through the fault proxy, by a host name that can stop resolving."""
    target = "s3://dr-story/site"
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port), reset_after=4096)
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": f"http://{host_name.name}:{proxy.port}"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = random.Random(5)
    files: dict[str, bytes] = {}
    cli.run("volume", "create", "src", "--size", "160M", "--replicas", "1")

    def generation(n: int, mib: int) -> tuple[str, str]:
        cli.run("mount", "src", str(mnt))
        for i in range(mib):
            files[f"g{n}-{i}.bin"] = rng.randbytes(MIB)
            (mnt / f"g{n}-{i}.bin").write_bytes(files[f"g{n}-{i}.bin"])
        cli.run("umount", str(mnt))
        return _backup(cli, target, "src")

    try:
        first, first_sum = generation(1, 8)
        standby.run(
            "dr", "create", "dr1", "--target", target, "--volume", "src", "--replicas", "2",
            "--interval", "1", "--retry-max", "1.5", "--quiet",
        )  # fmt: skip
        status = standby.json("dr", "status", "dr1")
        assert status["last_restored_backup"] == _name(first)
        assert standby.checksum("dr1") == first_sum
        assert cli.info("dr1")["state"] == "standby"

        second, second_sum = generation(2, 4)
        standby.dr_restored("dr1", second)
        assert standby.checksum("dr1") == second_sum

        # The endpoint refuses everything, then resets and answers 503 half the time.
        proxy.stop()
        third, third_sum = generation(3, 4)
        status = wait_for(
            lambda: (s := standby.json("dr", "status", "dr1"))["state"] == "retrying" and s,
            60,
            "the standby to report the outage",
        )
        assert status["last_restored_backup"] == _name(second) and status["last_error"]
        wait_for(lambda: standby.json("dr", "status", "dr1")["lag_seconds"] > 2, 30, "lag")
        proxy.fail_every(2, ["reset", "503"])
        proxy.resume()
        standby.dr_restored("dr1", third, timeout=120)
        assert standby.checksum("dr1") == third_sum
        proxy.clear()

        # The endpoint's host name stops resolving.
        host_name.drop()
        fourth, fourth_sum = generation(4, 4)
        status = wait_for(
            lambda: (
                (s := standby.json("dr", "status", "dr1"))["state"] == "retrying"
                and host_name.name in (s["last_error"] or "")
                and s
            ),
            60,
            "the standby to report the name resolution failure",
        )
        assert status["last_restored_backup"] == _name(third)
        host_name.resolve()
        standby.dr_restored("dr1", fourth, timeout=120)
        assert standby.checksum("dr1") == fourth_sum

        # SIGKILL in the middle of an increment, then a restart.
        proxy.rate = 512 << 10  # stretches the increment (20 blocks) over seconds
        fifth, fifth_sum = generation(5, 20)
        status = wait_for(
            lambda: (
                (s := standby.json("dr", "status", "dr1"))["applying"] == _name(fifth)
                and 10 <= (s["progress"] or 0) <= 80
                and s
            ),
            120,
            "the standby to be half-way through an increment",
        )
        os.kill(status["follower_pid"], signal.SIGKILL)
        wait_for(lambda: standby.json("dr", "status", "dr1")["state"] == "stopped", 30, "the kill")
        state = json.loads((cli.root / "volumes" / "dr1" / "dr-state.json").read_text())
        assert state["applying"] == _name(fifth) and "?" not in state["blocks"]
        assert standby.json("dr", "status", "dr1")["interrupted_increment"] == _name(fifth)
        assert standby.json("dr", "status", "dr1")["last_restored_backup"] == _name(fourth)
        proxy.rate = None
        standby.run("dr", "start", "dr1")
        standby.dr_restored("dr1", fifth)
        assert standby.checksum("dr1") == fifth_sum
        refused = standby.run(
            "volume", "attach", "dr1", "--device", str(tmp_path / "d"), check=False
        )
        assert refused.returncode == 1 and "DR standby" in refused.stderr

        # Activation while the follower is half-way through the next increment: the newest
        # backup, whole, in a normal volume that mounts with the source's files. Once it is
        # under way the store slows to a crawl, so that the follower cannot finish before the
        # activation stops it (blocks it has not begun take a minute each); the store speeds
        # up again when the follower is gone.
        proxy.rate = 512 << 10
        sixth, sixth_sum = generation(6, 20)
        follower = wait_for(
            lambda: (
                (s := standby.json("dr", "status", "dr1"))["applying"] == _name(sixth)
                and 10 <= (s["progress"] or 0) <= 40
                and s["follower_pid"]
            ),
            120,
            "the standby to be applying the sixth backup",
        )
        proxy.rate = 32 * 1024
        activation = standby.start("dr", "activate", "dr1", "--quiet")
        wait_for(lambda: not alive(follower), 60, "the activation to stop the follower")
        proxy.rate = None
        activated, errors = activation.communicate(timeout=300)
        assert activation.returncode == 0, errors
        assert _name(sixth) in activated
        log = (cli.root / "volumes" / "dr1" / "dr.log").read_text()
        assert f"applied {_name(sixth)}" not in log  # the activation finished it, not the follower
        assert standby.checksum("dr1") == sixth_sum
        assert cli.info("dr1")["state"] == "detached"
        mounted = cli.run("mount", "dr1", str(mnt)).stdout
        assert "formatted" not in mounted
        assert {p.name for p in mnt.iterdir() if p.suffix == ".bin"} == set(files)
        assert all((mnt / name).read_bytes() == data for name, data in files.items())
        cli.run("umount", str(mnt))
    finally:
        proxy.close()


def test_increments_fetch_only_changes_and_follow_a_deleted_backup(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://dr-incr/site"
    cli.run("volume", "create", "src", "--size", "64M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    rng = random.Random(9)

    write_at(device, 0, rng.randbytes(20 * MIB))  # blocks 0-9
    first, first_sum = _backup_attached(cli, target)
    cli.run(
        "dr", "create", "dr2", "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--retry-max", "1", "--quiet",
    )  # fmt: skip
    increment = cli.json("dr", "status", "dr2")["last_increment"]
    assert (increment["fetched"], increment["trimmed"]) == (10, 0)

    write_at(device, 4 * MIB, bytes(2 * MIB))  # block 2 becomes empty
    write_at(device, 8 * MIB + 4096, rng.randbytes(4096))  # block 4 changes
    write_at(device, 30 * MIB, rng.randbytes(4096))  # block 15 gets data
    second, second_sum = _backup_attached(cli, target)
    increment = cli.dr_restored("dr2", second)["last_increment"]
    assert (increment["fetched"], increment["trimmed"]) == (2, 1)
    assert cli.checksum("dr2") == second_sum

    # The restored backup is deleted: the standby moves to the newest remaining one, still
    # moving only the blocks that differ (2 and 4 come back, 15 is emptied).
    cli.run("backup", "rm", second)
    increment = cli.dr_restored("dr2", first)["last_increment"]
    assert (increment["fetched"], increment["trimmed"]) == (2, 1)
    assert cli.checksum("dr2") == first_sum

    before = cli.volumes()
    for args, status, message in (
        (("snapshot", "create", "dr2"), 1, "DR standby"),
        (("dr", "run", "dr2"), 1, "a follower of dr2 runs already (pid"),
        (("backup", "create", "dr2", "--target", target), 1, "DR standby"),
        (("volume", "expand", "dr2", "--size", "128M"), 1, "DR standby"),
        (("dr", "status", "src"), 1, "not a DR standby"),
        (("dr", "create", "dr2", "--target", target, "--volume", "src"), 1, "already exists"),
        (("dr", "create", "dr3", "--target", target, "--volume", "nope"), 1, "no complete backup"),
        (("dr", "create", "dr3", "--target", "s3://X/y", "--volume", "src"), 2, "bucket name"),
        (
            ("dr", "create", "dr3", "--target", target, "--volume", "src", "--interval", "0"),
            2,
            "1 <= --interval",
        ),
    ):
        result = cli.run(*args, check=False)
        assert result.returncode == status, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert cli.volumes() == before


def test_a_backup_of_an_older_snapshot_never_takes_a_standby_back(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Backups are ordered by when their snapshot was taken, not by when their upload began:
    a backup of an older snapshot, made last (as a system backup's part uploaded minutes after
    its snapshot is), is not the newest: a standby does not go back to it, ``backup ls`` lists
    it first and ``--keep-last 1`` keeps the other."""
    target = "s3://dr-order/site"
    cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    write_at(device, 0, os.urandom(MIB))
    cli.run("snapshot", "create", "src", "old")
    write_at(device, 0, os.urandom(MIB))
    new, new_sum = _backup_attached(cli, target)
    cli.run(
        "dr", "create", "dr4", "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    cli.dr_restored("dr4", new)
    args = ("backup", "create", "src", "--target", target, "--snapshot", "old", "--quiet")
    old = cli.run(*args).stdout.split()[-1]
    made = time.time()
    listed = cli.json("backup", "ls", "--target", target)
    assert [b["name"] for b in listed] == [_name(old), _name(new)], listed
    assert listed[0]["created"] >= listed[1]["created"], listed  # (uploaded last)
    # the snapshot times as the manifests keep them: the old one's layer time is to the
    # second (rounded down), the newer one's the instant before its snapshot was made: the
    # old one is strictly earlier, also when both were taken within one second
    stored = {b["name"]: b["taken"] for b in BackupStore(Bucket(Target.parse(target))).list()}
    assert stored[_name(old)] < stored[_name(new)], stored
    assert listed[0]["taken"] <= listed[1]["taken"], listed  # (RFC 3339: to the second)
    status = wait_for(  # a check that began after the old snapshot's backup was complete
        lambda: (
            (s := cli.json("dr", "status", "dr4"))["last_checked"]
            and calendar.timegm(time.strptime(s["last_checked"], "%Y-%m-%dT%H:%M:%SZ")) > made
            and s
        ),
        30,
        "the standby to look at the store again",
    )
    assert status["newest_backup"] == _name(new), status
    assert status["last_restored_backup"] == _name(new), status
    assert cli.checksum("dr4") == new_sum
    args = ("backup", "prune", "--target", target, "--volume", "src", "--keep-last", "1")
    dry = cli.json(*args, "--dry-run")
    assert [r["name"] for r in dry["removed"]] == [_name(old)], dry
    cli.run("dr", "stop", "dr4")
    cli.run("volume", "detach", "src")


def test_a_standby_waits_when_the_backups_it_grew_in_are_deleted(
    cli: Cli, s3_endpoint: str
) -> None:
    """The backup a standby grew to is deleted, and the newest left is smaller: a volume
    never shrinks, so the standby waits for a newer backup, saying why (as its last error),
    not that it is applying one."""
    target = "s3://dr-grown/site"
    cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
    _backup(cli, target, "src")
    cli.run(
        "dr", "create", "dr5", "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--retry-max", "1", "--quiet",
    )  # fmt: skip
    cli.run("volume", "expand", "src", "--size", "32M")
    grown, _ = _backup(cli, target, "src")
    cli.dr_restored("dr5", grown)
    cli.run("backup", "rm", grown)
    waiting = wait_for(
        lambda: (
            "never shrinks" in ((s := cli.json("dr", "status", "dr5"))["last_error"] or "") and s
        ),
        30,
        "the standby to say why it waits",
    )
    assert waiting["applying"] is None and waiting["last_restored_backup"] == _name(grown)
    assert "applying" not in cli.run("dr", "status", "dr5").stdout
    cli.run("dr", "stop", "dr5")


def _backup_attached(cli: Cli, target: str) -> tuple[str, str]:
    checksum = cli.checksum("src")  # nothing writes between this and the backup's snapshot
    return cli.backup("src", target), checksum


@pytest.mark.parametrize("damage", ["rotten", "missing"])
def test_a_corrupt_block_stops_the_standby_which_activates_offline(
    cli: Cli, tmp_path: Path, s3_endpoint: str, damage: str
) -> None:
    """A block whose bytes are wrong, or that is missing from a backup that still exists,
    stops the follower; the increment is rolled back, so the standby activates offline."""
    target = f"s3://dr-corrupt-{damage}/site"
    cli.run("volume", "create", "src", "--size", "64M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    with open(device, "r+b") as f:
        f.write(random.randbytes(6 * MIB))
        os.fsync(f.fileno())
    first, first_sum = _backup_attached(cli, target)
    cli.run(
        "dr", "create", "dr4", "--target", target, "--volume", "src", "--replicas", "2",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    cli.run("dr", "stop", "dr4")
    assert cli.json("dr", "status", "dr4")["state"] == "stopped"

    with open(device, "r+b") as f:
        f.seek(40 * MIB)
        f.write(random.randbytes(MIB))
        os.fsync(f.fileno())
    second, _ = _backup_attached(cli, target)
    store = BackupStore(Bucket(Target.parse(target)))
    new = set(store.manifest("src", _name(second))["blocks"]) - set(
        store.manifest("src", _name(first))["blocks"]
    )
    (digest,) = new
    if damage == "rotten":
        store.bucket.put(store._block_key(digest), b"rotten" * 1000, {"lhfs-compression": "none"})
    else:
        store.bucket.delete(store._block_key(digest))
    problem = "does not match its checksum" if damage == "rotten" else "is missing"

    cli.run("dr", "start", "dr4")
    status = wait_for(
        lambda: (s := cli.json("dr", "status", "dr4"))["state"] == "failed" and s,
        60,
        "the standby to stop on the corrupt block",
    )
    assert problem in status["last_error"]
    assert status["last_restored_backup"] == _name(first)
    result = cli.run("dr", "activate", "dr4", "--quiet", check=False)
    assert result.returncode == 1 and problem in result.stderr
    assert cli.info("dr4")["state"] == "standby"
    done = cli.json("dr", "activate", "dr4", "--offline", "--quiet")
    assert done["marker_removed_from"] == target and done["marker_kept"] is None  # (asked)
    assert cli.info("dr4")["state"] == "detached"
    assert cli.checksum("dr4") == first_sum


def test_a_removed_standby_takes_its_marker_with_it(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A standby's marker makes prune keep the backup it holds. ``volume rm`` of a standby
    removes the marker too; with the store out of reach it keeps the volume as it was (one
    line; following again if it did) unless --keep-marker, and ``dr forget`` removes a marker
    left behind, never one of a standby still following, asking which when standbys of that
    name on two hosts hold markers."""
    target = "s3://dr-forget/p"
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    elsewhere = Cli(tmp_path / "other-host")  # (another host's root: a standby named s1 too)
    store = BackupStore(Bucket(Target.parse(target)))

    def markers() -> list[tuple[str, str]]:
        return sorted((m["standby"], m["id"]) for m in store.standby_marks("v"))

    def prune(*extra: str) -> dict:
        args = ("--target", target, "--volume", "v", "--keep-last", "1", *extra)
        return cli.json("backup", "prune", *args)

    def create(where: Cli, name: str) -> None:
        where.run(
            "dr", "create", name, "--target", target, "--volume", "v", "--replicas", "1",
            "--interval", "1", "--quiet",
        )  # fmt: skip
        wait_for(lambda: name in [m[0] for m in markers()], 30, f"the marker of {name}")

    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    first = _name(cli.backup("v", target))
    try:
        create(standby, "s1")
        standby.run("dr", "stop", "s1")  # (it keeps holding the first backup)
        (s1,) = markers()
        create(standby, "s2")  # (it follows)
        cli.backup("v", target)
        held = {k["name"]: k["reasons"] for k in prune("--dry-run")["kept"]}
        assert f"DR standby s1 (marker {s1[1]})" in held[first], held

        proxy.stop()  # the store refuses connections
        for name, following in (("s1", ""), ("s2", ", following again")):
            kept = standby.run("volume", "rm", name, "--retry-timeout", "2", check=False)
            assert kept.returncode == 1, kept.stderr
            assert len(kept.stderr.strip().splitlines()) == 1, kept.stderr
            assert f"volume {name} was kept{following}: its marker" in kept.stderr, kept.stderr
            assert "--keep-marker" in kept.stderr
        assert cli.info("s1")["state"] == "standby" and len(markers()) == 2
        assert standby.json("dr", "status", "s2")["state"] not in ("stopped", "failed")
        gone = standby.json("volume", "rm", "s1", "--keep-marker", "--retry-timeout", "2")
        assert gone == {
            "name": "s1",
            "removed": True,
            "marker_removed_from": None,
            "left": [],
            "remote_replicas_left": [],
        }
        assert "s1" not in [v["name"] for v in cli.json("volume", "ls")]
        proxy.resume()

        refused = cli.run("dr", "forget", "s2", "--target", target, "--volume", "v", check=False)
        assert (
            refused.returncode == 1
            and "is this root's, and s2 still follows v here" in refused.stderr
        )
        assert standby.json("volume", "rm", "s2")["marker_removed_from"] == target
        assert markers() == [s1]

        create(elsewhere, "s1")  # a live standby of the same name on another host
        args = ("dr", "forget", "s1", "--target", target, "--volume", "v")
        ambiguous = cli.run(*args, check=False)
        assert ambiguous.returncode == 2 and "--id" in ambiguous.stderr, ambiguous.stderr
        assert len(markers()) == 2
        forgot = cli.json(*args, "--id", s1[1])
        assert forgot["released"] == [first] and s1 not in markers() and len(markers()) == 1
        assert first in [r["name"] for r in prune()["removed"]]
        again = cli.run(*args, "--id", s1[1], check=False)
        assert again.returncode == 1 and "holds no marker of a DR standby s1" in again.stderr
    finally:
        proxy.close()
        teardown(elsewhere.root)


def test_a_follower_reading_its_secrets_from_files_holds_none_in_its_environment(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A standby created with a credentials file (and a password file) runs its follower
    without the S3 secret or the password of the shell that created it: the follower reads
    them from the files (it inherited the shell's, where a dump of its environment held them)."""
    target = "s3://dr-secrets/p"
    password = tmp_path / "password"
    password.write_text("the store's password")
    password.chmod(0o600)
    cli.run("backup", "init", "--target", target, "--create-bucket", "--encrypt",
            "--password-file", str(password))  # fmt: skip
    cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
    cli.run("backup", "create", "src", "--target", target, "--password-file", str(password))
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}\n"
        f"AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}\n"
    )
    credentials.chmod(0o600)
    shell = Cli(cli.root, env={"LHFS_BACKUP_PASSWORD": "a-password-from-the-shell"})
    shell.run(
        "dr", "create", "sb", "--target", target, "--volume", "src", "--replicas", "1",
        "--credentials-file", str(credentials), "--password-file", str(password), "--quiet",
    )  # fmt: skip
    follower = cli.json("dr", "status", "sb")["follower_pid"]
    environ = Path(f"/proc/{follower}/environ").read_bytes()
    assert b"AWS_SECRET_ACCESS_KEY" not in environ and b"AWS_ACCESS_KEY_ID" not in environ
    assert b"LHFS_BACKUP_PASSWORD" not in environ
    assert b"AWS_ENDPOINT_URL" in environ  # (not a secret: where the store is)
    cli.run("volume", "rm", "sb")


def test_a_password_in_the_shell_is_not_given_to_the_follower_of_a_plain_store(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A plain store's standby started from a shell holding a password (for another store)
    follows without it; one whose configuration does not say whether its store is encrypted
    (made by an older lhfs) stops at the refusal, which no retry changes, saying so."""
    target = "s3://dr-plain-password/p"
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    url = cli.backup("src", target)
    cli.run("dr", "create", "sb", "--target", target, "--volume", "src", "--replicas", "1",
            "--interval", "1", "--retry-max", "2", "--quiet")  # fmt: skip
    cli.run("dr", "stop", "sb")
    shell = Cli(cli.root, env={"LHFS_BACKUP_PASSWORD": "for-another-store"})
    shell.run("dr", "start", "sb")
    follower = cli.json("dr", "status", "sb")["follower_pid"]
    assert b"LHFS_BACKUP_PASSWORD" not in Path(f"/proc/{follower}/environ").read_bytes()
    status = cli.dr_restored("sb", url)
    assert status["last_error"] is None, status
    cli.run("dr", "stop", "sb")
    path = cli.root / "volumes" / "sb" / "config.json"
    config = json.loads(path.read_text())
    del config["dr"]["encrypted"]
    path.write_text(json.dumps(config))
    shell.run("dr", "start", "sb")
    stopped = wait_for(
        lambda: (s := cli.json("dr", "status", "sb"))["state"] == "failed" and s, 30, "a stop"
    )
    assert "is not encrypted" in stopped["last_error"], stopped
    assert "'lhfs dr start sb' follows again" in stopped["last_error"], stopped
    assert stopped["follower_pid"] is None
    cli.run("dr", "start", "sb")  # (without the password: it follows again)
    assert cli.dr_restored("sb", url)["state"] == "standby"
    cli.run("volume", "rm", "sb")
