"""What an operator meets, continued: ``doctor`` on the tools and the capability growing a
mounted ext4 needs; ``mount --fs`` of a volume holding another file system refused as a
refusal; ``umount --json`` saying the state it leaves; a crashed volume's held loop device
waited for once; ``logs -f`` merging its components in time order."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_fuse

from lhfs.core import logs
from lhfs.core.procs import LHFS, wait_for
from lhfs.testing import Cli, kill_engine, one_line
from lhfs.volumes.mount import CAP_SYS_RESOURCE, capable


def mounted(point: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(point) for line in f)


def volumes_dir(cli: Cli) -> Path:
    return cli.root / "volumes"


def loops_on(device: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(device)], capture_output=True, text=True)
    return out.stdout.splitlines()


# -- doctor --------------------------------------------------------------------------------


def path_without(directory: Path, *missing: str) -> str:
    """A $PATH of one directory holding links to every program of this one but ``missing``."""
    directory.mkdir()
    for where in [*os.environ.get("PATH", "").split(":"), "/usr/sbin", "/usr/bin", "/sbin"]:
        if not os.path.isdir(where):
            continue
        for entry in os.scandir(where):
            link = directory / entry.name
            if entry.name not in missing and not os.path.lexists(link):
                link.symlink_to(entry.path)
    return str(directory)


def doctor(cli: Cli, *wrapper: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """``doctor --json`` (under ``wrapper``, a command that runs the one after it): its exit
    status and each check by name."""
    result = subprocess.run(
        [*wrapper, LHFS, "--root", str(cli.root), "doctor", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert result.returncode == int(any(c["status"] == "fail" for c in checks.values()))
    return result.returncode, checks


def test_doctor_checks_the_tools_a_mount_and_a_grow_run(cli: Cli, tmp_path: Path) -> None:
    """Every tool ``mount``, ``umount`` and ``volume expand`` run is checked where they look
    for it ($PATH): a missing grow tool (resize2fs, xfs_growfs) is a warning, saying what
    does not work without it; a missing losetup or mkfs.ext4 fails the doctor (exit 1)."""
    _, checks = doctor(cli)
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "e2fsck"):
        assert checks[f"tool {tool}"]["status"] == "ok", checks
        assert checks[f"tool {tool}"]["detail"] == shutil.which(tool), checks
    path = path_without(tmp_path / "no-grow", "resize2fs", "xfs_growfs")
    status, checks = doctor(cli, env={"PATH": path})
    for tool in ("resize2fs", "xfs_growfs"):
        check = checks[f"tool {tool}"]
        assert check["status"] == "warn" and check["detail"] == f"{tool} is not installed"
        assert "install" in check["hint"] and "grow" in check["hint"], check
    assert "e2fsprogs" in checks["tool resize2fs"]["hint"], checks
    assert checks["tool mkfs.ext4"]["status"] == checks["tool losetup"]["status"] == "ok"
    path = path_without(tmp_path / "no-losetup", "losetup", "mkfs.ext4")
    status, checks = doctor(cli, env={"PATH": path})
    assert status == 1, checks
    assert checks["tool losetup"]["status"] == checks["tool mkfs.ext4"]["status"] == "fail"
    assert "util-linux" in checks["tool losetup"]["hint"], checks
    shown = subprocess.run(
        [LHFS, "--root", str(cli.root), "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
    )
    assert shown.returncode == 1 and "FAIL  tool losetup" in shown.stdout, shown.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the capabilities are root's")
def test_doctor_warns_of_a_host_that_cannot_grow_a_mounted_ext4(cli: Cli) -> None:
    """Growing a mounted ext4 needs CAP_SYS_RESOURCE (a container's root may lack it): the
    doctor warns of it (exit 0: all else works), saying how it grows anyway; it fails a
    process without CAP_SYS_ADMIN, which can mount nothing."""
    _, checks = doctor(cli)
    held = capable(CAP_SYS_RESOURCE)
    assert checks["cap_sys_resource"]["status"] == ("ok" if held else "warn"), checks
    assert checks["cap_sys_admin"]["status"] == "ok", checks
    dropped = ("setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource")
    status, checks = doctor(cli, *dropped)
    check = checks["cap_sys_resource"]
    assert check["status"] == "warn" and "CAP_SYS_RESOURCE" in check["detail"], check
    assert "'lhfs umount' and 'lhfs mount' grow it offline" in check["hint"], check
    assert status == 0 or any(
        c["status"] == "fail" for name, c in checks.items() if name != "cap_sys_resource"
    )
    if shutil.which("capsh"):  # (libcap2-bin: the same, another way)
        wrapper = ("capsh", "--drop=cap_sys_resource", "--", "-c", 'exec "$@"', "capsh")
        _, checks = doctor(cli, *wrapper)  # (capsh runs bash with what follows --)
        assert checks["cap_sys_resource"]["status"] == "warn", checks
    no_admin = ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    status, checks = doctor(cli, *no_admin)
    assert status == 1 and checks["cap_sys_admin"]["status"] == "fail", checks
    assert "SYS_ADMIN" in checks["cap_sys_admin"]["hint"], checks


# -- mount and umount ----------------------------------------------------------------------


@needs_fuse
def test_mount_as_another_file_system_is_refused_and_changes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    """``mount --fs xfs`` of a volume formatted ext4 is a refusal (exit 1, not 2: the usage
    is right, the volume holds another file system), named in one line, with nothing
    attached or recorded; so is one of a file system lhfs did not make (adopted only as what
    ``--fs`` names)."""
    cli.run("volume", "create", "e", "--size", "320M", "--replicas", "1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "e", str(mnt), "--fs", "ext4")
    cli.run("umount", str(mnt))
    before = cli.volumes()
    line = one_line(cli.run("mount", "e", str(mnt), "--fs", "xfs", check=False), 1)
    assert "volume e is formatted ext4, not xfs" in line and "--fs ext4" in line, line
    assert cli.volumes() == before and not mounted(mnt)
    assert loops_on(volumes_dir(cli) / "e" / "device") == []
    # mounted already: the same
    cli.run("mount", "e", str(mnt))
    line = one_line(cli.run("mount", "e", str(mnt), "--fs", "xfs", check=False), 1)
    assert "formatted ext4, not xfs" in line, line
    cli.run("umount", str(mnt))

    # a file system made by hand on the attached device: adopted as what it is, not as --fs
    cli.run("volume", "create", "h", "--size", "64M", "--replicas", "1")
    device = tmp_path / "h.dev"
    cli.run("volume", "attach", "h", "--device", str(device))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True)
    cli.run("volume", "detach", "h")
    before = cli.volumes()
    line = one_line(cli.run("mount", "h", str(mnt), "--fs", "xfs", check=False), 1)
    assert "volume h is formatted ext4, not xfs" in line, line
    assert cli.volumes() == before and not mounted(mnt) and cli.info("h")["filesystem"] is None
    adopted = cli.json("mount", "h", str(mnt))
    assert adopted["formatted"] is False and cli.info("h")["filesystem"]["type"] == "ext4"
    cli.run("umount", str(mnt))


@needs_fuse
def test_umount_and_detach_json_say_the_state_they_leave(cli: Cli, tmp_path: Path) -> None:
    """``umount --json`` (and ``volume detach --json``) said the state from before (healthy):
    ``state`` is what it leaves (detached), ``was`` what it found; the line says the same as
    ever."""
    cli.run("volume", "create", "u", "--size", "64M", "--replicas", "2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "u", str(mnt))
    done = cli.json("umount", str(mnt))
    assert done["state"] == "detached" and done["was"] == "healthy", done
    assert done["mountpoint"] == str(mnt) and done["flushed"] is True and done["cleaned"] == []
    assert cli.info("u")["state"] == done["state"]
    cli.run("mount", "u", str(mnt))
    said = cli.run("umount", str(mnt)).stdout.strip()
    assert said == f"unmounted {mnt} and detached u", said
    cli.run("volume", "attach", "u", "--device", str(tmp_path / "u.dev"))
    done = cli.json("volume", "detach", "u")
    assert done["state"] == "detached" and done["was"] == "healthy", done
    # a crashed one: what it found, and what it cleaned up (its loop device freed)
    cli.run("mount", "u", str(mnt))
    loop = cli.info("u")["loop"]
    kill_engine(cli, "u")
    done = cli.json("umount", str(mnt))
    assert done["state"] == "detached" and done["was"] == "crashed", done
    assert f"freed {loop}" in done["cleaned"], done
    assert cli.info("u")["state"] == "detached" and not mounted(mnt)


@needs_fuse
def test_umount_of_a_crashed_volume_waits_for_its_held_loop_device_once(
    cli: Cli, tmp_path: Path
) -> None:
    """A crashed volume (engine killed -9) whose file system a process still uses: ``umount``
    unmounts it lazily and its loop device stays held. It waited 5 s for it, then its detach
    5 s more: it waits once, and says once that it stays."""
    cli.run("volume", "create", "c", "--size", "64M", "--replicas", "1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "c", str(mnt))
    loop = cli.info("c")["loop"]
    # (a shell left in it, and one that opened the loop device: held whatever the kernel
    # does with a lazily unmounted file system whose device fails)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{loop}; exec sleep 300"], cwd=mnt)
    try:
        fd = Path(f"/proc/{holder.pid}/fd/3")
        wait_for(lambda: fd.exists() and os.readlink(fd) == loop, 10, "the loop device held")
        kill_engine(cli, "c")
        started = time.monotonic()
        done = cli.json("umount", str(mnt))
        took = time.monotonic() - started
        assert 4.5 < took < 9, (took, done)  # (one wait of 5 s, not two)
        assert done["state"] == "detached" and done["was"] == "crashed", done
        stays = [c for c in done["cleaned"] if c.startswith(f"{loop} stays")]
        assert len(stays) == 1 and "fuser -v" in stays[0], done
        assert not mounted(mnt) and cli.info("c")["state"] == "detached"
    finally:
        holder.kill()
        holder.wait()
    device = volumes_dir(cli) / "c" / "device"
    wait_for(lambda: not loops_on(device), 20, "the loop device to go with its last user")
    cli.run("mount", "c", str(mnt))  # (and it mounts again)
    cli.run("umount", str(mnt))


# -- logs -f -------------------------------------------------------------------------------


def stamped(when: float, text: str) -> bytes:
    return logs.stamp_of(when) + text.encode() + b"\n"


def test_merger_holds_entries_for_their_window_and_keeps_continuations() -> None:
    """The follow mode's merge, on a clock of its own: entries come out in time order once
    their window is past, whichever log they were read from first; a traceback's lines
    stay with their entry; ``flush`` gives what is held."""

    class Fake:
        def __init__(self, label: str) -> None:
            self.label = label
            self.lines = b""

        def poll(self) -> bytes:
            out, self.lines = self.lines, b""
            return out

    engine, r1 = Fake("engine"), Fake("r1")
    merger = logs.Merger([engine, r1], window=1.0)  # type: ignore[list-item]
    t = 1_800_000_000.0
    engine.lines = stamped(t + 0.3, "late") + stamped(t + 0.5, "later")
    r1.lines = stamped(t + 0.1, "early") + b"Traceback (most recent call last):\n"
    assert merger.poll(now=t + 0.6) == b""  # (held: within the window)
    r1.lines = b"  boom\n" + stamped(t + 2.0, "much later")
    out = merger.poll(now=t + 1.4).decode().splitlines()
    assert [re.sub(r"^\[\w+\] (\S+Z )?", "", line) for line in out] == [
        "early",
        "Traceback (most recent call last):",
        "  boom",
        "late",
    ], out
    assert all(line.startswith("[r1] ") for line in out[:3]) and out[3].startswith("[engine] ")
    assert merger.poll(now=t + 1.5).decode().endswith("later\n")
    assert merger.poll(now=t + 1.6) == b""
    # an entry that reaches its file after its window: out at once, not lost
    engine.lines = stamped(t + 0.2, "stalled")
    assert b"stalled" in merger.poll(now=t + 1.7)
    assert merger.flush().decode().endswith("much later\n") and merger.flush() == b""


def test_logs_follow_merges_its_components_in_time_order(cli: Cli) -> None:
    """``logs -f`` printed each file's new lines as it read them, in the order it read the
    files (engine, r1, r2, dr): a replica's line logged before the engine's but read after it
    came out after it. It merges them by time, as the past is."""
    cli.run("volume", "create", "f", "--size", "16M", "--replicas", "2")
    directory = volumes_dir(cli) / "f"
    with open(directory / "engine.log", "ab") as f:
        f.write(stamped(time.time() - 5, "ready"))
    follow = cli.start("logs", "f", "-f")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout or []), daemon=True)
    reader.start()
    try:
        # (the past printed: the followers opened before it was read, so following from here)
        wait_for(lambda: any("ready" in line for line in lines), 20, "the past")
        expected = []
        base = time.time()
        for n in range(5):
            now = base + 0.3 * n  # (the rounds' stamps apart, written at once)
            # written newest first, in the order the files are read: engine, r1, r2
            for label, back in (("engine", 0.0), ("r1", 0.1), ("r2", 0.2)):
                with open(directory / f"{label}.log", "ab") as f:
                    f.write(stamped(now - back, f"round {n} {label}"))
            expected += [f"round {n} {label}" for label in ("r2", "r1", "engine")]
        wait_for(lambda: sum("round " in line for line in lines) == 15, 20, "the lines")
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
    assert follow.returncode == 0
    shown = [line.rstrip("\n").split(" ", 2)[2] for line in lines if "round " in line]
    assert shown == expected, lines
    assert all(line.startswith(f"[{line.split()[-1]}] ") for line in lines if "round " in line)
    # the past, printed without -f, in the same order
    past = [line.split(" ", 2)[2] for line in cli.run("logs", "f").stdout.splitlines()]
    assert [line for line in past if line.startswith("round ")] == expected


# -- a file system left behind by an expansion ------------------------------------------------


@needs_fuse
def test_a_file_system_an_expansion_left_small_is_grown_by_the_next(
    cli: Cli, tmp_path: Path
) -> None:
    """An expansion that grew the volume and its loop device but not the mounted file system
    (its tool missing here; killed at that point: the same state) is finished by asking for
    the size the volume has: the file system is grown, and said so. Asked again, nothing is
    left to do."""
    if not shutil.which("mkfs.xfs"):
        pytest.fail("xfsprogs is missing: tools/setup-system.sh installs it")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("volume", "create", "g", "--size", "320M", "--replicas", "1")
    cli.run("mount", "g", str(mnt), "--fs", "xfs")
    try:
        before = os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize
        short = Cli(cli.root, {"PATH": path_without(tmp_path / "bin", "xfs_growfs")})
        done = short.json("volume", "expand", "g", "--size", "640M")
        assert done["changed"] and done["loop"] and not done["filesystem"], done
        assert done["todo"] == f"xfs_growfs {mnt} (xfs_growfs is not installed)", done
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == before
        again = cli.json("volume", "expand", "g", "--size", "640M")
        assert not again["changed"] and not again["loop"] and not again["todo"], again
        assert again["filesystem"] == "xfs" and again["mountpoint"] == str(mnt), again
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > before * 1.8
        said = cli.run("volume", "expand", "g", "--size", "640M").stdout.strip()
        assert said == "g is already 640M: nothing to do", said
    finally:
        cli.run("umount", str(mnt), check=False)
