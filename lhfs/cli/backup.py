"""Backups: ``lhfs backup create/ls/rm/restore/gc``."""

from __future__ import annotations

import argparse
from typing import Any

from lhfs.cli.common import (
    Parser,
    print_json,
    quiet_option,
    root_of,
    say,
    size_arg,
    verb,
)
from lhfs.core.units import format_size, rfc3339

RETRY_TIMEOUT = 60.0  # (backupstore.s3's; not imported from there: it loads the S3 client)


def cmd_backup_create(args: argparse.Namespace) -> None:
    from lhfs.backups import backup
    from lhfs.cli.progress import Progress

    with Progress(f"backup {args.volume}", quiet=args.quiet) as bar:
        url, stats = backup.create(
            root_of(args),
            args.volume,
            args.target,
            args.snapshot,
            bar.update,
            args.block_size,
            create_bucket=args.create_bucket,
            retry_timeout=args.retry_timeout,
        )
    data = {
        "url": url,
        "blocks": stats.blocks,
        "read": stats.read,
        "uploaded": stats.uploaded,
        "uploaded_bytes": stats.uploaded_bytes,
        "reused": stats.reused,
    }
    if not args.quiet and not args.json:
        print(
            f"read {stats.read} of {stats.blocks} blocks, uploaded {stats.uploaded} "
            f"({format_size(stats.uploaded_bytes)}), {stats.reused} already stored"
        )
    say(args, data, url)


def cmd_backup_ls(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    backups = backup.list_backups(args.target, args.volume, args.retry_timeout)
    for b in backups:
        b["started"] = None if b["started"] is None else rfc3339(b["started"])
    if args.json:
        print_json(backups)
        return
    if not backups:
        print(f"no backups in {args.target}")
        return
    print(f"{'VOLUME':16} {'BACKUP':36} {'STATE':11} {'SIZE':>8} URL")
    for b in backups:
        size = format_size(b["size"]) if b["size"] else "-"
        print(f"{b['volume']:16} {b['name']:36} {b['state']:11} {size:>8} {b['url']}")


def cmd_backup_rm(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    done = backup.remove(args.url, args.retry_timeout)
    data = {"url": args.url, "collected": done.removed, "deferred": done.deferred}
    if done.deferred:
        text = (
            f"deleted {args.url}; collection of its blocks deferred: {done.deferred} "
            "('lhfs backup gc' collects them later)"
        )
    else:
        text = f"deleted {args.url}; {done.removed} unreferenced block(s) collected"
    say(args, data, text)


def cmd_backup_gc(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    done = backup.collect(args.target, args.retry_timeout)
    say(
        args,
        {"target": args.target, "collected": done.removed, "swept": done.swept},
        f"{done.removed} unreferenced block(s) collected, "
        f"{done.swept} marker(s) of interrupted backups removed",
    )


def cmd_backup_restore(args: argparse.Namespace) -> None:
    from lhfs.backups import backup
    from lhfs.cli.progress import Progress

    with Progress(f"restore {args.name}", quiet=args.quiet) as bar:
        vol = backup.restore(
            root_of(args), args.url, args.name, args.replicas, bar.update, args.retry_timeout
        )
    data = {"url": args.url, "volume": vol.name, "size": vol.size}
    say(args, data, f"restored {args.url} into volume {vol.name} ({format_size(vol.size)})")


def parsers(groups: Any) -> None:
    group = groups.add_parser("backup", help="incremental backups to S3, and restores")
    group.set_defaults(store=True)
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    p = verb(
        verbs,
        "create",
        cmd_backup_create,
        "back a snapshot of a volume up (blocks the store has are not sent again)",
        "volume",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--snapshot", help="an existing snapshot (default: take a new one)")
    p.add_argument(
        "--block-size",
        type=size_arg,
        help="backup block size of a volume's first backup to this target, a power of two "
        "4K-64M (default 2M); later backups keep it",
    )
    p.add_argument(
        "--create-bucket",
        action="store_true",
        help="make the bucket if it does not exist (otherwise a missing bucket is an error: "
        "a typo must not start a new store)",
    )
    quiet_option(p)
    store_options(p)
    p = verb(verbs, "ls", cmd_backup_ls, "backups in a target: complete, running, interrupted")
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--volume", help="only this volume's backups")
    store_options(p)
    p = verb(verbs, "rm", cmd_backup_rm, "delete a backup and collect unreferenced blocks")
    p.add_argument("url", help="s3://BUCKET/PREFIX?volume=V&backup=B")
    store_options(p)
    p = verb(
        verbs,
        "gc",
        cmd_backup_gc,
        "collect unreferenced blocks and the markers of interrupted backups",
        description="Delete the blocks no complete backup references, and the markers that "
        "interrupted backups left. Refused, with the reason, while a backup runs.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    store_options(p)
    p = verb(
        verbs,
        "restore",
        cmd_backup_restore,
        "restore a backup into a new volume",
        description="Create NAME (shown as 'restoring' until done) and write the backup "
        "straight into its replicas. 'lhfs replica add NAME' during the restore makes it go "
        "on through the volume's engine, which rebuilds the new replica online. Every block "
        "is checked against its checksum; a failed restore leaves no volume behind.",
    )
    p.add_argument("url", help="s3://BUCKET/PREFIX?volume=V&backup=B")
    p.add_argument("name", help="the new volume")
    p.add_argument("--replicas", type=int, default=3, help="replicas of the new volume")
    quiet_option(p)
    store_options(p)


def store_options(p: argparse.ArgumentParser) -> None:
    """What every command that talks to S3 takes."""
    p.add_argument(
        "--retry-timeout",
        type=float,
        default=RETRY_TIMEOUT,
        metavar="SECONDS",
        help="give up on a store that does not answer after this long (default "
        f"{RETRY_TIMEOUT:.0f} s; refusals are final at once). The endpoint and credentials "
        "come from AWS_ENDPOINT_URL (or AWS_REGION for Amazon S3), AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY",
    )
