"""DR standbys stay safe to use whatever cuts them short: an increment stopped or killed
half-way leaves (or gives back, at the next start or activation) one whole backup; commands
that race, damaged records and failed creations say one line and leave nothing half-made."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse

from backupstore.s3 import Bucket, StoreUnavailable, Target
from lhfs.backups import dr
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, write_at
from tools.faultproxy import FaultProxy

MIB = 1 << 20


def _name(url: str) -> str:
    return url.split("backup=")[1]


def _backup(cli: Cli, volume: str, target: str) -> str:
    args = ("backup", "create", volume, "--target", target, "--create-bucket", "--quiet")
    return cli.run(*args, "--block-size", "64K").stdout.split()[-1]


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    upstream = urlparse(s3_endpoint)
    relay = FaultProxy((upstream.hostname, upstream.port))
    try:
        yield relay
    finally:
        relay.close()


def _half_applied(
    cli: Cli, tmp_path: Path, proxy: FaultProxy, target: str, name: str
) -> tuple[Cli, str, str, dict]:
    """A standby of a 4M volume that holds its first backup and is part-way through applying
    a second one that changed every block (slowed by the proxy); the standby's command line,
    the first backup's name and checksum, and the standby's status then."""
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "src", "--device", str(device))
    rng = random.Random(1)
    write_at(device, 0, rng.randbytes(4 * MIB))
    first_sum = cli.checksum("src")
    first = _backup(cli, "src", target)
    standby = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    standby.run(
        "dr", "create", name, "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    assert standby.checksum(name) == first_sum
    write_at(device, 0, rng.randbytes(4 * MIB))
    proxy.rate = 256 << 10  # (4 MiB: about 16 s, cut short after the first blocks)
    second = _backup(cli, "src", target)
    status = wait_for(
        lambda: (
            (s := standby.json("dr", "status", name))["applying"] == _name(second)
            and 0 < (s["progress"] or 0) < 60
            and s
        ),
        60,
        "the standby to be part-way through the second backup",
    )
    return standby, _name(first), first_sum, status


@needs_fuse
def test_a_stopped_increment_is_undone_and_the_standby_activates_offline(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    standby, first, first_sum, _ = _half_applied(cli, tmp_path, proxy, "s3://drs-stop/p", "dsb")
    standby.run("dr", "stop", "dsb")
    state = json.loads((cli.root / "volumes" / "dsb" / "dr-state.json").read_text())
    assert state["applying"] is None and "?" not in state["blocks"] and state["backup"] == first
    log = (cli.root / "volumes" / "dsb" / "dr.log").read_text()
    assert "undid the unfinished increment" in log
    proxy.rate = None
    done = standby.json("dr", "activate", "dsb", "--offline", "--quiet")
    assert done["backup"] == first
    assert cli.checksum("dsb") == first_sum


@needs_fuse
def test_a_killed_increment_is_said_and_undone_at_offline_activation(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    standby, first, first_sum, status = _half_applied(
        cli, tmp_path, proxy, "s3://drs-kill/p", "dsk"
    )
    os.kill(status["follower_pid"], signal.SIGKILL)
    after = wait_for(
        lambda: (s := standby.json("dr", "status", "dsk"))["state"] == "stopped" and s,
        30,
        "the follower's death",
    )
    assert after["interrupted_increment"] == status["applying"]
    text = standby.run("dr", "status", "dsk").stdout
    assert f"the increment to {status['applying']} was cut short" in text
    (check,) = [c for c in cli.json("doctor", "dsk") if c["check"] == "dr standby"]
    assert check["status"] == "warn" and "was cut short" in check["detail"], check
    proxy.rate = None
    done = standby.json("dr", "activate", "dsk", "--offline", "--quiet")
    assert done["backup"] == first
    assert cli.checksum("dsk") == first_sum
    assert not (cli.root / "volumes" / "dsk" / "dr-undo").exists()


@needs_fuse
def test_a_killed_increment_whose_undo_record_is_cut_is_never_taken_for_whole(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    """Killed mid-increment, its ``dr-undo`` then cut short: nothing claims a whole backup
    (an offline activation refuses), and the next start rewrites every block."""
    standby, _, _, status = _half_applied(cli, tmp_path, proxy, "s3://drs-undo/p", "dsu")
    os.kill(status["follower_pid"], signal.SIGKILL)
    wait_for(lambda: standby.json("dr", "status", "dsu")["state"] == "stopped", 30, "the kill")
    undo = cli.root / "volumes" / "dsu" / "dr-undo"
    undo.write_bytes(undo.read_bytes()[:-100])
    proxy.rate = None
    refused = standby.run("dr", "activate", "dsu", "--offline", "--quiet", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "blocks of an increment cut short are unknown" in refused.stderr, refused.stderr
    standby.run("dr", "start", "dsu")
    done = standby.dr_restored("dsu", f"x?backup={status['applying']}")
    assert done["last_increment"]["fetched"] == 64  # (every block: none was known)
    assert cli.checksum("dsu") == cli.checksum("src")
    standby.run("dr", "stop", "dsu")


@needs_fuse
def test_an_increment_the_store_stalled_is_undone_by_an_offline_activation(
    cli: Cli, tmp_path: Path, s3_endpoint: str, proxy: FaultProxy
) -> None:
    """The store goes away mid-increment (the follower says it retries); the offline
    activation stops the follower, whose increment is undone: the first backup, whole."""
    standby, first, first_sum, _ = _half_applied(cli, tmp_path, proxy, "s3://drs-cut/p", "dsr")
    proxy.cut()
    wait_for(
        lambda: standby.json("dr", "status", "dsr")["state"] == "retrying",
        30,
        "the follower to retry the store",
    )
    proxy.resume()  # (still slow: the increment cannot finish before the activation)
    done = standby.json("dr", "activate", "dsr", "--offline", "--quiet")
    assert done["backup"] == first and done["marker_kept"] is None
    assert cli.checksum("dsr") == first_sum


def _standby(cli: Cli, target: str, name: str) -> Path:
    """A stopped standby of an empty 4M volume; its directory."""
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    _backup(cli, "src", target)
    cli.run(
        "dr", "create", name, "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    cli.run("dr", "stop", name)
    return cli.root / "volumes" / name


def _waits_for(pid: int, lock: Path) -> bool:
    """Whether process ``pid`` has ``lock`` open (it read the configuration and waits). Its
    descriptors come and go while it starts: one closed between the listing and the look is
    not the lock."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # (it ended: it waits for nothing)
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(lock):
                return True
        except FileNotFoundError:
            continue
    return False


def test_two_activations_at_once_one_wins_the_other_says_so(cli: Cli, s3_endpoint: str) -> None:
    directory = _standby(cli, "s3://drs-twice/p", "sb2")
    lock = directory / "dr.lock"
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # (both activations read the standby, then wait)
    try:
        both = [cli.start("dr", "activate", "sb2", "--offline", "--quiet") for _ in range(2)]
        wait_for(lambda: all(_waits_for(p.pid, lock) for p in both), 30, "both to wait")
    finally:
        os.close(held)
    results = sorted((p.wait(60), p.communicate()[1]) for p in both)
    assert [code for code, _ in results] == [0, 1], results
    assert results[1][1] == "lhfs: error: volume sb2 is not a DR standby volume\n"
    assert cli.info("sb2")["state"] == "detached"


def test_a_removal_that_waited_for_an_activation_keeps_the_volume(
    cli: Cli, s3_endpoint: str
) -> None:
    """``volume rm`` of a standby waits for the follower's lock; an activation that took it
    first makes a normal volume, which that removal must not delete."""
    directory = _standby(cli, "s3://drs-rm/p", "sb3")
    lock = directory / "dr.lock"
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        removal = cli.start("volume", "rm", "sb3")
        wait_for(lambda: _waits_for(removal.pid, lock), 30, "the removal to wait")
        config = json.loads((directory / "config.json").read_text())
        config["activated_from"] = config.pop("dr")  # (what an activation leaves)
        (directory / "config.json").write_text(json.dumps(config))
    finally:
        os.close(held)
    _, errors = removal.communicate(timeout=60)
    assert removal.returncode == 1
    assert errors == "lhfs: error: volume sb3 is not a DR standby volume\n"
    assert cli.info("sb3")["state"] == "detached"


def test_a_damaged_target_in_the_standby_record_is_said_naming_the_field(
    cli: Cli, s3_endpoint: str
) -> None:
    target = "s3://drs-damaged/p"
    directory = _standby(cli, target, "sbq")
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for damaged in (123, "not a url"):
        config["dr"]["target"] = damaged
        path.write_text(json.dumps(config))
        for args in (
            ("dr", "forget", "sbq", "--target", target, "--volume", "src"),
            ("dr", "status", "sbq"),
            ("dr", "activate", "sbq", "--offline"),
        ):
            result = cli.run(*args, check=False)
            assert result.returncode == 1, (args, result.stderr)
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and f"{path}: dr.target must be " in lines[0], args
    assert cli.info("sbq")["state"] == "standby"


def test_a_standby_whose_follower_cannot_start_is_not_created(cli: Cli, s3_endpoint: str) -> None:
    target = "s3://drs-create/p"
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    _backup(cli, "src", target)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = cli.run(
            "dr", "create", "sbp", "--target", target, "--volume", "src", "--replicas", "1",
            "--metrics", address, "--quiet", check=False,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "standby sbp was not created" in lines[0], lines
    assert [v["name"] for v in cli.volumes()] == ["src"]
    assert not (cli.root / "volumes" / "sbp").exists()


def test_activating_when_the_newest_backup_is_smaller_points_to_offline(
    cli: Cli, s3_endpoint: str
) -> None:
    target = "s3://drs-smaller/p"
    cli.run("volume", "create", "src", "--size", "4M", "--replicas", "1")
    _backup(cli, "src", target)
    cli.run(
        "dr", "create", "sbs", "--target", target, "--volume", "src", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    cli.run("volume", "expand", "src", "--size", "8M")
    grown = _backup(cli, "src", target)
    cli.dr_restored("sbs", grown)
    cli.run("backup", "rm", grown)
    result = cli.run("dr", "activate", "sbs", "--quiet", check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "is smaller than the standby" in lines[0], lines
    assert (
        f"'lhfs dr activate sbs --offline' activates the last one it restored ({_name(grown)})"
        in lines[0]
    )
    assert cli.info("sbs")["state"] == "standby"
    cli.run("dr", "stop", "sbs")


def test_dr_status_says_a_damaged_newest_manifest_was_passed_over(
    cli: Cli, s3_endpoint: str
) -> None:
    target = "s3://drs-manifest/p"
    _standby(cli, target, "sbm")
    newer = _name(_backup(cli, "src", target))
    bucket = Bucket(Target.parse(target))
    bucket.put(f"p/volumes/src/{newer}.json", b"damaged", {"lhfs-compression": "none"})
    cli.run("dr", "start", "sbm")
    status = _status_when(
        cli, "sbm", "passed_over", "the follower to pass over the damaged manifest"
    )
    assert list(status["passed_over"]) == [newer]
    assert status["last_restored_backup"] != newer
    text = cli.run("dr", "status", "sbm").stdout
    assert f"passed over backup {newer} as damaged: " in text
    cli.run("dr", "stop", "sbm")


def test_a_store_error_the_follower_got_past_is_shown_as_past(
    cli: Cli, s3_endpoint: str, proxy: FaultProxy
) -> None:
    target = "s3://drs-recovered/p"
    _standby(cli, target, "sbr")
    config_path = cli.root / "volumes" / "sbr" / "config.json"
    config = json.loads(config_path.read_text())
    config["dr"]["endpoint"] = proxy.endpoint  # (the follower goes through the proxy)
    config_path.write_text(json.dumps(config))
    proxy.stop()
    cli.run("dr", "start", "sbr")
    failing = _status_when(cli, "sbr", "last_error", "the follower to meet the refused store")
    assert failing["last_error_recovered_at"] is None
    proxy.resume()
    past = _status_when(cli, "sbr", "last_error_recovered_at", "the follower to get past the error")
    assert past["state"] == "standby" and past["last_error"] == failing["last_error"]
    text = cli.run("dr", "status", "sbr").stdout
    assert f"since recovered at {past['last_error_recovered_at']}" in text
    cli.run("dr", "stop", "sbr")


def test_hints_name_only_what_the_command_or_the_follower_can_do(
    cli: Cli, s3_endpoint: str, proxy: FaultProxy
) -> None:
    """A missing bucket names commands that make it (``dr create`` and ``backup ls`` take
    no --create-bucket); a follower's store error does not say --retry-timeout, which the
    follower does not take."""
    for args in (
        ("dr", "create", "sbh", "--target", "s3://drs-missing/p", "--volume", "src"),
        ("backup", "ls", "--target", "s3://drs-missing/p"),
    ):
        result = cli.run(*args, check=False)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "does not exist" in lines[0], (args, lines)
        assert "'lhfs backup create' or 'lhfs backup init' with --create-bucket" in lines[0]

    proxy.stop()
    config = {"target": "s3://drs-hint/p", "endpoint": proxy.endpoint, "region": None}
    store = dr.follower_store(config, lambda said: None, deadline=0.5)
    with pytest.raises(StoreUnavailable) as gone:
        store.bucket.ensure()
    assert str(gone.value).endswith("; the follower tries again later"), gone.value
    assert "--retry-timeout" not in str(gone.value)


def test_missing_or_refused_credentials_exit_1_whichever_command_meets_them(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://drs-creds/p"
    _standby(cli, target, "sbc")
    bare = Cli(cli.root, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    for args in (("dr", "start", "sbc"), ("dr", "activate", "sbc", "--quiet")):
        result = bare.run(*args, check=False)
        assert result.returncode == 1, (args, result.stderr)
        assert "no S3 credentials" in result.stderr and result.stderr.count("\n") == 1, args
    open_file = tmp_path / "creds"
    open_file.write_text(
        f"AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}\n"
        f"AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}\n"
    )
    open_file.chmod(0o644)
    for path, said in ((tmp_path / "nowhere", "does not exist"), (open_file, "mode")):
        result = cli.run(
            "dr", "create", "sbd", "--target", target, "--volume", "src", "--quiet",
            "--credentials-file", str(path), check=False,
        )  # fmt: skip
        assert result.returncode == 1, (path, result.stderr)
        assert said in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert cli.info("sbc")["state"] == "standby"


def test_an_activated_standby_keeps_its_log_and_drops_its_locks(cli: Cli, s3_endpoint: str) -> None:
    directory = _standby(cli, "s3://drs-logs/p", "sbl")
    cli.run("dr", "start", "sbl")  # (dr-start.lock made)
    cli.run("dr", "activate", "sbl", "--quiet")
    assert not (directory / "dr.lock").exists() and not (directory / "dr-start.lock").exists()
    shown = cli.run("logs", "sbl", "--component", "dr")
    assert "[dr]" in shown.stdout and "following src" in shown.stdout, shown.stdout
    result = cli.run("logs", "src", "--component", "dr")
    assert result.stdout == "" and "has no DR follower log: not a standby" in result.stderr


def _status_when(cli: Cli, name: str, field: str, what: str) -> dict:
    """``dr status`` of ``name`` once its ``field`` is set (waited for: ``what``)."""
    return wait_for(lambda: (s := cli.json("dr", "status", name))[field] and s, 30, what)
