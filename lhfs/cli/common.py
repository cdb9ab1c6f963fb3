"""What every command group shares: the parser class that turns argparse's complaints into
a usage error, size arguments, JSON output, the state root, and how a verb is declared."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lhfs.core.errors import ArgumentError, LhfsError
from lhfs.core.units import format_size, parse_size

DEFAULT_ROOT = "/var/lib/lhfs"
DEFAULT_CHUNK = "64K"
# The exit status of a check that ran to its end and found damage (scrub, backup check): apart
# from 1, a check that could not run, so that a script tells "damaged" from "not checked".
FOUND = 3


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{self.prog}: {message} (see --help)")


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except LhfsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dir_arg(text: str) -> str:
    """A directory argument: never empty (that would name the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a directory")
    return text


def path_arg(text: str) -> str:
    """A file path argument: never empty (that would name the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


def placement_options(p: argparse.ArgumentParser, whose: str) -> None:
    """``--replicas`` and ``--disks`` of a command that makes a volume (read back with
    ``replica_count`` and ``args.disks``)."""
    p.add_argument(
        "--replicas", type=int, help=f"replicas of {whose} (default 3, or one per --disks)"
    )
    p.add_argument(
        "--disks",
        type=disks_arg,
        metavar="D1,D2,...",
        help="place one replica on each of these disks (mount points of file systems, one "
        "replica each) instead of under the root, so that a lost disk loses one replica",
    )


def replica_count(args: argparse.Namespace) -> int:
    """``--replicas`` as given, else one per ``--disks``, else 3."""
    if args.replicas is not None:
        return int(args.replicas)
    return len(args.disks or ()) or 3


def disks_arg(text: str) -> list[str]:
    """A comma-separated list of disk mount points, none empty."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"not a list of disks: {text!r} (D1,D2,...)")
    return items


def seconds_arg(text: str) -> float:
    """A time in seconds: a finite number above 0 (``nan``, ``inf`` and ``-1`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:  # (NaN fails every comparison)
        raise argparse.ArgumentTypeError(f"not a time in seconds: {text!r} (a number above 0)")
    return value


def count_arg(text: str) -> int:
    """A whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (a whole number, 0 or more)")
    return value


def metrics_option(p: argparse.ArgumentParser, shown_by: str = "volume info") -> None:
    p.add_argument(
        "--metrics",
        type=address_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 picks one; "
        f"'{shown_by}' shows it)",
    )


def address_arg(text: str) -> str:
    """A ``HOST:PORT`` argument, checked as it is read: an empty one (``--metrics ""``) was
    taken for none, and the command went on without it."""
    from lhfs.wire.client import parse_address

    try:
        parse_address(text)
    except LhfsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def log_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log",
        metavar="FILE",
        type=path_arg,
        help="log to FILE, rotated by size (default: standard error, for a service manager)",
    )


def quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress output")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def say(args: argparse.Namespace, data: Any, text: str) -> None:
    """What a command reports: ``data`` as JSON with ``--json``, else the line ``text``."""
    if getattr(args, "json", False):
        print_json(data)
    else:
        print(text)


def json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document")


def root_of(args: argparse.Namespace, private: bool = True) -> Path:
    """The state root a command works in, checked by the commands that use one (see
    ``lhfs.config.root``); made private unless told not to (``doctor`` only looks)."""
    from lhfs.config import root as roots

    if roots.check(args.root) and private:  # (the string as given: an empty one is refused)
        roots.make_private(Path(args.root))
    return Path(args.root)


def replica_header() -> str:
    """The header over ``replica_line`` rows."""
    return f"  {'REPLICA':6} {'MODE':4} {'ADDRESS':22} {'ON DISK':>8} {'FREE':>8}"


def replica_line(r: dict[str, Any]) -> str:
    progress = "" if r.get("rebuild_progress") is None else f" rebuild {r['rebuild_progress']}%"
    error = f"  ({r['error']})" if r.get("error") else ""
    rejoin = f"  [{r['rejoin']}]" if r.get("rejoin") else ""
    if r.get("disk"):
        rejoin += f"  on disk {r['disk']}"
    address = r.get("address") or "local"
    held = "-" if r.get("disk_bytes") is None else format_size(r["disk_bytes"])
    free = "-" if r.get("disk_free") is None else format_size(r["disk_free"])
    return f"  {r['id']:6} {r['mode']:4} {address:22} {held:>8} {free:>8}{progress}{error}{rejoin}"


def verb(
    verbs: Any,
    name: str,
    func: Callable[[argparse.Namespace], None],
    text: str,
    *positionals: str | tuple[str, str],
    description: str | None = None,
    json: bool = True,
) -> argparse.ArgumentParser:
    """One subcommand: positional arguments (``(NAME, what it is)``, said by ``--help``), --json
    (every command that reports something reports it as one JSON document too), the function
    it runs."""
    p = verbs.add_parser(name, help=text, description=description or text[:1].upper() + text[1:])
    for positional in positionals:
        arg, what = positional if isinstance(positional, tuple) else (positional, None)
        p.add_argument(arg, help=what)
    if json:
        json_option(p)
    p.set_defaults(func=func)
    return p


def describe_detach(report: dict[str, Any]) -> str:
    """One line on how a volume was let go (see ``attachment.detach``)."""
    notes = []
    if report["was"] == "faulted":
        notes.append("it was faulted: writes not flushed before the fault are lost")
    elif report["was"] == "crashed":
        notes.append("its engine had died")
    elif report["was"] == "not answering":
        notes.append("its engine did not answer")
    elif report["flushed"] is False:
        notes.append("the last flush failed")
    if report["cleaned"]:
        notes.append("; ".join(report["cleaned"]))
    return f"detached {report['name']}" + (f" ({'; '.join(notes)})" if notes else "")
