"""Backups people can keep: authenticated manifests, encrypted stores, check and prune, all
against a real S3 server."""

from __future__ import annotations

import base64
import calendar
import contextlib
import http.server
import json
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import xxhash
import zstandard
from conftest import needs_fuse

from backupstore import keycache
from backupstore.keys import StoreKeys
from backupstore.retention import keep
from backupstore.s3 import Bucket, Endpoint, Target
from backupstore.store import (
    MAX_BLOCK,
    BackupStore,
    manifest_limit,
    order,
    snapshot_time,
    taken_at,
)
from lhfs.backups.backup import backup_url
from lhfs.core.errors import CorruptState
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, one_line, write_at

pytestmark = needs_fuse
MIB = 1 << 20
PATTERN = b"lhfs-recognisable-PATTERN-0123456789-"


def objects(target: str) -> dict[str, bytes]:
    """Every object under a target, by key."""
    bucket = Bucket(Target.parse(target))
    prefix = Target.parse(target).key("")
    return {obj.object_name: bucket.get(obj.object_name)[0] for obj in bucket.list(prefix)}


def backed_up_volume(cli: Cli, tmp_path: Path, target: str, name: str = "src") -> list[str]:
    """A volume with data and two backups of it in ``target``; their URLs."""
    cli.run("volume", "create", name, "--size", "16M", "--replicas", "1")
    device = tmp_path / f"{name}.dev"
    cli.run("volume", "attach", name, "--device", str(device))
    rng = random.Random(7)
    write_at(device, 0, rng.randbytes(6 * MIB))
    first = cli.backup(name, target)
    write_at(device, 8 * MIB, rng.randbytes(2 * MIB))
    second = cli.backup(name, target)
    cli.run("volume", "detach", name)
    return [first, second]


def test_tampered_manifests_records_and_blocks_are_refused_by_restore_dr_and_check(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://trust-plain/p"
    urls = backed_up_volume(cli, tmp_path, target)
    other = "s3://trust-other/p"
    backed_up_volume(cli, tmp_path, other, "elsewhere")
    bucket = Bucket(Target.parse(target))
    stored = objects(target)
    newest = urls[1].split("backup=")[1]
    manifest_key = f"p/volumes/src/{newest}.json"
    sealed = stored[manifest_key]
    body = json.loads(sealed[36:])
    blocks = [i for i, d in enumerate(body["blocks"]) if d]
    assert len(blocks) >= 2

    def swapped() -> bytes:
        changed = dict(body, blocks=list(body["blocks"]))
        i, j = blocks[0], blocks[1]
        changed["blocks"][i], changed["blocks"][j] = changed["blocks"][j], changed["blocks"][i]
        return sealed[:36] + json.dumps(changed).encode()  # valid JSON, the old MAC

    meta_key = "p/volumes/src/volume.meta"
    meta = stored[meta_key]
    edited_meta = meta[:36] + meta[36:].replace(b'"block_size": 2097152', b'"block_size": 1048576')
    assert edited_meta != meta
    a_block = f"{body['blocks'][blocks[0]][:2]}/{body['blocks'][blocks[0]]}"
    foreign = next(v for k, v in objects(other).items() if "/blocks/" in k)
    cases = [
        ("swapped digests", manifest_key, swapped(), "fails authentication"),
        ("truncated manifest", manifest_key, sealed[: len(sealed) // 2], "fails authentication"),
        ("edited volume.meta", meta_key, edited_meta, "fails authentication"),
        ("a block of another store", f"p/blocks/{a_block}", foreign, "does not match"),
    ]
    for what, key, bad, message in cases:
        original = bucket.get(key)
        assert original is not None, key
        bucket.put(
            key, bad, {"lhfs-compression": original[1].get("x-amz-meta-lhfs-compression", "none")}
        )
        try:
            restore = cli.run("backup", "restore", urls[1], "copy", "--quiet", check=False)
            if key == meta_key:  # (its damage is its own: each manifest authenticates alone)
                assert restore.returncode == 0, (what, restore.stderr)
                cli.run("volume", "rm", "copy")
            else:
                assert restore.returncode == 1, (what, restore.stderr)
                assert restore.stderr.count("\n") == 1 and message in restore.stderr, what
            assert "copy" not in cli.run("volume", "ls").stdout  # nothing left half-restored
            check = cli.run("backup", "check", "--target", target, "--read-data", check=False)
            assert check.returncode == 3 and message in check.stdout, (what, check.stdout)
            dr = cli.run(
                "dr", "create", "standby", "--target", target, "--volume", "src",
                "--replicas", "1", "--interval", "1", "--quiet", check=False,
            )  # fmt: skip
            if key == manifest_key:  # (the older backup reads: followed, the newest passed over)
                assert dr.returncode == 0 and f"passed over backup {newest}" in dr.stderr, dr
                assert message in dr.stderr, (what, dr.stderr)
            elif key == meta_key:
                assert dr.returncode == 0, (what, dr.stderr)
            else:
                assert dr.returncode == 1 and message in dr.stderr, (what, dr.stderr)
            cli.run("volume", "rm", "standby", check=False)
        finally:
            bucket.put(
                key,
                original[0],
                {"lhfs-compression": original[1].get("x-amz-meta-lhfs-compression", "none")},
            )
    sound = cli.json("backup", "check", "--target", target, "--read-data")
    assert sound["problems"] == [] and sound["backups"] == 2 and sound["blocks_read"] > 0
    cli.run("backup", "restore", urls[1], "copy", "--quiet")


def test_an_encrypted_store_holds_no_plaintext_nor_digest_and_needs_its_password(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://trust-sealed/p"
    password = tmp_path / "password"
    password.write_text("correct horse battery staple\n")
    password.chmod(0o600)
    wrong = tmp_path / "wrong"
    wrong.write_text("incorrect horse\n")
    wrong.chmod(0o600)
    pw = ("--password-file", str(password))
    refused = cli.run(
        "backup", "init", "--target", target, "--encrypt", "--create-bucket", check=False
    )
    assert refused.returncode == 2 and "--encrypt needs a password" in refused.stderr
    made = cli.json("backup", "init", "--target", target, "--encrypt", "--create-bucket", *pw)
    assert made == {"target": target, "created": True, "encrypted": True}

    cli.run("volume", "create", "secret", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "secret", "--device", str(device))
    pattern = PATTERN * (MIB // len(PATTERN))
    write_at(device, 0, pattern + os.urandom(MIB) + pattern)  # compressible and not
    content = device.read_bytes()
    cli.run("volume", "detach", "secret")
    for args, message in [
        ((), "is encrypted: give its password"),
        (("--password-file", str(wrong)), "the password does not open"),
    ]:  # refused before a snapshot is taken for it
        refused = cli.run("backup", "create", "secret", "--target", target, *args, check=False)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        assert cli.json("snapshot", "ls", "secret") == []
    url = cli.run("backup", "create", "secret", "--target", target, "--quiet", *pw).stdout.split()[
        -1
    ]

    digests = set()
    for block in (2 * MIB, 64 << 10):
        for at in range(0, len(content), block):
            digests.add(xxhash.xxh3_128_hexdigest(content[at : at + block]))
    stored = objects(target)
    assert len(stored) >= 4
    for key, data in stored.items():
        assert b"PATTERN" not in data and b"recognisable" not in data, key
        for digest in digests:
            assert digest not in key and digest.encode() not in data, key
            assert bytes.fromhex(digest) not in data, key

    for args, message in [
        ((), "is encrypted: give its password"),
        (("--password-file", str(wrong)), "the password does not open"),
    ]:
        failed = cli.run("backup", "restore", url, "copy", "--quiet", *args, check=False)
        assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
        assert message in failed.stderr
        assert "copy" not in cli.run("volume", "ls").stdout
    env_password = Cli(cli.root, {"LHFS_BACKUP_PASSWORD": "correct horse battery staple"})
    env_password.run("backup", "restore", url, "copy", "--quiet")
    assert cli.checksum("copy") == cli.checksum("secret")
    report = env_password.json("backup", "check", "--target", target, "--read-data")
    assert report["encrypted"] and report["problems"] == [] and report["blocks_read"] >= 2

    # the derived key is cached in the kernel's keyring, for that password only
    record = json.loads(Bucket(Target.parse(target)).get("p/lhfs-store.json")[0])
    salt = base64.b64decode(record["kdf"]["salt"])
    assert keycache.lookup(record["id"], salt, b"correct horse battery staple") is not None
    assert keycache.lookup(record["id"], salt, b"incorrect horse") is None

    # a block moved under another block's name does not open (bound to its name)
    bucket = Bucket(Target.parse(target))
    first, second = sorted(k for k in stored if "/blocks/" in k)[:2]
    bucket.put(first, stored[second])
    moved = env_password.run("backup", "restore", url, "copy2", "--quiet", check=False)
    assert moved.returncode == 1 and "does not open with this store's key" in moved.stderr
    bucket.put(first, stored[first])

    again = cli.json("backup", "init", "--target", target, "--encrypt", *pw)
    assert again["created"] is False
    mixed = cli.run("backup", "init", "--target", target, check=False)
    assert mixed.returncode == 1 and "is encrypted" in mixed.stderr
    cli.run("backup", "init", "--target", "s3://trust-plain2/p", "--create-bucket")
    mixed = cli.run("backup", "ls", "--target", "s3://trust-plain2/p", *pw, check=False)
    assert mixed.returncode == 0  # (nothing to open yet)
    cli.backup("copy", "s3://trust-plain2/p")
    mixed = cli.run("backup", "ls", "--target", "s3://trust-plain2/p", *pw, check=False)
    assert mixed.returncode == 2 and "is not encrypted" in mixed.stderr
    args = ("backup", "init", "--target", "s3://trust-plain2/p", "--encrypt", *pw)
    mixed = cli.run(*args, check=False)
    assert mixed.returncode == 2 and "not encrypted: a store stays as it was made" in mixed.stderr

    # a DR standby follows an encrypted store with its recorded password file
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "secret", "--replicas", "1",
        "--interval", "1", "--quiet", *pw,
    )  # fmt: skip
    status = cli.json("dr", "status", "standby")
    assert status["last_restored_backup"] == url.split("backup=")[1]
    cli.run("dr", "activate", "standby", "--quiet")
    assert cli.checksum("standby") == cli.checksum("secret")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"last": 2}, {"h23", "h22"}),
        ({"hourly": 3}, {"h23", "h22", "h21"}),
        ({"daily": 2}, {"h23", "d1"}),
        ({"daily": 10}, {"h23", "d1", "d2", "w2", "m2"}),
        ({"weekly": 2}, {"h23", "w2"}),
        ({"monthly": 2}, {"h23", "w2"}),
        ({"monthly": 3}, {"h23", "w2", "m2"}),
        ({"yearly": 5}, {"h23"}),
        ({"last": 1, "monthly": 2}, {"h23", "w2"}),
        ({"hourly": 1, "daily": 1}, {"h23"}),
        ({"last": 100}, {"h23", "h22", "h21", "h21b", "d1", "d2", "w2", "m2"}),
    ],
)
def test_prune_policy_keeps_exactly_what_it_names(policy: dict[str, int], expected: set) -> None:
    """Fixed times (UTC): 2026-12-04 23:10 is the newest; one backup an hour before it, two in
    the hour before that, one each of the two previous days, one two weeks back, one two
    months back."""
    newest = calendar.timegm((2026, 12, 4, 23, 10, 0, 0, 0, 0))
    hour, day = 3600, 86400
    times = {
        "h23": newest,
        "h22": newest - hour,
        "h21": newest - 2 * hour,
        "h21b": newest - 2 * hour - 600,
        "d1": newest - day,
        "d2": newest - 2 * day,
        "w2": newest - 14 * day,
        "m2": newest - 62 * day,
    }
    backups = [{"name": n, "time": t} for n, t in times.items()]
    random.Random(len(policy)).shuffle(backups)
    assert set(keep(backups, policy)) == expected


def test_prune_keeps_its_policy_and_what_a_standby_holds(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    target = "s3://trust-prune/p"
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "v", "--device", str(device))
    urls = []
    for n in range(5):
        write_at(device, n * 2 * MIB, os.urandom(MIB))
        urls.append(cli.backup("v", target))
        if n == 1:  # a standby that holds the second backup, then stops following
            cli.run(
                "dr", "create", "standby", "--target", target, "--volume", "v",
                "--replicas", "1", "--interval", "1", "--quiet",
            )  # fmt: skip
            wait_for(
                lambda: Bucket(Target.parse(target)).list_upto("p/standbys/", 10), 30, "marker"
            )
            cli.run("dr", "stop", "standby")
    names = [u.split("backup=")[1] for u in urls]
    store = BackupStore(Bucket(Target.parse(target)))
    blocks_before = store.block_count()
    dry = cli.json(
        "backup", "prune", "--target", target, "--volume", "v", "--keep-last", "2", "--dry-run"
    )
    assert [k["name"] for k in dry["kept"]] == [names[1], names[3], names[4]]
    assert [r["name"] for r in dry["removed"]] == [names[0], names[2]]
    assert store.block_count() == blocks_before and len(store.complete_names("v")) == 5
    refused = cli.run("backup", "prune", "--target", target, "--volume", "v", check=False)
    assert refused.returncode == 2 and "no --keep-* rule" in refused.stderr
    done = cli.json("backup", "prune", "--target", target, "--volume", "v", "--keep-last", "2")
    kept = {k["name"]: k["reasons"] for k in done["kept"]}
    assert set(kept) == {names[1], names[3], names[4]}
    assert any("DR standby standby" in r for r in kept[names[1]])
    assert sorted(store.complete_names("v")) == sorted(kept)
    # collection arithmetic: what is left is exactly what the kept backups name
    report = cli.json("backup", "check", "--target", target)
    assert report["unreferenced_blocks"] == 0 and report["problems"] == []
    assert store.block_count() == report["blocks"] == blocks_before - done["collected"]
    cli.run("dr", "start", "standby")
    cli.dr_restored("standby", urls[4])
    cli.run("volume", "detach", "v")
    cli.run("dr", "activate", "standby", "--quiet")
    assert cli.checksum("standby") == cli.checksum("v")


def test_scattered_small_writes_upload_deltas_and_restore_equal(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """1% of the 64 KiB chunks changed at random, five times: each increment uploads at most
    5% of the volume (whole 2 MiB blocks would be some 15%); restores, a DR standby, check and
    prune all see the same data; a block changed in many chunks is stored whole again."""
    target = "s3://trust-deltas/p"
    size, chunk = 128 * MIB, 64 << 10
    cli.run("volume", "create", "d", "--size", "128M", "--replicas", "1")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "d", "--device", str(device))
    rng = random.Random(5)
    with open(device, "r+b") as f:
        for _ in range(0, size, MIB):
            f.write(rng.randbytes(MIB // 2) + bytes(MIB // 2))
        f.flush()
        os.fsync(f.fileno())
    store = BackupStore(Bucket(Target.parse(target)))
    cli.backup("d", target)
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "d", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip

    def stored_bytes() -> int:
        return sum(obj.size for obj in store.bucket.list("p/blocks/"))

    urls = []
    for _ in range(5):
        for place in rng.sample(range(size // chunk), size // chunk // 100):
            write_at(device, place * chunk, rng.randbytes(chunk // 2) + bytes(chunk // 2))
        before = stored_bytes()
        urls.append(cli.backup("d", target))
        assert stored_bytes() - before <= 0.05 * size, (stored_bytes() - before) / size
    manifest = store.manifest("d", urls[-1].split("backup=")[1])
    assert len(manifest["deltas"]) >= 10 and manifest["delta_unit"] == chunk
    write_at(device, 0, rng.randbytes(12 * chunk))  # 12 of block 0's 32 chunks: whole again
    urls.append(cli.backup("d", target))
    assert "0" not in store.manifest("d", urls[-1].split("backup=")[1]).get("deltas", {})
    total = cli.checksum("d")
    cli.dr_restored("standby", urls[-1])
    cli.run("volume", "detach", "d")
    for n in (2, 5):
        cli.run("backup", "restore", urls[n], f"copy{n}", "--replicas", "1", "--quiet")
    assert cli.checksum("copy5") == total
    pruned = cli.json("backup", "prune", "--target", target, "--volume", "d", "--keep-last", "1")
    assert len(pruned["removed"]) == 6  # (the standby holds the newest too)
    report = cli.json("backup", "check", "--target", target, "--read-data")
    assert report["problems"] == [] and report["unreferenced_blocks"] == 0
    cli.run("volume", "rm", "copy5")
    cli.run("backup", "restore", urls[-1], "copy5", "--replicas", "1", "--quiet")
    assert cli.checksum("copy5") == total
    cli.run("dr", "activate", "standby", "--quiet")
    assert cli.checksum("standby") == total


def test_an_increment_that_knows_no_chunk_changes_keeps_its_base_deltas(s3_endpoint: str) -> None:
    """A block stored as a delta in the base, unchanged since, is carried by an increment
    whose chunk-level changes are unknown (more than a replica lists, say): the increment's
    manifest names the base's delta unit (it named 0 and no restore could read it)."""
    bucket = Bucket(Target.parse("s3://trust-carried/p"))
    bucket.ensure(create=True)
    store = BackupStore(bucket)
    unit, rng = 64 << 10, random.Random(9)
    blocks = [rng.randbytes(MIB // 2) + bytes(MIB // 2) for _ in range(4)]

    def read(index: int, block_size: int) -> bytes:
        return blocks[index]

    extra = {"chunk_size": unit}
    store.create("v", "b1", 4 * MIB, read, block_size=MIB, extra=extra)
    blocks[1] = rng.randbytes(unit) + blocks[1][unit:]  # (one unit of block 1: a delta)
    second, _ = store.create("v", "b2", 4 * MIB, read, block_size=MIB, base=("b1", [1]),
                             extra=extra, units=(unit, {1: {0}}))  # fmt: skip
    assert list(second["deltas"]) == ["1"] and second["delta_unit"] == unit, second
    blocks[2] = rng.randbytes(MIB)
    third, _ = store.create("v", "b3", 4 * MIB, read, block_size=MIB, base=("b2", [2]),
                            extra=extra, units=None)  # fmt: skip
    assert list(third["deltas"]) == ["1"] and third["delta_unit"] == unit, third
    reseal(store, "volumes/v/b3.json", json.dumps({**third, "delta_unit": 0}).encode())
    assert store.manifest("v", "b3")["delta_unit"] == unit  # (as an earlier lhfs wrote it)
    out = bytearray(4 * MIB)

    def write(index: int, data: bytes) -> None:
        out[index * MIB : index * MIB + len(data)] = data

    store.restore("v", "b3", write)
    assert bytes(out) == b"".join(blocks)


def small_backup(
    target: str, volume: str = "v", password: bytes | None = None
) -> tuple[BackupStore, str, dict]:
    """A store (plain, or encrypted with ``password``) holding one backup of 4 MiB in 1 MiB
    blocks, made by the store's own code (no volume to attach): the store, the backup's URL
    and its manifest."""
    bucket = Bucket(Target.parse(target))
    bucket.ensure(create=True)
    store = BackupStore(bucket, password=password)
    rng = random.Random(3)
    blocks = [rng.randbytes(MIB // 2) + bytes(MIB // 2) for _ in range(4)]
    manifest, _ = store.create(
        volume,
        "b1",
        4 * MIB,
        lambda index, block_size: blocks[index],
        block_size=MIB,
        extra={"chunk_size": 64 << 10},
    )
    return store, backup_url(bucket.target, volume, "b1"), manifest


def test_backup_rm_refuses_a_wrong_password_before_it_deletes(cli: Cli, s3_endpoint: str) -> None:
    """``backup rm`` with no password or a wrong one for an encrypted store, or one for a
    plain store, fails in one line and deletes nothing: the backup stays complete."""
    _, sealed, _ = small_backup("s3://trust-rm/sealed", password=b"right horse")
    _, plain, _ = small_backup("s3://trust-rm/plain")
    right = Cli(cli.root, {"LHFS_BACKUP_PASSWORD": "right horse"})
    wrong = Cli(cli.root, {"LHFS_BACKUP_PASSWORD": "wrong horse"})
    for who, url, code, why in (
        (cli, sealed, 1, "is encrypted: give its password"),
        (wrong, sealed, 1, ""),
        (right, plain, 2, "give no password for it"),  # (a usage error)
    ):
        refused = who.run("backup", "rm", url, check=False)
        assert refused.returncode == code and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("lhfs: error: ") and why in refused.stderr
    for who, url in ((right, sealed), (cli, plain)):
        target = url.split("?")[0]
        listed = who.json("backup", "ls", "--target", target)
        assert [(b["url"], b["state"]) for b in listed] == [(url, "complete")], listed
        who.run("backup", "rm", url)
        assert who.json("backup", "ls", "--target", target) == []


def test_a_decompression_bomb_is_a_corrupt_block_not_a_gigabyte(cli: Cli, s3_endpoint: str) -> None:
    """A block replaced by a few KB of zstd that claim 256 MiB (or claim nothing and go on
    past a block's size) is refused as corrupt without taking that memory."""
    target = "s3://trust-bomb/p"
    store, url, manifest = small_backup(target)
    digest = manifest["blocks"][1]
    key = f"p/blocks/{digest[:2]}/{digest}"
    claims = zstandard.ZstdCompressor(level=1).compress(bytes(256 * MIB))
    silent = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(32 * MIB))
    assert len(claims) < 64 << 10
    for bomb in (silent, claims):
        store.bucket.put(key, bomb, {"lhfs-compression": "zstd"})
        tracemalloc.start()
        try:
            with pytest.raises(CorruptState, match="cannot be decompressed"):
                BackupStore(store.bucket).get_block(digest)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 24 * MIB, peak
    restore = cli.run("backup", "restore", url, "copy", "--quiet", check=False)
    assert restore.returncode == 1 and restore.stderr.count("\n") == 1, restore.stderr
    assert "cannot be decompressed: it claims more than 16M" in restore.stderr
    assert "copy" not in cli.run("volume", "ls").stdout
    check = cli.run("backup", "check", "--target", target, "--read-data", check=False)
    assert check.returncode == 3 and f"block {digest}" in check.stdout, check.stdout
    assert "cannot be decompressed" in check.stdout


def test_an_object_larger_than_lhfs_writes_is_refused_unread(cli: Cli, s3_endpoint: str) -> None:
    """A store record of 2 MiB and a block larger than the largest block are refused in one
    line naming the object, not read whole."""
    target = "s3://trust-large/p"
    store, url, manifest = small_backup(target)
    record = store.bucket.get("p/lhfs-store.json")
    assert record is not None
    store.bucket.put("p/lhfs-store.json", record[0] + b" " * (2 * MIB))
    listing = cli.run("backup", "ls", "--target", target, check=False)
    assert listing.returncode == 1 and listing.stderr.count("\n") == 1, listing.stderr
    assert "p/lhfs-store.json in s3://trust-large is larger than lhfs writes" in listing.stderr
    store.bucket.put("p/lhfs-store.json", record[0])
    digest = manifest["blocks"][2]
    key = f"p/blocks/{digest[:2]}/{digest}"
    store.bucket.put(key, os.urandom(MAX_BLOCK + MIB), {"lhfs-compression": "none"})
    restore = cli.run("backup", "restore", url, "copy", "--quiet", check=False)
    assert restore.returncode == 1 and restore.stderr.count("\n") == 1, restore.stderr
    assert f"{key} in s3://trust-large is larger than lhfs writes" in restore.stderr
    check = cli.run("backup", "check", "--target", target, "--read-data", check=False)
    assert check.returncode == 3 and f"{key} in s3://trust-large is larger" in check.stdout


class _Liar(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose every object is endless: one says so in its length (and then
    sends little), the other names no length and streams on."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("/long"):
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            self.wfile.write(bytes(4096))
            self.connection.settimeout(5)  # (held open until the client goes, 5 s at most)
            with contextlib.suppress(OSError):
                self.rfile.read(1)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = bytes(64 << 10)
        for _ in range(1024):  # 64 MiB, unless the client stops first
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


def test_a_read_stops_at_its_bound_whatever_the_server_says() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{server.server_port}", "us-east-1", "k", "s")
        bucket = Bucket(Target.parse("s3://liar/p"), deadline=3, endpoint=endpoint)
        for key in ("p/long", "p/endless"):
            started = time.monotonic()
            with pytest.raises(CorruptState, match=f"{key} in s3://liar is larger than lhfs"):
                bucket.get(key, limit=MIB)
            assert time.monotonic() - started < 2, key
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("block_size", [16 << 10, 2 * MIB, MAX_BLOCK])
def test_the_bound_of_a_manifest_holds_the_largest_lhfs_writes(block_size: int) -> None:
    """Blocks of the largest volume's last indexes, each stored as a delta of the most 4 KiB
    units a delta holds: as many as the largest volume has weigh less than the bound."""
    count = 64
    units = list(range(block_size // 4096 - block_size // 16384, block_size // 4096))
    first = (1 << 50) // block_size - count
    digest = "f" * 32
    manifest = {
        "blocks": [digest] * count,
        "deltas": {
            str(first + i): {"base": digest, "units": units, "delta": digest} for i in range(count)
        },
    }
    assert len(json.dumps(manifest)) / count * ((1 << 50) // block_size) < manifest_limit(
        block_size
    )


def reseal(store: BackupStore, relative: str, payload: bytes) -> None:
    """Write ``payload`` under ``relative`` sealed as lhfs seals it, with the MAC key a plain
    store keeps in its record: what anyone who can write the bucket can do."""
    record = store.bucket.get(store.target.key("lhfs-store.json"))
    assert record is not None
    keys = StoreKeys.open(record[0], None, "forger")
    store.bucket.put(store.target.key(relative), keys.seal(relative, payload))


def test_a_resealed_manifest_with_fields_of_the_wrong_type_is_refused_in_one_line(
    cli: Cli, s3_endpoint: str
) -> None:
    """Each field of a manifest is checked for its type and range: a manifest re-sealed with
    the plain store's MAC key is refused by restore, DR and check (a problem), never a
    traceback nor "no problem"; so is JSON nested deep enough to exhaust the parser."""
    target = "s3://trust-fields/p"
    store, url, manifest = small_backup(target)
    relative = "volumes/v/b1.json"
    digest = manifest["blocks"][0]
    with_delta = {"0": {"base": digest, "delta": digest, "units": [1, 2]}, "delta_unit": 65536}
    cases: list[tuple[str, dict | None]] = [
        ("chunk_size", {"chunk_size": "x"}),
        ("size", {"size": 4.0 * MIB}),
        ("chunk_size", {"chunk_size": 3}),
        ("chunk_size", {"chunk_size": 1 << 23}),
        ("size", {"size": -1, "blocks": []}),
        ("block_size", {"block_size": 3000, "blocks": manifest["blocks"] * 350}),
        ("blocks", {"blocks": [*manifest["blocks"][:3], digest + "\n"]}),
        ("blocks", {"blocks": [*manifest["blocks"][:3], 5]}),
        ("started", {"started": "x"}),
        ("started", {"started": float("inf")}),
        ("created", {"created": 5}),
        ("created", {"created": "2024-02-30T00:00:00Z", "started": 0}),
        ("taken", {"taken": "2024-02-30T00:00:00Z"}),
        ("taken", {"taken": -1.0}),
        ("taken", {"taken": float("nan")}),
        ("taken", {"taken": True}),
        ("snapshot", {"snapshot": ["s"]}),
        ("format", {"format": True}),
        ("delta_unit", {"deltas": {"0": with_delta["0"]}, "delta_unit": 3}),
        ("deltas", {"deltas": {"0": {**with_delta["0"], "units": [True]}}, "delta_unit": 65536}),
        ("deltas", {"deltas": {" 0": with_delta["0"]}, "delta_unit": 65536}),
        ("JSON", None),
    ]
    for field, changes in cases:
        payload = (
            b"[" * 100_000 if changes is None else json.dumps({**manifest, **changes}).encode()
        )
        reseal(store, relative, payload)
        expected = f"the manifest of backup b1 of v cannot be parsed (its {field})"
        fresh = BackupStore(store.bucket)  # (what a command opens)
        with pytest.raises(CorruptState) as refused:
            fresh.manifest("v", "b1")
        assert str(refused.value) == expected, changes
        assert fresh.check()["problems"] == [expected], changes
        if changes not in (cases[0][1], cases[1][1], None):
            continue  # (the commands on a few: they all read manifests as above)
        restore = cli.run("backup", "restore", url, "copy", "--quiet", check=False)
        assert restore.returncode == 1, (changes, restore.stderr)
        assert restore.stderr == f"lhfs: error: {expected}\n", (changes, restore.stderr)
        assert "copy" not in cli.run("volume", "ls").stdout
        check = cli.run("backup", "check", "--target", target, "--json", check=False)
        assert check.returncode == 3, (changes, check.stderr)
        assert json.loads(check.stdout)["problems"] == [expected], (changes, check.stdout)
        dr = cli.run(
            "dr", "create", "standby", "--target", target, "--volume", "v",
            "--replicas", "1", "--interval", "1", "--quiet", check=False,
        )  # fmt: skip
        passed = f"lhfs: passed over backup b1 of v: {expected}\n"
        nothing = f"lhfs: error: {target} holds no complete backup of volume v\n"
        assert dr.returncode == 1 and dr.stderr == passed + nothing, dr.stderr
        assert "standby" not in cli.run("volume", "ls").stdout
    reseal(store, relative, json.dumps(manifest).encode())
    cli.run("backup", "restore", url, "copy", "--quiet")
    record = store.bucket.get("p/lhfs-store.json")
    assert record is not None
    store.bucket.put("p/lhfs-store.json", b"[" * 100_000)
    listing = cli.run("backup", "ls", "--target", target, check=False)
    assert listing.returncode == 1 and listing.stderr.count("\n") == 1, listing.stderr
    assert "the store record s3://trust-fields/p cannot be read" in listing.stderr


def test_a_manifest_naming_a_block_of_another_size_is_refused_before_it_is_written(
    cli: Cli, s3_endpoint: str
) -> None:
    """A manifest re-sealed to name, at one place, a block of another backup whose blocks are
    larger (its digest right, its content whole): a restore and a DR standby refuse it in one
    line, where they wrote its megabyte over the blocks after its place (those the manifest
    says are zeros are never written: they kept the stray bytes, and a standby recorded them
    as zeros for good); ``backup check --read-data`` names it."""
    target = "s3://trust-slot/p"
    store, _, large = small_backup(target)  # (volume v: 1 MiB blocks)
    rng = random.Random(4)
    small = [rng.randbytes(64 << 10), *[bytes(64 << 10)] * 15]
    manifest, _ = store.create(
        "w", "b1", MIB, lambda index, size: small[index], block_size=64 << 10,
        extra={"chunk_size": 64 << 10},
    )  # fmt: skip
    blocks = list(manifest["blocks"])
    blocks[1] = large["blocks"][0]
    reseal(store, "volumes/w/b1.json", json.dumps({**manifest, "blocks": blocks}).encode())
    said = "block 1 of backup b1 of volume w is 1048576 bytes, not the 65536 of its backup's"
    url = backup_url(store.bucket.target, "w", "b1")
    restore = one_line(cli.run("backup", "restore", url, "copy", "--quiet", check=False))
    assert said in restore, restore
    assert "copy" not in cli.run("volume", "ls").stdout
    check = cli.run("backup", "check", "--target", target, "--read-data", "--json", check=False)
    assert check.returncode == 3, check.stderr
    (problem,) = json.loads(check.stdout)["problems"]
    assert "is 1048576 bytes, not the block size of every backup naming it" in problem, problem
    cli.run(
        "dr", "create", "standby", "--target", target, "--volume", "w", "--replicas", "1",
        "--interval", "1", "--quiet", check=False,
    )  # fmt: skip
    status = wait_for(
        lambda: (s := cli.json("dr", "status", "standby"))["last_error"] and s,
        60,
        "the standby to refuse the block",
    )
    assert "is 1048576 bytes, not the 65536" in status["last_error"], status


def test_a_date_that_does_not_exist_is_a_damaged_manifest_not_a_traceback(
    cli: Cli, s3_endpoint: str
) -> None:
    """A manifest re-sealed with the plain store's MAC key whose snapshot time (or, with no
    start, its creation) is 2024-02-30: it has the form of a date but is none. ``backup ls``
    and prune report it damaged, in one line, and go on with the others; a snapshot time in
    the form the first manifests that had one wrote (RFC 3339) still reads."""
    target = "s3://trust-dates/p"
    store, _, manifest = small_backup(target)
    relative = "volumes/v/b1.json"
    for field, changes in (
        ("taken", {"taken": "2024-02-30T00:00:00Z"}),
        ("created", {"created": "2024-02-30T00:00:00Z", "started": 0}),
    ):
        reseal(store, relative, json.dumps({**manifest, **changes}).encode())
        expected = f"the manifest of backup b1 of v cannot be parsed (its {field})"
        listed = cli.json("backup", "ls", "--target", target)
        assert [(b["state"], b["reason"]) for b in listed] == [("damaged", expected)], listed
        pruned = cli.json(
            "backup", "prune", "--target", target, "--volume", "v", "--keep-last", "1", "--dry-run"
        )
        assert pruned["removed"] == [] and len(pruned["damaged"]) == 1, pruned
        check = cli.run("backup", "check", "--target", target, "--json", check=False)
        assert json.loads(check.stdout)["problems"] == [expected], check.stdout
    reseal(store, relative, json.dumps({**manifest, "taken": "2024-02-28T10:11:12Z"}).encode())
    (listed,) = cli.json("backup", "ls", "--target", target)
    assert (listed["state"], listed["taken"]) == ("complete", "2024-02-28T10:11:12Z"), listed


def test_a_manifest_or_store_record_of_a_newer_format_says_upgrade_not_damaged(
    cli: Cli, s3_endpoint: str
) -> None:
    """A manifest (and a store record) whose ``format`` is newer than this lhfs knows was
    written by a newer lhfs: said so ("upgrade lhfs"), shown as ``newer`` by ``backup ls``,
    never called damaged (an older lhfs once called every manifest of a newer one so)."""
    target = "s3://trust-newer/p"
    store, url, manifest = small_backup(target)
    reseal(store, "volumes/v/b1.json", json.dumps({**manifest, "format": 99}).encode())
    newer_lhfs = "written by a newer lhfs (format 99): upgrade lhfs"
    expected = f"the manifest of backup b1 of v was {newer_lhfs}"
    with pytest.raises(CorruptState) as refused:
        BackupStore(store.bucket).manifest("v", "b1")
    assert str(refused.value) == expected
    (listed,) = cli.json("backup", "ls", "--target", target)
    assert (listed["state"], listed["reason"]) == ("newer", expected), listed
    restore = cli.run("backup", "restore", url, "copy", "--quiet", check=False)
    assert restore.returncode == 1 and restore.stderr == f"lhfs: error: {expected}\n"
    record = store.bucket.get(store.target.key("lhfs-store.json"))
    assert record is not None
    newer = {**json.loads(record[0]), "format": 99}
    store.bucket.put(store.target.key("lhfs-store.json"), json.dumps(newer).encode())
    listing = cli.run("backup", "ls", "--target", target, check=False)
    assert listing.returncode == 1, listing.stderr
    assert listing.stderr == f"lhfs: error: the store record {target} was {newer_lhfs}\n"


def test_gc_of_a_store_holding_a_newer_manifest_says_upgrade_never_remove_it(
    cli: Cli, s3_endpoint: str
) -> None:
    """``backup gc`` of a store holding a manifest a newer lhfs wrote (a valid backup) says
    this lhfs cannot collect the store: upgrade to collect. It said to ``backup rm`` it, as a
    damaged one. Said first when damaged ones are there too; nothing is deleted."""
    target = "s3://trust-newer-gc/p"
    store, _url, manifest = small_backup(target)
    reseal(store, "volumes/v/b1.json", json.dumps({**manifest, "format": 99}).encode())
    store.bucket.put(store.target.key("volumes/v/b0.json"), b"not a manifest")  # (damaged)
    before = objects(target)
    gc = cli.run("backup", "gc", "--target", target, check=False)
    assert gc.returncode == 1, gc.stderr
    assert gc.stderr == (
        "lhfs: error: not collecting: the manifest of backup b1 of v was written by a newer "
        "lhfs (format 99) (and 1 more: 'lhfs backup ls' shows them); this lhfs cannot collect "
        "this store: upgrade lhfs to collect\n"
    ), gc.stderr
    assert objects(target) == before


def test_the_time_a_backup_orders_by_never_fails() -> None:
    """``taken_at`` and ``order`` read what they can and never raise: a snapshot time (a
    number, or RFC 3339 as the first manifests that had one wrote), else the start, else the
    creation, else 0; a layer's time is read to the second, fractions and offset or not."""
    feb = calendar.timegm((2024, 2, 28, 10, 11, 12, 0, 0, 0))
    assert taken_at({"taken": feb + 0.25, "started": 5.0}) == feb + 0.25
    assert taken_at({"taken": "2024-02-28T10:11:12Z", "started": 5.0}) == feb
    assert taken_at({"taken": "2024-02-30T00:00:00Z", "started": 5.0}) == 5.0
    assert taken_at({"taken": None, "started": 0, "created": "2024-02-28T10:11:12Z"}) == feb
    assert taken_at({"taken": "x", "started": "y", "created": "2024-02-30T00:00:00Z"}) == 0.0
    assert taken_at({}) == 0.0
    junk = {"name": "b", "taken": [1], "started": "z", "created": None}
    assert order(junk) == (0.0, 0.0, "b")
    # two snapshots within one second are ordered by the instant each was taken
    first, second = {"name": "z", "taken": feb + 0.1}, {"name": "a", "taken": feb + 0.9}
    assert sorted([second, first], key=order) == [first, second]
    for layer in (
        "2024-02-28T10:11:12Z",
        "2024-02-28T10:11:12.987654Z",
        "2024-02-28T10:11:12+00:00",
    ):
        assert snapshot_time(layer) == feb, layer
    for layer in ("2024-02-30T00:00:00Z", "", "yesterday", None, 5):
        assert snapshot_time(layer) is None, layer


def test_a_resealed_system_record_with_fields_of_the_wrong_type_is_refused(
    cli: Cli, s3_endpoint: str
) -> None:
    """A system backup's record re-sealed with fields a restore uses of the wrong type (a
    replica count, a setting, a volume's name) is refused in one line, nothing restored (it
    ended in a traceback half-way)."""
    target = "s3://trust-system/p"
    store, _url, _manifest = small_backup(target)
    good = {"backup": "b1", "replicas": 1, "config": {"settings": {"io_timeout": 8.0}}}
    cases = [
        {"v": {**good, "replicas": "x"}},
        {"v": {**good, "config": {"settings": {"io_timeout": "soon"}}}},
        {"v": {**good, "config": {"settings": {"io_timeout": float("nan")}}}},
        {"v": {**good, "config": "x"}},
        {"v": "x"},
        {"../v": good},
    ]
    for volumes_part in cases:
        record = {"format": 1, "name": "s", "created": "2026-12-05T00:00:00Z", "started": 0.0,
                  "volumes": volumes_part, "images": {}, "skipped": {}}  # fmt: skip
        reseal(store, "systems/s.json", json.dumps(record).encode())
        result = cli.run("system", "restore", f"{target}?system=s", check=False)
        assert result.returncode == 1, (volumes_part, result.stderr)
        assert result.stderr == "lhfs: error: the record of system backup s cannot be parsed\n"
        assert cli.run("volume", "ls").stdout.startswith("no volumes")  # (nothing restored)


def test_a_store_record_asking_for_a_costly_key_derivation_is_refused_before_it(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """An encrypted store's record (not authenticated before its key is derived) edited to
    ask scrypt for 512 MiB, or for parameters that are not numbers, is refused in one line
    without deriving; the record lhfs wrote opens."""
    target = "s3://trust-kdf/p"
    password = tmp_path / "password"
    password.write_text("correct horse battery staple\n")
    password.chmod(0o600)
    pw = ("--password-file", str(password))
    cli.run("backup", "init", "--target", target, "--encrypt", "--create-bucket", *pw)
    bucket = Bucket(Target.parse(target))
    found = bucket.get("p/lhfs-store.json")
    assert found is not None
    record = json.loads(found[0])
    assert cli.json("backup", "check", "--target", target, *pw)["problems"] == []
    salt = base64.b64encode(os.urandom(16)).decode()  # (no derived key cached for it)
    for edit in ({"n": 1 << 17, "r": 32}, {"n": "x"}, {"n": 3 << 14}, {"p": 2}):
        kdf = {**record["kdf"], "salt": salt, **edit}
        bucket.put("p/lhfs-store.json", json.dumps({**record, "kdf": kdf}).encode())
        started = time.monotonic()
        refused = cli.run("backup", "check", "--target", target, *pw, check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "asks for a key derivation lhfs refuses" in refused.stderr, (edit, refused.stderr)
        assert time.monotonic() - started < 5
    bucket.put("p/lhfs-store.json", found[0])
    assert cli.json("backup", "check", "--target", target, *pw)["problems"] == []


def test_image_names_are_kept_for_backing_images_backups(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """No volume is named ``image-...`` (the store's name for a backing image's backups):
    not created, restored into, nor a standby; and a backing image's backup is never made a
    volume, by restore or DR, but said to be an image's."""
    target = "s3://trust-images/p"
    store, url, _ = small_backup(target)
    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(MIB + 512))
    cli.run("backing-image", "create", "odd", "--from", str(raw))
    image_url = cli.run(
        "backing-image", "backup", "odd", "--target", target, "--quiet"
    ).stdout.split()[-1]
    assert "volume=image-odd&" in image_url
    reserved = "names starting with 'image-' are reserved for backing images' backups"
    image_backup = "the backups of image-odd are the backing image odd's, not a volume's"
    for args, message in [
        (("volume", "create", "image-odd", "--size", "4M", "--replicas", "1"), reserved),
        (("backup", "restore", url, "image-copy", "--quiet"), reserved),
        (("backup", "restore", image_url, "copy", "--quiet"), image_backup),
        (("dr", "create", "image-sb", "--target", target, "--volume", "v"), reserved),
        (("dr", "create", "sb", "--target", target, "--volume", "image-odd"), image_backup),
    ]:
        refused = cli.run(*args, check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (args, refused)
        assert message in refused.stderr, (args, refused.stderr)
        assert cli.json("volume", "ls") == []
    assert "system restore" in refused.stderr
    assert [b["volume"] for b in store.list()] == ["v", "image-odd"]
    # a volume of such a name made before they were kept: backed up and restored as before
    cli.run("volume", "create", "older", "--size", "4M", "--replicas", "1")
    (cli.root / "volumes" / "older").rename(cli.root / "volumes" / "image-older")
    older = cli.backup("image-older", target)
    cli.run("backup", "restore", older, "back", "--replicas", "1", "--quiet")
    assert cli.checksum("back") == cli.checksum("image-older")
    shared = cli.run("backing-image", "create", "older", "--from", str(raw), check=False)
    assert shared.returncode == 1 and "would share its backups" in shared.stderr, shared.stderr
    (cli.root / "volumes" / "image-older").rename(cli.root / "volumes" / "image-odd")
    shared = cli.run("backup", "create", "image-odd", "--target", target, check=False)
    assert shared.returncode == 1 and "would share their backups" in shared.stderr


def test_a_damaged_or_stray_manifest_is_shown_and_removable_and_stops_no_other_command(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A manifest with one byte flipped (the newest, the next backup's base) and a stray
    object named like one: ls shows both damaged with the reason, a DR standby follows the
    newest backup that reads, prune neither keeps nor
    removes them, the next backup reads the whole volume and says why, gc deletes no block
    while one is there (the blocks it names are unknown), and 'backup rm' removes each."""
    target = "s3://trust-damaged/p"
    first, newest = backed_up_volume(cli, tmp_path, target, "v3")
    bucket = Bucket(Target.parse(target))
    key = f"p/volumes/v3/{newest.split('backup=')[1]}.json"
    found = bucket.get(key)
    assert found is not None
    flipped = bytearray(found[0])
    flipped[len(flipped) // 2] ^= 1
    bucket.put(key, bytes(flipped))
    stray = "backup-20991231-000000-aaaa-1-aaaa"
    bucket.put(f"p/volumes/v3/{stray}.json", b"not a manifest")
    store = BackupStore(bucket)
    blocks = store.block_count()

    for args in ((), ("--volume", "v3")):
        listed = cli.json("backup", "ls", "--target", target, *args)
        states = {b["url"]: (b["state"], b["reason"]) for b in listed}
        assert states[first] == ("complete", None)
        for url in (newest, f"{target}?volume=v3&backup={stray}"):
            assert states[url][0] == "damaged" and "fails authentication" in states[url][1]
    table = cli.run("backup", "ls", "--target", target).stdout.splitlines()
    row = next(line for line in table if newest in line)
    assert " damaged " in row and row.endswith("is not this store's)"), row
    made = cli.run(  # a standby follows the newest backup that reads, saying what it passed
        "dr", "create", "sb", "--target", target, "--volume", "v3", "--replicas", "1",
        "--interval", "1", "--quiet",
    )  # fmt: skip
    damaged = sorted([newest.split("backup=")[1], stray])

    def passed_over(stderr: str) -> None:
        lines = sorted(line for line in stderr.splitlines() if "passed over" in line)
        assert len(lines) == 2, stderr
        for line, name in zip(lines, damaged, strict=True):
            assert line.startswith(f"lhfs: passed over backup {name} of v3: "), line
            assert "fails authentication" in line, line

    passed_over(made.stderr)
    assert cli.dr_restored("sb", first)["state"] == "standby"
    cli.run("dr", "stop", "sb")
    activated = cli.run("dr", "activate", "sb", "--quiet")  # (a failover says it too)
    passed_over(activated.stderr)
    assert f"at backup {first.split('backup=')[1]}" in activated.stdout, activated.stdout

    gc = cli.run("backup", "gc", "--target", target, check=False)
    assert gc.returncode == 1 and gc.stderr.count("\n") == 1, gc.stderr
    assert "not collecting" in gc.stderr and "'lhfs backup rm s3://trust-damaged/p?" in gc.stderr
    pruned = cli.json("backup", "prune", "--target", target, "--volume", "v3", "--keep-last", "1")
    assert [k["name"] for k in pruned["kept"]] == [first.split("backup=")[1]]
    assert pruned["removed"] == [] and len(pruned["damaged"]) == 2
    assert store.block_count() == blocks

    made = cli.run("backup", "create", "v3", "--target", target)
    assert "the previous backup cannot be read" in made.stderr, made.stderr
    assert "is not this store's): reading the whole volume" in made.stderr
    assert "read 8 of 8 blocks, uploaded 0" in made.stdout  # (every block already stored)
    cli.run("backup", "restore", made.stdout.split()[-1], "copy", "--replicas", "1", "--quiet")
    assert cli.checksum("copy") == cli.checksum("v3")

    removed = cli.run("backup", "rm", f"{target}?volume=v3&backup={stray}")
    assert "collection of its blocks deferred" in removed.stdout  # (the other one is left)
    assert store.block_count() == blocks
    cli.run("backup", "rm", newest)
    assert [b["state"] for b in cli.json("backup", "ls", "--target", target)] == ["complete"] * 2
    cli.run("backup", "gc", "--target", target)
    assert cli.json("backup", "check", "--target", target, "--read-data")["problems"] == []


def test_check_names_every_backup_a_bad_block_breaks_and_a_full_backup_repairs_them(
    cli: Cli, tmp_path: Path, s3_endpoint: str
) -> None:
    """A block missing from the store and another corrupt, both named by every backup: check
    names each backup on each block's line and says what repairs them; an increment still
    reuses them (and is as broken); a full backup sends every block again under its name,
    and every backup restores."""
    target = "s3://trust-heal/p"
    urls = backed_up_volume(cli, tmp_path, target)
    names = [url.split("backup=")[1] for url in urls]
    store = BackupStore(Bucket(Target.parse(target)))
    lost, rotten = store.manifest("src", names[0])["blocks"][:2]
    store.bucket.delete(f"p/blocks/{lost[:2]}/{lost}")
    garbage = os.urandom(MIB)
    store.bucket.put(f"p/blocks/{rotten[:2]}/{rotten}", garbage, {"lhfs-compression": "none"})

    def check(*names: str) -> None:
        args = ("backup", "check", "--target", target, "--read-data")
        found = cli.run(*args, check=False)
        assert found.returncode == 3, found.stdout
        named = "named by " + ", ".join(f"backup {n} of src" for n in sorted(names))
        assert f"block {lost} is missing ({named})" in found.stdout, found.stdout
        assert f"block {rotten} in {target} does not match its checksum ({named})" in found.stdout
        assert f"'lhfs backup create src --target {target} --full' to send" in found.stdout
        report = json.loads(cli.run(*args, "--json", check=False).stdout)
        assert report["broken_backups"] == [{"volume": "src", "backup": n} for n in sorted(names)]

    check(*names)
    names.append(cli.backup("src", target).split("backup=")[1])  # (reads nothing: reuses them)
    check(*names)
    full = cli.json("backup", "create", "src", "--target", target, "--full", "--quiet")
    assert (full["read"], full["uploaded"]) == (8, 4), full  # (every block that is not zeros)
    report = cli.json("backup", "check", "--target", target, "--read-data")
    assert report["problems"] == [] and report["broken_backups"] == []
    for n, url in enumerate([*urls, full["url"]]):
        cli.run("backup", "restore", url, f"copy{n}", "--replicas", "1", "--quiet")
    assert cli.checksum("copy2") == cli.checksum("src")
