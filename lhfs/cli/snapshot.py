"""Snapshots: ``lhfs snapshot create/ls/rm/revert``."""

from __future__ import annotations

import argparse
from typing import Any

from lhfs.cli.common import (
    Parser,
    print_json,
    quiet_option,
    root_of,
    say,
    verb,
)
from lhfs.core.units import format_size


def cmd_snapshot_create(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    snap = manage.snapshot_create(root_of(args), args.volume, args.name)
    print_json(snap) if args.json else print(f"created snapshot {snap['name']}")


def cmd_snapshot_ls(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    snaps = manage.snapshot_list(root_of(args), args.volume)
    if args.json:
        print_json(snaps)
        return
    if not snaps:
        print(f"{args.volume} has no snapshots")
        return
    print(f"{'SNAPSHOT':32} {'CREATED':25} {'SIZE':>8}")
    for snap in snaps:
        mark = "" if snap.get("active", True) else "  (not in the volume's chain)"
        print(f"{snap['name']:32} {snap['created']:25} {format_size(snap['size']):>8}{mark}")


def cmd_snapshot_rm(args: argparse.Namespace) -> None:
    from lhfs.cli.progress import Progress
    from lhfs.volumes import manage

    with Progress(f"remove {args.name}", quiet=args.quiet) as bar:
        some = manage.snapshot_remove(root_of(args), args.volume, args.name, bar.update)
    data = {"volume": args.volume, "name": args.name, "removed": True, "only_on": some}
    text = f"removed snapshot {args.name}"
    if some is not None:  # (a snapshot create cut short left it there)
        text += f", which only {some} replica{'s' if some > 1 else ''} held"
    say(args, data, text)


def cmd_snapshot_revert(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    unformatted = manage.snapshot_revert(root_of(args), args.volume, args.name)
    data = {"volume": args.volume, "name": args.name, "reverted": True}
    data["filesystem_record_cleared"] = unformatted
    text = f"reverted {args.volume} to {args.name}"
    if unformatted:
        text += (
            ", taken before 'lhfs mount' formatted it: its file system record is set aside, "
            "and the next 'lhfs mount' formats it if it is blank"
        )
    say(args, data, text)


def parsers(groups: Any) -> None:
    group = groups.add_parser("snapshot", help="create, list, remove and revert snapshots")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    p = verb(
        verbs,
        "create",
        cmd_snapshot_create,
        "crash-consistent snapshot on every replica",
        ("volume", "the volume"),
    )
    p.add_argument("name", nargs="?", help="snapshot name (default: snap-DATE-TIME)")
    verb(verbs, "ls", cmd_snapshot_ls, "the chain, oldest first", ("volume", "the volume"))
    p = verb(
        verbs,
        "rm",
        cmd_snapshot_rm,
        "remove a snapshot; its data merges into its child",
        ("volume", "the volume"),
        ("name", "the snapshot"),
    )
    quiet_option(p)
    verb(
        verbs,
        "revert",
        cmd_snapshot_revert,
        "(detached) make the head a fresh layer on a snapshot",
        ("volume", "the volume"),
        ("name", "the snapshot"),
    )
