"""The kernel's mount table and loop devices, as lhfs reads them: which loop devices a file
backs and where they are mounted. Read by the commands that attach and let go, and by an
engine that must not end under a file system mounted on its device."""

from __future__ import annotations

import os
import re
from pathlib import Path


def mount_table() -> list[tuple[str, str]]:
    """(source, mount point) of every mount, as the kernel lists them (spaces and the like
    written as octal escapes there, decoded here)."""
    with open("/proc/self/mounts") as f:
        rows = [line.split()[:2] for line in f]
    return [(unescape(source), unescape(point)) for source, point in rows]


def unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def kernel_path(device: Path) -> str:
    """``device`` as the kernel names it (a loop device's backing file, a descriptor's link):
    its directory with every link resolved (a root under ``/home`` linked elsewhere), its
    own name as it is (never a link: an attach refuses one; and not looked at: a FUSE file
    whose engine is stopped would hang the look)."""
    absolute = os.path.abspath(device)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def loops_backed_by(device: Path) -> list[str]:
    """Loop devices whose backing file is ``device``."""
    out = []
    target = kernel_path(device)
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing in (target, target + " (deleted)"):
            out.append(f"/dev/{entry.name}")
    return out


def mounted_at(source: str) -> list[str]:
    """Where ``source`` (a loop device) is mounted."""
    return [point for where, point in mount_table() if where == source]
