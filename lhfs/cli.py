"""The ``lhfs`` command line: parses arguments, calls the library, maps errors to exit codes.

This is the one place where an ``LhfsError`` becomes a single line on stderr and an exit status
(1: the operation failed, 2: bad usage); no user mistake ends in a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LhfsError, UsageError
from .units import format_size, parse_size

DEFAULT_ROOT = "/var/lib/lhfs"
DEFAULT_CHUNK = "64K"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except LhfsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


# -- replica ----------------------------------------------------------------------------------


def cmd_replica_init(args: argparse.Namespace) -> None:
    from .store import ChunkStore

    store = ChunkStore.create(Path(args.dir), args.size, args.chunk_size, args.backing_image)
    with store:
        info = store.info()
    if args.json:
        _print_json(info)
    else:
        print(
            f"initialised {args.dir}: {format_size(info['size'])}, "
            f"chunks of {format_size(info['chunk_size'])}"
        )


def cmd_replica_serve(args: argparse.Namespace) -> None:
    import trio

    from .replica_client import parse_address
    from .replica_server import run

    host, port = parse_address(args.listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def ready(bound: tuple[str, int]) -> None:
        print(f"serving {args.dir} on {bound[0]}:{bound[1]}", flush=True)

    trio.run(run, Path(args.dir), host, port, ready)


def cmd_replica_inspect(args: argparse.Namespace) -> None:
    from .store import ChunkStore

    with ChunkStore.open(Path(args.dir)) as store:
        info = store.info()
        info["layers"] = store.list_layers()
    if args.json:
        _print_json(info)
        return
    print(
        f"size {format_size(info['size'])}, chunks of {format_size(info['chunk_size'])}, "
        f"revision {info['revision']}"
    )
    if info["backing_image"]:
        print(f"backing image {info['backing_image']['id']} ({info['backing_image']['file']})")
    for layer in info["layers"]:
        name = layer["name"] or "(head)"
        mark = "" if layer["active"] else "  [off chain]"
        print(f"  {name:24} {layer['created']}  {format_size(layer['size']):>8}{mark}")


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lhfs",
        description="A replicated block volume in userspace: copy-on-write replicas, "
        "an engine, a FUSE device and S3 backups.",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("LHFS_ROOT", DEFAULT_ROOT),
        help="state directory (default: $LHFS_ROOT, else %(default)s)",
    )
    groups = parser.add_subparsers(dest="group", metavar="GROUP", parser_class=_Parser)
    groups.required = True

    replica = groups.add_parser("replica", help="replica processes and directories")
    verbs = replica.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    p = verbs.add_parser(
        "init",
        help="initialise an empty replica directory",
        description="Create the files of a new, empty volume copy in DIR.",
    )
    p.add_argument("--dir", required=True, help="replica directory (created if missing)")
    p.add_argument("--size", required=True, type=_size, help="volume size, e.g. 10G")
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=parse_size(DEFAULT_CHUNK),
        help=f"copy-on-write and rebuild unit, a power of two (default {DEFAULT_CHUNK})",
    )
    p.add_argument("--backing-image", type=Path, help="raw image copied in as the chain's bottom")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_replica_init)

    p = verbs.add_parser(
        "serve",
        help="run one replica process in the foreground",
        description="Serve the replica in DIR over TCP until SIGTERM. An empty DIR is served "
        "uninitialised, for an engine to initialise and rebuild. Prints 'serving DIR on "
        "HOST:PORT' once it accepts connections (port 0 picks a free port).",
    )
    p.add_argument("--dir", required=True, help="replica directory")
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    p.set_defaults(func=cmd_replica_serve)

    p = verbs.add_parser(
        "inspect",
        help="show a stopped replica directory's chain",
        description="Open a replica directory that no process serves and list its layers.",
    )
    p.add_argument("--dir", required=True, help="replica directory")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_replica_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except LhfsError as exc:
        print(f"lhfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lhfs: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
