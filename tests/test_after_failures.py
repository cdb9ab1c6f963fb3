"""What failures leave, and what is said of them: a failed backup's snapshot, a replica added
and never built, a remote replica's damaged identity file, a replica's warnings about
strangers of several kinds in one minute."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from urllib.parse import urlparse

from conftest import needs_fuse

from backupstore.s3 import Bucket, StoreRefused, Target
from backupstore.store import BackupStore
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, write_direct
from lhfs.wire import protocol as p
from lhfs.wire.client import parse_address
from tools.faultproxy import FaultProxy

MIB = 1 << 20


def _handshake_once(address: str, hello: bytes) -> None:
    """Send ``hello`` to a replica and wait until it closes the connection (it has logged
    whatever it logs about it by then)."""
    with socket.create_connection(parse_address(address), timeout=10) as sock:
        sock.sendall(hello)
        while sock.recv(4096):
            pass


def test_handshake_failures_are_logged_a_line_a_minute_per_kind(
    tmp_path: Path, replica_factory
) -> None:
    """Failed handshakes from one source are logged a line a minute per kind: a second kind in
    the same minute is said (it was held back behind the first), a second of a kind is not."""
    replica = replica_factory(tmp_path / "r")
    lines = lambda: [  # noqa: E731
        line for line in replica.log.read_text().splitlines() if "during the handshake" in line
    ]
    _handshake_once(replica.address, b"HTTP/1")
    wait_for(lambda: len(lines()) == 1, 10, "the first failed handshake to be logged")
    _handshake_once(replica.address, b"GET / ")
    other = p.HELLO.pack(p.MAGIC, p.VERSION, b"\x01" * 16, bytes(32))
    _handshake_once(replica.address, other)
    wait_for(lambda: len(lines()) == 2, 10, "the other kind to be logged")
    said = lines()
    assert "not an lhfs client" in said[0] and "another volume" in said[1], said


def test_a_failed_backup_removes_the_snapshot_it_took(cli: Cli, s3_endpoint: str) -> None:
    """A backup whose store goes away once it has taken its snapshot fails in one line and
    removes that snapshot (it stayed in the chain until housekeeping trimmed it): nothing of
    it is left in the volume, no hold, no removal under way."""
    cli.run("volume", "create", "v", "--size", "8M", "--replicas", "1")
    vol = volumes.load(cli.root, "v")
    with ChunkStore.open(vol.replica_dir(vol.replicas[0])) as chunks:
        chunks.write(0, random.Random(1).randbytes(8 * MIB))
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 2000  # (bytes/s of answers: the backup is still under way when it is cut)
    target = "s3://failed-snapshot/p"
    store = BackupStore(Bucket(Target.parse(target)))
    args = ("backup", "create", "v", "--target", target, "--create-bucket", "--quiet")
    backup = Cli(cli.root, {"AWS_ENDPOINT_URL": proxy.endpoint}).start(
        *args, "--block-size", "1M", "--retry-timeout", "2"
    )

    def running() -> bool:
        try:
            return any(b["state"] == "in_progress" for b in store.list("v"))
        except StoreRefused:  # (no bucket yet)
            return False

    try:
        wait_for(lambda: running() or backup.poll() is not None, 60, "the backup to run")
        assert backup.poll() is None, "the backup ended before its store went away"
        proxy.cut()
        _, err = backup.communicate(timeout=60)
    finally:
        if backup.poll() is None:
            backup.kill()
        proxy.close()
    assert backup.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("lhfs: error: backup of v failed: ") and "snapshot" not in err, err
    config = volumes.load(cli.root, "v").config
    assert not config.get("snapshot_holds") and not config.get("removing"), config
    assert [s["name"] for s in cli.json("snapshot", "ls", "v")] == [], "the snapshot stayed"


@needs_fuse
def test_an_added_replica_refused_by_its_target_is_given_back_by_the_next_engine(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A replica added but never built (its engine stopped before its first rebuild: the
    configuration records it ``unbuilt``) whose target refuses that rebuild (a directory not
    empty) is given back by whichever engine attaches next, as by the one that added it: it
    was an ordinary failed replica there, tried again until the rejoin limit."""
    cli.run("volume", "create", "v", "--size", "8M", "--replicas", "1")
    cli.run("volume", "key", "v", "--out", str(tmp_path / "v.key"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a replica")
    served = replica_factory(junk, tmp_path / "v.key")

    def added(config: dict) -> None:  # (as ``replica add`` records it before its rebuild)
        config["replicas"].append(
            {
                "id": "r2",
                "local": False,
                "address": served.address,
                "mode": "ERR",
                "error": "being added",
                "tls_ca": None,
                "unbuilt": True,
            }
        )
        config["next_replica"] = 3

    volumes.load(cli.root, "v").update(added)
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))

    def given_back() -> bool:  # (its id too: given back by a second update of the record)
        config = volumes.load(cli.root, "v").config
        return [r["id"] for r in config["replicas"]] == ["r1"] and config["next_replica"] == 2

    wait_for(given_back, 20, "the added replica and its id to be given back")
    assert "replica r2 is given back: rebuild failed" in cli.engine_log("v")
    assert (junk / "notes.txt").read_text() == "not a replica"
    assert cli.live("v")["state"] == "healthy"
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_remote_replica_whose_id_is_damaged_says_so_and_is_replaced(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """A replica served for an engine on another host whose ``id`` file is damaged refuses to
    start, in one line naming the file and the commands that replace it, and changes nothing
    (it took a new identity and was a stranger to its engine for good, with nothing said to
    it). The way back it names works: the file removed, the directory served again, ``replica
    rm`` and ``replica add`` make it a healthy replica."""
    cli.run("volume", "create", "v", "--size", "8M", "--replicas", "1")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    key = tmp_path / "v.key"
    cli.run("volume", "key", "v", "--out", str(key))
    far = serve(tmp_path / "far", key)
    cli.run("replica", "add", "v", "--address", far.address, "--quiet")
    far.stop()
    (far.dir / "id").write_text("garbage\n")
    args = ("replica", "serve", "--dir", str(far.dir), "--listen", far.address)
    line = one_line(cli.run(*args, "--key-file", str(key), check=False, timeout=30), 1)
    assert f"{far.dir / 'id'}, this replica directory's identity, is damaged" in line, line
    assert "'lhfs replica rm v ID'" in line and "'lhfs replica add v --address" in line, line
    assert (far.dir / "id").read_text() == "garbage\n"
    (far.dir / "id").unlink()
    again = serve(far.dir, key, port=parse_address(far.address)[1])
    cli.run("replica", "rm", "v", "r2")
    cli.run("replica", "add", "v", "--address", again.address, "--quiet")
    modes = [r["mode"] for r in cli.live("v")["replicas"]]
    assert cli.live("v")["state"] == "healthy" and modes == ["RW", "RW"], cli.live("v")
    cli.run("volume", "detach", "v")


@needs_fuse
def test_replica_accept_of_a_replica_that_is_no_older_copy_is_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """``replica accept`` of a local replica that holds its recorded revision (a typo of the
    replica's id, a volume that was never refused) is refused, naming both revisions, and the
    record stays: it answered "given up" and turned the older-copy check off for it."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    write_direct(tmp_path / "v.dev", 0, bytes(range(256)) * 16)
    cli.run("volume", "detach", "v")
    path = cli.root / "volumes" / "v" / "config.json"
    before = path.read_bytes()
    line = one_line(cli.run("replica", "accept", "v", "r1", check=False), 1)
    assert "replica r1 of v holds revision" in line and "it is no older copy" in line, line
    assert path.read_bytes() == before
