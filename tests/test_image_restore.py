"""Restores against a real S3 server. A volume's backup records the backing image it was made
on, by content id: ``backup restore`` and a DR standby put the volume back on the root's image
of that content, holding only what differs from it, else restore it whole and say why. A
system restore under way says what it is, and holds the parts it reads."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from urllib.parse import urlparse

from test_backup_left import head_chunks, replica_dirs, write_detached
from test_backup_trust import reseal

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, teardown
from tools.faultproxy import FaultProxy

MIB = 1 << 20
CHUNK = 64 << 10


def own_bytes(cli: Cli, name: str) -> int:
    """The bytes a volume's replica directories take on the disk beside their copies of the
    backing image: what the volume holds itself."""
    total = 0
    for directory in replica_dirs(cli, name):
        with ChunkStore.open(directory) as store:
            image = store.backing and Path(store.backing.path).name
        for path in directory.rglob("*"):
            if path.is_file() and path.name != image:
                total += path.stat().st_blocks * 512
    return total


def test_a_restore_of_a_volume_made_on_an_image_stands_on_that_image(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://image-restore/p"
    rng = random.Random(5)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    # data over the image, zeros over the image, data past it
    writes = {MIB: rng.randbytes(CHUNK), 2 * MIB: bytes(CHUNK), 5 * MIB: rng.randbytes(CHUNK)}
    write_detached(cli, "a", writes)
    changed = {offset // CHUNK for offset in writes}
    url = cli.backup("a", target)
    source = cli.checksum("a")

    done = cli.json("backup", "restore", url, "r", "--replicas", "1", "--quiet")
    assert done["backing_image"] == image_id and done["backing_image_name"] == "base", done
    assert done["whole"] is None
    config = volumes.load(cli.root, "r").config  # (what its configuration names)
    assert config["backing_image"] == image_id and config["backing_image_name"] == "base"
    assert cli.checksum("r") == source
    assert head_chunks(replica_dirs(cli, "r")[0]) == changed  # only what differs
    on_image = own_bytes(cli, "r")

    other = Cli(tmp_path / "root2")
    try:  # no image of that content: whole, said in a line (a notice: on stderr)
        result = other.run("backup", "restore", url, "r", "--replicas", "1", "--quiet")
        said = result.stderr.removeprefix("lhfs: ").splitlines()
        assert result.stdout.count("\n") == 1 and said == [
            f"volume r holds its backing image's content as its own data: its backing image "
            f"base ({image_id}) is not under {other.root}; register that image ('lhfs "
            "backing-image create NAME --from FILE', or 'lhfs system restore' of a system "
            "backup holding it) for a restore to stand on it"
        ], result.stderr
        assert other.info("r")["backing_image"] is None
        assert other.checksum("r") == source
        whole = own_bytes(other, "r")
        assert on_image < 512 << 10 < 3 * MIB <= whole, (on_image, whole)  # (some 200K, 3M)
        other.run("volume", "rm", "r")
        # its content registered under another name, its file modified since: not stood on
        other.run("backing-image", "create", "mine", "--from", str(raw))
        with open(other.root / "backing-images" / "mine.img", "r+b") as f:
            f.write(b"changed in place")
        result = other.json("backup", "restore", url, "r", "--replicas", "1", "--quiet")
        assert "as mine, whose file was modified since it was registered" in result["whole"]
        assert other.info("r")["backing_image"] is None and other.checksum("r") == source
        other.run("volume", "rm", "r")
        other.run("backing-image", "rm", "mine")
        # changed in place with its size and time kept (it looks registered as it was): the
        # copy made for the volume tells, and the restore goes on whole, saying so
        other.run("backing-image", "create", "mine", "--from", str(raw))
        image = other.root / "backing-images" / "mine.img"
        stamp = image.stat()
        with open(image, "r+b") as f:
            f.write(b"changed in place")
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        result = other.json("backup", "restore", url, "r", "--replicas", "1", "--quiet")
        said = "its backing image mine's file changed since it was registered"
        assert said in result["whole"], result
        assert other.info("r")["backing_image"] is None and other.checksum("r") == source
        other.run("volume", "rm", "r")
        other.run("backing-image", "rm", "mine")
        other.run("backing-image", "create", "mine", "--from", str(raw))  # (matched by content)
        result = other.json("backup", "restore", url, "r", "--replicas", "1", "--quiet")
        assert result["backing_image_name"] == "mine" and result["whole"] is None
        assert other.checksum("r") == source
        assert head_chunks(replica_dirs(other, "r")[0]) == changed
    finally:
        teardown(other.root)

    # the field is hostile input (checked, in one line); a manifest without it (an older
    # lhfs's) restores whole, saying nothing of an image
    backup = url.split("backup=")[1]
    relative = f"volumes/a/{backup}.json"
    store = BackupStore(Bucket(Target.parse(target)))
    manifest = store.manifest("a", backup)
    assert manifest["backing_image"] == image_id
    for bad in (5, "0" * 33, image_id.upper(), f"{'0' * 32}-{9 * MIB}", f"{'0' * 32}-0"):
        reseal(store, relative, json.dumps({**manifest, "backing_image": bad}).encode())
        refused = cli.run("backup", "restore", url, "bad", "--quiet", check=False)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr == (
            f"lhfs: error: the manifest of backup {backup} of a cannot be parsed (its "
            "backing_image)\n"
        ), bad
    older = {k: v for k, v in manifest.items() if not k.startswith("backing_image")}
    reseal(store, relative, json.dumps(older).encode())
    result = cli.run("backup", "restore", url, "old", "--replicas", "1", "--quiet")
    assert result.stdout.count("\n") == 1 and "backing image" not in result.stdout
    assert cli.info("old")["backing_image"] is None and cli.checksum("old") == source
    assert "bad" not in {v["name"] for v in cli.volumes()}


def test_a_dr_standby_of_a_volume_on_an_image_follows_and_activates_on_it(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Blocks of 2 MiB: the image covers block 0 and half of block 1. The standby is made on
    the image, and each increment fetches only the blocks that differ from what it holds."""
    target = "s3://image-standby/p"
    rng = random.Random(6)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    block = 2 * MIB // CHUNK  # (chunks in a block)
    write_detached(cli, "a", {0: rng.randbytes(CHUNK), 6 * MIB: rng.randbytes(CHUNK)})
    url = cli.backup("a", target)
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "a", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    assert cli.info("standby")["backing_image"] == image_id
    first = cli.dr_restored("standby", url)
    assert first["last_increment"]["fetched"] == 2, first  # (not block 1, the image's)
    assert not head_chunks(replica_dirs(cli, "standby")[0]) & set(range(block, 2 * block))
    # zeros over the image in block 1, data in block 2
    write_detached(cli, "a", {2 * MIB: bytes(CHUNK), 4 * MIB: rng.randbytes(CHUNK)})
    url = cli.backup("a", target)
    second = cli.dr_restored("standby", url)
    assert second["last_increment"]["fetched"] == 2, second
    cli.run("dr", "activate", "standby", "--quiet")
    assert cli.info("standby")["backing_image"] == image_id
    assert cli.checksum("standby") == cli.checksum("a")


def test_a_system_backup_being_restored_is_kept_and_said_so(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A system restore stopped (SIGSTOP) while it writes a volume, read through a slow link:
    its reader's marker says it is a system restore, and ``system rm`` leaves the system
    backup whose part it reads, as ``backup rm`` leaves a backup being read."""
    target = "s3://image-system-read/p"
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1")
    write_detached(cli, "v", {0: random.Random(7).randbytes(MIB)})
    url = cli.run(
        "system", "backup", "--target", target, "--name", "s1", "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    other = Cli(tmp_path / "root2")
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # (the restore takes long enough to be stopped half-way)
    restore = Cli(other.root, env={"AWS_ENDPOINT_URL": proxy.endpoint}).start(
        "system", "restore", url, "--quiet"
    )
    try:
        wait_for(
            lambda: (
                "v" in volumes.list_names(other.root) and other.info("v")["state"] == "restoring"
            ),
            60,
            "the restore to start writing",
        )
        os.kill(restore.pid, signal.SIGSTOP)
        reader = f"a system restore of backup {{}} of volume v (pid {restore.pid}"
        pruned = cli.json(
            "backup", "prune", "--target", target, "--volume", "v", "--keep-last", "1"
        )
        (kept,) = pruned["kept"]
        assert f"being read: {reader.format(kept['name'])}" in " ".join(kept["reasons"]), kept
        before = cli.json("system", "ls", "--target", target)
        refused = cli.run("system", "rm", url, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith(f"lhfs: error: {reader.format(kept['name'])}")
        assert refused.stderr.endswith(
            " is under way: system backup s1 not removed; try again once it is done\n"
        )
        assert cli.json("system", "ls", "--target", target) == before
    finally:
        restore.kill()
        restore.wait(30)
        proxy.close()
        teardown(other.root)
