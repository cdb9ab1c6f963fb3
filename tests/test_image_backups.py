"""Backups and DR standbys of volumes on backing images, and backing images' own backups,
against a real S3 server: a standby on an image holds only what differs from it, chunk by
chunk, as a restore on it does."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_backup_left import head_chunks, replica_dirs, write_detached
from test_backup_trust import reseal
from test_image_restore import own_bytes

from backupstore.s3 import Bucket, Target
from backupstore.store import BackupStore
from lhfs.backups import image_backups
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, teardown
from lhfs.volumes import images
from tools.faultproxy import FaultProxy

MIB = 1 << 20
CHUNK = 64 << 10


def test_a_dr_standby_on_an_image_writes_only_the_chunks_that_differ(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Blocks of 2 MiB, chunks of 64 KiB: an increment writes the chunks of a changed block
    that read otherwise, and gives a chunk back to the image when it holds the image's
    content again, so the standby (and the volume it becomes) stays thin over the image."""
    target = "s3://image-standby-chunks/p"
    rng = random.Random(11)
    raw = tmp_path / "base.raw"
    image = rng.randbytes(3 * MIB)
    raw.write_bytes(image)
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {0: rng.randbytes(CHUNK), 6 * MIB: rng.randbytes(CHUNK)})
    url = cli.backup("a", target)
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "a", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    first = cli.dr_restored("standby", url)["last_increment"]
    assert first["fetched"] == 2, first
    standby = replica_dirs(cli, "standby")[0]
    thin = own_bytes(cli, "standby")
    assert head_chunks(standby) == {0, 6 * MIB // CHUNK}
    assert first["written"] == 2 * CHUNK, first  # (not the 4 MiB of the two blocks)
    assert thin < 1 * MIB, thin  # (some 200 KiB; whole blocks took 4 MiB)

    # block 0: its first chunk holds the image's content again, another chunk changes
    write_detached(cli, "a", {0: image[:CHUNK], 3 * CHUNK: rng.randbytes(CHUNK)})
    url = cli.backup("a", target)
    second = cli.dr_restored("standby", url)["last_increment"]
    assert second["fetched"] == 1 and second["written"] == CHUNK, second
    assert head_chunks(standby) == {3, 6 * MIB // CHUNK}
    assert cli.checksum("standby") == cli.checksum("a")
    cli.run("dr", "activate", "standby", "--quiet")
    assert head_chunks(replica_dirs(cli, "standby")[0]) == {3, 6 * MIB // CHUNK}
    assert own_bytes(cli, "standby") <= thin
    assert cli.checksum("standby") == cli.checksum("a")


def test_write_changed_touches_only_what_reads_otherwise(tmp_path: Path) -> None:
    """The chunk store's side of it, on pieces of every kind: part of a chunk (a backup's
    blocks may be smaller than a standby's chunks), zeros over the image, the image's content
    given back to it, and a write that changes nothing."""
    rng = random.Random(12)
    image = rng.randbytes(4 * CHUNK)
    raw = tmp_path / "image.raw"
    raw.write_bytes(image)
    store = ChunkStore.create(tmp_path / "r", 8 * CHUNK, CHUNK, raw)
    try:
        assert store.write_changed(0, image[: 2 * CHUNK]) == 0  # (reads so already)
        assert not store.head.index
        ours = rng.randbytes(CHUNK)
        data = image[:CHUNK] + ours + bytes(CHUNK) + image[3 * CHUNK :] + bytes(4 * CHUNK)
        assert store.write_changed(0, data) == CHUNK
        assert set(store.head.index) == {1, 2}  # (data, and zeros hiding the image)
        assert store.read(0, 8 * CHUNK) == data
        # part of a chunk, then the image's content given back (the head's copy goes)
        assert store.write_changed(CHUNK + 100, b"x" * 50) == 50
        assert store.write_changed(CHUNK, image[CHUNK : 3 * CHUNK]) == 0
        assert not store.head.index
        assert store.read(0, 8 * CHUNK) == image + bytes(4 * CHUNK)
        assert store.write_changed(6 * CHUNK, ours + ours) == 2 * CHUNK  # (past the image)
        assert store.write_changed(6 * CHUNK, bytes(2 * CHUNK)) == 0
        assert not store.head.index and store.read(6 * CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
        store.flush()  # (a chunk given back is freed once the index no longer names it)
        assert store.head.data_path.stat().st_blocks == 0
    finally:
        store.close()
    with ChunkStore.open(tmp_path / "r") as again:  # (what was recorded, read back)
        assert not again.head.index and again.read(0, 8 * CHUNK) == image + bytes(4 * CHUNK)


def test_a_system_restore_chooses_the_image_a_volume_stands_on_as_any_restore_does(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """One rule for every restore (``images.of_content``): by content, the name the source
    was made from first, never a file modified since it was registered; the line saying why a
    volume is restored whole names the image as ``backup restore`` names it."""
    target = "s3://image-system-rule/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(13).randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {MIB: random.Random(14).randbytes(CHUNK)})
    record = cli.root / "backing-images" / "base.json"
    kept = record.read_text()
    record.write_text("{")  # (the system backup holds no image: skipped as damaged)
    try:
        url = cli.run(
            "system", "backup", "--target", target, "--name", "s1", "--create-bucket", "--quiet"
        ).stdout.split()[-1]
    finally:
        record.write_text(kept)
    source = cli.checksum("a")

    other = Cli(tmp_path / "root2")
    try:  # of two names of its content, the one it was made from
        other.run("backing-image", "create", "aaa", "--from", str(raw))
        other.run("backing-image", "create", "base", "--from", str(raw))
        done = other.json("system", "restore", url, "--quiet")
        assert done["on_images"] == {"a": "base"} and done["whole"] == {}, done
        assert other.checksum("a") == source
        other.run("volume", "rm", "a")
        other.run("backing-image", "rm", "base")
        other.run("backing-image", "rm", "aaa")
        # its content under another name, that file modified since: whole, said as a
        # restore says it
        other.run("backing-image", "create", "mine", "--from", str(raw))
        with open(other.root / "backing-images" / "mine.img", "r+b") as f:
            f.write(b"changed in place")
        result = other.run("system", "restore", url, "--quiet")
        assert result.stderr.splitlines() == [
            f"lhfs: volume a: its backing image base ({image_id}) is under {other.root} as mine, "
            "whose file was modified since it was registered: restored with the image's "
            "content as its own data"
        ], result.stderr
        assert other.info("a")["backing_image"] is None and other.checksum("a") == source
    finally:
        teardown(other.root)


def test_a_restore_made_whole_says_why_on_stderr_whichever_command_made_it(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Notices on stderr, results on stdout (as progress and every other notice): ``backup
    restore``, ``dr create`` and ``system restore`` of a volume whose image the root lacks
    say alike why it holds the image's content as its own data; stdout holds only what was
    done, a line, or one JSON document with ``--json``."""
    target = "s3://image-whole-said/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(15).randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {MIB: random.Random(16).randbytes(CHUNK)})
    url = cli.backup("a", target)
    record = cli.root / "backing-images" / "base.json"
    kept = record.read_text()
    record.write_text("{")  # (the system backup holds no image: skipped as damaged)
    try:
        system_url = cli.run(
            "system", "backup", "--target", target, "--name", "s1", "--quiet"
        ).stdout.split()[-1]
    finally:
        record.write_text(kept)

    other = Cli(tmp_path / "root2")
    why = f"its backing image base ({image_id}) is not under {other.root}"

    def said(volume: str, reason: str = why) -> str:
        return (
            f"lhfs: volume {volume} holds its backing image's content as its own data: "
            f"{reason}; register that image ('lhfs backing-image create NAME --from FILE', or "
            "'lhfs system restore' of a system backup holding it) for a restore to stand on it\n"
        )

    try:
        result = other.run("backup", "restore", url, "r", "--replicas", "1", "--quiet")
        assert result.stderr == said("r"), result.stderr
        assert result.stdout.count("\n") == 1 and result.stdout.startswith("restored "), result
        result = other.run(
            "backup", "restore", url, "j", "--replicas", "1", "--quiet", "--json"
        )  # fmt: skip
        assert result.stderr == said("j"), result.stderr
        assert json.loads(result.stdout)["whole"] == said("j")[len("lhfs: ") : -1]
        result = other.run(
            "dr", "create", "standby", "--target", target, "--volume", "a", "--replicas", "1",
            "--interval", "1", "--quiet",
        )  # fmt: skip
        assert result.stderr == said("standby"), result.stderr
        assert "holds its backing image" not in result.stdout, result.stdout
        result = other.run("system", "restore", system_url, "--quiet")
        assert result.stderr == (
            f"lhfs: volume a: its backing image {image_id} is neither in the system backup nor "
            f"under {other.root}: restored with the image's content as its own data\n"
        ), result.stderr
        assert result.stdout.count("\n") == 1, result.stdout
        assert other.checksum("a") == other.checksum("r") == cli.checksum("a")
    finally:
        teardown(other.root)


def _refused_restore(cli: Cli, args: tuple[str, ...], said: str) -> None:
    """``backing-image restore ARGS`` fails (exit 1) in the one line ``said``, nothing on
    stdout, and the root is left as it was."""
    before = _registered(cli)
    refused = cli.run("backing-image", "restore", *args, check=False)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr == f"lhfs: error: {said}\n", refused.stderr
    assert _registered(cli) == before


def _registered(cli: Cli) -> list[dict]:
    """The root's images and every file under it but the engines' and the lock files: what a
    refused command must leave as it was."""
    return [
        cli.json("backing-image", "ls"),
        sorted(str(p) for p in cli.root.rglob("*") if not p.name.endswith(".lock")),
    ]


def test_a_backing_image_backed_up_alone_is_restored_byte_for_byte(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://image-alone/p"
    rng = random.Random(17)
    raw = tmp_path / "base.raw"
    content = rng.randbytes(3 * MIB) + bytes(MIB) + rng.randbytes(512)  # (a last block short)
    raw.write_bytes(content)
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    first = cli.run(
        "backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {MIB: rng.randbytes(CHUNK)})
    volume_url = cli.backup("a", target)

    other = Cli(tmp_path / "root2")
    try:
        result = other.run("backing-image", "restore", "base", "--target", target)
        assert result.stdout == (
            f"restored backing image base from backup {first.split('backup=')[1]} of base: "
            f"4.0M, id {image_id}\n"
        ), result.stdout
        assert "restore base" in result.stderr and "100%" in result.stderr  # (progress)
        # read once to check it against its id, and not again to register it
        assert "checking base" in result.stderr and "hashing" not in result.stderr, result
        (listed,) = other.json("backing-image", "ls")
        assert listed["name"] == "base" and listed["id"] == image_id and not listed["changed"]
        assert Path(listed["path"]).read_bytes() == content
        assert not list(other.root.glob(".restore-image-*"))  # (its scratch file gone)
        assert not [p for p in (other.root / "backing-images").iterdir() if ".tmp" in p.name]
        # a volume restored from a backup made on it stands on it
        done = other.json("backup", "restore", volume_url, "r", "--replicas", "1", "--quiet")
        assert done["backing_image_name"] == "base" and done["whole"] is None, done
        assert other.checksum("r") == cli.checksum("a")

        # the same content under another name is refused, naming the image that holds it
        _refused_restore(
            other,
            ("base", "--target", target, "--as", "copy"),
            f"backing image base under {other.root} holds that content already ({image_id}): "
            "volumes restored from backups made on base stand on it",
        )

        # under another name, a backup named
        other.run("volume", "rm", "r")
        other.run("backing-image", "rm", "base")
        backup = first.split("backup=")[1]
        done = other.json(
            "backing-image", "restore", "base", "--target", target, "--as", "copy",
            "--backup", backup, "--quiet",
        )  # fmt: skip
        assert done["name"] == "copy" and done["id"] == image_id and done["backup"] == backup
        (listed,) = other.json("backing-image", "ls")
        assert listed["name"] == "copy" and Path(listed["path"]).read_bytes() == content

        # a manifest naming another content id (re-sealed by whoever can write the bucket):
        # what was fetched is checked against it and refused, nothing registered
        store = BackupStore(Bucket(Target.parse(target)))
        manifest = store.manifest("image-base", backup)
        forged = f"{'0' * 32}-{4 * MIB + 512}"
        relative = f"volumes/image-base/{backup}.json"
        reseal(store, relative, json.dumps({**manifest, "snapshot": forged}).encode())
        _refused_restore(
            other,
            ("base", "--target", target, "--backup", backup, "--quiet"),
            "backing image base: the restored content is not the backed up one",
        )
    finally:
        teardown(other.root)


def test_a_bad_backing_image_restore_says_why_in_one_line_and_changes_nothing(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://image-alone-bad/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(18).randbytes(MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("backing-image", "create", "taken", "--from", str(raw))
    cli.run("backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet")
    cli.run("backing-image", "rm", "base")
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    cli.backup("v", target)
    before = _registered(cli)
    restore = ("backing-image", "restore")
    for args, code, said in (
        (("a/b", "--target", target), 2, "invalid backing image name 'a/b'"),
        (("base", "--target", target, "--as", "x y"), 2, "invalid backing image name 'x y'"),
        (("n" * 61, "--target", target), 2, "is too long: at most 58 characters"),
        (("base", "--target", "s3://Bad_Bucket/p"), 2, "Bad_Bucket"),
        (("base", "--target", target, "--backup", "a/b"), 2, "invalid backup name 'a/b'"),
        (("nosuch", "--target", target), 1, f"{target} holds no backup of backing image nosuch"),
        (("v", "--target", target), 1, f"{target} holds no backup of backing image v"),
        (
            ("base", "--target", target, "--backup", "base-20260101-000000-abcd"),
            1,
            f"{target} holds no backup base-20260101-000000-abcd of backing image base",
        ),
        (("base", "--target", target, "--as", "taken"), 1, "backing image taken already exists"),
        (("base", "--target", target), 1, "backing image taken under"),  # (its content)
    ):
        refused = cli.run(*restore, *args, check=False)
        assert refused.returncode == code, (args, refused)
        assert refused.stderr.count("\n") == 1 and said in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr and refused.stdout == ""
        assert _registered(cli) == before, args


def test_a_killed_backing_image_restore_registers_nothing_and_its_file_is_cleared(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Killed during the fetch (through a slow link), a restore leaves no image
    registered; its scratch file, as large as the image, goes with the next ``backing-image
    ls``, and the restore run again completes."""
    target = "s3://image-alone-killed/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(19).randbytes(6 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet")
    other = Cli(tmp_path / "root2")
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # (6 MiB: some 24 s, killed before its end)
    try:
        slow = Cli(other.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
        restore = slow.start("backing-image", "restore", "base", "--target", target, "--quiet")
        try:
            wait_for(  # (made, of the image's size, as the fetch begins)
                lambda: any(other.root.glob(".restore-image-base.*.tmp")),
                60,
                "the restore to begin fetching the image",
            )
        finally:
            restore.kill()
            restore.wait(30)
        proxy.close()
        assert other.json("backing-image", "ls") == []
        assert not list(other.root.glob(".restore-image-*"))
        done = other.json("backing-image", "restore", "base", "--target", target, "--quiet")
        assert Path(other.json("backing-image", "ls")[0]["path"]).read_bytes() == raw.read_bytes()
        assert done["id"] == cli.json("backing-image", "ls")[0]["id"]
    finally:
        proxy.close()
        teardown(other.root)


def test_a_chunk_given_back_to_the_image_survives_a_crash_before_the_flush(
    tmp_path: Path,
) -> None:
    """Killed after ``write_changed`` gave a chunk back to the image and before the index
    said so, the store reads the chunk as it was (its data kept), never zeros that are
    neither what it held nor what was written."""
    rng = random.Random(20)
    image = rng.randbytes(2 * CHUNK)
    raw = tmp_path / "image.raw"
    raw.write_bytes(image)
    ours = rng.randbytes(CHUNK)
    with ChunkStore.create(tmp_path / "r", 4 * CHUNK, CHUNK, raw) as store:
        store.write(0, ours)
    script = (
        "import os, sys\n"
        "from lhfs.store.chunkstore import ChunkStore\n"
        "store = ChunkStore.open(sys.argv[1])\n"
        "assert store.write_changed(0, open(sys.argv[2], 'rb').read(sys.argv[3])) == 0\n"
        "os._exit(9)  # (killed: no flush, no close)\n"
    ).replace("sys.argv[3]", str(CHUNK))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "r"), str(raw)], capture_output=True
    )
    assert done.returncode == 9, done.stderr
    with ChunkStore.open(tmp_path / "r") as again:
        assert again.read(0, CHUNK) == ours
        assert again.write_changed(0, image[:CHUNK]) == 0
    with ChunkStore.open(tmp_path / "r") as again:
        assert again.read(0, 2 * CHUNK) == image and not again.head.index


def test_a_manifest_whose_size_is_not_its_image_ids_is_refused_before_any_fetch(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A manifest re-sealed with a size far above its image id's (its extra blocks nulls):
    refused at once, naming both, nothing fetched nor registered. A scratch file of that size
    was made and hashed whole before the content was found not to be the backed up one."""
    target = "s3://image-alone-size/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(20).randbytes(MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    made = cli.run(
        "backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    backup = made.split("backup=")[1]
    store = BackupStore(Bucket(Target.parse(target)))
    manifest = store.manifest("image-base", backup)
    size = 256 * MIB
    blocks = manifest["blocks"] + [None] * (-(-size // manifest["block_size"]) - 1)
    forged = {**manifest, "size": size, "blocks": blocks}
    reseal(store, f"volumes/image-base/{backup}.json", json.dumps(forged).encode())
    other = Cli(tmp_path / "root2")
    try:
        _refused_restore(
            other,
            ("base", "--target", target),
            f"the manifest of backup {backup} of image-base says {size} bytes, its image "
            f"content id {image_id} {MIB}: one of them was changed",
        )
    finally:
        teardown(other.root)


def test_a_system_restore_on_an_image_changed_in_place_goes_on_whole_as_any_restore(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """The image a volume stands on is registered, its file changed in place with its size
    and time kept (it looks as registered): found as the volume's copy of it is made, and the
    volume restored whole, said in a line, as ``backup restore`` does; the system restore
    gave that volume up ("volume a: the backing image file ... changed")."""
    target = "s3://image-system-changed/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(21).randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {MIB: random.Random(22).randbytes(CHUNK)})
    url = cli.run(
        "system", "backup", "--target", target, "--name", "s1", "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    source = cli.checksum("a")
    other = Cli(tmp_path / "root2")
    try:
        other.run("backing-image", "create", "base", "--from", str(raw))
        image = other.root / "backing-images" / "base.img"
        stamp = image.stat()
        with open(image, "r+b") as f:
            f.write(b"changed in place")
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        result = other.run("system", "restore", url, "--volumes", "a")
        assert result.stderr.splitlines()[-1] == (
            "lhfs: volume a: its backing image base's file changed since it was registered: "
            "restored with the image's content as its own data"
        ), result.stderr
        assert "volume(s) a" in result.stdout and "on backing image" not in result.stdout
        assert other.info("a")["backing_image"] is None and other.checksum("a") == source
    finally:
        teardown(other.root)


def test_a_backing_image_restore_reads_the_backups_manifest_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest the restore decided on is the one its blocks are fetched by: read once
    (each read counted on the store it restores from), the image restored whole. The
    store's restore read it again, and could find another, the store changed meanwhile."""
    target = "s3://image-once/p"
    raw = tmp_path / "base.raw"
    content = random.Random(21).randbytes(MIB + 512)
    raw.write_bytes(content)
    cli.run("backing-image", "create", "base", "--from", str(raw))
    made = cli.run(
        "backing-image", "backup", "base", "--target", target, "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    backup = made.split("backup=")[1]
    reads: list[tuple[str, str]] = []
    read = BackupStore.manifest

    def counted(store: BackupStore, volume: str, name: str) -> dict:
        reads.append((volume, name))
        return read(store, volume, name)

    monkeypatch.setattr(BackupStore, "manifest", counted)
    root = tmp_path / "root2"
    info = image_backups.restore(root, "base", target, backup_name=backup)
    assert reads == [("image-base", backup)], reads
    assert info["backup"] == backup, info
    (listed,) = images.list_images(root)
    assert listed["name"] == "base" and Path(listed["path"]).read_bytes() == content, listed
