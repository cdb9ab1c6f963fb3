"""An operator's mistake never faults a volume, letting go always works, and every error is an
answer: one line, an exit status, nothing changed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_fuse

from backupstore.s3 import Bucket, Target
from lhfs.core.procs import LHFS, wait_for
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import Cli, kill_engine, one_line, web_server

pytestmark = needs_fuse
MIB = 1 << 20


def mounts_of(text: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if text in line]


def loops_of(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


@pytest.fixture
def mounted(cli: Cli, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cli.run("volume", "create", "m", "--size", "128M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "m", str(mnt))
    yield "m", mnt


def test_snapshot_typos_on_a_mounted_volume_fault_nothing(
    cli: Cli, tmp_path: Path, mounted: tuple[str, Path]
) -> None:
    name, mnt = mounted
    (mnt / "a").write_bytes(os.urandom(MIB))
    cli.run("snapshot", "create", name, "s1")
    (mnt / "b").write_bytes(os.urandom(MIB))  # unsynced writes, in the page cache
    for args, status, message in (
        (("snapshot", "rm", name, "nope"), 1, "no snapshot named 'nope'"),
        (("snapshot", "rm", name, "../x"), 2, "invalid snapshot name"),
        (("snapshot", "create", name, "s1"), 1, "already exists"),
        (("snapshot", "create", name, "../x"), 2, "invalid snapshot name"),
        (("volume", "expand", name, "--size", "64M"), 2, "cannot shrink"),
    ):
        line = one_line(cli.run(*args, check=False), status)
        assert message in line, line
    info = cli.info(name)
    assert info["state"] == "healthy" and {r["mode"] for r in info["replicas"]} == {"RW"}, info
    data = (mnt / "b").read_bytes()
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    cli.run("umount", str(mnt))
    cli.run("volume", "attach", name, "--device", str(tmp_path / "dev"))
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(tmp_path / "dev")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    wait_for(lambda: not loops_of(tmp_path / "dev"), 30, "the loop device to go")
    cli.run("volume", "detach", name)
    cli.run("mount", name, str(mnt))
    assert (mnt / "b").read_bytes() == data
    (tmp_path / "link").symlink_to(mnt)  # (it was "nothing is mounted at" the link)
    cli.run("umount", str(tmp_path / "link"))


def test_a_faulted_volume_is_let_go(cli: Cli, mounted: tuple[str, Path]) -> None:
    name, mnt = mounted
    cli.run("volume", "set", name, "--rejoin-wait", "3600")  # (no replica comes back by itself)
    (mnt / "f").write_bytes(b"x" * MIB)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    for replica in cli.info(name)["replicas"]:
        os.kill(replica["pid"], signal.SIGKILL)
    wait_for(lambda: cli.info(name)["state"] == "faulted", 60, "the volume to fault")
    device = Path(cli.info(name)["device"])
    result = cli.run("umount", str(mnt), check=False)
    assert result.returncode == 0, result.stderr
    assert "faulted" in result.stdout and "unmounted" in result.stdout, result.stdout
    assert mounts_of(str(mnt)) == [] and mounts_of(str(device)) == []
    assert loops_of(device) == []
    assert cli.engine_pid(name) is None
    assert cli.info(name)["state"] == "detached"
    # the replicas held every flushed write: the volume attaches again, whole
    cli.run("mount", name, str(mnt))
    assert (mnt / "f").read_bytes() == b"x" * MIB
    cli.run("umount", str(mnt))


def test_a_faulted_attached_volume_detaches(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "f", "--size", "64M", "--replicas", "2", "--rejoin-wait", "3600")
    cli.run("volume", "attach", "f", "--device", str(tmp_path / "dev"))
    for replica in cli.info("f")["replicas"]:
        os.kill(replica["pid"], signal.SIGKILL)
    wait_for(lambda: cli.info("f")["state"] == "faulted", 60, "the volume to fault")
    result = cli.run("volume", "detach", "f", check=False)
    assert result.returncode == 0 and "faulted" in result.stdout, result.stdout + result.stderr
    assert cli.engine_pid("f") is None and mounts_of(str(tmp_path / "dev")) == []


def test_attaching_with_no_replica_reachable_is_one_line(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A volume whose only replica is on a host that is down: attach fails with the reason in
    one line (it failed in a task of the engine's and came out as an exception group before),
    and the volume stays detached, ready to attach once the host is back."""
    cli.run("volume", "create", "u", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "u", "--device", str(tmp_path / "u.dev"))
    cli.run("volume", "key", "u", "--out", str(tmp_path / "u.key"))
    remote = replica_factory(tmp_path / "remote", tmp_path / "u.key")
    cli.run("replica", "add", "u", "--address", remote.address)
    cli.run("replica", "rm", "u", "r1")
    cli.run("volume", "detach", "u")
    assert remote.stop() == 0
    result = cli.run("volume", "attach", "u", "--device", str(tmp_path / "u.dev"), check=False)
    assert one_line(result, 1).startswith(
        "lhfs: error: not attached: r2 (recorded healthy) cannot be reached: cannot reach "
        f"replica {remote.address}"
    ) and "failed: attach again once it is back (if it is lost for good" in one_line(result, 1)
    assert cli.info("u")["state"] == "detached"
    port = int(remote.address.rsplit(":", 1)[1])
    again = ReplicaProcess(tmp_path / "remote", tmp_path / "u.key", port=port)  # the host is back
    try:
        cli.run("volume", "attach", "u", "--device", str(tmp_path / "u.dev"))
        assert [r["mode"] for r in cli.info("u")["replicas"]] == ["RW"]
        cli.run("volume", "detach", "u")
    finally:
        again.stop()


def test_a_service_never_imports_code_from_the_operators_directory(
    cli: Cli, tmp_path: Path
) -> None:
    """``volume attach`` starts the engine, as root; run from a directory that holds a package
    named ``lhfs`` (another user's ``/tmp/lhfs``), the engine must not import it."""
    planted = tmp_path / "cwd" / "lhfs"
    planted.mkdir(parents=True)
    marker = tmp_path / "imported"
    for name in ("__init__.py", "__main__.py"):
        (planted / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    cli.run("volume", "create", "w", "--size", "16M", "--replicas", "1")
    attach = [LHFS, "--root", str(cli.root), "volume", "attach", "w", "--device"]
    result = subprocess.run(
        [*attach, str(tmp_path / "w.dev")], cwd=planted.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert cli.info("w")["state"] == "healthy"
    cli.run("volume", "detach", "w")


def test_mount_right_after_an_engine_kill(cli: Cli, mounted: tuple[str, Path]) -> None:
    name, mnt = mounted
    files = {f"f{i}": os.urandom(100_000) for i in range(5)}
    for file, data in files.items():
        (mnt / file).write_bytes(data)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    device = Path(cli.info(name)["device"])
    kill_engine(cli, name)
    crashed = cli.info(name)
    assert crashed["state"] == "crashed", crashed
    assert crashed["leftovers"]["mounts"] == [str(mnt)], crashed
    time.sleep(0.1)  # the point of the test: 0.1 s after the kill, not later
    result = cli.run("mount", name, str(mnt), check=False)
    assert result.returncode == 0, result.stderr
    for file, data in files.items():
        assert (mnt / file).read_bytes() == data
    assert len(mounts_of(str(mnt))) == 1 and len(loops_of(device)) == 1
    kill_engine(cli, name)
    result = cli.run("umount", str(mnt), check=False)  # a dead engine's mount is let go too
    assert result.returncode == 0, result.stderr
    assert mounts_of(str(mnt)) == [] and loops_of(device) == [] and mounts_of(str(device)) == []


def _not_s3(method: str, path: str) -> tuple[int, str, bytes]:
    """A plain web server: its home page at /, an HTML 404 page for everything else."""
    home = path == "/" and method == "GET"
    body = b"<html><body><h1>" + (b"Welcome" if home else b"Not Found") + b"</h1></body></html>"
    return (200 if home else 404), "text/html", body


def test_s3_errors_are_answers(cli: Cli, s3_endpoint: str) -> None:
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    snapshots = cli.json("snapshot", "ls", "v")
    buckets_before = sorted(
        b.name for b in Bucket(Target("any", ""), deadline=5).client.list_buckets()
    )
    for args in (
        ("backup", "create", "v", "--target", "s3://lhfs-ok/a/../x"),
        ("backup", "create", "v", "--target", "s3://lhfs-ok/./x"),
        ("backup", "ls", "--target", "s3://lhfs-ok/a/../x"),
        ("backup", "restore", "s3://lhfs-ok/p?volume=../x&backup=b", "new"),
        ("backup", "restore", "s3://lhfs-ok/p?volume=v&backup=../../x", "new"),
        ("backup", "rm", "s3://lhfs-ok/p?volume=v&backup=b&x=1"),
        ("backup", "create", "v", "--target", "s3://Bad_Bucket/p"),
    ):
        line = one_line(cli.run(*args, check=False), 2)
        assert "invalid" in line or "not a backup" in line, line
    missing = one_line(
        cli.run("backup", "create", "v", "--target", "s3://lhfs-typo/p", check=False), 1
    )
    assert "bucket 'lhfs-typo' does not exist" in missing and "--create-bucket" in missing, missing

    with web_server(_not_s3) as url:
        web = Cli(cli.root, env={"AWS_ENDPOINT_URL": url})
        for args in (
            ("backup", "ls", "--target", "s3://lhfs-ok/p"),
            ("backup", "create", "v", "--target", "s3://lhfs-ok/p", "--create-bucket"),
        ):
            line = one_line(web.run(*args, check=False, timeout=60), 1)
            assert url.removeprefix("http://") in line and "S3" in line, line
            assert "<html>" not in line

    anonymous = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    for args in (
        ("backup", "ls", "--target", "s3://lhfs-ok/p"),
        ("backup", "create", "v", "--target", "s3://lhfs-ok/p", "--create-bucket"),
        ("backup", "restore", "s3://lhfs-ok/p?volume=v&backup=b", "new"),
    ):
        line = one_line(Cli(cli.root, env=anonymous).run(*args, check=False), 2)
        assert "AWS_ACCESS_KEY_ID" in line, line
    no_endpoint = Cli(
        cli.root, env={"AWS_ENDPOINT_URL": "", "AWS_REGION": "", "AWS_DEFAULT_REGION": ""}
    )
    line = one_line(no_endpoint.run("backup", "ls", "--target", "s3://lhfs-ok/p", check=False), 2)
    assert "AWS_ENDPOINT_URL" in line, line

    buckets_after = sorted(
        b.name for b in Bucket(Target("any", ""), deadline=5).client.list_buckets()
    )
    assert buckets_after == buckets_before  # nothing above created a bucket
    assert cli.json("snapshot", "ls", "v") == snapshots  # nor took a snapshot
    assert cli.json("volume", "ls")[0]["name"] == "v" and len(cli.json("volume", "ls")) == 1


def test_a_refused_endpoint_fails_within_the_retry_timeout(cli: Cli) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    nobody = Cli(cli.root, env={**env, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    started = time.monotonic()
    args = ("backup", "ls", "--target", "s3://lhfs-ok/p", "--retry-timeout", "2")
    line = one_line(nobody.run(*args, check=False, timeout=120), 1)
    assert time.monotonic() - started < 30
    assert "did not answer" in line and "for 2s" in line, line
    assert "(default 60 s;" in " ".join(nobody.run("backup", "ls", "--help").stdout.split())
    with socket.socket() as silent:  # a store that takes connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        hung = Cli(cli.root, env={**env, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
        started = time.monotonic()
        args = ("backup", "ls", "--target", "s3://lhfs-ok/p", "--retry-timeout", "5")
        line = one_line(hung.run(*args, check=False, timeout=120), 1)
        took = time.monotonic() - started
    assert took < 30 and "did not answer" in line, (took, line)  # (each request waited 60 s)


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mode (what 'nothing changed' compares)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(".log") or path.name.endswith(".lock"):
            continue  # (logs grow, and taking a lock creates its file)
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_size if path.is_file() else 0, info.st_mode)
    return out


def test_every_verb_answers_bad_input_with_one_line(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Every verb of the command line, given wrong types, missing objects, '..', empty strings
    and huge numbers: exit 1 or 2, one line on stderr, no traceback, nothing changed."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    cli.run("snapshot", "create", "v", "s1")
    image = tmp_path / "img.raw"
    image.write_bytes(b"i" * 65536)
    cli.run("backing-image", "create", "img", "--from", str(image))
    key = tmp_path / "v.key"
    cli.run("volume", "key", "v", "--out", str(key))
    target = "s3://lhfs-table/p"
    url = cli.backup("v", target)
    before = _listing(cli.root)
    huge = "99999999999999T"
    cases = [
        ("replica", "init", "--dir", str(tmp_path / "r"), "--size", "abc"),
        ("replica", "init", "--dir", str(tmp_path / "r"), "--size", huge),
        ("replica", "init", "--dir", "", "--size", "1M"),
        ("replica", "serve", "--dir", str(tmp_path / "r"), "--listen", "x", "--key-file", str(key)),
        (
            "replica",
            "serve",
            "--dir",
            str(tmp_path / "r"),
            "--listen",
            "127.0.0.1:99999",
            "--key-file",
            str(key),
        ),
        (
            "replica",
            "serve",
            "--dir",
            str(tmp_path / "r"),
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            str(tmp_path / "nokey"),
        ),
        ("replica", "inspect", "--dir", str(tmp_path / "nowhere")),
        ("replica", "add", "ghost"),
        ("replica", "add", "v", "--address", "no-port"),
        ("replica", "rm", "v", "r9"),
        ("replica", "rm", "..", "r1"),
        ("replica", "ls", ""),
        ("volume", "create", "..", "--size", "16M"),
        ("volume", "create", "x", "--size", "0"),
        ("volume", "create", "x", "--size", huge),
        ("volume", "create", "x", "--size", "16M", "--replicas", "99999"),
        ("volume", "create", "x", "--size", "16M", "--replicas", "two"),
        ("volume", "create", "x", "--size", "16M", "--chunk-size", "3K"),
        ("volume", "create", "x", "--size", "16M", "--backing-image", "nope"),
        ("volume", "attach", "ghost", "--device", str(tmp_path / "d")),
        ("volume", "attach", "v", "--device", "/proc/nope/d"),
        ("volume", "detach", "v"),
        ("volume", "detach", "../v"),
        ("volume", "info", ""),
        ("volume", "expand", "v", "--size", "1M"),
        ("volume", "expand", "v", "--size", huge),
        ("volume", "expand", "ghost", "--size", "32M"),
        ("volume", "scrub", "v"),
        ("volume", "checksum", "ghost"),
        ("volume", "rm", "ghost"),
        ("volume", "key", "v", "--out", str(key)),
        ("volume", "key", "ghost", "--out", str(tmp_path / "k2")),
        ("mount", "ghost", str(tmp_path)),
        ("mount", "v", str(tmp_path / "nodir")),
        ("mount", "v", str(tmp_path), "--fs", "ntfs"),
        ("umount", str(tmp_path)),
        ("snapshot", "create", "v", "s1"),
        ("snapshot", "create", "v", ".."),
        ("snapshot", "create", "v", ""),
        ("snapshot", "ls", "ghost"),
        ("snapshot", "rm", "v", "nope"),
        ("snapshot", "rm", "v", "../s1"),
        ("snapshot", "revert", "v", "nope"),
        ("backing-image", "create", "img", "--from", str(image)),
        ("backing-image", "create", "x", "--from", str(tmp_path / "none")),
        ("backing-image", "create", "..", "--from", str(image)),
        ("backing-image", "backup", "ghost", "--target", target),
        ("backing-image", "backup", "img", "--target", "s3://lhfs-table/../p"),
        ("backup", "create", "ghost", "--target", target),
        ("backup", "create", "v", "--target", target, "--block-size", "3M"),
        ("backup", "create", "v", "--target", target, "--block-size", huge),
        ("backup", "create", "v", "--target", target, "--snapshot", "nope"),
        ("backup", "create", "v", "--target", target, "--retry-timeout", "soon"),
        ("backup", "create", "v", "--target", ""),
        ("backup", "ls", "--target", target, "--volume", ".."),
        ("backup", "rm", url.replace("backup=", "backup=x")),
        ("backup", "rm", ""),
        ("backup", "restore", url, "v"),
        ("backup", "restore", url, "new", "--replicas", "0"),
        ("backup", "restore", url, ".."),
        ("backup", "restore", url.replace("volume=v", "volume=w"), "new"),
        ("backup", "gc", "--target", "s3://lhfs-table-none/p"),
        ("dr", "create", "v", "--target", target, "--volume", "v"),
        ("dr", "create", "d", "--target", target, "--volume", "ghost"),
        ("dr", "create", "d", "--target", target, "--volume", "v", "--interval", "-1"),
        ("dr", "create", "d", "--target", target, "--volume", "v", "--interval", "1e308"),
        (
            "dr",
            "create",
            "d",
            "--target",
            target,
            "--volume",
            "v",
            "--credentials-file",
            str(tmp_path / "none"),
        ),
        ("dr", "status", "v"),
        ("dr", "activate", "v"),
        ("dr", "start", "ghost"),
        ("dr", "stop", "v"),
        ("dr", "run", "v"),
        ("dr", "forget", "ghost", "--target", target, "--volume", "v"),
        ("dr", "forget", "ghost", "--target", "s3://lhfs-table/../x", "--volume", "v"),
        ("volume", "rm", "v", "--retry-timeout", "soon"),
        ("backup", "ls", "--target", target, "--retry-timeout", "nan"),
        ("backup", "ls", "--target", target, "--retry-timeout", "-1"),
        ("engine-run", "ghost", str(tmp_path / "d")),
        ("backup", "init", "--target", target, "--encrypt"),
        ("backup", "init", "--target", "s3://lhfs-table-none/p"),
        ("backup", "check", "--target", "s3://lhfs-table-none/p"),
        ("backup", "check", "--target", target, "--password-file", str(tmp_path / "none")),
        ("backup", "prune", "--target", target, "--volume", "v"),
        ("backup", "prune", "--target", target, "--volume", "v", "--keep-last", "-1"),
        ("backup", "prune", "--target", target, "--volume", "ghost", "--keep-last", "1"),
        ("backup", "prune", "--target", target, "--volume", "..", "--keep-daily", "x"),
        ("system", "backup", "--target", target, "--name", ".."),
        ("system", "backup", "--target", "s3://lhfs-table-none/p"),
        ("system", "ls", "--target", "s3://UPPER/p"),
        ("system", "restore", url),
        ("system", "restore", f"{target}?system=ghost"),
        ("system", "restore", f"{target}?system=a&system=b"),
        ("system", "rm", f"{target}?system=.."),
        ("logs", "ghost"),
        ("logs", "v", "--lines", "many"),
        ("logs", "v", "--component", "kernel"),
        ("volume", "set", "v", "--system-snapshots", "0"),
        ("volume", "set", "v", "--system-snapshots", "2.5"),
        ("snapshot", "create", "v", "rebuild-1"),
        ("logs", "v", "-n", "-5"),
        ("volume", "attach", "v", "--device", ""),
        ("volume", "attach", "v", "--device", str(image)),  # (a file with data: a typo)
        ("volume", "attach", "v", "--device", str(cli.root / "volumes" / "d")),
        ("backing-image", "create", "x", "--from", str(tmp_path)),
        ("doctor", "--target", "s3://"),
    ]
    for args in cases:
        result = cli.run(*args, check=False, timeout=120)
        try:
            one_line(result, 1, 2)
        except AssertionError as exc:
            raise AssertionError(f"lhfs {' '.join(args)}: {exc}") from None
        assert _listing(cli.root) == before, args
    assert not (tmp_path / "r").exists()


def test_a_failed_activation_leaves_the_standby_on_its_recorded_endpoint(
    cli: Cli, s3_endpoint: str
) -> None:
    """A standby records its endpoint at creation. An activation from a shell whose
    AWS_ENDPOINT_URL points elsewhere still uses the recorded one; when the store does not
    answer, the activation fails and the follower goes on, as it was, on its endpoint."""
    from urllib.parse import urlparse

    from tools.faultproxy import FaultProxy

    target = "s3://lhfs-standby/p"
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    via_proxy = Cli(cli.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        cli.run("volume", "create", "src", "--size", "16M", "--replicas", "1")
        first = cli.backup("src", target)
        via_proxy.run(
            *("dr", "create", "sb", "--target", target, "--volume", "src", "--replicas", "1"),
            *("--interval", "1", "--retry-max", "1", "--quiet"),
        )
        status = cli.json("dr", "status", "sb")
        assert status["endpoint"] == proxy.endpoint and status["last_restored_backup"] in first
        proxy.stop()  # the store goes away; an operator activates from another shell
        elsewhere = Cli(cli.root, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
        failed = elsewhere.run("dr", "activate", "sb", "--retry-timeout", "2", check=False)
        line = one_line(failed, 1)
        assert proxy.endpoint in line and "still a standby, following again" in line, line
        status = cli.json("dr", "status", "sb")
        assert status["endpoint"] == proxy.endpoint and status["follower_pid"], status
        assert cli.info("sb")["state"] == "standby"
        proxy.resume()  # the follower, on its recorded endpoint, takes the next backup
        second = cli.backup("src", target)
        cli.dr_restored("sb", second)
        done = elsewhere.run("dr", "activate", "sb").stdout
        assert "is a normal volume now" in done
    finally:
        proxy.close()


def test_smaller_mistakes_leave_no_trace(cli: Cli, tmp_path: Path) -> None:
    """A size past what the root's file system holds as one file is refused at create and at
    expand with the limit in the message; a mkfs that is not installed leaves no record that
    would later refuse another file system; expanding to the current size says so."""
    import shutil

    limit = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    assert limit == "ext2/ext3", "the root must be on ext4 here (16 TiB files at most)"
    line = one_line(cli.run("volume", "create", "big", "--size", "32T", check=False), 2)
    assert "holds files of at most 16" in line, line
    assert cli.json("volume", "ls") == []
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    line = one_line(cli.run("volume", "expand", "v", "--size", "20T", check=False), 2)
    assert "holds files of at most 16" in line, line
    assert "already 16M" in cli.run("volume", "expand", "v", "--size", "16M").stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mkfs.xfs") is None:  # (where xfsprogs is missing)
        line = one_line(cli.run("mount", "v", str(mnt), "--fs", "xfs", check=False), 1)
        assert "mkfs.xfs is not installed" in line, line
        assert cli.info("v")["filesystem"] is None and cli.info("v")["state"] == "detached"
    else:  # (too small for xfs: said before anything is recorded, not as mkfs's failure)
        line = one_line(cli.run("mount", "v", str(mnt), "--fs", "xfs", check=False), 2)
        assert "xfs needs a volume of 300M at least and v is 16M" in line, line
        assert cli.info("v")["filesystem"] is None and cli.info("v")["state"] == "detached"
    cli.run("mount", "v", str(mnt), "--fs", "ext4")
    holder = subprocess.Popen(["sleep", "600"], cwd=mnt)  # (a shell left in it)
    try:
        line = one_line(cli.run("umount", str(mnt), check=False), 1)
        assert "target is busy" in line and f"'fuser -vm {mnt}' shows what" in line, line
    finally:
        holder.kill()
        holder.wait()
    cli.run("umount", str(mnt))
    assert cli.info("v")["filesystem"]["type"] == "ext4"
    # a reader that left (| head): the command ends quietly
    read_end, write_end = os.pipe()
    os.close(read_end)
    from lhfs.core.procs import LHFS

    closed = subprocess.run([LHFS, "--root", str(cli.root), "volume", "ls", "--json"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(write_end)
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


def test_a_crashed_volume_is_not_removed_from_under_its_mounts(
    cli: Cli, tmp_path: Path, mounted: tuple[str, Path]
) -> None:
    """``volume rm`` of a volume whose engine died with its file system mounted is refused
    whole (before, it deleted the replicas, then failed on the mounted device, and left a
    mount no command could let go); ``detach`` cleans up, then ``rm`` works. A half-removed
    volume's directory never breaks ``volume ls``."""
    name, mnt = mounted
    (mnt / "f").write_bytes(b"kept")
    kill_engine(cli, name)
    line = one_line(cli.run("volume", "rm", name, check=False), 1)
    assert "crashed" in line and f"{mnt} mounted" in line and "volume detach" in line, line
    assert cli.info(name)["state"] == "crashed" and len(cli.info(name)["replicas"]) == 3
    shown = cli.run("volume", "info", name).stdout  # (its hint runs as it is written)
    assert "its engine died and left " + str(mnt) in shown, shown
    assert f"('lhfs --root {cli.root} volume detach {name}' cleans up)" in shown, shown
    doctor = cli.run("doctor", name, check=False)  # (it said all was well)
    assert doctor.returncode == 1 and "crashed: its engine died" in doctor.stdout, doctor.stdout
    assert f"lhfs --root {cli.root} volume detach {name}" in doctor.stdout, doctor.stdout
    cli.run("volume", "detach", name)
    assert mounts_of(str(mnt)) == []
    cli.run("volume", "rm", name)
    (cli.root / "volumes" / ".gone.removing").mkdir()  # (an rm cut short by a crash)
    (cli.root / "volumes" / ".gone.removing" / "config.json").write_text("{}")
    assert [(v["name"], v["state"]) for v in cli.json("volume", "ls")] == [
        ("gone", "removal cut short")
    ]


def test_refused_commands_take_back_what_they_began(cli: Cli, tmp_path: Path) -> None:
    """A ``mount`` refused on an attached volume frees the loop device it made (before, it
    was left, and ``detach`` then asked to unmount what was not mounted); a ``replica add``
    that fails gives its replica id back; snapshots keep the time they were taken through a
    rebuild that replaces every replica they were on; unnamed snapshots taken within one
    second get names of their own."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    taken = cli.json("snapshot", "create", "v", "s1")["created"]
    names = [cli.json("snapshot", "create", "v")["name"] for _ in range(3)]
    assert len(set(names)) == 3, names
    device = tmp_path / "v.dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    busy = tmp_path / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(busy)], check=True)
    try:
        line = one_line(cli.run("mount", "v", str(busy), check=False), 1)
        assert "already a mount point" in line, line
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    assert loops_of(device) == []
    line = one_line(cli.run("replica", "add", "v", "--address", "127.0.0.1:0", check=False), 2)
    assert "port 0" in line, line
    for spaced in (" 127.0.0.1:7000", "127.0.0.1 :7000", "127.0.0.1:7000 "):  # (a typo: usage)
        line = one_line(cli.run("replica", "add", "v", "--address", spaced, check=False), 2)
        assert "not a HOST:PORT address" in line, line
    one_line(cli.run("replica", "add", "v", "--address", "127.0.0.1:1", check=False), 1)
    wait_for(  # (the snapshot's second has passed: a copy made now would show another time)
        lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) != taken, 5, "a new second"
    )
    assert cli.json("replica", "add", "v")["id"] == "r2"
    cli.run("replica", "rm", "v", "r1")
    after = {s["name"]: s["created"] for s in cli.json("snapshot", "ls", "v")}
    assert after["s1"] == taken, (after, taken)
    cli.run("volume", "detach", "v")


def test_a_revert_to_before_the_format_and_a_mount_without_its_type(
    cli: Cli, tmp_path: Path
) -> None:
    """A volume formatted as xfs is mounted again without ``--fs`` (it was refused: "holds
    xfs, not ext4"). Reverted to a snapshot taken before ``lhfs mount`` formatted it, it is
    formatted again by the next mount (it was refused for ever: the record said formatted,
    the device held nothing, and no command could let the record go)."""
    cli.run("volume", "create", "r", "--size", "320M", "--replicas", "1")  # (xfs: 300M at least)
    cli.run("snapshot", "create", "r", "blank")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "r", str(mnt), "--fs", "xfs")
    (mnt / "file").write_text("kept")
    cli.run("umount", str(mnt))
    cli.run("mount", "r", str(mnt))
    fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    assert fstype == "xfs" and (mnt / "file").read_text() == "kept"
    cli.run("umount", str(mnt))
    said = cli.run("snapshot", "revert", "r", "blank").stdout
    assert "file system record is set aside" in said, said
    mounted = cli.json("mount", "r", str(mnt))
    assert mounted["formatted"] is True and not (mnt / "file").exists(), mounted
    cli.run("umount", str(mnt))


def test_backing_images_as_an_operator_meets_them(cli: Cli, tmp_path: Path) -> None:
    """A sparse image stays sparse under the root and in each replica (it was copied whole);
    an image of a long name, or a raw file with a space in its name, makes a volume (the
    replica's copy took the name whole and was refused); an empty file is refused; a
    registered image whose file changed is refused by volume create and by its backup (it was
    used under its old id); ``backing-image rm`` removes one, its volumes unharmed."""
    sparse = tmp_path / "my disk.img"
    with open(sparse, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(5 * 1024 * 1024)
        f.write(os.urandom(1024 * 1024))
    line = one_line(cli.run("backing-image", "create", "i" * 59, "--from", str(sparse),
                            check=False), 2)  # fmt: skip
    assert "at most 58 characters" in line, line
    long_name = "img-" + "a" * 54
    cli.run("backing-image", "create", long_name, "--from", str(sparse))
    cli.run("volume", "create", "by-name", "--size", "64M", "--replicas", "2",
            "--backing-image", long_name)  # fmt: skip
    cli.run("volume", "create", "by-file", "--size", "64M", "--replicas", "1",
            "--backing-image", str(sparse))  # fmt: skip
    copies = [
        *(cli.root / "backing-images").glob("*.img"),
        *cli.root.glob("volumes/*/replicas/*/*.img"),
    ]
    assert len(copies) == 4, copies
    for copy in copies:
        assert copy.stat().st_blocks * 512 <= 2 * 1024 * 1024, (copy, copy.stat().st_blocks)
    assert cli.checksum("by-name") == cli.checksum("by-file")
    empty = tmp_path / "empty.img"
    empty.touch()
    line = one_line(cli.run("backing-image", "create", "e", "--from", str(empty), check=False), 2)
    assert "is empty" in line, line
    line = one_line(cli.run("volume", "create", "e", "--size", "16M", "--backing-image",
                            str(empty), check=False), 2)  # fmt: skip
    assert "is empty" in line, line
    registered = cli.root / "backing-images" / f"{long_name}.img"
    with open(registered, "r+b") as f:  # (its time kept: a change no stamp shows)
        stamp = os.stat(registered)
        f.seek(5 * 1024 * 1024 + 10)
        f.write(b"changed!")
    os.utime(registered, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    line = one_line(cli.run("volume", "create", "late", "--size", "64M", "--backing-image",
                            long_name, check=False), 1)  # fmt: skip
    assert "changed since it was registered" in line, line
    assert [v["name"] for v in cli.volumes()] == ["by-file", "by-name"]
    line = one_line(cli.run("backing-image", "backup", long_name, "--target", "s3://x/y",
                            check=False), 1)  # fmt: skip
    assert "changed since it was registered" in line, line
    removed = cli.run("backing-image", "rm", long_name).stdout
    assert "by-name" in removed and not registered.exists(), removed
    assert cli.json("backing-image", "ls") == []
    assert cli.checksum("by-name") == cli.checksum("by-file")


_SIGNAL_PROBE = """
import signal, sys, trio
import lhfs.cli
def probe(*args, **kwargs):
    print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
trio.run = probe
sys.exit(lhfs.cli.main(sys.argv[1:]))
"""


def test_a_service_leaves_sigterm_to_its_event_loop(cli: Cli, tmp_path: Path) -> None:
    """A command stops on SIGTERM as on Ctrl-C: a handler raises where the interpreter is.
    A replica (and the engine) must not have that handler when its event loop starts: the
    loop receives SIGTERM while it serves and puts its own handler back after, and an
    exception raised inside the loop's machinery (a second SIGTERM while a replica shut
    down) left the replica's loop unable to end, holding the FUSE device, and every process
    that touched the device hung. The probe stands in for the event loop and says what the
    SIGTERM handler is when it would start."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    key = tmp_path / "v.key"
    cli.run("volume", "key", "v", "--out", str(key))
    serve = [
        "replica", "serve", "--dir", str(tmp_path / "r"), "--listen", "127.0.0.1:0",
        "--key-file", str(key),
    ]  # fmt: skip
    python = str(Path(LHFS).with_name("python"))
    probed = subprocess.run(
        [python, "-c", _SIGNAL_PROBE, *serve], capture_output=True, text=True, timeout=60
    )
    assert probed.returncode == 0 and probed.stdout == "True\n", probed
