"""What an operator sees: --json everywhere with stable keys, progress off a terminal, logs,
online expansion, system snapshots kept to their number, --version."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fuse

from lhfs.core import logs
from lhfs.core.procs import wait_for
from lhfs.testing import LHFS, Cli, write_at
from lhfs.volumes.manage import REPLICA_KEYS, VOLUME_KEYS
from lhfs.volumes.mount import CAP_SYS_RESOURCE, capable

pytestmark = needs_fuse
MIB = 1 << 20
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def check_volume_keys(info: dict[str, Any]) -> None:
    assert set(info) == set(VOLUME_KEYS), set(info) ^ set(VOLUME_KEYS)
    for replica in info["replicas"]:
        assert set(replica) == set(REPLICA_KEYS), set(replica) ^ set(REPLICA_KEYS)
        if replica["since"] is not None:
            assert STAMP.match(replica["since"]), replica["since"]
    for snapshot in info["snapshots"]:
        assert STAMP.match(snapshot["created"]), snapshot


def test_json_of_every_verb_parses_and_keeps_its_keys_in_every_state(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """One table of verbs and the keys of their JSON; ``volume info`` in each state a volume
    goes through (detached, healthy, degraded, crashed, a standby)."""
    target = "s3://json-keys/p"
    device = tmp_path / "dev"
    seen: dict[str, list[str]] = {}

    def run(*args: str, keys: set[str] | None = None) -> Any:
        out = cli.run(*args, "--json").stdout
        doc = json.loads(out)  # one document, nothing else on stdout
        if keys is not None:
            assert isinstance(doc, dict) and keys <= set(doc), (args, doc)
        seen.setdefault(" ".join(args[:2]), []).append(out)
        return doc

    run("volume", "create", "v", "--size", "64M", "--replicas", "2", "--system-snapshots", "5")
    check_volume_keys(run("volume", "info", "v"))
    run("volume", "set", "v", "--io-timeout", "9", keys={"name", "settings"})
    attached = run("volume", "attach", "v", "--device", str(device), keys={"device", "metrics"})
    assert attached["metrics"] is None
    write_at(device, 0, os.urandom(MIB))
    check_volume_keys(run("volume", "info", "v"))
    run("volume", "checksum", "v", keys={"name", "checksum"})
    run("snapshot", "create", "v", "s1", keys={"name", "created"})
    assert [s["name"] for s in run("snapshot", "ls", "v")] == ["s1"]
    run("volume", "scrub", "v", keys={"damaged", "repaired", "layers", "replicas"})
    run("volume", "expand", "v", "--size", "128M", keys={"changed", "size", "todo"})
    backup = run(
        "backup", "create", "v", "--target", target, "--create-bucket",
        keys={"url", "read", "uploaded_bytes"},
    )  # fmt: skip
    listed = run("backup", "ls", "--target", target)
    assert listed and all(STAMP.match(b["started"]) and STAMP.match(b["created"]) for b in listed)
    replicas = run("replica", "ls", "v")
    assert [set(r) for r in replicas] == [set(REPLICA_KEYS)] * 2
    added = run("replica", "add", "v", keys={"id", "mode", "rebuild_stats"})
    assert added["mode"] == "RW"
    run("replica", "rm", "v", added["id"], keys={"volume", "id", "removed", "left"})
    victim = run("volume", "info", "v")["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    write_at(device, 0, b"x" * 4096)  # a write notices
    degraded = run("volume", "info", "v")
    assert degraded["state"] == "degraded"
    check_volume_keys(degraded)
    run("volume", "detach", "v", keys={"name", "state", "flushed"})
    run("snapshot", "rm", "v", "s1", keys={"volume", "name", "removed"})
    run("backup", "restore", backup["url"], "copy", "--replicas", "1", keys={"volume", "size"})
    check_volume_keys(run("volume", "info", "copy"))
    run("volume", "key", "copy", "--out", str(tmp_path / "key"), keys={"name", "file"})
    run("volume", "rm", "copy", keys={"name", "removed", "marker_removed_from", "left"})
    standby = run(
        "dr", "create", "dr", "--target", target, "--volume", "v", "--replicas", "1",
        "--interval", "1", "--quiet", keys={"name", "state", "last_restored_backup"},
    )  # fmt: skip
    assert standby["last_restored_backup"]
    info = run("volume", "info", "dr")
    assert info["state"] == "standby" and info["dr"] is not None
    check_volume_keys(info)
    run("dr", "stop", "dr", keys={"name", "stopped", "was_following"})
    run("dr", "start", "dr", keys={"name", "pid"})
    run(
        "dr",
        "activate",
        "dr",
        "--quiet",
        keys={"name", "backup", "marker_removed_from", "marker_kept"},
    )
    run("backup", "rm", backup["url"], keys={"url", "collected"})
    run("backup", "gc", "--target", target, keys={"collected"})
    # a volume whose engine was killed: crashed, the same keys
    run("volume", "attach", "v", "--device", str(device))
    os.kill(run("volume", "info", "v")["pid"], signal.SIGKILL)
    crashed = wait_for(
        lambda: (i := run("volume", "info", "v"))["state"] == "crashed" and i, 30, "crashed"
    )
    check_volume_keys(crashed)
    assert crashed["leftovers"] is not None
    run("volume", "detach", "v")
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(MIB))
    run("backing-image", "create", "base", "--from", str(image), keys={"name", "id", "size"})
    assert [i["name"] for i in run("backing-image", "ls")] == ["base"]
    # every verb that reports something was asked once at least
    assert len(seen) >= 25, sorted(seen)


def test_progress_off_a_terminal_prints_tenths_and_one_100(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "p", "--size", "512M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "p", "--device", str(device))
    write_at(device, 0, os.urandom(64 * MIB))
    result = cli.run("volume", "checksum", "p")
    lines = result.stderr.splitlines()
    assert all(line.startswith("checksum p: ") for line in lines), lines
    percents = [float(line.split()[2].rstrip("%")) for line in lines]
    assert percents == sorted(percents) and percents.count(100) == 1, lines
    assert len(lines) <= 11
    assert "512M/512M" not in result.stderr or "in " in lines[-1]
    assert cli.run("volume", "checksum", "p", "--quiet").stderr == ""
    cli.run("volume", "detach", "p")
    # the reporter itself, driven past 100% and back: one line per tenth, one 100%
    script = (
        "from lhfs.cli.progress import Progress\n"
        "with Progress('x') as bar:\n"
        "    for i in range(0, 1001):\n"
        "        bar.update(i / 10, i << 20, 1000 << 20)\n"
        "    bar.update(100); bar.update(100)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = out.stderr.splitlines()
    assert len(lines) == 11 and sum(" 100% " in line for line in lines) == 1, lines
    assert "1000M/1000M" in lines[-1] or "in " in lines[-1]


def test_logs_merge_follow_and_rotate(cli: Cli, tmp_path: Path) -> None:
    cli.run("volume", "create", "l", "--size", "64M", "--replicas", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "l", "--device", str(device))
    out = cli.run("logs", "l").stdout.splitlines()
    assert any(line.startswith("[engine] ") and "attached" in line for line in out), out
    stamps = [line.split()[1] for line in out if re.match(r"^\[\w+\] \d{4}-", line)]
    assert stamps == sorted(stamps) and all(s.endswith("Z") for s in stamps)
    entries = cli.json("logs", "l")
    assert entries and {tuple(e) for e in entries} == {("component", "text", "time")}
    assert all(STAMP.match(e["time"][:19] + "Z") for e in entries if e["time"])
    only = cli.run("logs", "l", "--component", "replica").stdout.splitlines()
    assert only and all(line.startswith(("[r1] ", "[r2] ")) for line in only), only
    follow = cli.start("logs", "l", "--follow", "--component", "engine")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout or []), daemon=True)
    reader.start()
    try:
        victim = cli.info("l")["replicas"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        write_at(device, 0, b"y" * 4096)
        wait_for(
            lambda: any(f"replica {victim['id']} (" in line for line in list(lines)),
            30,
            "the follower to show the replica's failure",
        )
        assert all(line.startswith("[engine] ") for line in list(lines))
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
    assert follow.returncode == 0
    cli.run("volume", "detach", "l")
    assert cli.run("logs", "nope", check=False).returncode == 1

    # rotation by size: a service started with --log rotates and keeps three older files;
    # what it writes to stderr (a traceback) lands in the current file
    log = tmp_path / "svc.log"
    script = (
        "import logging, os, sys\n"
        "from pathlib import Path\n"
        "from lhfs.core import logs\n"
        "logs.setup(Path(sys.argv[1]))\n"
        "for i in range(2000):\n"
        "    logging.getLogger('lhfs.t').info('line %05d %s', i, 'x' * 40)\n"
        "print('on stderr', file=sys.stderr, flush=True)\n"
    )
    env = {**os.environ, "LHFS_LOG_MAX_BYTES": "20000"}
    subprocess.run([sys.executable, "-c", script, str(log)], env=env, check=True)
    files = logs.files(log)
    assert [p.name for p in files] == ["svc.log.3", "svc.log.2", "svc.log.1", "svc.log"]
    assert all(p.stat().st_size <= 20000 + 200 for p in files)
    assert "on stderr" in log.read_text()
    lines = [text for _, _, text in logs.merged({"t": log}, 0, True) if b"line " in text]
    numbers = [int(t.split(b"line ")[1][:5]) for t in lines]
    assert numbers == sorted(numbers) and numbers[-1] == 1999


def _df_size(mountpoint: Path) -> int:
    stat = os.statvfs(mountpoint)
    return stat.f_blocks * stat.f_frsize


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_online_expansion_of_a_mounted_volume(cli: Cli, tmp_path: Path, fs: str) -> None:
    """Seen by df. Growing a mounted ext4 needs CAP_SYS_RESOURCE; where the process lacks it
    (a container), the command must say exactly what remains to be done instead."""
    if fs == "xfs" and not shutil.which("mkfs.xfs"):
        pytest.fail("xfsprogs is missing: tools/setup-system.sh installs it")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "g", "--size", "320M", "--replicas", "2")
    cli.run("mount", "g", str(mnt), "--fs", fs)
    try:
        (mnt / "file").write_bytes(os.urandom(MIB))
        before = _df_size(mnt)
        same = cli.json("volume", "expand", "g", "--size", "320M")
        assert same["changed"] is False
        assert (
            "already 320M: nothing to do"
            in cli.run("volume", "expand", "g", "--size", "320M").stdout
        )
        done = cli.json("volume", "expand", "g", "--size", "640M")
        assert done["changed"] and done["loop"], done
        online = fs == "xfs" or capable(CAP_SYS_RESOURCE)
        if online:
            assert done["filesystem"] == fs and done["mountpoint"] == str(mnt) and not done["todo"]
            assert _df_size(mnt) > before * 1.8
        else:
            assert (
                done["todo"].startswith(f"resize2fs {done['loop']}")
                and "CAP_SYS_RESOURCE" in done["todo"]
            )
            assert _df_size(mnt) == before
        text = cli.run("volume", "expand", "g", "--size", "704M").stdout
        assert text.startswith("expanded g to 704M; ") and done["loop"] in text
        assert (f"its {fs} file system at {mnt}" in text) == online, text
        info = cli.info("g")
        assert info["loop"] == done["loop"] and info["mountpoint"] == str(mnt)
        assert (mnt / "file").stat().st_size == MIB
        # Grown while not mounted: the next mount grows the file system, as the hint says.
        cli.run("umount", str(mnt))
        cli.run("volume", "expand", "g", "--size", "1G")
        mounted = cli.json("mount", "g", str(mnt))
        assert mounted["grown"] and _df_size(mnt) > before * 2.9, (mounted, _df_size(mnt))
        assert (mnt / "file").stat().st_size == MIB
        cli.run("umount", str(mnt))
        assert not cli.json("mount", "g", str(mnt))["grown"]  # (once is enough)
    finally:
        cli.run("umount", str(mnt), check=False)


def test_system_snapshots_are_kept_to_their_number(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://housekeeping/p"
    cli.run("volume", "create", "h", "--size", "64M", "--replicas", "2", "--system-snapshots", "2")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "h", "--device", str(device))
    refused = cli.run("snapshot", "create", "h", "backup-mine", check=False)
    assert refused.returncode == 2 and "lhfs's own" in refused.stderr
    cli.run("snapshot", "create", "h", "mine")

    def system() -> list[str]:
        names = [s["name"] for s in cli.json("snapshot", "ls", "h")]
        assert "mine" in names  # an operator's snapshot is never touched
        return [n for n in names if n.startswith(("backup-", "rebuild-"))]

    for n in range(5):
        write_at(device, n * MIB, os.urandom(MIB))
        cli.backup("h", target)
        wait_for(lambda: len(system()) <= 2, 60, "housekeeping")
    added = cli.json("replica", "add", "h")  # a rebuild takes a barrier snapshot
    assert added["mode"] == "RW"
    kept = wait_for(lambda: (s := system()) and len(s) <= 2 and s, 60, "housekeeping")
    last = json.loads((cli.root / "volumes" / "h" / "config.json").read_text())["backups"]
    assert last[target]["snapshot"] in kept  # the next backup's base survives
    write_at(device, 9 * MIB, os.urandom(4096))
    out = cli.run("backup", "create", "h", "--target", target).stdout
    assert "read 1 of 32 blocks" in out  # still incremental
    assert "housekeeping: removed system snapshot" in cli.run("logs", "h", "-n", "0").stdout
    out = cli.run("volume", "set", "h", "--system-snapshots", "1.5", check=False)
    assert out.returncode == 2 and "whole number" in out.stderr
    cli.run("volume", "detach", "h")


def test_version() -> None:
    import lhfs

    out = subprocess.run([LHFS, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lhfs {lhfs.__version__}"


def test_the_grafana_dashboard_asks_for_metrics_lhfs_serves() -> None:
    """Every series the dashboard queries is one the engine or the follower exports (a
    renamed metric would leave a panel silently empty)."""
    root = Path(__file__).parent.parent
    dashboard = json.loads((root / "tools/grafana/lhfs-volumes.json").read_text())
    exported = (root / "lhfs/engine/metrics.py").read_text()
    exported += (root / "lhfs/backups/follower_metrics.py").read_text()
    asked = set()
    for panel in dashboard["panels"]:
        for query in panel["targets"]:
            asked |= set(re.findall(r"\blhfs_[a-z_]+", query["expr"]))
    assert len(asked) >= 15
    for name in asked:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in exported, name
