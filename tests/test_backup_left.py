"""Backups and backing images kept as their sources kept them: volumes restored on their
backing image, one content under two image names kept once, and a store's stray or damaged
objects said for what they are; against a real S3 server."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from urllib.parse import urlparse

from backupstore.s3 import Bucket, Target
from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, teardown
from tools.faultproxy import FaultProxy

MIB = 1 << 20
CHUNK = 64 << 10


def replica_dirs(cli: Cli, name: str) -> list[Path]:
    return [Path(r["dir"]) for r in cli.info(name)["replicas"]]


def write_detached(cli: Cli, name: str, writes: dict[int, bytes]) -> None:
    """Write into every replica of a detached volume (no device needed)."""
    for directory in replica_dirs(cli, name):
        with ChunkStore.open(directory) as store:
            for offset, data in writes.items():
                store.write(offset, data)
            store.flush()


def head_chunks(directory: Path) -> set[int]:
    """The chunks a replica holds itself (written or trimmed) above its backing image."""
    with ChunkStore.open(directory) as store:
        return {chunk for layer in store.chain for chunk in layer.index}


def test_a_system_restore_puts_volumes_back_on_their_backing_image(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://left-images/p"
    rng = random.Random(3)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(3 * MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    image_id = cli.json("backing-image", "ls")[0]["id"]
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "2", "--backing-image", "base")
    cli.run("volume", "create", "plain", "--size", "4M", "--replicas", "1")
    # data over the image, zeros over the image, data past it
    writes = {MIB: rng.randbytes(CHUNK), 2 * MIB: bytes(CHUNK), 5 * MIB: rng.randbytes(CHUNK)}
    write_detached(cli, "a", writes)
    write_detached(cli, "plain", {0: rng.randbytes(CHUNK)})
    changed = {offset // CHUNK for offset in writes}
    assert head_chunks(replica_dirs(cli, "a")[0]) == changed
    sums = {v: cli.checksum(v) for v in ("a", "plain")}
    url = cli.run(
        "system", "backup", "--target", target, "--name", "s1", "--create-bucket", "--quiet"
    ).stdout.split()[-1]

    other = Cli(tmp_path / "root2")
    try:
        done = other.json("system", "restore", url, "--quiet")
        assert {v: other.checksum(v) for v in ("a", "plain")} == sums
        assert other.info("a")["backing_image"] == image_id
        assert done["images"] == ["base"] and done["on_images"] == {"a": "base"}
        assert done["whole"] == {}
        assert other.info("plain")["backing_image"] is None
        for directory in replica_dirs(other, "a"):  # only its changes, as its source held
            assert head_chunks(directory) == changed, directory
        (listed,) = other.json("backing-image", "ls")
        assert listed["name"] == "base" and listed["volumes"] == ["a"]
        assert "(volumes a)" in other.run("backing-image", "ls").stdout
        said = other.run("backing-image", "rm", "base").stdout
        assert "volumes a keep the copies" in said
        assert other.checksum("a") == sums["a"]
    finally:
        teardown(other.root)

    # the content under the root already, under another name: linked, matched by content
    third = Cli(tmp_path / "root3")
    try:
        third.run("backing-image", "create", "mine", "--from", str(raw))
        done = third.json("system", "restore", url, "--volumes", "a", "--quiet")
        assert done["images"] == [] and done["on_images"] == {"a": "mine"}
        assert third.checksum("a") == sums["a"]
        assert head_chunks(replica_dirs(third, "a")[0]) == changed
        whole = third.json("system", "restore", url, "--volumes", "plain", "--quiet")
        assert whole["images"] == [] and whole["on_images"] == {} and whole["whole"] == {}
        third.run("volume", "rm", "a")
        third.run("volume", "rm", "plain")
        done = third.json("system", "restore", url, "--quiet")  # base registered as mine's
        assert done["images"] == ["base"] and done["on_images"] == {"a": "base"}
        images = third.root / "backing-images"
        assert os.stat(images / "base.img").st_ino == os.stat(images / "mine.img").st_ino
    finally:
        teardown(third.root)

    # an image the system backup does not hold (its record was damaged: skipped)
    record = cli.root / "backing-images" / "base.json"
    kept = record.read_text()
    record.write_text("{")
    try:
        url2 = cli.run(
            "system", "backup", "--target", target, "--name", "s2", "--quiet"
        ).stdout.split()[-1]
    finally:
        record.write_text(kept)
    fourth = Cli(tmp_path / "root4")
    try:
        result = fourth.run("system", "restore", url2, "--quiet")
        assert f"volume a: its backing image {image_id} is neither in the system backup" in (
            result.stderr
        )
        done = fourth.json("volume", "info", "a")
        assert done["backing_image"] is None
        assert fourth.checksum("a") == sums["a"]
    finally:
        teardown(fourth.root)

    # the content registered under the root, its file modified since: neither linked to nor
    # stood on (what it holds is not what its id says): the image restored from the store,
    # or, the image left out, the volume restored whole, saying why
    fifth = Cli(tmp_path / "root5")
    try:
        fifth.run("backing-image", "create", "mine", "--from", str(raw))
        images = fifth.root / "backing-images"
        with open(images / "mine.img", "r+b") as f:
            f.write(b"changed in place")
        done = fifth.json("system", "restore", url, "--volumes", "a", "--quiet")
        assert done["images"] == ["base"] and done["on_images"] == {"a": "base"}, done
        assert os.stat(images / "base.img").st_ino != os.stat(images / "mine.img").st_ino
        assert fifth.checksum("a") == sums["a"]
        fifth.run("volume", "rm", "a")
        fifth.run("backing-image", "rm", "base")
        result = fifth.run("system", "restore", url2, "--volumes", "a", "--quiet")
        assert "was modified since it was registered" in result.stderr, result.stderr
        assert fifth.json("volume", "info", "a")["backing_image"] is None
        assert fifth.checksum("a") == sums["a"]
    finally:
        teardown(fifth.root)


def test_one_content_under_two_image_names_is_kept_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://left-twice/p"
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(4).randbytes(3 * MIB + 512))
    cli.run("backing-image", "create", "one", "--from", str(raw))
    cli.run("backing-image", "create", "two", "--from", str(raw))
    images = cli.root / "backing-images"
    assert os.stat(images / "one.img").st_ino == os.stat(images / "two.img").st_ino
    listed = {i["name"]: i for i in cli.json("backing-image", "ls")}
    assert listed["one"]["id"] == listed["two"]["id"] and not listed["two"]["changed"]
    # other content of the same size is a copy of its own
    raw2 = tmp_path / "other.raw"
    raw2.write_bytes(random.Random(5).randbytes(3 * MIB + 512))
    cli.run("backing-image", "create", "three", "--from", str(raw2))
    assert os.stat(images / "three.img").st_ino != os.stat(images / "one.img").st_ino

    bucket = Bucket(Target.parse(target))
    cli.run("backing-image", "backup", "one", "--target", target, "--create-bucket", "--quiet")
    blocks = sorted(o.object_name for o in bucket.list("p/blocks/"))
    cli.run("backing-image", "backup", "two", "--target", target, "--quiet")
    assert sorted(o.object_name for o in bucket.list("p/blocks/")) == blocks
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "1", "--backing-image", "two")
    url = cli.run("system", "backup", "--target", target, "--quiet").stdout.split()[-1]

    # removing one name keeps the content the other names
    cli.run("backing-image", "rm", "one")
    assert [i["name"] for i in cli.json("backing-image", "ls")] == ["three", "two"]
    cli.run("volume", "create", "w", "--size", "4M", "--replicas", "1", "--backing-image", "two")
    assert cli.checksum("w") == cli.checksum("v")

    other = Cli(tmp_path / "root2")
    try:
        done = other.json("system", "restore", url, "--quiet")
        assert sorted(done["images"]) == ["one", "three", "two"]
        assert done["on_images"] == {"v": "two"}
        mine = other.root / "backing-images"
        assert os.stat(mine / "one.img").st_ino == os.stat(mine / "two.img").st_ino
        assert other.checksum("v") == cli.checksum("v")
    finally:
        teardown(other.root)


def backed_up_twice(cli: Cli, target: str) -> list[str]:
    """A detached volume ``src`` with data, backed up twice to ``target``; the URLs."""
    rng = random.Random(6)
    cli.run("volume", "create", "src", "--size", "8M", "--replicas", "1")
    write_detached(cli, "src", {0: rng.randbytes(3 * MIB)})
    first = cli.backup("src", target)
    write_detached(cli, "src", {5 * MIB: rng.randbytes(MIB)})
    return [first, cli.backup("src", target)]


def test_a_damaged_volume_meta_is_said_as_itself_and_the_backups_still_read(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://left-meta/p"
    urls = backed_up_twice(cli, target)
    bucket = Bucket(Target.parse(target))
    meta = "p/volumes/src/volume.meta"
    sealed = bucket.get(meta)[0]
    for damaged in (sealed[:-3] + b"xyz", b"not lhfs's"):
        bucket.put(meta, damaged)
        listed = cli.json("backup", "ls", "--target", target)
        assert [b["state"] for b in listed] == ["complete", "complete"], listed
        check = cli.run("backup", "check", "--target", target, check=False)
        assert check.returncode == 3, check
        problems = [line for line in check.stdout.splitlines() if "volume.meta" in line]
        assert len(problems) == 1 and "volumes/src/volume.meta" in problems[0], check.stdout
        assert "the backups of src read without it" in problems[0]
        assert "manifest" not in check.stdout.replace(problems[0], ""), check.stdout
        report = cli.run("backup", "check", "--target", target, "--json", check=False).stdout
        assert json.loads(report)["backups"] == 2
    cli.run("backup", "restore", urls[1], "copy", "--quiet")
    assert cli.checksum("copy") == cli.checksum("src")
    cli.run("backup", "gc", "--target", target)
    again = cli.run("backup", "create", "src", "--target", target, "--quiet")
    assert "volume.meta" in again.stderr and "written again" in again.stderr, again.stderr
    assert bucket.get(meta)[0] != b"not lhfs's"
    assert cli.json("backup", "check", "--target", target)["problems"] == []


def test_stray_objects_are_named_by_check_and_removed_by_gc(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://left-stray/p"
    urls = backed_up_twice(cli, target)
    bucket = Bucket(Target.parse(target))
    strays = ["p/volumes/src/notes.txt", "p/volumes/src/a b.json", "p/volumes/src/sub/x.json"]
    for key in strays:
        bucket.put(key, b"not lhfs's")
    listed = cli.json("backup", "ls", "--target", target)
    assert sorted(b["url"] for b in listed) == sorted(urls)
    assert {b["state"] for b in listed} == {"complete"}
    check = cli.run("backup", "check", "--target", target, check=False)
    assert check.returncode == 3
    for key in strays:
        line = f"stray object s3://left-stray/{key}: not an object lhfs writes"
        assert line in check.stdout, check.stdout
    assert f"'lhfs backup gc --target {target} --strays' removes it" in check.stdout
    # a stray named as a manifest may be a backup this lhfs does not know: its blocks are
    # unknown, so no collection deletes any (until --strays removes it)
    removed = cli.json("backup", "rm", urls[0])
    assert "may be a backup this lhfs does not know" in removed["deferred"], removed
    held = cli.run("backup", "gc", "--target", target, check=False)
    assert held.returncode == 1 and "not collecting: stray object" in held.stderr, held.stderr
    assert all(bucket.get(key) is not None for key in strays)
    gc = cli.json("backup", "gc", "--target", target, "--strays")
    assert sorted(gc["strays"]) == sorted(f"s3://left-stray/{key}" for key in strays)
    assert gc["strays_removed"] is True, gc
    assert all(bucket.get(key) is None for key in strays)
    assert cli.json("backup", "check", "--target", target)["problems"] == []
    # any other stray holds nothing back, and is kept (only --strays deletes one)
    bucket.put(strays[0], b"not lhfs's")
    kept = cli.json("backup", "gc", "--target", target)
    assert kept["strays"] == [f"s3://left-stray/{strays[0]}"] and not kept["strays_removed"]
    assert bucket.get(strays[0]) is not None
    bucket.delete(strays[0])
    # a backup of a snapshot of a long name: its URL is one rm and restore take
    snapshot = "s" * 64
    cli.run("snapshot", "create", "src", snapshot)
    url = cli.run(
        "backup", "create", "src", "--target", target, "--snapshot", snapshot, "--quiet"
    ).stdout.split()[-1]
    cli.run("backup", "restore", url, "long", "--quiet")
    cli.run("backup", "rm", url)
    assert url not in [b["url"] for b in cli.json("backup", "ls", "--target", target)]


def test_a_system_restore_killed_in_a_volume_on_an_image_keeps_the_image(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """Killed while it writes a volume on a backing image, a system restore keeps the image
    it finished; the volume shows an interrupted restore until ``volume rm``, and restored
    again with ``--volumes`` it stands on that image."""
    target = "s3://left-killed/p"
    rng = random.Random(8)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rng.randbytes(MIB))
    cli.run("backing-image", "create", "base", "--from", str(raw))
    cli.run("volume", "create", "a", "--size", "8M", "--replicas", "1", "--backing-image", "base")
    write_detached(cli, "a", {0: rng.randbytes(CHUNK), 2 * MIB: rng.randbytes(6 * MIB)})
    url = cli.run(
        "system", "backup", "--target", target, "--create-bucket", "--quiet"
    ).stdout.split()[-1]
    other = Cli(tmp_path / "root2")
    upstream = urlparse(s3_endpoint)
    proxy = FaultProxy((upstream.hostname, upstream.port))
    proxy.rate = 256 << 10  # (6 MiB of the volume: killed half-way)
    try:
        slow = Cli(other.root, env={"AWS_ENDPOINT_URL": proxy.endpoint})
        restore = slow.start("system", "restore", url, "--quiet")
        try:
            wait_for(
                lambda: (
                    "a" in volumes.list_names(other.root)
                    and other.info("a")["state"] == "restoring"
                ),
                60,
                "the restore to write volume a",
            )
        finally:
            restore.kill()
            restore.wait(30)
        proxy.close()
        assert other.info("a")["restoring"]["interrupted"] is True
        assert [i["name"] for i in other.json("backing-image", "ls")] == ["base"]
        other.run("volume", "rm", "a")
        done = other.json("system", "restore", url, "--volumes", "a", "--quiet")
        assert done["images"] == [] and done["on_images"] == {"a": "base"}
        assert other.checksum("a") == cli.checksum("a")
    finally:
        proxy.close()
        teardown(other.root)
