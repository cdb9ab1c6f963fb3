"""System backups: ``lhfs system backup/ls/restore/rm``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lhfs.cli.common import Parser, print_json, quiet_option, root_of, say, verb
from lhfs.cli.progress import Steps
from lhfs.core.units import rfc3339


def cmd_system_backup(args: argparse.Namespace) -> None:
    from lhfs.backups import system

    parts = Steps(args.quiet)
    try:
        done = system.create(
            root_of(args),
            args.target,
            args.name,
            parts.update,
            args.create_bucket,
            args.retry_timeout,
            parts.note,
        )
    finally:
        parts.close()
    skipped = "".join(f"; skipped {v} ({why})" for v, why in done["skipped"].items())
    text = (
        f"system backup {done['name']}: {len(done['volumes'])} volume(s), "
        f"{len(done['images'])} backing image(s){skipped}\n{done['url']}"
    )
    say(args, done, text)


def cmd_system_ls(args: argparse.Namespace) -> None:
    from lhfs.backups import system

    found = system.listing(args.target, args.retry_timeout)
    if args.json:  # (times as RFC 3339, as everywhere in lhfs's JSON)
        print_json(
            [
                {
                    **entry,
                    "started": rfc3339(entry["started"]),
                    "written": entry["written"] and rfc3339(entry["written"]),
                }
                for entry in found
            ]
        )
        return
    if not found:
        print(f"no system backups in {args.target}")
        return
    print(f"{'SYSTEM BACKUP':36} {'STATE':11} {'CREATED':20} VOLUMES, IMAGES")
    for entry in found:
        parts = ", ".join([*(entry["volumes"] or []), *(entry["images"] or [])]) or "-"
        if entry["reason"]:  # (damaged: why, and what removes it)
            parts = f"{entry['reason']} ('lhfs system rm {entry['url']}' removes it)"
        print(f"{entry['name']:36} {entry['state']:11} {entry['created']:20} {parts}")


def cmd_system_restore(args: argparse.Namespace) -> None:
    from lhfs.backups import system

    only = None if args.volumes is None else [v.strip() for v in args.volumes.split(",")]
    parts = Steps(args.quiet)
    try:
        done = system.restore(root_of(args), args.url, only, parts.update, args.retry_timeout)
    finally:
        parts.close()
    text = (
        f"restored system backup {done['name']}: volume(s) {', '.join(done['volumes']) or '-'}; "
        f"backing image(s) {', '.join(done['images']) or '-'}"
        + (f" ({', '.join(done['skipped_images'])} already here)" if done["skipped_images"] else "")
        + "".join(f"; {v} on backing image {i}" for v, i in done["on_images"].items())
    )
    for volume, why in done["whole"].items():  # (notices: on stderr, as every notice is)
        print(f"lhfs: volume {volume}: {why}", file=sys.stderr, flush=True)
    say(args, done, text)


def cmd_system_rm(args: argparse.Namespace) -> None:
    from lhfs.backups import system

    done = system.remove(args.url, args.retry_timeout)
    damaged = (
        f" (its record could not be read: {done['damaged']}; its parts, unknown, stay as "
        "ordinary backups)"
        if done["damaged"]
        else ""
    )
    kept = "".join(
        f"; kept {k['backup']}: system backup {k['system']}, whose record cannot be read, may "
        "name it"
        for k in done["kept_backups"]
    )
    text = (
        f"deleted system backup {done['name']}{damaged} and {len(done['removed_backups'])} "
        f"backup(s) no other system backup names{kept}; "
        + (
            f"collection deferred: {done['deferred']}"
            if done["deferred"]
            else f"{done['collected']} unreferenced block(s) collected"
        )
    )
    say(args, done, text)


def parsers(groups: Any) -> None:
    from lhfs.cli.backup import store_options

    group = groups.add_parser(
        "system",
        help="back up and restore every volume and backing image of a root at once",
        description="A system backup is a backup of every volume (DR standbys aside) and "
        "every backing image of a root, with the volumes' settings, as one named whole that "
        "is complete only when every part is. Its parts are ordinary backups in the target.",
    )
    group.set_defaults(store=True)
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    p = verb(
        verbs,
        "backup",
        cmd_system_backup,
        "back up every volume and backing image of the root",
        description=(
            "Take a snapshot of every volume at one instant (the I/O of all of them held "
            "together for as long as the snapshots take, before any upload: together they"
            " are crash-consistent, as one disk would be), back each up (incrementally, "
            "as 'backup create' does), back every backing image up (one the store already"
            " holds is complete at once), then record the system backup. Each part shows "
            "its progress; a failure names the part. Interrupted, it leaves nothing that "
            "looks complete ('system ls' shows it interrupted)."
        ),
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--name", help="the system backup's name (default: system-DATE-TIME-XXXX)")
    p.add_argument("--create-bucket", action="store_true", help="make the bucket if missing")
    quiet_option(p)
    store_options(p)
    p = verb(verbs, "ls", cmd_system_ls, "system backups in a target: complete or not")
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    store_options(p)
    p = verb(
        verbs,
        "restore",
        cmd_system_restore,
        "recreate the volumes and backing images of a system backup",
        description="Recreate, under --root, the backing images and the volumes of the "
        "system backup at URL (s3://BUCKET/PREFIX?system=NAME), each volume with its "
        "recorded settings, replica count and file system record. Refused, before anything "
        "is made, when one of those volumes (or an image of other content) exists already.",
    )
    p.add_argument("url", help="s3://BUCKET/PREFIX?system=NAME")
    p.add_argument(
        "--volumes",
        metavar="V1,V2",
        help="only these volumes (and the backing images they stand on that the root lacks)",
    )
    quiet_option(p)
    store_options(p)
    p = verb(
        verbs,
        "rm",
        cmd_system_rm,
        "delete a system backup and the parts no other one names",
        ("url", "s3://BUCKET/PREFIX?system=NAME"),
    )
    store_options(p)
