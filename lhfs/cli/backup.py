"""Backups: ``lhfs backup create/ls/rm/restore/gc``."""

from __future__ import annotations

import argparse
from typing import Any

from lhfs.cli.common import (
    FOUND,
    Parser,
    path_arg,
    placement_options,
    print_json,
    quiet_option,
    replica_count,
    root_of,
    say,
    seconds_arg,
    size_arg,
    verb,
)
from lhfs.core.names import IMAGE_BACKUPS
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
            notice=bar.note,
            full=args.full,
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
    for b in backups:  # (seconds since the epoch in the store; RFC 3339 here)
        b["started"] = None if b["started"] is None else rfc3339(b["started"])
        b["taken"] = None if b["taken"] is None else rfc3339(b["taken"])
    if args.json:
        print_json(backups)
        return
    if not backups:
        print(f"no backups in {args.target}")
        return
    print(f"{'VOLUME':16} {'BACKUP':44} {'STATE':11} {'SIZE':>8} URL")
    for b in backups:
        size = format_size(b["size"]) if b["size"] else "-"
        reason = f"  ({b['reason']})" if b["reason"] else ""
        print(f"{b['volume']:16} {b['name']:44} {b['state']:11} {size:>8} {b['url']}{reason}")


def cmd_backup_rm(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    done, released = backup.remove(args.url, args.retry_timeout, root_of(args))
    data = {
        "url": args.url,
        "collected": done.removed,
        "deferred": done.deferred,
        "released": released,
    }
    if done.deferred:
        later = "" if done.damaged else " ('lhfs backup gc' collects them later)"
        text = f"deleted {args.url}; collection of its blocks deferred: {done.deferred}{later}"
    else:
        text = f"deleted {args.url}; {done.removed} unreferenced block(s) collected"
    say(args, data, text + _released(released))


def cmd_backup_forget(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    released = backup.forget(root_of(args), args.volume, args.target)
    kept = f"snapshot {released}" if released else "a snapshot"
    say(
        args,
        {"volume": args.volume, "target": args.target, "released": released},
        f"volume {args.volume} no longer keeps {kept} for backups to {args.target}; the next "
        "backup there reads the whole volume",
    )


def _released(snapshot: str | None) -> str:
    """What a removal says of the snapshot the volume kept as its base for the target."""
    if snapshot is None:
        return ""
    return f"; the volume no longer keeps snapshot {snapshot} as its base for that target"


def cmd_backup_gc(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    done = backup.collect(args.target, args.retry_timeout, args.strays)
    fate = "removed" if done.strays_removed else "kept (--strays removes them)"
    say(
        args,
        {
            "target": args.target,
            "collected": done.removed,
            "swept": done.swept,
            "strays": done.strays,
            "strays_removed": done.strays_removed,
        },
        f"{done.removed} unreferenced block(s) collected, "
        f"{done.swept} marker(s) of interrupted backups or restores removed"
        + (f"; {len(done.strays)} stray object(s) {fate}" if done.strays else ""),
    )


def cmd_backup_restore(args: argparse.Namespace) -> None:
    from lhfs.backups import backup
    from lhfs.cli.progress import Progress

    whole: list[str] = []  # (why it holds its source's backing image's content itself)
    with Progress(f"restore {args.name}", quiet=args.quiet) as bar:

        def told(text: str) -> None:
            """A notice, on stderr as every notice is (stdout: what was done); kept for JSON."""
            whole.append(text)
            bar.note(text)

        vol = backup.restore(
            root_of(args),
            args.url,
            args.name,
            replica_count(args),
            bar.update,
            args.retry_timeout,
            args.disks,
            notice=told,
        )
    image = vol.config.get("backing_image_name") if vol.config.get("backing_image") else None
    data = {
        "url": args.url,
        "volume": vol.name,
        "size": vol.size,
        "backing_image": vol.config.get("backing_image"),
        "backing_image_name": image,
        "whole": whole[0] if whole else None,
    }
    text = f"restored {args.url} into volume {vol.name} ({format_size(vol.size)})"
    text += f" on backing image {image}" if image else ""
    say(args, data, text)


def cmd_backup_init(args: argparse.Namespace) -> None:
    from lhfs.backups import backup

    done = backup.init_store(args.target, args.encrypt, args.create_bucket, args.retry_timeout)
    kind = "an encrypted" if done["encrypted"] else "a plain"
    if done["created"]:
        text = f"{args.target} is {kind} store now"
    else:
        text = f"{args.target} already is {kind} store: nothing changed"
    say(args, done, text)


def cmd_backup_check(args: argparse.Namespace) -> int:
    from lhfs.backups import backup
    from lhfs.cli.progress import Progress

    with Progress(f"check {args.target}", quiet=args.quiet or not args.read_data) as bar:
        report = backup.check_store(args.target, args.read_data, bar.update, args.retry_timeout)
    if args.json:
        print_json(report)
    elif report["problems"]:
        for problem in report["problems"]:
            print(problem)
        print(f"{len(report['problems'])} problem(s) in {args.target}")
        volumes = sorted({b["volume"] for b in report["broken_backups"]})
        if volumes:
            print(
                f"{len(report['broken_backups'])} backup(s) cannot be restored whole: run "
                + ", ".join(_resend(volume, args.target) for volume in volumes)
                + " to send their blocks again (a block the volume no longer holds cannot be: "
                "'lhfs backup rm' the backups that name it)"
            )
    elif not report["backups"]:  # (blocks it holds, if any, no backup names: see the note)
        print(f"{args.target}: it holds no backup; no problem")
    elif not report["blocks"]:
        print(
            f"{args.target}: {report['backups']} backup(s) authenticated, naming no block (all "
            "zeros); no problem"
        )
    else:
        read = f", {report['blocks_read']} read and verified" if args.read_data else ""
        print(
            f"{args.target}: {report['backups']} backup(s) authenticated, the "
            f"{report['blocks']} block(s) they name all present{read}; no problem"
        )
    if not args.json and report["unreferenced_blocks"]:
        print(
            f"note: {report['unreferenced_blocks']} block(s) "
            f"({format_size(report['unreferenced_bytes'])}) that no backup names (sent by a "
            "backup under way, or left by a removal cut short): 'lhfs backup gc --target "
            f"{args.target}' collects them"
        )
    return FOUND if report["problems"] else 0


def _resend(volume: str, target: str) -> str:
    """The command that sends every block of ``volume`` to ``target`` again."""
    image = volume.removeprefix(IMAGE_BACKUPS)
    if image != volume:  # (a backing image's backups)
        return f"'lhfs backing-image backup {image} --target {target} --full'"
    return f"'lhfs backup create {volume} --target {target} --full'"


def cmd_backup_prune(args: argparse.Namespace) -> None:
    from backupstore.retention import RULES
    from lhfs.backups import backup

    policy = {rule: getattr(args, f"keep_{rule}") or 0 for rule in RULES}
    report = backup.prune(
        args.target, args.volume, policy, args.dry_run, args.retry_timeout, root_of(args)
    )
    if args.json:
        print_json(report)
        return
    for kept in report["kept"]:
        print(f"keep   {kept['name']:40} {kept['created']}  ({', '.join(kept['reasons'])})")
    verb_ = "would remove" if args.dry_run else "remove"
    for removed in report["removed"]:
        print(f"{verb_:6} {removed['name']:40} {removed['created']}")
    for damaged in report["damaged"]:  # (what it holds is unknown: never removed by a rule)
        print(f"damaged {damaged['name']:39} not removed: {damaged['reason']}")
    summary = f"{len(report['kept'])} kept, {len(report['removed'])} removed"
    if args.dry_run:
        summary = f"{len(report['kept'])} would be kept, {len(report['removed'])} would be removed"
    if report["damaged"]:
        summary += f", {len(report['damaged'])} damaged left ('lhfs backup rm' removes one)"
    if report["deferred"]:  # (never in a dry run: nothing was collected)
        summary += f"; collection of their blocks deferred: {report['deferred']}"
    elif report["removed"] and not args.dry_run:
        summary += f"; {report['collected']} unreferenced block(s) collected"
    print(summary + _released(report["released"]))


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
        ("volume", "the volume to back up"),
        description="Back a snapshot of VOLUME up (a new one unless --snapshot names one): "
        "only the blocks changed since its last backup to the target are read, and only those "
        "the store lacks are sent. A collection under way ('backup gc', 'rm', 'prune') holds "
        "it back, and it says so on stderr; the marker of a collection whose process died "
        "holds it back at most 10 minutes after its last refresh. --retry-timeout does not "
        "bound that wait.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--snapshot", help="an existing snapshot (default: take a new one)")
    p.add_argument(
        "--block-size",
        type=size_arg,
        help="backup block size of a volume's first backup to this target, a power of two "
        "4K-16M (default 2M); later backups keep it",
    )
    p.add_argument(
        "--create-bucket",
        action="store_true",
        help="make the bucket if it does not exist (otherwise a missing bucket is an error: "
        "a typo must not start a new store)",
    )
    full_option(p)
    quiet_option(p)
    store_options(p)
    p = verb(
        verbs,
        "forget",
        cmd_backup_forget,
        "drop a volume's record of its last backup to a target, and the snapshot it keeps",
        ("volume", "the volume"),
        description="Drop VOLUME's record of its last backup to --target, the base of the next "
        "backup there, whose snapshot housekeeping then trims: for a store lost whole or out "
        "of reach for good ('backup rm' of that backup, or a 'backup prune' that removes it, "
        "drops the record by itself). The store is not asked. The next backup to the target "
        "reads the whole volume.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX, as the backups named it")
    p = verb(
        verbs,
        "init",
        cmd_backup_init,
        "make a store (encrypted with --encrypt) before its first backup",
        description="Make the store's record in --target: with --encrypt, the store's keys, "
        "wrapped by the password (LHFS_BACKUP_PASSWORD or --password-file); blocks and "
        "manifests are then encrypted and authenticated, and block names reveal nothing of "
        "their content. Without --encrypt, a plain store whose manifests are authenticated. "
        "The first backup to a target without a record makes one the same way (encrypted "
        "when a password is given). A store is either encrypted or not: that never changes. "
        "Keep the password: the backups cannot be read without it.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--encrypt", action="store_true", help="an encrypted store")
    p.add_argument("--create-bucket", action="store_true", help="make the bucket if missing")
    store_options(p)
    p = verb(
        verbs,
        "check",
        cmd_backup_check,
        "prove a store sound: manifests authentic, blocks present (and intact)",
        description="Check that every manifest and volume record in --target authenticates "
        "and parses and that every block a backup names exists; with --read-data, fetch "
        "every block and verify it against its checksum. Changes nothing. Exit status: 0 "
        "sound, 3 problems found (each listed on a line), 1 the check could not run.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--read-data", action="store_true", help="also fetch and verify every block")
    quiet_option(p)
    store_options(p)
    p = verb(
        verbs,
        "prune",
        cmd_backup_prune,
        "delete the backups of a volume a retention policy does not keep",
        description="Keep the backups of --volume that the --keep-* rules name (restic's "
        "'forget' policy: the N newest; the newest of each of the N most recent hours, days, "
        "ISO weeks, months, years that have one; periods in UTC), the newest always, and the "
        "one each DR standby of the volume last restored; delete the others and collect "
        "the blocks no backup uses any more. --dry-run shows what would go.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--volume", required=True, help="the volume whose backups are pruned")
    from backupstore.retention import RULES

    for rule in RULES:
        p.add_argument(f"--keep-{rule}", type=int, metavar="N", help=f"the keep-{rule} rule")
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    store_options(p)
    p = verb(
        verbs, "ls", cmd_backup_ls, "backups in a target: complete, running, interrupted, damaged"
    )
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
        "collect unreferenced blocks and the markers of interrupted backups and restores",
        description="Delete the blocks no complete backup references and the markers that "
        "interrupted backups and killed restores left; with --strays, also the stray objects "
        "under volumes/ "
        "(objects lhfs never writes: 'backup check' names them; kept by default, as they may "
        "be someone else's). Refused, with the reason, while a backup runs, "
        "and while a damaged manifest is in the store (the blocks it names are unknown): "
        "'lhfs backup rm' it first; while one a newer lhfs wrote is there, upgrade lhfs to "
        "collect.",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument(
        "--strays",
        action="store_true",
        help="also delete the stray objects under volumes/ ('backup check' names them)",
    )
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
    placement_options(p, "the new volume")
    quiet_option(p)
    store_options(p)


def full_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full",
        action="store_true",
        help="read every block and send it again, even one the store holds: repairs the "
        "blocks 'backup check' finds missing or damaged (as much upload as the data)",
    )


def store_options(p: argparse.ArgumentParser) -> None:
    """What every command that talks to S3 takes."""
    p.add_argument(
        "--retry-timeout",
        type=seconds_arg,
        default=RETRY_TIMEOUT,
        metavar="SECONDS",
        help="give up on a store that does not answer after this long (default "
        f"{RETRY_TIMEOUT:.0f} s; refusals are final at once); once one request gave up, the "
        "others do too, so the command fails about that long after the store went away. "
        "The endpoint and credentials "
        "come from AWS_ENDPOINT_URL (or AWS_REGION for Amazon S3), AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        type=path_arg,
        help="the password of an encrypted store: the first line of FILE, readable by its "
        "owner only (default: $LHFS_BACKUP_PASSWORD; neither: a store that is not encrypted)",
    )
