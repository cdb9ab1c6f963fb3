"""Backups and DR standbys of volumes on backing images, and backing images' own backups,
against a real S3 server: a standby on an image holds only what differs from it, chunk by
chunk, as a restore on it does."""

from __future__ import annotations

import json
import random
from pathlib import Path

from test_backup_left import head_chunks, replica_dirs, write_detached
from test_image_restore import own_bytes

from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, teardown

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
        store.flush()
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
