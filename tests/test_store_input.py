"""What a backup store takes from its bucket, its files and the command line: only objects
shaped as lhfs writes them are its blocks, no store lies inside another, and secret files,
regions and URLs are checked before they are used; against a real S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupstore.s3 import Bucket, StoreRefused, Target
from backupstore.store import digest_of
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli

MIB = 1 << 20


def one_backup(cli: Cli, target: str, volume: str = "src") -> str:
    """A volume with data, backed up once to ``target``; the backup's URL."""
    cli.run("volume", "create", volume, "--size", "4M", "--replicas", "1")
    for replica in cli.info(volume)["replicas"]:
        with ChunkStore.open(Path(replica["dir"])) as store:
            store.write(MIB, bytes(range(256)) * 1024)
            store.flush()
    return cli.backup(volume, target)


def test_objects_under_blocks_shaped_unlike_a_block_are_strays_kept_by_gc(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://input-strays/p"
    url = one_backup(cli, target)
    bucket = Bucket(Target.parse(target))
    name = "0123456789abcdef0123456789abcdef"
    strays = [
        "p/blocks/README.txt",
        "p/blocks/ab/not-a-block.txt",
        f"p/blocks/zz/{name}",  # (a block's name under another directory)
        f"p/blocks/01/{name.upper()}",
        f"p/blocks/01/{name}/x",
    ]
    for key in strays:
        bucket.put(key, b"not lhfs's")
    check = cli.run("backup", "check", "--target", target, check=False)
    assert check.returncode == 3, check
    for key in strays:
        assert f"stray object s3://input-strays/{key}: not an object lhfs writes" in check.stdout
    kept = cli.json("backup", "gc", "--target", target)
    assert sorted(kept["strays"]) == sorted(f"s3://input-strays/{k}" for k in strays)
    assert kept["collected"] == 0 and kept["strays_removed"] is False
    assert all(bucket.get(key) is not None for key in strays)
    cli.run("backup", "restore", url, "copy", "--quiet")
    assert cli.checksum("copy") == cli.checksum("src")
    gone = cli.json("backup", "gc", "--target", target, "--strays")
    assert gone["strays_removed"] is True and gone["collected"] == 0
    assert all(bucket.get(key) is None for key in strays)
    assert cli.json("backup", "check", "--target", target)["problems"] == []


def test_a_store_inside_another_or_around_one_is_refused(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    one_backup(cli, "s3://input-nested/outer")
    bucket = Bucket(Target.parse("s3://input-nested/outer"))
    before = sorted(o.object_name for o in bucket.list(""))
    for inner in ("s3://input-nested/outer/blocks", "s3://input-nested/outer/a/b"):
        for args in (
            ("backup", "create", "src", "--target", inner, "--quiet"),
            ("backup", "init", "--target", inner),
        ):
            done = cli.run(*args, check=False)
            assert done.returncode == 1, done
            said = done.stderr.strip()
            assert "\n" not in said and "Traceback" not in said
            assert f"{inner} lies inside the store s3://input-nested/outer" in said, said
    assert sorted(o.object_name for o in bucket.list("")) == before
    # a store around one: its prefix holds another's record
    cli.run("backup", "init", "--target", "s3://input-nested/deep/in", "--create-bucket")
    for around in ("s3://input-nested/deep", "s3://input-nested"):
        done = cli.run("backup", "init", "--target", around, check=False)
        assert done.returncode == 1, done
        assert f"{around} holds the store s3://input-nested/deep/in" in done.stderr
    assert bucket.get("deep/lhfs-store.json") is None and bucket.get("lhfs-store.json") is None
    cli.run("backup", "init", "--target", "s3://input-nested/beside")  # (beside: fine)


def test_gc_strays_keeps_a_store_found_inside_the_store(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A store made inside another before that was refused: the outer one's collection
    leaves it be, and --strays, which would delete it, is refused."""
    target = "s3://input-inside/outer"
    one_backup(cli, target)
    bucket = Bucket(Target.parse(target))
    record = bucket.get("outer/lhfs-store.json")[0]
    inner = ["outer/blocks/lhfs-store.json", "outer/blocks/blocks/ab/" + "ab" * 16]
    bucket.put(inner[0], record)
    bucket.put(inner[1], b"a block of the inner store")
    assert cli.json("backup", "gc", "--target", target)["collected"] == 0
    done = cli.run("backup", "gc", "--target", target, "--strays", check=False)
    assert done.returncode == 1, done
    assert "holds the store s3://input-inside/outer/blocks" in done.stderr
    assert all(bucket.get(key) is not None for key in inner)


def refused(cli: Cli, code: int, *args: str) -> str:
    """The one line a command refused with, exit ``code`` (a hang fails the test)."""
    done = cli.run(*args, check=False, timeout=30)
    said = done.stderr.strip()
    assert done.returncode == code, (args, done)
    assert "\n" not in said and "Traceback" not in said, said
    return said


def test_a_secret_file_larger_than_lhfs_reads_is_refused_not_cut_short(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    password = tmp_path / "password"
    password.write_bytes(b"x" * (64 << 10) + b"y\n")  # (first 64 KiB: another password)
    password.chmod(0o600)
    target = "s3://input-secret/p"
    args = ("backup", "init", "--target", target, "--encrypt", "--create-bucket")
    said = refused(cli, 2, *args, "--password-file", str(password))
    assert f"password file {password} is larger than 64 KiB" in said, said
    bucket = Bucket(Target.parse("s3://input-secret"))
    with pytest.raises(StoreRefused):  # (nothing made: not even the bucket)
        bucket.ensure()
    password.write_bytes(b"x" * (64 << 10))  # (the most a secret file may hold)
    cli.run(*args, "--password-file", str(password))
    assert bucket.get("p/lhfs-store.json") is not None


def test_a_fifo_as_a_secret_file_or_backing_image_is_refused_at_once(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    target = "s3://input-fifo/p"
    said = refused(
        cli, 2, "backup", "init", "--target", target, "--encrypt", "--create-bucket",
        "--password-file", str(fifo),
    )  # fmt: skip
    assert f"password file {fifo} is not a regular file" in said
    serve = tmp_path / "served"
    said = refused(
        cli, 2, "replica", "serve", "--dir", str(serve), "--listen", "127.0.0.1:0",
        "--key-file", str(fifo),
    )  # fmt: skip
    assert f"key file {fifo} is not a regular file" in said
    assert not serve.exists()
    made = tmp_path / "made"
    args = ("replica", "init", "--dir", str(made), "--size", "1M", "--backing-image", str(fifo))
    said = refused(cli, 1, *args)
    assert f"backing image {fifo} is not a regular file" in said
    assert not made.exists()
    cli.run("volume", "create", "src", "--size", "1M", "--replicas", "1")
    said = refused(
        cli, 1, "dr", "create", "sb", "--target", target, "--volume", "src",
        "--credentials-file", str(fifo), "--no-wait",
    )  # fmt: skip
    assert f"credentials file {fifo} is not a regular file" in said
    assert "sb" not in {v["name"] for v in cli.json("volume", "ls")}


def test_a_malformed_region_is_refused_in_one_line_naming_it(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://input-region/p"
    for region in ("eu west", "../x", "x?", "-a", "a-"):
        for env in ({"AWS_REGION": region}, {"AWS_REGION": "", "AWS_DEFAULT_REGION": region}):
            other = Cli(tmp_path / "root", {**env})
            said = refused(other, 2, "backup", "ls", "--target", target, "--retry-timeout", "3")
            variable = "AWS_REGION" if env["AWS_REGION"] else "AWS_DEFAULT_REGION"
            assert f"{variable} is not a region name: {region!r}" in said, said
        without = Cli(tmp_path / "root", {"AWS_REGION": region, "AWS_ENDPOINT_URL": ""})
        said = refused(without, 2, "backup", "ls", "--target", target)
        assert "AWS_REGION is not a region name" in said and "ENDPOINT" not in said, said
    cli.run("backup", "init", "--target", target, "--create-bucket")
    for region in ("us-east-1", "garage_1", "RegionOne"):  # (any S3 names its region its way)
        assert (
            Cli(tmp_path / "root", {"AWS_REGION": region}).json("backup", "ls", "--target", target)
            == []
        )


def test_a_dr_poll_interval_below_a_second_is_refused(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://input-interval/p"
    one_backup(cli, target)
    for interval in ("0.001", "0.5", "0"):
        said = refused(
            cli, 2, "dr", "create", "sb", "--target", target, "--volume", "src",
            "--interval", interval, "--quiet",
        )  # fmt: skip
        assert "need 1 <= --interval <= --retry-max <= 86400 seconds" in said, said
    assert "sb" not in {v["name"] for v in cli.json("volume", "ls")}


def test_urls_with_control_characters_or_fragments_are_refused(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://input-urls/p"
    url = one_backup(cli, target)
    bucket = Bucket(Target.parse(target))
    before = sorted(o.object_name for o in bucket.list(""))
    for bad in ("s3://input-urls/p\nq", "s3://input-urls/p\tq", "s3://input-urls/p\x7f"):
        said = refused(cli, 2, "backup", "create", "src", "--target", bad, "--quiet")
        assert "holds a control character" in said and "s3://BUCKET/PREFIX" in said, said
    for bad in ("s3://input-urls/p#x", "s3://input-urls/p#", "s3://input-urls/p?"):
        said = refused(cli, 2, "backup", "ls", "--target", bad)
        assert "not a backup target" in said, said
    for bad in (url + "#x", url + "#", url.replace("volume=src", "volume=s\nrc")):
        said = refused(cli, 2, "backup", "restore", bad, "copy", "--quiet")
        assert "not a backup URL" in said or "control character" in said, said
    system = cli.run(
        "system", "backup", "--target", target, "--name", "sys", "--quiet"
    ).stdout.split()[-1]
    after = sorted(o.object_name for o in bucket.list(""))
    other = Cli(tmp_path / "other")
    for bad in (system + "#x", system.replace("system=sys", "system=s\nys")):
        said = refused(other, 2, "system", "restore", bad, "--quiet")
        assert "not a system backup URL" in said or "control character" in said, said
    said = refused(other, 1, "system", "restore", system, "--volumes", "nosuch", "--quiet")
    assert "holds no volume nosuch" in said, said
    said = refused(other, 2, "system", "restore", system, "--volumes", "src,", "--quiet")
    assert "an empty volume name: 'src,'" in said, said
    assert other.json("volume", "ls") == []
    assert len(after) > len(before) and sorted(o.object_name for o in bucket.list("")) == after


def test_dr_forget_of_a_malformed_id_and_check_of_an_empty_store(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://input-forget/p"
    url = one_backup(cli, target)
    for marker in ("..", "x/y", "", "-a"):
        said = refused(
            cli, 2, "dr", "forget", "sb", "--target", target, "--volume", "src", f"--id={marker}"
        )
        assert f"--id {marker!r} is not a marker's id" in said, said
    said = refused(
        cli, 1, "dr", "forget", "sb", "--target", target, "--volume", "src", "--id", "0" * 16
    )
    assert "holds no marker" in said, said
    said = cli.run("backup", "check", "--target", target).stdout
    assert "1 backup(s) authenticated, the 1 block(s) they name all present" in said, said
    bucket = Bucket(Target.parse(target))  # a removal cut short: its manifest gone, not its block
    backup = url.split("backup=")[1]
    bucket.delete(f"p/volumes/src/{backup}.json")
    said = cli.run("backup", "check", "--target", target).stdout  # (never "0 ... present")
    assert said.startswith(f"{target}: it holds no backup; no problem\n"), said
    assert "note: 1 block(s)" in said and "that no backup names" in said, said
    cli.run("volume", "create", "empty", "--size", "4M", "--replicas", "1")
    cli.backup("empty", target)  # (its blocks all zeros: it names none)
    said = cli.run("backup", "check", "--target", target).stdout
    assert said.startswith(f"{target}: 1 backup(s) authenticated, naming no block (all zeros)")


def test_a_block_name_in_another_directory_is_no_block_a_backup_can_reuse(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """An object under ``blocks/`` named as a block the backup holds, in a directory lhfs
    never puts it, is not taken for that block by the listing a large backup makes of the
    store's blocks (the backup would not send it, and could never be restored)."""
    target = "s3://input-misplaced/p"
    cli.run("backup", "init", "--target", target, "--create-bucket")
    cli.run("volume", "create", "src", "--size", "8M", "--replicas", "1")
    data = bytes(range(256)) * 256  # (one 64 KiB block of 128: the store's blocks are listed)
    for replica in cli.info("src")["replicas"]:
        with ChunkStore.open(Path(replica["dir"])) as store:
            store.write(MIB, data)
            store.flush()
    digest = digest_of(data)
    bucket = Bucket(Target.parse(target))
    bucket.put(f"p/blocks/{'yy' if digest.startswith('zz') else 'zz'}/{digest}", b"not it")
    args = ("backup", "create", "src", "--target", target, "--block-size", "64K", "--quiet")
    url = cli.run(*args).stdout.split()[-1]
    assert bucket.get(f"p/blocks/{digest[:2]}/{digest}") is not None
    cli.run("backup", "restore", url, "copy", "--quiet")
    assert cli.checksum("copy") == cli.checksum("src")
