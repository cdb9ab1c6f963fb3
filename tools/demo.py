"""The main job on embedded defaults: a replicated volume, formatted, mounted, used, hurt.

In a temporary root: a three-replica volume is mounted with ext4 (``lhfs mount``), files are
written and read back, one replica process is killed with SIGKILL while a file is being written
and the volume keeps serving (degraded), a snapshot is taken and backed up to an embedded S3
server (the moto server, on loopback), and restored into a second volume with an equal
checksum. A DR standby then follows the volume's backups, picks up a newer one by incremental
restore, is activated and mounted with the same files. It exits 0 and leaves nothing mounted or
running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from lhfs.testing import Cli, S3Server, teardown

MIB = 1 << 20


def step(text: str) -> None:
    print(f"- {text}", flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="lhfs-demo-"))
    s3 = S3Server(work / "s3.log")
    cli = Cli(work / "root", env=s3.env)
    mnt = work / "mnt"
    mnt.mkdir()
    started = time.monotonic()
    try:
        cli.run("volume", "create", "demo", "--size", "512M", "--replicas", "3")
        step("created volume 'demo': 512 MiB, 3 replicas (local replica processes)")
        out = cli.run("mount", "demo", str(mnt)).stdout.strip()
        step(out)
        files = {f"file{i}.bin": os.urandom(4 * MIB) for i in range(8)}
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        assert all((mnt / n).read_bytes() == d for n, d in files.items())
        step(f"wrote and read back {len(files)} files ({len(files) * 4} MiB), synced")

        victim = cli.info("demo")["replicas"][0]
        big = os.urandom(64 * MIB)
        writer = threading.Thread(target=lambda: (mnt / "during-kill.bin").write_bytes(big))
        writer.start()
        os.kill(victim["pid"], signal.SIGKILL)
        writer.join()
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        assert (mnt / "during-kill.bin").read_bytes() == big
        info = cli.info("demo")
        step(
            f"killed replica {victim['id']} (SIGKILL) during a 64 MiB write: the write "
            f"completed, volume is {info['state']}"
        )
        assert info["state"] == "degraded"

        snap = cli.json("snapshot", "create", "demo", "after-kill")
        step(f"snapshot {snap['name']} taken on the remaining replicas")
        checksum = cli.checksum("demo")
        url = cli.run(
            "backup",
            "create",
            "demo",
            "--target",
            "s3://demo-backups/site",
            "--snapshot",
            "after-kill",
            "--create-bucket",
            "--quiet",
        ).stdout.split()[-1]
        step(f"backed up to an embedded S3 server ({s3.endpoint}): {url}")
        cli.run("umount", str(mnt))
        step(f"unmounted and detached; volume checksum {checksum}")

        cli.run("mount", "demo", str(mnt))
        assert all((mnt / n).read_bytes() == d for n, d in files.items())
        assert (mnt / "during-kill.bin").read_bytes() == big
        cli.run("umount", str(mnt))
        step("mounted again (no re-format): every file is there")
        cli.run("backup", "restore", url, "restored", "--replicas", "2", "--quiet")
        restored = cli.checksum("restored")
        assert restored == checksum, "the restored volume differs"
        step(f"restored the backup into volume 'restored': checksum {restored}, equal")

        target = "s3://demo-backups/site"
        cli.run("dr", "create", "standby", "--target", target, "--volume", "demo",
                "--replicas", "2", "--interval", "1", "--quiet")  # fmt: skip
        step("DR volume 'standby' follows the backups of 'demo' (restored the newest one)")
        cli.run("mount", "demo", str(mnt))
        files["later.bin"] = os.urandom(8 * MIB)
        (mnt / "later.bin").write_bytes(files["later.bin"])
        cli.run("umount", str(mnt))
        status = cli.dr_restored("standby", cli.backup("demo", target))
        moved = status["last_increment"]
        step(
            f"a newer backup was applied to the standby incrementally: {moved['fetched']} of "
            f"{moved['blocks']} blocks fetched, lag {status['lag_seconds']:.0f}s"
        )
        cli.run("dr", "activate", "standby", "--quiet")
        cli.run("mount", "standby", str(mnt))
        assert all((mnt / n).read_bytes() == d for n, d in files.items())
        assert (mnt / "during-kill.bin").read_bytes() == big
        cli.run("umount", str(mnt))
        step("activated the standby and mounted it: every file of 'demo' is there")
        print(f"demo ok in {time.monotonic() - started:.1f}s", flush=True)
    finally:
        teardown(cli.root)
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
