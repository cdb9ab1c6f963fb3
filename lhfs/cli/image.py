"""Backing images: ``lhfs backing-image create/ls/rm/backup``."""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

from lhfs.cli.backup import full_option, store_options
from lhfs.cli.common import (
    Parser,
    path_arg,
    print_json,
    quiet_option,
    root_of,
    say,
    verb,
)
from lhfs.cli.progress import Progress, Steps
from lhfs.core.units import format_size


def cmd_image_create(args: argparse.Namespace) -> None:
    from lhfs.volumes import images

    steps = Steps(args.quiet, of=args.name)  # (copying the file in, then hashing it)
    try:
        info = images.create(root_of(args), args.name, Path(args.source), steps.step)
    finally:
        steps.close()
    text = f"created backing image {info['name']}: {format_size(info['size'])}, id {info['id']}"
    say(args, info, text)


def cmd_image_ls(args: argparse.Namespace) -> None:
    from lhfs.volumes import images

    found = images.list_images(root_of(args))
    on = images.users(root_of(args), {i["name"]: i["id"] for i in found if "id" in i})
    for info in found:  # (the volumes made from it)
        if "id" in info:
            info["volumes"] = on.get(info["name"], [])
    if args.json:
        print_json(found)
        return
    if not found:
        print("no backing images")
    else:
        print(f"{'IMAGE':24} {'SIZE':>8}  ID")
    for info in found:
        if "error" in info:  # (its record is damaged: 'backing-image rm' clears it)
            print(f"{info['name']:24} {'damaged':>8}  {info['error']}")
        else:
            changed = (  # (its size or time differ from when it was registered)
                "  (its file was modified since it was registered: volume create refuses it "
                "if its content changed)"
                if info["changed"]
                else ""
            )
            if info["changed"] and not os.path.exists(info["path"]):
                changed = f"  (its file {info['path']} is missing)"
            if info["volumes"]:
                changed += f"  (volumes {', '.join(info['volumes'])})"
            print(f"{info['name']:24} {format_size(info['size']):>8}  {info['id']}{changed}")


def cmd_image_rm(args: argparse.Namespace) -> None:
    from lhfs.volumes import images

    users = images.remove(root_of(args), args.name)
    text = f"removed backing image {args.name}"
    if users:
        text += f" (volumes {', '.join(users)} keep the copies their replicas hold)"
    say(args, {"name": args.name, "removed": True, "volumes": users}, text)


def cmd_image_backup(args: argparse.Namespace) -> None:
    from lhfs.backups import image_backups

    with Progress(f"backup {args.name}", quiet=args.quiet) as bar:
        url = image_backups.backup(
            root_of(args),
            args.name,
            args.target,
            bar.update,
            create_bucket=args.create_bucket,
            retry_timeout=args.retry_timeout,
            full=args.full,
            notice=bar.note,
        )
    say(args, {"name": args.name, "url": url}, url)


def cmd_image_restore(args: argparse.Namespace) -> None:
    from lhfs.backups import image_backups

    new = args.new_name or args.name
    steps = Steps(args.quiet, of=new)  # (fetching, checking, copying in, hashing)
    try:
        info = image_backups.restore(
            root_of(args),
            args.name,
            args.target,
            args.new_name,
            args.backup,
            partial(steps.update, "restore"),
            args.retry_timeout,
            steps.note,
            steps.step,
        )
    finally:
        steps.close()
    text = (
        f"restored backing image {info['name']} from backup {info['backup']} of {args.name}: "
        f"{format_size(info['size'])}, id {info['id']}"
    )
    say(args, info, text)


def parsers(groups: Any) -> None:
    group = groups.add_parser("backing-image", help="shared read-only images under volumes")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    p = verb(
        verbs,
        "create",
        cmd_image_create,
        "import a raw image (known by its content)",
        ("name", "the new backing image's name"),
    )
    p.add_argument("--from", dest="source", required=True, type=path_arg, help="the raw image file")
    quiet_option(p)
    verb(verbs, "ls", cmd_image_ls, "backing images: names, sizes, content ids")
    verb(
        verbs,
        "rm",
        cmd_image_rm,
        "delete a backing image (volumes made from it keep their own copies)",
        ("name", "the backing image"),
        description="Delete a registered backing image from the root. A volume made from it "
        "keeps a copy in each of its replicas (a rebuild copies it from a healthy replica), "
        "so it goes on as before; new volumes can no longer be made from it by name.",
    )
    p = verb(
        verbs,
        "backup",
        cmd_image_backup,
        "store a backing image in a backup target",
        ("name", "the backing image"),
    )
    p.set_defaults(store=True)
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--create-bucket", action="store_true", help="make the bucket if missing")
    full_option(p)
    quiet_option(p)
    store_options(p)
    p = verb(
        verbs,
        "restore",
        cmd_image_restore,
        "register a backing image from its backup in a target",
        ("name", "the backing image's name when it was backed up"),
        description="Fetch a backup made by 'lhfs backing-image backup NAME' (kept in the "
        "target as the volume image-NAME; its newest complete backup unless --backup names "
        "one) and register it under the root as 'backing-image create' would: checked against "
        "the content id it was backed up with, written to a temporary file and renamed into "
        "place once on disk. Refused, changing nothing, when a backing image of that name "
        "exists, or when one of that content is registered under another name (volumes "
        "restored from backups made on it stand on that one: it is matched by content). "
        "'lhfs system restore' restores the images of a system backup.",
    )
    p.set_defaults(store=True)
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument(
        "--as", dest="new_name", metavar="NEWNAME", help="register it under this name instead"
    )
    p.add_argument(
        "--backup",
        metavar="ID",
        help="the backup to restore, as 'lhfs backup ls --volume image-NAME' names it "
        "(default: the newest complete one)",
    )
    quiet_option(p)
    store_options(p)
