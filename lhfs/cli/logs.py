"""``lhfs logs VOLUME``: the logs of a volume's engine, replicas and DR follower, merged."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lhfs.cli.common import count_arg, print_json, root_of
from lhfs.core.errors import UsageError

COMPONENTS = ("engine", "replica", "dr")
_POLL = 0.2


def _logs(args: argparse.Namespace) -> dict[str, Path]:
    """label -> log file of the components asked for; says where remote replicas log."""
    from lhfs.config import volume as volumes
    from lhfs.volumes.standby import LOG as DR_LOG

    vol = volumes.load(root_of(args), args.name)
    wanted = args.component or COMPONENTS
    found: dict[str, Path] = {}
    if "engine" in wanted:
        found["engine"] = vol.engine_log
    if "replica" in wanted:
        for replica in vol.replicas:
            if vol.replica_dir(replica) is not None:
                found[replica["id"]] = vol.replica_log(replica["id"])
            else:
                print(
                    f"(replica {replica['id']} runs at {replica.get('address')}: its log is on "
                    "that host)",
                    file=sys.stderr,
                )
    # (an activated standby keeps its follower's log: what it applied, and why it stopped)
    if "dr" in wanted and (vol.config.get("dr") or (vol.dir / DR_LOG).exists()):
        found["dr"] = vol.dir / DR_LOG
    elif "dr" in wanted and args.component:
        print(f"(volume {vol.name} has no DR follower log: not a standby)", file=sys.stderr)
    return found


def cmd_logs(args: argparse.Namespace) -> None:
    from lhfs.core import logs

    if args.json and args.follow:
        raise UsageError("--json prints one document: not with -f")
    found = _logs(args)
    # (started first: what is logged while the past is read is the followers' to show)
    followers = [logs.Follower(label, path) for label, path in found.items() if args.follow]
    starts = {f.label: f.start for f in followers if f.start is not None}
    chosen = logs.merged(found, 0 if args.all else args.lines, args.all, starts)
    if args.json:
        print_json(
            [
                {
                    "component": label,
                    "time": stamp.decode().strip() or None,
                    "text": text.decode(errors="replace").removeprefix(stamp.decode()).rstrip("\n"),
                }
                for label, stamp, text in chosen
            ]
        )
        return
    out = sys.stdout.buffer
    for label, _, text in chosen:
        out.write(logs.labelled(label, text))
    out.flush()
    if not args.follow:
        return
    merger = logs.Merger(followers)
    try:
        while True:
            new = merger.poll()
            if new:
                out.write(new)
                out.flush()
            time.sleep(_POLL)  # (a file gives no event to wait on here: polled)
    except KeyboardInterrupt:
        out.write(merger.flush())  # (what was held for its time: read, so shown)
        out.flush()
        return


def parsers(groups: Any) -> None:
    p = groups.add_parser(
        "logs",
        help="a volume's logs: engine, replicas, DR follower",
        description="Print the last lines of the logs of a volume's processes, merged in time "
        "order, each line prefixed by the process it comes from ([engine], [r1], [dr]). Logs "
        "rotate at $LHFS_LOG_MAX_BYTES (10 MiB); three older files are kept (--all shows "
        "them). Replicas served on other hosts log there.",
    )
    p.add_argument("name", help="the volume")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new lines, merged in time order too (each held a second past its "
        "time for lines of other processes logged before it)",
    )
    p.add_argument(
        "--component",
        action="append",
        choices=COMPONENTS,
        help="only this process's log (repeatable; default all)",
    )
    p.add_argument(
        "-n",
        "--lines",
        type=count_arg,
        default=100,
        help="how many of the last lines (default 100; 0: all of the current files)",
    )
    p.add_argument("--all", action="store_true", help="everything, rotated files included")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the entries as one JSON list of {component, time, text} (not with -f)",
    )
    p.set_defaults(func=cmd_logs)
