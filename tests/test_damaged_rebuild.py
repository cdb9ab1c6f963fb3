"""A replica whose directory does not open for damage (layer files cut or lost, a
``volume.json`` lhfs could not have written) is set aside and rebuilt by itself while another
replica serves: local or on another host, its damaged directory always kept beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.engine import control
from lhfs.testing import Cli, one_line, read_direct, write_direct

MIB = 1 << 20


def _attached_with_snapshot(cli: Cli, device: Path) -> bytes:
    """Volume v, two local replicas, attached on ``device``: a MiB of random data, snapshot
    s1 of it, another MiB over it; what the volume holds."""
    cli.run("volume", "create", "v", "--size", "4M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(device))
    data = os.urandom(2 * MIB)
    write_direct(device, 0, data[:MIB])
    cli.run("snapshot", "create", "v", "s1")
    write_direct(device, MIB, data[MIB:])
    return data


def _same_everywhere(cli: Cli, volume: str) -> None:
    sums = control.call(volumes.load(cli.root, volume).control_socket, "replica_checksums")
    assert len(sums) >= 2 and len(set(sums.values())) == 1, sums


@needs_fuse
def test_a_local_replica_with_a_damaged_volume_json_is_set_aside_and_rebuilt(
    cli: Cli, tmp_path: Path
) -> None:
    """r1's ``volume.json`` is garbage: it stayed ERR until replaced by hand. Now its directory
    is set aside (its layer files with it) and r1 rebuilt from r2; the reason says where."""
    device = tmp_path / "v.dev"
    data = _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    kept = sorted(p.name for p in r1.iterdir() if p.suffix in (".data", ".idx"))
    (r1 / "volume.json").write_bytes(b'{"format": 1, "size": "lost')
    cli.run("volume", "attach", "v", "--device", str(device))
    (aside,) = r1.parent.glob("r1.damaged-*")
    assert (aside / "volume.json").read_bytes() == b'{"format": 1, "size": "lost'
    assert sorted(p.name for p in aside.iterdir() if p.suffix in (".data", ".idx")) == kept
    wait_for(lambda: cli.live("v")["state"] == "healthy", 30, "r1 rebuilt from r2")
    _same_everywhere(cli, "v")
    for _ in range(4):  # (reads are spread over the replicas that serve)
        assert read_direct(device, 0, 2 * MIB) == data
    assert "volume.json is damaged" in cli.engine_log("v")
    assert f"set aside as {aside}" in cli.engine_log("v")
    cli.run("volume", "detach", "v")


@needs_fuse
def test_a_volume_json_of_a_newer_lhfs_is_not_set_aside(cli: Cli, tmp_path: Path) -> None:
    """A newer format is not damage: the replica is refused (ERR, said) and left as it is."""
    device = tmp_path / "v.dev"
    _attached_with_snapshot(cli, device)
    cli.run("volume", "detach", "v")
    r1 = cli.root / "volumes" / "v" / "replicas" / "r1"
    meta = json.loads((r1 / "volume.json").read_text())
    (r1 / "volume.json").write_text(json.dumps({**meta, "format": 9}))
    cli.run("volume", "attach", "v", "--device", str(device))
    assert not list(r1.parent.glob("r1.damaged-*"))
    (r1_state,) = [r for r in cli.json("replica", "ls", "v") if r["id"] == "r1"]
    assert r1_state["mode"] == "ERR" and "upgrade lhfs" in r1_state["error"], r1_state
    cli.run("volume", "detach", "v")
    line = one_line(cli.run("replica", "inspect", "--dir", str(r1), check=False))
    assert "newer than this lhfs's" in line, line
