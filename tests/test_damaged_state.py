"""Damaged local state (a file edited by hand, half written by a tool, left by an older lhfs or
a reboot) is refused in one line naming the file and the field, with a non-zero exit and
nothing changed, never a traceback; commands over the whole root show the damaged thing and go
on with the others. Detached volumes only: no FUSE is needed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core import locks
from lhfs.core.errors import Busy
from lhfs.core.procs import alive, wait_for
from lhfs.replica.server import directory_id
from lhfs.testing import Cli, one_line

MIB = 1 << 20


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its content: what "nothing changed" compares."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _reaped() -> int:
    """The pid of a process that has exited (and been reaped): what a dead holder left."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_damaged_configuration_is_refused_and_spares_the_other_volumes(cli: Cli) -> None:
    """``config.json`` that parses but is not what lhfs writes: each command about the volume
    refuses in one line naming the file and the field (``volume rm`` too: it never deletes on
    the strength of a damaged configuration); ``volume ls`` and ``doctor`` show it damaged and
    go on with the others."""
    for name in ("bad", "good"):
        cli.run("volume", "create", name, "--size", "1M", "--replicas", "1")
    path = cli.root / "volumes" / "bad" / "config.json"
    sound = json.loads(path.read_text())
    cases: list[tuple[str, Any]] = [
        ("not a JSON object", []),
        ("size must be an integer", {}),
        ("settings.io_timeout", {**sound, "settings": {"io_timeout": "abc"}}),
        ("epoch", {**sound, "epoch": "x"}),
        ("removing", {**sound, "removing": 5}),
        ("size must be an integer", {**sound, "size": "x", "replicas": []}),
        ("largest size lhfs handles", {**sound, "size": 10**30}),
        ("replicas[0].id", {**sound, "replicas": [{"id": 5}]}),
        (
            "replicas[0].rotten_backing",
            {**sound, "replicas": [{"id": "r1", "rotten_backing": "no"}]},
        ),
        ("backing_image_name", {**sound, "backing_image_name": 7}),
        ("dr must be an object", {**sound, "dr": "x"}),
    ]
    for n, (field, config) in enumerate(cases):
        path.write_text(json.dumps(config))
        before = files(path.parent)
        line = one_line(cli.run("volume", "info", "bad", check=False))
        assert str(path) in line and field in line, line
        if n in (0, 5):  # (every command loads the configuration one way: a few suffice)
            listed = cli.run("volume", "ls").stdout.splitlines()
            assert listed[0] == f"bad: damaged: {line.removeprefix('lhfs: error: ')}", listed
            assert listed[1].startswith("good: detached"), listed
            refused = one_line(cli.run("volume", "rm", "bad", check=False))
            assert refused.startswith(f"{line}: refused, nothing removed"), refused
            set_ = one_line(cli.run("volume", "set", "bad", "--io-timeout", "9", check=False))
            assert set_ == line, set_
            doctor = cli.run("doctor", "bad", "--json", check=False)
            assert doctor.returncode == 1, doctor.stderr
            failed = [c for c in json.loads(doctor.stdout) if c["status"] == "fail"]
            assert [c["detail"] for c in failed if c["check"] == "volume"] == [
                line.removeprefix("lhfs: error: ")
            ], failed
        assert files(path.parent) == before, field
    nulls = {"settings": None, "removing": None, "backups": None, "snapshot_holds": None}
    path.write_text(json.dumps({**sound, **nulls}))  # (null where a field may be missing)
    assert cli.json("volume", "info", "bad")["settings"]["io_timeout"] == 8
    cli.run("snapshot", "create", "bad", "s1")
    path.write_text(json.dumps(sound))
    assert [v["state"] for v in cli.volumes()] == ["detached", "detached"]


def test_a_system_backup_skips_a_damaged_volume_and_image_saying_why(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """``system backup`` backs up the sound volumes and images of a root and skips, with the
    reason, a volume whose configuration is damaged and an image whose record is."""
    for name in ("bad", "good"):
        cli.run("volume", "create", name, "--size", "1M", "--replicas", "1")
    (cli.root / "volumes" / "bad" / "config.json").write_text("{}")
    (tmp_path / "image.raw").write_bytes(os.urandom(MIB))
    cli.run("backing-image", "create", "bi", "--from", str(tmp_path / "image.raw"))
    (cli.root / "backing-images" / "bi.json").write_text("[]")
    done = cli.json(
        "system", "backup", "--target", "s3://damaged/sys", "--create-bucket", "--quiet"
    )
    assert list(done["volumes"]) == ["good"] and done["images"] == {}, done
    assert sorted(done["skipped"]) == ["bad", "image bi"], done
    assert all(why.startswith("damaged: ") for why in done["skipped"].values()), done


def test_an_engine_record_that_names_no_engine_is_a_crashed_engine_detach_clears(
    cli: Cli, tmp_path: Path
) -> None:
    """``engine.json`` whose pid is not one (a string, beyond any pid) or belongs to a live
    process that is not the volume's engine (a pid reused after a reboot): every command
    calls the volume crashed, the same way; ``volume detach`` clears it."""
    assert not alive("77") and not alive(10**20) and not alive(None)
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    record = cli.root / "volumes" / "v" / "engine.json"
    unrelated = subprocess.Popen(["sleep", "600"])  # (a live process that is no engine)
    try:
        for pid in ("123", 10**20, unrelated.pid):
            record.write_text(json.dumps({"pid": pid, "device": str(tmp_path / "device")}))
            assert cli.info("v")["state"] == "crashed", pid
            assert "crashed" in one_line(cli.run("volume", "rm", "v", check=False)), pid
            cli.run("volume", "detach", "v")
            assert not record.exists() and unrelated.poll() is None, pid
    finally:
        unrelated.kill()
        unrelated.wait()
    assert cli.info("v")["state"] == "detached"


@needs_fuse
def test_an_engine_record_left_by_a_reboot_is_cleaned_up_by_the_next_attach(
    cli: Cli, tmp_path: Path
) -> None:
    """After a reboot the pid of ``engine.json`` may belong to a live process that is not the
    engine: ``volume attach`` (and ``lhfs mount``) take the volume for crashed and clean up,
    as ``volume detach`` does, instead of "already attached"; the process is not touched."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    unrelated = subprocess.Popen(["sleep", "600"])  # (a live process that is no engine)
    try:
        record = cli.root / "volumes" / "v" / "engine.json"
        record.write_text(json.dumps({"pid": unrelated.pid, "device": str(tmp_path / "old")}))
        cli.run("volume", "attach", "v", "--device", str(tmp_path / "device"))
        assert cli.info("v")["state"] == "healthy" and unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()
    # Damaged while its engine serves: the engine lock says which process it is (taken for
    # dead, the engine lost its device and record and could be reached no more).
    engine = json.loads(record.read_text())["pid"]
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": "x"}))
    assert cli.info("v")["state"] == "healthy" and cli.info("v")["pid"] == engine
    cli.run("volume", "detach", "v")
    assert not alive(engine) and cli.info("v")["state"] == "detached"


def test_a_damaged_filesystem_record_is_refused_never_taken_for_none(
    cli: Cli, tmp_path: Path
) -> None:
    """``filesystem.json`` damaged: ``lhfs mount`` refuses in one line naming it, before it
    attaches or formats anything (no record would mean "never formatted"); ``volume info``
    and ``ls`` show the error in its place and the rest of the volume as ever."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    record = cli.root / "volumes" / "v" / "filesystem.json"
    (tmp_path / "mnt").mkdir()
    for content in ("garbage{", "[]", '{"type": "ext4"}'):
        record.write_text(content)
        before = files(cli.root / "volumes")
        line = one_line(cli.run("mount", "v", str(tmp_path / "mnt"), check=False))
        assert f"{record}" in line, (content, line)
        shown = cli.json("volume", "info", "v")
        assert shown["state"] == "detached" and str(record) in shown["filesystem"]["error"]
        assert "file system record damaged" in cli.run("volume", "info", "v").stdout
        assert files(cli.root / "volumes") == before, content
    assert cli.json("volume", "ls")[0]["filesystem"]["error"]


def test_damaged_dr_files_are_one_line_and_start_no_follower(cli: Cli) -> None:
    """A standby's ``dr-state.json`` damaged: ``dr status`` and ``dr start`` refuse in one
    line naming it (no follower is started to retry it for ever); ``dr-status.json`` with a
    pid that is not one is a follower that does not run; a damaged ``dr`` section of the
    configuration is named field by field."""
    cli.run("volume", "create", "s", "--size", "1M", "--replicas", "1")
    directory = cli.root / "volumes" / "s"
    config = json.loads((directory / "config.json").read_text())
    dr = {
        "target": "s3://nowhere/p", "volume": "src", "interval": 60, "retry_max": 600,
        "created": time.time(),
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps({**config, "dr": dr}))
    (directory / "dr-status.json").write_text('{"pid": "77", "current_at": "x"}')
    assert cli.json("dr", "status", "s")["state"] == "stopped"
    state = directory / "dr-state.json"
    for content, field in (
        ("[]", "not a JSON object"),
        ("{}", "size"),
        ('{"backup": 5}', "backup"),
    ):
        state.write_text(content)
        for verb in ("status", "start") if content == "[]" else ("status",):
            line = one_line(cli.run("dr", verb, "s", check=False))
            assert str(state) in line and field in line, (content, line)
    assert not (directory / "dr.log").exists()  # (no follower was started)
    state.unlink()
    for section, field in (("x", "dr must be an object"), ({**dr, "target": 5}, "dr.target")):
        (directory / "config.json").write_text(json.dumps({**config, "dr": section}))
        line = one_line(cli.run("dr", "status", "s", check=False))
        assert str(directory / "config.json") in line and field in line, line


def test_damaged_backing_image_records_are_shown_and_removable(cli: Cli, tmp_path: Path) -> None:
    """A backing image's record damaged: ``ls`` shows it damaged, a volume made from it is
    refused in one line, ``rm`` removes it; a create's temporary file left by a killed
    process is cleared by the next ``ls``."""
    source = tmp_path / "image.raw"
    source.write_bytes(os.urandom(MIB))
    cli.run("backing-image", "create", "bi", "--from", str(source))
    base = cli.root / "backing-images"
    left = base / f".bi.img.{_reaped()}.tmp"  # (a create killed half-way)
    older = base / ".bi.img.tmp"  # (one of an older lhfs, which had no pid in it)
    running = base / f".other.img.{os.getpid()}.tmp"  # (a create under way: kept)
    for part in (left, older, running):
        part.write_bytes(b"part")
    for content, field in (
        ("garbage", "damaged"), ("[]", "not a JSON object"), ("{}", "file"),
        ('{"id": 5, "file": "bi.img"}', "id"),
    ):  # fmt: skip
        (base / "bi.json").write_text(content)
        (shown,) = cli.json("backing-image", "ls")
        assert shown["name"] == "bi" and field in shown["error"], shown
        assert not left.exists() and not older.exists() and running.exists()
        create = cli.run(
            "volume", "create", "v", "--size", "1M", "--backing-image", "bi", check=False
        )
        line = one_line(create)
        assert str(base / "bi.json") in line and field in line, line
    assert "damaged" in cli.run("backing-image", "ls").stdout.splitlines()[1]
    assert not (cli.root / "volumes" / "v").exists()
    cli.run("backing-image", "rm", "bi")
    assert sorted(p.name for p in base.iterdir()) == [running.name]


def test_two_creates_of_one_backing_image_name_never_mix(cli: Cli, tmp_path: Path) -> None:
    """Two ``backing-image create`` of one name at once: one makes it, the other is refused
    in one line, and the record's id is that of the file registered, which holds the bytes of
    the source the winner was given (they shared one temporary file before)."""
    sources = [tmp_path / "a.raw", tmp_path / "b.raw"]
    for source in sources:
        source.write_bytes(os.urandom(8 * MIB))
    procs = [
        cli.start("backing-image", "create", "same", "--from", str(s), "--json") for s in sources
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    won = [i for i, p in enumerate(procs) if p.returncode == 0]
    assert len(won) == 1, outs
    lost = procs[1 - won[0]]
    line = one_line(
        subprocess.CompletedProcess(lost.args, lost.returncode, "", outs[1 - won[0]][1])
    )
    assert "being created by another command" in line or "already exists" in line, line
    said = json.loads(outs[won[0]][0])
    base = cli.root / "backing-images"
    assert json.loads((base / "same.json").read_text())["id"] == said["id"]
    assert (base / "same.img").read_bytes() == sources[won[0]].read_bytes()
    assert sorted(p.name for p in base.iterdir()) == ["same.img", "same.json"]


def test_lock_files_that_are_no_files_are_one_line(cli: Cli, tmp_path: Path) -> None:
    """A symbolic link or a directory in place of a lock file is refused in one line naming
    it (never followed: the link's target is not created), whichever lock it is."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    directory = cli.root / "volumes" / "v"
    elsewhere = tmp_path / "elsewhere"
    cases = [
        ("config.lock", ("volume", "set", "v", "--io-timeout", "9")),
        ("command.lock", ("volume", "detach", "v")),
    ]
    for lock, command in cases:
        path = directory / lock
        path.unlink(missing_ok=True)
        for what in ("a symbolic link", "a directory"):
            path.symlink_to(elsewhere) if what == "a symbolic link" else path.mkdir()
            line = one_line(cli.run(*command, check=False))
            assert line == f"lhfs: error: lock file {path} is {what}: remove it", line
            assert not elsewhere.exists()
            path.unlink() if path.is_symlink() else path.rmdir()


def test_a_busy_lock_names_its_holder_only_while_it_lives(tmp_path: Path) -> None:
    """A lock held by a process that did not write its pid (a child of a holder that died)
    keeps the dead holder's pid in the file: ``Busy`` names no pid then, never a dead one."""
    path = tmp_path / "command.lock"
    path.write_text(f"{_reaped()}\n")
    holding = "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(1)"
    holder = subprocess.Popen(
        [sys.executable, "-c", holding + "; sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "1\n"
        with pytest.raises(Busy) as refused:
            locks.take(path, 0, "busy")
        assert str(refused.value) == "busy"
        path.write_text(f"{holder.pid}\n")
        with pytest.raises(Busy) as refused:
            locks.take(path, 0, "busy")
        assert str(refused.value) == f"busy (pid {holder.pid})"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_file_removed_while_waited_for_is_not_taken_for_held(tmp_path: Path) -> None:
    """A command waiting for a volume's lock while the volume is removed (its lock file with
    it) must not go on as if it held the lock on the file there now, which nobody else sees:
    it waits on the file at the path, and gets that one."""
    path = tmp_path / "command.lock"
    first = locks.take(path, 0, "busy")
    got: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: got.update(fd=locks.take(path, 30, "busy")))
    waiter.start()

    def opened() -> int:  # descriptors of this process on the lock file, removed or not
        found = 0
        for fd in list(Path("/proc/self/fd").iterdir()):
            with contextlib.suppress(OSError):  # (the listing's own, closed since)
                found += os.readlink(fd).removesuffix(" (deleted)") == str(path)
        return found

    wait_for(lambda: opened() >= 2, 30, "the waiter to open the lock file")
    path.unlink()
    os.close(first)  # (the waiter's flock now succeeds, on the removed file)
    waiter.join(30)
    try:
        assert os.fstat(got["fd"]).st_ino == path.stat().st_ino
    finally:
        os.close(got["fd"])


def test_a_damaged_replica_identity_is_replaced_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica directory's ``id`` file holding garbage gets a new identity, and the log says
    the old one was damaged (the replica is a new member to its engines: whoever looks finds
    why)."""
    (tmp_path / "id").write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="lhfs.replica"):
        uid = directory_id(tmp_path)
    assert (tmp_path / "id").read_text() == f"{uid}\n"
    assert f"the identity file {tmp_path / 'id'} was damaged" in caplog.text, caplog.text
    assert directory_id(tmp_path) == uid


def test_a_recorded_pid_now_of_another_process_is_not_taken_for_lhfs(cli: Cli) -> None:
    """A restore's mark and a backup's hold keep the pid of an lhfs command; after a reboot
    the number may name any process. Such a one is no restore nor backup: the volume shows
    its restore interrupted and ``volume rm`` removes it (it was refused for good, naming the
    unrelated process as the one to stop)."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        for mark in (
            {"restoring": {"backup": "s3://b/p?volume=v&backup=x", "pid": unrelated.pid}},
            {"snapshot_holds": {"s1": unrelated.pid}},
        ):
            volumes.load(cli.root, "v").update(lambda config, mark=mark: config.update(mark))
            if "restoring" in mark:
                assert cli.info("v")["restoring"]["interrupted"] is True
            else:
                held = cli.run("volume", "rm", "v", "--json", check=False)
                assert held.returncode == 0, held.stderr
    finally:
        unrelated.kill()
        unrelated.wait()
    assert "v" not in volumes.list_names(cli.root)
