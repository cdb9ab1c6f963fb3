"""``lhfs mount`` and ``lhfs umount``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lhfs.cli.common import (
    describe_detach,
    dir_arg,
    json_option,
    metrics_option,
    root_of,
    say,
    verb,
)


def cmd_mount(args: argparse.Namespace) -> None:
    from lhfs.volumes.mount import mount

    result = mount(root_of(args), args.name, Path(args.mountpoint), args.fs, args.metrics)
    how = "formatted and mounted" if result["formatted"] else "mounted"
    grown = "; its file system grown to the volume's size" if result["grown"] else ""
    if result["todo"]:
        grown = f"; its file system is smaller than the volume, still to do: {result['todo']}"
    metrics = result.get("metrics")
    shown = f"; metrics on http://{metrics}/metrics" if metrics else ""
    say(
        args,
        result,
        f"{how} {result['name']} at {result['mountpoint']} ({result['loop']}){grown}{shown}",
    )


def cmd_umount(args: argparse.Namespace) -> None:
    from lhfs.volumes.mount import umount

    result = umount(root_of(args), Path(args.mountpoint), force=args.force)
    say(args, result, f"unmounted {result['mountpoint']} and {describe_detach(result)}")


def mount_parsers(groups: Any) -> None:
    p = groups.add_parser(
        "mount",
        help="attach, format if never formatted, and mount a volume",
        description="Attach the volume if needed, put a loop device on it, create a "
        "filesystem only if the volume was never formatted (a durable record decides, "
        "checked against the device's real content), and mount it; a file system smaller "
        "than its volume (expanded since) is grown to the volume's size.",
    )
    p.add_argument("name", help="the volume")
    p.add_argument("mountpoint", type=dir_arg, help="an existing directory to mount it on")
    p.add_argument(
        "--fs",
        help="file system to format a new volume with (default ext4; xfs needs 300M at "
        "least); for one formatted already it must name what it holds (or be left out)",
    )
    metrics_option(p)
    json_option(p)
    p.set_defaults(func=cmd_mount)


def umount_parsers(groups: Any) -> None:
    p = verb(
        groups,
        "umount",
        cmd_umount,
        "unmount, free the loop device, detach",
        description="Unmount the file system, free the loop device and detach the volume: "
        "also when the volume is faulted or its engine died (the file system is then "
        "unmounted lazily) — it says what it cleaned up. A busy file system of a working "
        "volume is refused.",
    )
    p.add_argument("mountpoint", type=dir_arg, help="where 'lhfs mount' mounted the volume")
    p.add_argument(
        "--force",
        action="store_true",
        help="also let go when the engine does not answer (writes not yet flushed are lost)",
    )
