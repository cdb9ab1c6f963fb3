"""What an operator sees when something went wrong: damaged system records, markers and
scratch files of killed commands, holders of a loop device, replicas the engine has as ERR,
and messages that say what is true (against a real S3 server where a store is involved)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import needs_fuse

from backupstore import systems
from backupstore.s3 import Bucket, Endpoint, StoreUnavailable, Target
from backupstore.store import BackupStore, writer
from lhfs.core.procs import wait_for
from lhfs.testing import Cli
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


def _flip(bucket: Bucket, key: str) -> None:
    """Damage an object as a tester would: read it, flip a byte, put it back."""
    found = bucket.get(key)
    assert found is not None
    data = bytearray(found[0])
    data[len(data) // 2] ^= 0x01
    bucket.put(key, bytes(data))


def _after(bucket: Bucket, key: str) -> None:
    """Wait until the server's clock has passed the time of ``key`` (its times may be whole
    seconds): what is written next is later by that clock."""
    probe = key + ".probe"

    def later() -> bool:
        bucket.put(probe, b"")
        return bucket.modified(probe) > bucket.modified(key)

    wait_for(later, 10, f"the store's clock to pass {key}")
    bucket.delete(probe)


def _backups(store: BackupStore, volume: str, *names: str) -> None:
    """Small backups of ``volume`` made by the store's own code (no volume to attach)."""
    for name in names:
        data = name.encode() * 1000
        store.create(
            volume,
            name,
            MIB,
            lambda index, block_size, data=data: data + bytes(block_size - len(data)),
            block_size=MIB,
            extra={"chunk_size": 64 << 10},
        )


def _record(store: BackupStore, name: str, parts: dict[str, str]) -> None:
    systems.put(
        store,
        {
            "format": 1,
            "name": name,
            "created": "2026-12-05T00:00:00Z",
            "started": 0.0,
            "volumes": {v: {"backup": b, "replicas": 1} for v, b in parts.items()},
            "images": {},
            "skipped": {},
        },
    )


def test_a_damaged_system_record_is_listed_removable_and_blocks_only_what_it_may_name(
    cli: Cli, s3_endpoint: str
) -> None:
    """A system record with a byte flipped is listed ``damaged`` and found by ``backup
    check`` (exit 3); ``backup rm`` and prune hold only the backups it may name (written
    before it), saying why; ``system rm`` of another system backup finishes (it deleted that
    record, then failed), and of the damaged one removes it. A part deleted by hand makes its
    system backup damaged, not complete."""
    target = "s3://ops-systems/p"
    bucket = Bucket(Target.parse(target))
    bucket.ensure(create=True)
    store = BackupStore(bucket)
    _backups(store, "v", "b1", "b2")
    _record(store, "sysA", {"v": "b1"})
    _record(store, "sysB", {"v": "b2"})
    sys_a = Target.parse(target).key("systems/sysA.json")
    _flip(bucket, sys_a)  # (rewritten: its time is now that of the damage)
    _after(bucket, sys_a)
    _backups(store, "v", "b3", "b4")

    listed = {s["name"]: s for s in cli.json("system", "ls", "--target", target)}
    assert listed["sysA"]["state"] == "damaged" and listed["sysA"]["parts"] is None
    assert "systems/sysA.json fails authentication" in listed["sysA"]["reason"]
    assert listed["sysB"]["state"] == "complete"
    shown = cli.run("system", "ls", "--target", target).stdout
    assert "damaged" in shown and f"system rm {target}?system=sysA" in shown

    checked = cli.run("backup", "check", "--target", target, check=False)
    assert checked.returncode == 3, checked
    assert "system backup sysA: systems/sysA.json fails authentication" in checked.stdout

    pruned = cli.json(
        "backup", "prune", "--target", target, "--volume", "v", "--keep-last", "1", "--dry-run"
    )  # fmt: skip
    kept = {k["name"]: " ".join(k["reasons"]) for k in pruned["kept"]}
    assert "system backup sysA, whose record cannot be read" in kept["b1"]
    assert [r["name"] for r in pruned["removed"]] == ["b3"]  # (written after it: free)

    refused = cli.run("backup", "rm", f"{target}?volume=v&backup=b1", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "may be part of system backup sysA" in refused.stderr
    cli.run("backup", "rm", f"{target}?volume=v&backup=b3")
    assert store.complete_names("v") == ["b1", "b2", "b4"]

    # sysB's part was written before sysA's record: kept, and said; sysB's record goes
    done = cli.json("system", "rm", f"{target}?system=sysB")
    assert done["removed_backups"] == [] and done["damaged"] is None
    assert done["kept_backups"] == [{"backup": "v/b2", "system": "sysA"}]
    assert not systems.exists(store, "sysB")
    gone = cli.run("system", "rm", f"{target}?system=sysA")
    assert gone.returncode == 0 and "could not be read" in gone.stdout
    assert cli.json("system", "ls", "--target", target) == []
    assert sorted(store.complete_names("v")) == ["b1", "b2", "b4"]  # (ordinary backups now)
    cli.run("backup", "rm", f"{target}?volume=v&backup=b1")

    # a part deleted by hand: its system backup is damaged, and check says so
    _record(store, "sysC", {"v": "b4"})
    store.forget("v", "b4")
    listed = cli.json("system", "ls", "--target", target)
    assert [(s["name"], s["state"]) for s in listed] == [("sysC", "damaged")]
    assert "backup b4 of v are missing" in listed[0]["reason"]
    checked = cli.run("backup", "check", "--target", target, check=False)
    assert checked.returncode == 3 and "system backup sysC: its part(s)" in checked.stdout
    assert json.loads(cli.run("backup", "check", "--target", target, "--json", check=False).stdout)[
        "problems"
    ]


def test_a_dead_system_backups_marker_is_taken_over_at_once(cli: Cli, s3_endpoint: str) -> None:
    """The marker of a system backup killed on this host (its pid gone, same boot and PID
    namespace) is taken over by a rerun at once, as every other marker is judged dead; until
    then ``system rm`` names ``backup gc``. One whose owner lives is refused, saying when it
    expires and what removes it."""
    target = "s3://ops-markers/p"
    bucket = Bucket(Target.parse(target))
    bucket.ensure(create=True)
    key = Target.parse(target).key("systems/sysK2.running")
    # (a pid no process can have: one of an ended process may be taken again meanwhile)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    body = {"started": time.time(), **writer(), "pid": dead, "owner": "killed"}
    bucket.put(key, json.dumps(body).encode())
    listed = cli.json("system", "ls", "--target", target)
    assert [(s["name"], s["state"]) for s in listed] == [("sysK2", "interrupted")]
    refused = cli.run("system", "rm", f"{target}?system=sysK2", check=False)
    assert refused.returncode == 1 and "'lhfs backup gc --target" in refused.stderr

    done = cli.json("system", "backup", "--target", target, "--name", "sysK2")
    assert done["name"] == "sysK2"
    assert [s["state"] for s in cli.json("system", "ls", "--target", target)] == ["complete"]

    bucket.put(key.replace("sysK2", "sysK3"), json.dumps({**body, "pid": os.getpid()}).encode())
    busy = cli.run("system", "backup", "--target", target, "--name", "sysK3", check=False)
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1
    assert "is under way" in busy.stderr and "expires in" in busy.stderr
    assert "'lhfs backup gc' removes it" in busy.stderr


def test_umount_names_the_processes_of_another_mount_namespace_holding_the_loop_device(
    cli: Cli, tmp_path: Path
) -> None:
    """A process started in its own mount namespace while the file system was mounted keeps
    a copy of the mount: ``lhfs umount`` unmounts here, then says which processes hold the
    loop device and that it goes when they end, never ``losetup -d`` (autoclear is set
    already). ``volume detach --force`` then says each thing it did once."""
    cli.run("volume", "create", "fsv", "--size", "32M", "--replicas", "1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "fsv", str(mnt))
    own = os.readlink("/proc/self/ns/mnt")
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "120"])
    try:
        wait_for(
            lambda: (
                os.readlink(f"/proc/{holder.pid}/ns/mnt") != own
                and str(mnt) in Path(f"/proc/{holder.pid}/mountinfo").read_text()
            ),
            10,
            "the other mount namespace",
        )
        refused = cli.run("umount", str(mnt), check=False, timeout=60)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"unmounted {mnt} here; fsv stays attached" in refused.stderr
        assert f"process(es) {holder.pid} (sleep)" in refused.stderr
        assert "freed when they end or unmount it" in refused.stderr
        assert "losetup -d" not in refused.stderr
        loop = cli.info("fsv")["loop"]
        assert Path(f"/sys/block/{Path(loop).name}/loop/autoclear").read_text().strip() == "1"

        forced = cli.json("volume", "detach", "fsv", "--force")
        assert len(forced["cleaned"]) == len(set(forced["cleaned"])), forced["cleaned"]
        assert not any(c == f"freed {loop}" for c in forced["cleaned"]), forced["cleaned"]
    finally:
        holder.kill()
        holder.wait()
    wait_for(
        lambda: (
            not Path(f"/sys/block/{Path(loop).name}/loop").exists()
            or not (Path(f"/sys/block/{Path(loop).name}/loop/backing_file").exists())
        ),
        20,
        "the loop device to be freed",
    )


def test_a_mount_grows_an_ext4_by_any_growth(cli: Cli, tmp_path: Path) -> None:
    """An unmounted ext4 volume expanded by 8 MiB (less than the 16 MiB a mount once
    ignored) is grown by the next ``lhfs mount``, as ``volume expand`` says."""
    cli.run("volume", "create", "g", "--size", "64M", "--replicas", "1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "g", str(mnt))
    before = os.statvfs(mnt)
    cli.run("umount", str(mnt))
    expanded = cli.run("volume", "expand", "g", "--size", "72M").stdout
    assert "its ext4 file system grows at its next 'lhfs mount'" in expanded
    mounted = cli.json("mount", "g", str(mnt))
    try:
        assert mounted["grown"] is True
        after = os.statvfs(mnt)
        grown = (after.f_blocks * after.f_frsize) - (before.f_blocks * before.f_frsize)
        assert grown > 7 * MIB, grown
    finally:
        cli.run("umount", str(mnt))
    again = cli.json("mount", "g", str(mnt))  # (nothing more to grow: said so)
    cli.run("umount", str(mnt))
    assert again["grown"] is False


def test_doctor_says_what_the_engine_has_a_local_replica_as(cli: Cli, tmp_path: Path) -> None:
    """A local replica whose directory another ``replica serve`` holds cannot start: the
    engine has it ERR, and doctor says so (it said ``ok``: the directory is in place)."""
    cli.run("volume", "create", "d", "--size", "16M", "--replicas", "2")
    second = cli.info("d")["replicas"][1]
    directory = cli.root / "volumes" / "d" / "replicas" / second["id"]
    assert (directory / "volume.json").exists(), list(directory.parent.iterdir())
    key = tmp_path / "d.key"
    cli.run("volume", "key", "d", "--out", str(key))
    holder = cli.start(
        "replica", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0",
        "--key-file", str(key),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and "serving" in holder.stdout.readline()
        cli.run("volume", "attach", "d", "--device", str(tmp_path / "d.dev"))
        wait_for(lambda: cli.replica("d", second["id"])["mode"] == "ERR", 30, "the replica to fail")
        checks = cli.run("doctor", "d", "--json", check=False)
        found = next(
            c for c in json.loads(checks.stdout) if c["check"] == f"replica {second['id']}"
        )
        assert found["status"] == "warn", found
        assert "but the engine has it failed: " in found["detail"], found
    finally:
        holder.terminate()
        holder.wait(30)


def test_a_detached_volume_of_remote_replicas_lists_its_snapshots_and_rm_says_what_is_left(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """Detached, with every replica remote: ``snapshot ls`` reads them from a remote
    replica (it said "no snapshots"), and with none answering refuses (exit 1), never an
    empty list. ``volume rm`` says the remote replica's process and directory still hold
    the data."""
    cli.run("volume", "create", "t1", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "t1", "--device", str(tmp_path / "t1.dev"))
    for name in ("s1", "s2", "s3"):
        cli.run("snapshot", "create", "t1", name)
    key = tmp_path / "t1.key"
    cli.run("volume", "key", "t1", "--out", str(key))
    remote = replica_factory(tmp_path / "remote", key)
    far = cli.run("replica", "add", "t1", "--address", remote.address).stdout.split()[2]
    cli.run("replica", "rm", "t1", "r1")
    cli.run("volume", "detach", "t1")

    listed = cli.json("snapshot", "ls", "t1")  # (and the rebuild's own snapshot)
    assert [s["name"] for s in listed if not s["name"].startswith("rebuild-")] == ["s1", "s2", "s3"]
    assert "s3" in cli.run("snapshot", "ls", "t1").stdout
    assert remote.stop() == 0
    refused = cli.run("snapshot", "ls", "t1", "--json", check=False)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert "cannot be listed while it is detached" in refused.stderr
    assert refused.stderr.count("\n") == 1

    removed = cli.run("volume", "rm", "t1")
    assert f"remote replica(s) {far} at {remote.address} still hold its data" in removed.stdout
    assert "'lhfs replica serve' processes and directories are yours" in removed.stdout


def test_the_scratch_file_of_a_system_restore_killed_during_an_image_is_cleared(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A ``system restore`` SIGKILLed while it writes a backing image leaves its image-sized
    scratch file under the root: ``backing-image ls`` (and the next restore) clears it once
    its process is gone, and the rerun restores the image."""
    target = "s3://ops-scratch/p"
    raw = tmp_path / "bi1.raw"
    raw.write_bytes(os.urandom(4 * MIB))
    cli.run("backing-image", "create", "bi1", "--from", str(raw))
    url = cli.json("system", "backup", "--target", target, "--name", "s1", "--create-bucket")["url"]
    other = Cli(tmp_path / "root2")
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # (killed while it writes the image)
    try:
        restore = Cli(other.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}).start(
            "system", "restore", url, "--quiet"
        )
        wait_for(
            lambda: any(other.root.glob(".restore-image-*")), 60, "the restore to write the image"
        )
        restore.kill()
        restore.wait(30)
    finally:
        proxy.close()
    assert list(other.root.glob(".restore-image-bi1*"))  # (what a kill leaves)
    assert other.json("backing-image", "ls") == []
    assert not list(other.root.glob(".restore-image-*"))
    done = other.json("system", "restore", url, "--quiet")
    assert done["images"] == ["bi1"]
    assert [i["name"] for i in other.json("backing-image", "ls")] == ["bi1"]


def test_system_restore_with_an_empty_volume_list_says_it_is_empty(cli: Cli) -> None:
    """``--volumes ""`` is an empty list, not a volume named twice."""
    result = cli.run("system", "restore", "s3://bucket/p?system=s", "--volumes", "", check=False)
    assert result.returncode == 2
    assert result.stderr == (
        "lhfs: error: --volumes is empty: name the volumes to restore (VOL1,VOL2,...)\n"
    )


def test_backing_image_ls_marks_a_modified_file_and_rm_names_only_its_own_volumes(
    cli: Cli, tmp_path: Path
) -> None:
    """``backing-image ls`` marks an image whose registered file was written since (it
    showed nothing); ``rm`` lists the volumes made from that image only, not those made
    from another image or a raw file of the same content."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(os.urandom(MIB))
    cli.run("backing-image", "create", "one", "--from", str(raw))
    cli.run("backing-image", "create", "two", "--from", str(raw))  # (the same content)
    cli.run("volume", "create", "from-one", "--size", "4M", "--replicas", "1",
            "--backing-image", "one")  # fmt: skip
    cli.run("volume", "create", "from-two", "--size", "4M", "--replicas", "1",
            "--backing-image", "two")  # fmt: skip
    cli.run("volume", "create", "from-raw", "--size", "4M", "--replicas", "1",
            "--backing-image", str(raw))  # fmt: skip
    listed = {i["name"]: i for i in cli.json("backing-image", "ls")}
    assert listed["one"]["changed"] is False and listed["two"]["changed"] is False
    registered = Path(listed["one"]["path"])
    with open(registered, "r+b") as f:
        f.write(b"changed")
    listed = {i["name"]: i for i in cli.json("backing-image", "ls")}
    # (one content is kept once: both names are that one file)
    assert listed["one"]["changed"] is True and listed["two"]["changed"] is True
    shown = {line.split()[0]: line for line in cli.run("backing-image", "ls").stdout.splitlines()}
    assert "modified since it was registered" in shown["one"]

    removed = cli.json("backing-image", "rm", "two")
    assert removed["volumes"] == ["from-two"]


def test_a_delete_a_frozen_store_did_not_answer_is_not_said_undone(s3_endpoint: str) -> None:
    """A DELETE that a frozen store did not answer may land later (it did): the failure says
    it was not confirmed, never that the object stays (an offline activation and ``volume
    rm`` of a standby said its marker stays, when it was deleted)."""
    target = Target.parse("s3://ops-frozen/p")
    Bucket(target).ensure(create=True)
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    try:
        endpoint = Endpoint.from_env()
        bucket = Bucket(target, deadline=1.0, endpoint=replace(endpoint, url=proxy.endpoint))
        key = target.key("marker")
        bucket.put(key, b"x")
        proxy.delay = 11.0  # (past the 10 s a request waits: the DELETE is passed on after)
        proxy.schedule(["delay"])
        with pytest.raises(StoreUnavailable) as failed:
            bucket.delete(key)
        assert "did not answer DELETE p/marker" in str(failed.value)
        assert "it may have been done all the same (not confirmed)" in str(failed.value)
        wait_for(lambda: not Bucket(target).exists(key), 10, "the late DELETE to land")
    finally:
        proxy.close()


def test_a_mounted_volume_whose_engine_is_stopped_is_refused_at_once(
    cli: Cli, tmp_path: Path
) -> None:
    """``umount`` of a volume whose engine is stopped (SIGSTOP) waited in the kernel for
    ever (the file system's last writes to a device nothing answers), past any timeout; and
    ``volume set`` changed the configuration, then failed. Both refuse at once now, nothing
    changed; ``umount --force`` kills the engine and lets go. A mount point given by a link is
    the place it leads to: mounted twice through it, the second finds the first."""
    mnt, link = tmp_path / "mnt", tmp_path / "link"
    mnt.mkdir()
    link.symlink_to(mnt)
    cli.run("volume", "create", "s", "--size", "64M", "--replicas", "1")
    said = cli.run("mount", "s", str(link)).stdout
    assert str(mnt) in said, said
    cli.run("mount", "s", str(link))  # (the same place again: nothing to do)
    (mnt / "f").write_bytes(b"kept")
    os.sync()
    pid = cli.info("s")["pid"]
    config = (cli.root / "volumes" / "s" / "config.json").read_text()
    os.kill(pid, 19)  # SIGSTOP
    try:
        for args in (["umount", str(mnt)], ["volume", "set", "s", "--io-timeout", "4"]):
            began = time.monotonic()
            result = cli.run(*args, check=False, timeout=60)
            assert result.returncode == 1 and time.monotonic() - began < 10, result.stderr
            assert f"(pid {pid}) is stopped: 'kill -CONT {pid}'" in result.stderr, result.stderr
        assert (cli.root / "volumes" / "s" / "config.json").read_text() == config
        assert os.path.ismount(mnt)
        forced = cli.run("umount", str(mnt), "--force", timeout=60)
        assert forced.returncode == 0, forced.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone, if --force killed it)
            os.kill(pid, 18)  # SIGCONT
    assert not os.path.ismount(mnt) and cli.info("s")["state"] == "detached"
    cli.run("mount", "s", str(mnt))
    assert (mnt / "f").read_bytes() == b"kept"
    subprocess.run(["umount", str(mnt)], check=True)  # (an 'lhfs umount' cut short, as it were)
    rerun = cli.run("umount", str(mnt), check=False)
    assert rerun.returncode == 1 and "'lhfs volume detach s' lets go" in rerun.stderr, rerun
    cli.run("volume", "detach", "s")


def test_mount_says_where_metrics_are_served_and_never_drops_them_silently(
    cli: Cli, tmp_path: Path
) -> None:
    """``lhfs mount --metrics`` of a volume already attached took nothing (its engine was
    started without them) and said nothing: refused now, naming what the engine serves;
    a mount that starts the engine says where its metrics are."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "m", "--size", "32M", "--replicas", "1")
    cli.run("volume", "attach", "m", "--device", str(tmp_path / "m.dev"))
    refused = cli.run("mount", "m", str(mnt), "--metrics", "127.0.0.1:0", check=False)
    assert refused.returncode == 1 and "its engine serves none" in refused.stderr, refused
    assert not os.path.ismount(mnt)
    cli.run("volume", "detach", "m")
    said = cli.run("mount", "m", str(mnt), "--metrics", "127.0.0.1:0").stdout
    assert "; metrics on http://127.0.0.1:" in said, said
    assert cli.json("mount", "m", str(mnt))["metrics"] == cli.info("m")["metrics"]
    cli.run("umount", str(mnt))
