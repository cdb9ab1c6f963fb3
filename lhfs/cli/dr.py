"""DR standby volumes: ``lhfs dr create/status/activate/start/stop/forget/run``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from lhfs.cli.backup import store_options
from lhfs.cli.common import (
    Parser,
    log_option,
    metrics_option,
    path_arg,
    placement_options,
    print_json,
    quiet_option,
    replica_count,
    root_of,
    say,
    verb,
)
from lhfs.core.errors import LhfsError
from lhfs.core.units import format_size


def cmd_dr_create(args: argparse.Namespace) -> None:
    from lhfs.backups import dr

    vol = dr.create(
        root_of(args),
        args.name,
        args.target,
        args.volume,
        replica_count(args),
        args.interval,
        args.retry_max,
        Path(args.credentials_file) if args.credentials_file else None,
        args.retry_timeout,
        args.metrics,
        args.disks,
        notice=lambda text: print(f"lhfs: {text}", file=sys.stderr, flush=True),
    )
    text = f"created standby volume {vol.name} ({format_size(vol.size)}) following {args.volume}"
    if args.no_wait:
        say(args, dr.status(root_of(args), args.name), text)
        return
    if not args.json:
        print(text)
    _wait_restored(args)


def _wait_restored(args: argparse.Namespace) -> None:
    """Follow the first restore with a progress bar; store errors are shown, not fatal (the
    follower keeps retrying, and keeps running in the background after Ctrl-C)."""

    from lhfs.backups import dr
    from lhfs.cli.progress import Progress

    shown_error = None
    with Progress(f"restore {args.name}", quiet=args.quiet) as bar:
        while True:
            status = dr.status(root_of(args), args.name)
            if status["last_restored_backup"]:
                bar.update(100)
                break
            if status["state"] in ("failed", "stopped"):
                raise LhfsError(f"the DR follower stopped: {status['last_error'] or 'see dr.log'}")
            if status["last_error"] and status["last_error"] != shown_error:
                shown_error = status["last_error"]
                print(f"store error, retrying: {shown_error}", file=sys.stderr, flush=True)
            bar.update(status["progress"] or 0)
            time.sleep(0.2)
    say(
        args,
        status,
        f"{args.name} holds backup {status['last_restored_backup']}; following in the background",
    )


def cmd_dr_status(args: argparse.Namespace) -> None:
    from lhfs.backups import dr

    status = dr.status(root_of(args), args.name)
    if args.json:
        print_json(status)
        return
    print(
        f"{status['name']}: {status['state']}, following {status['source_volume']} in "
        f"{status['target']}"
    )
    waiting = status["waiting_for_store"]
    if waiting:
        print(
            f"  waiting for the store since {waiting['since']}: {waiting['request']} not "
            "answered yet"
        )
    print(f"  last restored backup: {status['last_restored_backup'] or '(none yet)'}")
    if status["applying"]:
        print(f"  applying {status['applying']}: {status['progress'] or 0:.0f}%")
    print(f"  lag: {status['lag_seconds']:.0f}s")
    deleted = status["deleted_while_applied"]
    if deleted:
        print(
            f"  backup {deleted['backup']} was deleted from the store while it was applied "
            f"({deleted['at']}): its increment was undone and the follower goes on with the "
            "newest backup left; the lag counts until a backup newer than it is applied"
        )
    if status["metrics"]:
        print(f"  metrics: http://{status['metrics']}/metrics")
    for backup, why in sorted((status["passed_over"] or {}).items()):
        print(f"  passed over backup {backup} as damaged: {why}")
    if status["last_error"]:
        recovered = status["last_error_recovered_at"]
        since = f", since recovered at {recovered}" if recovered else ""
        print(f"  last error ({status['last_error_at']}{since}): {status['last_error']}")
    activation, name = status["activation"], status["name"]
    if status["interrupted_increment"]:
        print(
            f"  the increment to {status['interrupted_increment']} was cut short: 'lhfs dr "
            f"start {name}' or 'lhfs dr activate {name}' undoes it first"
        )
    if activation and activation["interrupted"]:
        print(
            f"  an activation (pid {activation['pid']}, begun {activation['started']}) was cut "
            f"short, the standby partly changed: 'lhfs dr activate {name}' finishes it, or "
            f"'lhfs dr start {name}' follows again"
        )
    elif activation:
        print(f"  being activated (pid {activation['pid']}, begun {activation['started']})")
    elif status["state"] == "stopped":
        print(f"  no follower runs: 'lhfs dr start {name}' resumes")


def cmd_dr_activate(args: argparse.Namespace) -> None:
    from lhfs.backups import dr
    from lhfs.cli.progress import Progress

    with Progress(f"activate {args.name}", quiet=args.quiet) as bar:
        result = dr.activate(
            root_of(args), args.name, args.offline, bar.update, args.retry_timeout, bar.note
        )
    say(
        args,
        {"name": args.name, **result},
        f"activated {args.name} at backup {result['backup']}: it is a normal volume now"
        + (f"; {result['marker_kept']}" if result["marker_kept"] else ""),
    )


def cmd_dr_start(args: argparse.Namespace) -> None:
    from lhfs.backups import dr

    pid = dr.start(root_of(args), args.name)
    text = f"{args.name} is following its source (follower pid {pid})"
    say(args, {"name": args.name, "pid": pid}, text)


def cmd_dr_stop(args: argparse.Namespace) -> None:
    from lhfs.backups import dr

    running = dr.stop_following(root_of(args), args.name)
    text = f"{args.name} {'stopped' if running else 'was not'} following (still a standby; "
    text += "'lhfs dr start' resumes)"
    say(args, {"name": args.name, "stopped": True, "was_following": running}, text)


def cmd_dr_forget(args: argparse.Namespace) -> None:
    from lhfs.backups import dr

    freed = dr.forget(
        root_of(args), args.target, args.volume, args.name, args.id, args.retry_timeout
    )
    text = (
        f"removed the marker of DR standby {args.name} of {args.volume} from {args.target}; "
        f"prune no longer keeps {', '.join(freed)} for it"
    )
    say(args, {"name": args.name, "volume": args.volume, "released": freed}, text)


def cmd_dr_run(args: argparse.Namespace) -> None:
    from lhfs.backups import dr
    from lhfs.core import logs

    logs.setup(Path(args.log) if args.log else None)
    try:
        code = dr.run(root_of(args), args.name, args.metrics)
    except SystemExit as stop:  # SIGTERM: the follower has flushed and let go of its lock
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    # Downloads still under way belong to an abandoned increment (undone already): exit at
    # once instead of waiting for a slow store to answer them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _followed(p: argparse.ArgumentParser) -> None:
    """Where the backups a standby follows are: the store and the source volume's name."""
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX of the backups")
    p.add_argument("--volume", required=True, help="the source volume's name in the target")


def parsers(groups: Any) -> None:
    group = groups.add_parser(
        "dr",
        help="standby volumes that follow another volume's backups",
        description="A DR (standby) volume follows a source volume's backups in a target by "
        "incremental restore, in a background follower that survives store outages (it retries "
        "for as long as it takes) and restarts (it resumes from the last backup it fully "
        "restored). It cannot be attached until it is activated. The standby keeps the S3 "
        "endpoint it was created with (activate and start use it, whatever the environment "
        "says); credentials come from the file given with --credentials-file, else from the "
        "environment of the command that starts the follower.",
    )
    group.set_defaults(store=True)
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True
    p = verb(
        verbs,
        "create",
        cmd_dr_create,
        "create a standby volume following a source volume's backups",
        ("name", "the standby volume to make"),
        description="Create the standby volume NAME, restore the newest complete backup of "
        "--volume from --target into it and keep applying newer ones in the background. "
        "Returns once the first backup is restored (--no-wait: at once).",
    )
    _followed(p)
    placement_options(p, "the standby")
    p.add_argument(
        "--interval", type=float, default=30.0, help="seconds between polls (default 30)"
    )
    p.add_argument(
        "--retry-max",
        type=float,
        default=300.0,
        help="longest wait between retries while the store fails (default 300 s)",
    )
    p.add_argument(
        "--credentials-file",
        metavar="FILE",
        type=path_arg,
        help="S3 credentials for the follower (AWS_ACCESS_KEY_ID=... and "
        "AWS_SECRET_ACCESS_KEY=... lines, mode 600): recorded by name and read by the "
        "follower, they win over its environment",
    )
    p.add_argument("--no-wait", action="store_true", help="return before the first restore")
    quiet_option(p)
    metrics_option(p, "dr status")
    store_options(p)
    verb(
        verbs,
        "status",
        cmd_dr_status,
        "last restored backup, lag, last error",
        ("name", "the standby volume"),
        description="The standby's state (restoring, standby, applying, retrying, failed, "
        "stopped), the last fully restored backup, the lag (seconds since it was last known "
        "to hold the newest backup) and the last store error.",
    )
    p = verb(
        verbs,
        "activate",
        cmd_dr_activate,
        "apply the newest backup and make the standby a normal volume",
        ("name", "the standby volume"),
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="the store is gone: keep the last fully restored backup instead",
    )
    quiet_option(p)
    store_options(p)
    verb(
        verbs,
        "start",
        cmd_dr_start,
        "start the background follower again (after a reboot or a stop)",
        ("name", "the standby volume"),
    )
    verb(
        verbs,
        "stop",
        cmd_dr_stop,
        "stop the follower; the volume stays a standby",
        ("name", "the standby volume"),
    )
    p = verb(
        verbs,
        "forget",
        cmd_dr_forget,
        "remove the marker of a standby that is gone, so that prune stops keeping its backup",
        ("name", "the standby volume"),
        description="A DR standby records in the store which backup it holds, and 'backup "
        "prune' keeps that backup for its next increment. 'volume rm' of a standby removes "
        "its marker; this removes the marker of a standby NAME (as prune names it) removed "
        "with --keep-marker, or lost with its host. Never the marker of a standby that follows "
        "on this host.",
    )
    _followed(p)
    p.add_argument(
        "--id",
        metavar="MARKER",
        help="the marker's id, as prune shows it: needed when standbys of that name on "
        "several hosts hold markers",
    )
    store_options(p)
    p = verb(
        verbs,
        "run",
        cmd_dr_run,
        "run the follower in the foreground (for a service manager)",
        ("name", "the standby volume"),
        json=False,
    )
    metrics_option(p, "dr status")
    log_option(p)
