"""Restores against a real S3 server: a system restore under way says what it is,
and holds the parts it reads."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from urllib.parse import urlparse

from test_backup_left import write_detached

from lhfs.config import volume as volumes
from lhfs.core.procs import wait_for
from lhfs.testing import Cli, teardown
from tools.faultproxy import FaultProxy

MIB = 1 << 20


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
