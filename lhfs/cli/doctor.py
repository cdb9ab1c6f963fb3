"""``lhfs doctor``: a preflight check, one line per check."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lhfs.cli.common import print_json, root_of, seconds_arg

REACH_TIMEOUT = 5.0  # (lhfs.volumes.doctor's; not imported from there: it loads the store)

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def cmd_doctor(args: argparse.Namespace) -> int:
    from lhfs.volumes import doctor

    if args.target:  # (a malformed URL is bad usage, said before any check runs)
        from backupstore.s3 import Target

        Target.parse(args.target)
    checks = doctor.run(root_of(args, private=False), args.volume, args.target, args.retry_timeout)
    if args.json:
        print_json(doctor.report(checks))
    else:
        for check in checks:
            hint = f" -- {check.hint}" if check.hint else ""
            print(f"{_MARK[check.status]}  {check.check:18} {check.detail}{hint}")
    failed = [check.check for check in checks if check.status == "fail"]
    if failed:  # (stdout holds the report; stderr the one line every failure has)
        print(f"lhfs: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def parsers(groups: Any) -> None:
    p = groups.add_parser(
        "doctor",
        help="check what lhfs needs here (and a volume's replicas, a backup target)",
        description="A preflight check: root, /dev/fuse, loop devices, the capabilities "
        "mounting (CAP_SYS_ADMIN) and growing a mounted ext4 (CAP_SYS_RESOURCE) need, the "
        "tools mount, mkfs and growing run (on $PATH), free space and the largest file under "
        "the root; with VOLUME, each of its "
        "replicas reachable and holding its key; with --target, the S3 endpoint's name, the "
        "endpoint answering as S3, the credentials, the bucket writable (a probe object written "
        "and removed) and the clock against the server's. One line per check: ok, WARN or "
        "FAIL with what to do. Exit status 0 when nothing fails, 1 otherwise (and stderr names "
        "the checks that failed).",
    )
    p.add_argument("volume", nargs="?", help="a volume whose replicas to check")
    p.add_argument("--target", help="s3://BUCKET/PREFIX to check")
    p.add_argument(
        "--retry-timeout",
        type=seconds_arg,
        default=REACH_TIMEOUT,
        metavar="SECONDS",
        help=f"how long the store may take to answer (default {REACH_TIMEOUT:.0f} s: a check "
        "says soon that it does not)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_doctor, store=True)
