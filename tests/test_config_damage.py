"""A volume's configuration and its replicas' epoch files damaged by hand in ways that parse:
refused in one line naming the file and the field, changing nothing; a session epoch out of
range is said as such, never as a wrong key or another engine's takeover."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fuse

from lhfs.core.errors import CorruptState
from lhfs.store.chunkstore import ChunkStore
from lhfs.testing import Cli, one_line, raw_session, read_direct, write_direct
from lhfs.wire import protocol as p
from lhfs.wire.auth import VolumeKey

MIB = 1 << 20


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its content: what "nothing changed" compares."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith((".lock", ".log"))
    }


DAMAGE: dict[str, tuple[Any, str]] = {  # what is changed in config.json -> the field said
    "epoch-at-the-limit": (lambda c: c.update(epoch=p.MAX_EPOCH), "epoch must be"),
    "epoch-beyond-64-bits": (lambda c: c.update(epoch=2**64), "epoch must be"),
    "two-replicas-of-one-id": (
        lambda c: c["replicas"][1].update(id=c["replicas"][0]["id"]),
        "replicas[1].id must be an id no other replica",
    ),
    "unknown-mode": (lambda c: c["replicas"][0].update(mode="FOO"), "replicas[0].mode"),
    "mode-in-lower-case": (lambda c: c["replicas"][1].update(mode="rw"), "replicas[1].mode"),
}


def _damaged(cli: Cli, change: Any, field: str) -> tuple[Path, str, dict[str, bytes]]:
    """Volume v (two replicas) with ``change`` made to its ``config.json`` by hand, and
    ``doctor`` failing it in one check naming the file and ``field``: the file, the field, and
    the volume's files as they were before ``doctor`` (what "nothing changed" compares)."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "2")
    path = cli.root / "volumes" / "v" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    before = files(path.parent)
    doctor = cli.run("doctor", "v", "--json", check=False)
    assert doctor.returncode == 1, doctor.stderr
    failed = [c["detail"] for c in json.loads(doctor.stdout) if c["status"] == "fail"]
    assert any(str(path) in d and field in d for d in failed), failed
    return path, field, before


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_field_is_refused_by_every_command(cli: Cli, tmp_path: Path, case: str) -> None:
    """``doctor``, ``volume info`` and ``volume attach`` each refuse the configuration in one
    line naming it and the field, with a non-zero exit, and nothing is changed."""
    path, field, before = _damaged(cli, *DAMAGE[case])
    device = str(tmp_path / "dev")
    for command in (("volume", "info", "v"), ("volume", "attach", "v", "--device", device)):
        line = one_line(cli.run(*command, check=False))
        assert str(path) in line and field in line, line
    assert files(path.parent) == before


UNSERVABLE: dict[str, tuple[Any, str]] = {  # loads, but no session can start from it
    "epoch-near-the-limit": (lambda c: c.update(epoch=p.MAX_EPOCH - 2), "epoch must be"),
    "no-replica": (lambda c: c.update(replicas=[]), "replicas is empty"),
}


@pytest.mark.parametrize("case", list(UNSERVABLE))
def test_a_configuration_no_engine_can_serve_is_refused_by_attach_and_doctor(
    cli: Cli, tmp_path: Path, case: str
) -> None:
    """A configuration that loads but that no engine may serve (a session epoch past where
    one may start, no replica left: an lhfs from before ``replica rm`` kept the last one
    could remove it) is refused by an attach and failed by ``doctor``, in one line naming
    the file and the field, changing nothing; ``volume info`` shows it and ``volume rm``
    removes it (it was refused by every command, ``volume rm`` too: stuck for good)."""
    path, field, before = _damaged(cli, *UNSERVABLE[case])
    device = str(tmp_path / "dev")
    line = one_line(cli.run("volume", "attach", "v", "--device", device, check=False))
    assert str(path) in line and field in line, line
    assert files(path.parent) == before
    assert cli.info("v")["name"] == "v"
    cli.run("volume", "rm", "v")
    assert not path.parent.exists()


def test_the_only_replica_is_never_removed(cli: Cli) -> None:
    """``replica rm`` of a volume's only replica is refused whatever its mode (ERR too), so
    that lhfs never writes a configuration without replicas, which no engine can serve."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    path = cli.root / "volumes" / "v" / "config.json"
    config = json.loads(path.read_text())
    config["replicas"][0].update(mode="ERR", error="its process did not start")
    path.write_text(json.dumps(config))
    before = files(path.parent)
    line = one_line(cli.run("replica", "rm", "v", "r1", check=False))
    assert "r1 is the only replica of v: a volume keeps one at least" in line, line
    assert files(path.parent) == before


def ask_for_epoch(address: str, key: VolumeKey, epoch: int) -> None:
    """Make an engine's handshake asking for ``epoch`` as it is, past the checks an engine
    makes before it asks (as an engine of another lhfs might)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        handshake = p.ClientHandshake(key, address, p.ENGINE, 1, False, b"engine-9")
        sock.sendall(handshake.hello())
        handshake.answer(sock.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
        handshake.epoch = epoch
        nonces = handshake._replica_nonce, handshake._nonce
        proof = key.client_proof(*nonces, p.ENGINE, epoch, b"engine-9")
        sock.sendall(p.AUTH.pack(proof, p.ENGINE, epoch, b"engine-9"))
        handshake.welcome(sock.recv(p.WELCOME.size, socket.MSG_WAITALL))


def test_an_epoch_out_of_range_is_said_as_such(tmp_path: Path, replica_factory) -> None:
    """A replica refuses an engine session at the epoch limit saying "epoch out of range",
    keeping nothing, and an engine never asks for one; an engine refuses a replica in a
    session epoch above any an engine asks for as a damaged epoch file: not as a wrong key,
    nor as another engine's takeover that would fault the volume."""
    ChunkStore.create(tmp_path / "r", MIB, 64 << 10).close()
    replica = replica_factory(tmp_path / "r")
    before = files(tmp_path / "r")
    with pytest.raises(CorruptState, match="epoch out of range"):
        ask_for_epoch(replica.address, replica.key, p.MAX_EPOCH)
    with pytest.raises(CorruptState, match=r"session epoch \d+ is out of range"):
        raw_session(replica.address, replica.key, epoch=p.MAX_EPOCH, owner=b"engine-1")
    assert files(tmp_path / "r") == before
    raw_session(
        replica.address, replica.key, epoch=p.MAX_START_EPOCH + 1, owner=b"engine-1"
    ).close()
    with pytest.raises(CorruptState, match="its epoch file is damaged"):
        raw_session(replica.address, replica.key, epoch=5, owner=b"engine-2")


@pytest.mark.parametrize("text", ["xyz", f"{1 << 62} 0000000000000000", "-1 0000000000000000"])
def test_a_replica_with_a_damaged_epoch_file_does_not_serve(
    tmp_path: Path, replica_factory, text: str
) -> None:
    """Garbage, an epoch at the limit no session may reach, a negative one: the replica
    refuses to serve in one line naming its epoch file, rather than refuse every engine."""
    ChunkStore.create(tmp_path / "r", MIB, 64 << 10).close()
    (tmp_path / "r" / "epoch").write_text(text)
    with pytest.raises(RuntimeError) as refused:
        replica_factory(tmp_path / "r").wait_ready()
    assert f"{tmp_path / 'r' / 'epoch'} is damaged" in str(refused.value), refused.value


@needs_fuse
def test_one_replica_with_its_epoch_at_the_limit_leaves_the_others_serving(
    cli: Cli, tmp_path: Path
) -> None:
    """One replica's epoch file at the limit is damage of that replica alone: it is ERR saying
    its epoch file is damaged, the other serves the data, and the volume is not faulted (it
    once was, the sound replica marked ERR as if another engine had taken the volume over)."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "2")
    device = tmp_path / "device"
    cli.run("volume", "attach", "v", "--device", str(device))
    write_direct(device, 0, b"e" * (64 << 10))
    cli.run("volume", "detach", "v")
    epoch = cli.root / "volumes" / "v" / "replicas" / "r1" / "epoch"
    epoch.write_text(f"{p.MAX_EPOCH} 0000000000000000")
    cli.run("volume", "attach", "v", "--device", str(device))
    info = cli.info("v")
    assert info["state"] == "degraded", info
    modes = {r["id"]: (r["mode"], r["error"] or "") for r in info["replicas"]}
    assert modes["r2"] == ("RW", ""), modes
    assert modes["r1"][0] == "ERR" and f"{epoch} is damaged" in modes["r1"][1], modes
    assert read_direct(device, 0, 64 << 10) == b"e" * (64 << 10)
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_size_beyond_what_the_replicas_hold_is_refused_at_attach(
    cli: Cli, tmp_path: Path
) -> None:
    """``size`` in config.json above what the serving replicas hold: attach is refused in one
    line naming the file and the field, the recorded replicas left as they were (served, the
    first write past the replicas' end faulted the volume)."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "2")
    path = cli.root / "volumes" / "v" / "config.json"
    config = json.loads(path.read_text())
    config["size"] = 2 * MIB
    path.write_text(json.dumps(config))
    line = one_line(
        cli.run("volume", "attach", "v", "--device", str(tmp_path / "dev"), check=False)
    )
    assert f"{path}: size must be at most what the replicas hold ({MIB} bytes" in line, line
    after = json.loads(path.read_text())
    assert after["size"] == 2 * MIB, after
    assert [(r["mode"], r["error"]) for r in after["replicas"]] == [("RW", None)] * 2, after
    assert cli.info("v")["state"] == "detached"


def test_a_key_of_another_volume_is_failed_by_doctor_and_named_by_attach(
    cli: Cli, tmp_path: Path
) -> None:
    """Two volumes' ``key.json`` swapped: ``doctor`` said every replica was ok, and the attach
    only "see the replica logs". Now ``doctor`` fails each replica, naming both ids, and the
    attach's one line carries the replicas' own reason."""
    for name in ("a", "b"):
        cli.run("volume", "create", name, "--size", "1M", "--replicas", "1")
    keys = [cli.root / "volumes" / name / "key.json" for name in ("a", "b")]
    first, second = (k.read_bytes() for k in keys)
    keys[0].write_bytes(second)
    keys[1].write_bytes(first)
    doctor = cli.run("doctor", "a", "--json", check=False)
    assert doctor.returncode == 1, doctor.stderr
    failed = [c["detail"] for c in json.loads(doctor.stdout) if c["status"] == "fail"]
    assert any("holds a replica of another volume" in d for d in failed), failed
    line = one_line(
        cli.run("volume", "attach", "a", "--device", str(tmp_path / "dev"), check=False)
    )
    assert "r1: " in line and "another volume" in line, line
