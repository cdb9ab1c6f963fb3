"""Attach, mount and an engine's end, against what an operator or a service manager may do:
an engine told to end (SIGTERM) under a mounted file system, paths given empty or twice at
once, a device file held open by a writer, links and odd characters where paths go."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import needs_fuse

from lhfs.config import volume as volumes
from lhfs.core.mounts import loops_backed_by
from lhfs.core.procs import LHFS, wait_for
from lhfs.engine import control
from lhfs.testing import Cli, one_line


def mounted(point: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(point) for line in f)


# -- an engine told to end under a mounted file system ----------------------------------------


@needs_fuse
def test_sigterm_to_an_engine_under_a_busy_mount_flushes_and_is_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """A service stop whose ``lhfs umount`` found the file system busy SIGTERMs the engine:
    it ended, and left the ext4 mounted on a dead device (its unsynced writes lost, the volume
    said detached). It flushes what is mounted, says why it stays, and serves on; once the
    mount point is let go, ``lhfs umount`` ends it and the file written is whole."""
    cli.run("volume", "create", "t", "--size", "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "t", str(mnt))
    data = os.urandom(8 << 20)
    (mnt / "file.bin").write_bytes(data)  # (in the page cache: not synced)
    holder = subprocess.Popen(["sleep", "300"], cwd=mnt)
    try:
        assert cli.run("umount", str(mnt), check=False).returncode == 1
        pid = cli.engine_pid("t")
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM refused" in cli.engine_log("t"), 90, "the refusal")
        line = next(x for x in cli.engine_log("t").splitlines() if "SIGTERM refused" in x)
        assert "lhfs umount" in line and "volume detach --force t" in line, line
        assert volumes.alive(pid) and mounted(mnt) and cli.info("t")["state"] == "healthy"
    finally:
        holder.kill()
        holder.wait()
    cli.run("umount", str(mnt))
    assert not volumes.alive(pid) and not mounted(mnt)
    cli.run("mount", "t", str(mnt))
    try:
        assert (mnt / "file.bin").read_bytes() == data
    finally:
        cli.run("umount", str(mnt))


@needs_fuse
def test_sigterm_frees_a_loop_device_nothing_mounts_and_ends(cli: Cli, tmp_path: Path) -> None:
    """A loop device bound to the device with nothing mounted on it (the system unmounted a
    service's file system itself at shutdown) does not keep the engine from a SIGTERM: it is
    freed and the engine ends, the volume detached (it refused, and each shutdown waited for
    its SIGKILL)."""
    cli.run("volume", "create", "u", "--size", "16M", "--replicas", "1")
    device = tmp_path / "u.dev"
    cli.run("volume", "attach", "u", "--device", str(device))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        pid = cli.engine_pid("u")
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not volumes.alive(pid), 60, "the engine to end")
        assert "refused" not in cli.engine_log("u")
        assert not Path(f"/sys/block/{Path(loop).name}/loop").exists()
        assert cli.info("u")["state"] == "detached"
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@needs_fuse
def test_an_engine_ending_under_a_mounted_file_system_is_cleaned_up_as_a_crashed_one(
    cli: Cli, tmp_path: Path
) -> None:
    """An engine that ends by itself (here: told to on its control socket, not by a command
    that let go of the loop device first) while a file system is mounted on its device left
    the loop device on a device unmounted under it: ``lhfs umount`` said the mount point was
    no volume's, ``volume detach`` that it was not attached, and ``volume rm`` went on. It
    leaves them as a killed engine does: the volume crashed, ``volume rm`` refused, and
    ``lhfs umount`` cleans up and detaches."""
    cli.run("volume", "create", "c", "--size", "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "c", str(mnt))
    pid = cli.engine_pid("c")
    assert pid is not None
    control.call(volumes.load(cli.root, "c").control_socket, "detach", timeout=60)
    wait_for(lambda: not volumes.alive(pid), 60, "the engine to end")
    assert "still bound to" in cli.engine_log("c")
    assert cli.info("c")["state"] == "crashed"
    line = one_line(cli.run("volume", "rm", "c", check=False), 1)
    assert "crashed" in line and "volume detach c" in line, line
    done = cli.json("umount", str(mnt))
    assert done["was"] == "crashed" and done["state"] == "detached", done
    assert not mounted(mnt) and cli.info("c")["state"] == "detached"
    cli.run("mount", "c", str(mnt))  # (its file system as it was: mounted, not formatted)
    cli.run("umount", str(mnt))


# -- empty paths ------------------------------------------------------------------------------

EMPTY_PATHS = [
    ("mount", "e", ""),
    ("umount", ""),
    ("volume", "attach", "e", "--device", ""),
    ("volume", "key", "e", "--out", ""),
    ("backing-image", "create", "b", "--from", ""),
    ("replica", "init", "--dir", "r", "--size", "1M", "--backing-image", ""),
    ("replica", "init", "--dir", "r", "--size", "1M", "--key-file", ""),
    ("replica", "serve", "--dir", "r", "--listen", "127.0.0.1:0", "--key-file", ""),
    ("replica", "add", "e", "--address", "127.0.0.1:1", "--tls-ca", ""),
    ("engine-run", "e", ""),
    ("dr", "run", "d", "--log", ""),
    ("backup", "ls", "--target", "s3://b/p", "--password-file", ""),
    ("dr", "create", "d", "--target", "s3://b/p", "--volume", "e", "--credentials-file", ""),
    ("--root", "", "volume", "ls"),
]


@needs_fuse
def test_an_empty_path_is_refused_before_anything_is_done(cli: Cli, tmp_path: Path) -> None:
    """An empty path named the current directory: ``lhfs mount VOL ""`` (a unit whose
    MOUNTPOINT is unset) mounted the volume there, ``engine-run x ""`` started replicas
    before it refused. Each path argument refuses it as a usage error, in one line, and
    nothing is attached, mounted or written."""
    cli.run("volume", "create", "e", "--size", "16M")
    before = cli.volumes()
    work = tmp_path / "work"
    work.mkdir()
    for args in EMPTY_PATHS:
        result = subprocess.run(
            cli_command(cli, args), capture_output=True, text=True, cwd=work, timeout=60
        )
        line = one_line(result, 2)
        assert "an empty path" in line or "state root is empty" in line, (args, line)
    assert not mounted(work) and list(work.iterdir()) == []
    assert cli.volumes() == before and cli.info("e")["state"] == "detached"


def cli_command(cli: Cli, args: tuple[str, ...]) -> list[str]:
    """``lhfs`` with ``args`` under the test's root (unless they give one themselves)."""
    return [LHFS, *args] if args[0] == "--root" else [LHFS, "--root", str(cli.root), *args]


# -- one place, one attachment ----------------------------------------------------------------


def mounts_at(point: Path) -> int:
    with open("/proc/self/mounts") as f:
        return sum(line.split()[1] == str(point) for line in f)


@needs_fuse
def test_two_volumes_attached_on_one_device_path_at_once_one_is_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """Two attaches of two volumes on one ``--device`` at once each found the path free and
    both mounted it (stacked FUSE mounts: the writes went to one). One attaches; the other
    is refused in one line naming the path, and left detached."""
    for name in ("d1", "d2"):
        cli.run("volume", "create", name, "--size", "4M")
    device = tmp_path / "dev"
    for _ in range(3):
        runs = [
            cli.start("volume", "attach", name, "--device", str(device)) for name in ("d1", "d2")
        ]
        results = [(run.wait(120), run.communicate()[1]) for run in runs]
        assert sorted(code for code, _ in results) == [0, 1], results
        _, err = next(r for r in results if r[0])
        assert len(err.strip().splitlines()) == 1 and str(device) in err, err
        assert mounts_at(device) == 1
        states = sorted(cli.info(name)["state"] for name in ("d1", "d2"))
        assert states == ["detached", "healthy"], states
        winner = "d1" if results[0][0] == 0 else "d2"
        cli.run("volume", "detach", winner)
        assert not device.exists()


@needs_fuse
def test_two_volumes_mounted_on_one_mount_point_at_once_one_is_refused(
    cli: Cli, tmp_path: Path
) -> None:
    """Two ``lhfs mount`` of two volumes on one mount point at once both mounted there. One
    mounts; the other is refused in one line naming the mount point, and left detached."""
    for name in ("m1", "m2"):
        cli.run("volume", "create", name, "--size", "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for _ in range(3):
            runs = [cli.start("mount", name, str(mnt)) for name in ("m1", "m2")]
            results = [(run.wait(180), run.communicate()[1]) for run in runs]
            assert sorted(code for code, _ in results) == [0, 1], results
            _, err = next(r for r in results if r[0])
            assert len(err.strip().splitlines()) == 1 and str(mnt) in err, err
            assert mounts_at(mnt) == 1
            states = sorted(cli.info(name)["state"] for name in ("m1", "m2"))
            assert states == ["detached", "healthy"], states
            cli.run("umount", str(mnt))
    finally:
        while mounts_at(mnt):
            cli.run("umount", str(mnt))


# -- a device file held open --------------------------------------------------------------


@needs_fuse
def test_detach_of_a_device_file_held_open_is_refused_unless_forced(
    cli: Cli, tmp_path: Path
) -> None:
    """A detach of a healthy volume whose device file a process writes broke the writer
    mid-way ("Software caused connection abort"). It is refused in one line naming the
    process, the volume left attached and the writer writing; once it closes the file the
    detach goes; ``--force`` lets go under a holder all the same."""
    cli.run("volume", "create", "w", "--size", "16M")
    device = tmp_path / "dev"
    cli.run("volume", "attach", "w", "--device", str(device))
    writer = subprocess.Popen(
        [
            "python3",
            "-c",
            "import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
            "os.pwrite(fd, b'x' * 4096, 0)\n"
            "os.fsync(fd)\n"
            "print('open', flush=True)\n"
            "sys.stdin.read()\n"
            "os.pwrite(fd, b'y' * 4096, 4096)\n"
            "os.fsync(fd)\n",
            str(device),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "open\n"
        line = one_line(cli.run("volume", "detach", "w", check=False), 1)
        assert f"{writer.pid} (python3)" in line and "--force" in line, line
        assert cli.info("w")["state"] == "healthy"
        writer.communicate("", timeout=60)  # (writes on, then closes it)
        assert writer.returncode == 0
    finally:
        writer.kill()
        writer.wait()
    cli.run("volume", "detach", "w")
    assert cli.info("w")["state"] == "detached"
    cli.run("volume", "attach", "w", "--device", str(device))
    holder = subprocess.Popen(["sleep", "300"], stdin=open(device, "rb"))  # noqa: SIM115
    try:
        cli.run("volume", "detach", "w", "--force")
        assert cli.info("w")["state"] == "detached"
    finally:
        holder.kill()
        holder.wait()


# -- links and odd characters -------------------------------------------------------------------


def test_an_error_naming_a_path_with_a_newline_stays_one_line(cli: Cli, tmp_path: Path) -> None:
    """A path holding a newline (or another control character) split the error in two: it
    is written escaped, the error one line."""
    cli.run("volume", "create", "n", "--size", "1M")
    odd = tmp_path / "no\ndir"
    line = one_line(cli.run("volume", "attach", "n", "--device", str(odd / "dev"), check=False), 1)
    assert "no\\ndir" in line, line
    line = one_line(cli.run("mount", "n", str(tmp_path / "no\x1bmnt"), check=False), 1)
    assert "no\\x1bmnt" in line, line
    assert cli.info("n")["state"] == "detached"


def test_a_device_path_that_is_a_link_is_refused_and_nothing_made(cli: Cli, tmp_path: Path) -> None:
    """An attach through a link that led nowhere made its target, and the detach left it
    there (an empty file). A device path that is a link is refused, nothing made."""
    cli.run("volume", "create", "s", "--size", "1M")
    link, target = tmp_path / "link", tmp_path / "nowhere"
    link.symlink_to(target)
    line = one_line(cli.run("volume", "attach", "s", "--device", str(link), check=False), 2)
    assert "symbolic link" in line and str(link) in line, line
    assert not target.exists() and cli.info("s")["state"] == "detached"


@needs_fuse
def test_a_mount_point_inside_the_state_root_is_refused(cli: Cli) -> None:
    """``lhfs mount`` took a mount point inside another volume's directory, where ``volume
    attach`` refuses a device: refused alike, nothing attached."""
    for name in ("a1", "a2"):
        cli.run("volume", "create", name, "--size", "1M")
    inside = cli.root / "volumes" / "a2" / "sub"
    inside.mkdir()
    line = one_line(cli.run("mount", "a1", str(inside), check=False), 2)
    assert "inside lhfs's own directories" in line, line
    assert not mounted(inside) and cli.info("a1")["state"] == "detached"


def test_a_volume_directory_that_is_a_link_is_refused(cli: Cli) -> None:
    """``volumes/w2`` a link to ``volumes/w1``: ``volume info w2`` showed w1, and ``volume rm
    w2`` said removed and left ``.w2.removing`` for ever. Refused in one line, w1 untouched."""
    cli.run("volume", "create", "w1", "--size", "1M")
    (cli.root / "volumes" / "w2").symlink_to(cli.root / "volumes" / "w1")
    for args in (("volume", "info", "w2"), ("volume", "rm", "w2")):
        line = one_line(cli.run(*args, check=False), 1)
        assert "is a symbolic link" in line and "w2" in line, line
    assert not list((cli.root / "volumes").glob(".w2*"))
    assert cli.info("w1")["state"] == "detached"


@needs_fuse
def test_rm_of_a_volume_whose_device_file_a_loop_device_uses_is_refused(cli: Cli) -> None:
    """A loop device left on a volume's device file (a file system may sit on it) with no
    engine recorded: ``volume rm`` removed the volume under it. Refused, naming the loop
    device and what to do."""
    cli.run("volume", "create", "l", "--size", "1M")
    device = cli.root / "volumes" / "l" / "device"
    device.write_bytes(bytes(1 << 20))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        line = one_line(cli.run("volume", "rm", "l", check=False), 1)
        assert loop in line and f"losetup -d {loop}" in line, line
        assert cli.info("l")["state"] == "detached"
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    wait_for(lambda: not loops_backed_by(device), 30, "the loop device to go")
    cli.run("volume", "rm", "l")
    assert "l" not in [v["name"] for v in cli.volumes()]
