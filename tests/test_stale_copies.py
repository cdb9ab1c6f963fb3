"""A volume's configuration and key as lhfs reads them back: a volume whose key file is
missing is refused rather than given a new identity, and a configuration without
``next_replica`` still adds replicas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import needs_fuse
from test_freshest import one_line, recorded

from lhfs.testing import Cli


@needs_fuse
def test_a_missing_key_file_is_refused_not_made_again(cli: Cli, tmp_path: Path) -> None:
    """``key.json`` lost from a volume that has an identity: attach and ``volume key`` are
    refused in one line saying how to get it back, and nothing changes (before: a new key
    was made and ``volume_id`` rewritten, every replica then refused the volume for good).
    The key restored, the volume attaches."""
    cli.run("volume", "create", "k", "--size", "8M", "--replicas", "2")
    directory = cli.root / "volumes" / "k"
    saved = tmp_path / "key.saved"
    shutil.move(directory / "key.json", saved)
    before = (directory / "config.json").read_bytes()
    device = tmp_path / "k.dev"
    for args in (
        ("volume", "attach", "k", "--device", str(device)),
        ("volume", "key", "k", "--out", str(tmp_path / "k.key")),
    ):
        line = one_line(cli.run(*args, check=False))
        assert "key.json is missing" in line and "restore key.json" in line, line
        assert not (directory / "key.json").exists()
        assert (directory / "config.json").read_bytes() == before
    shutil.move(saved, directory / "key.json")
    cli.run("volume", "attach", "k", "--device", str(device))
    assert cli.live("k")["state"] == "healthy"
    cli.run("volume", "detach", "k")


@needs_fuse
def test_a_configuration_without_next_replica_still_adds_replicas(cli: Cli, tmp_path: Path) -> None:
    """``next_replica`` missing (written by hand): the next replica is numbered above every
    one there is (before: "internal error: 'next_replica'"). A remote replica without an
    address is refused in one line naming the field."""
    cli.run("volume", "create", "n", "--size", "8M", "--replicas", "2")
    path = cli.root / "volumes" / "n" / "config.json"
    config = json.loads(path.read_text())
    del config["next_replica"]
    path.write_text(json.dumps(config))
    device = tmp_path / "n.dev"
    cli.run("volume", "attach", "n", "--device", str(device))
    added = cli.run("replica", "add", "n").stdout.split()[2]
    assert added == "r3", added
    assert recorded(cli, "n")["next_replica"] == 4
    cli.run("volume", "detach", "n")
    config = json.loads(path.read_text())
    config["replicas"].append({"id": "r9", "local": False, "mode": "ERR"})
    path.write_text(json.dumps(config))
    line = one_line(cli.run("volume", "info", "n", check=False))
    assert "replicas[3].address must be" in line, line
