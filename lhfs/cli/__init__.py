"""The ``lhfs`` command line: parses arguments, calls the library, maps errors to exit codes.

Each command group lives in a module of its own here, its parsers beside its handlers
(``replica``, ``volume``, ``snapshot``, ``image``, ``backup``, ``dr``, ``system``, ``mount``,
``logs``, ``doctor``, ``engine``); this entry point imports and builds only the group a command
names.
``main`` is the one place where an ``LhfsError`` becomes a single line on stderr and an exit
status (1: the operation failed, 2: bad usage); no user mistake ends in a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lhfs.cli.common import DEFAULT_ROOT, Parser
from lhfs.core import __version__
from lhfs.core.errors import ArgumentError, LhfsError, sole

# group name -> (module under lhfs.cli, the function adding its parsers), in --help's order
_GROUPS: dict[str, tuple[str, str]] = {
    "replica": ("replica", "parsers"),
    "volume": ("volume", "parsers"),
    "backup": ("backup", "parsers"),
    "dr": ("dr", "parsers"),
    "system": ("system", "parsers"),
    "backing-image": ("image", "parsers"),
    "snapshot": ("snapshot", "parsers"),
    "mount": ("mount", "mount_parsers"),
    "umount": ("mount", "umount_parsers"),
    "logs": ("logs", "parsers"),
    "doctor": ("doctor", "parsers"),
    "engine-run": ("engine", "parsers"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Only the group that ``argv`` names is imported and built,
    unless it names none (help, a mistake): building all forty parsers took 15 ms of every
    command's start, most of it argparse looking on disk, for each parser, for translations of
    its messages."""
    parser = Parser(
        prog="lhfs",
        description="A replicated block volume in userspace: copy-on-write replicas, "
        "an engine, a FUSE device and S3 backups.",
    )
    parser.add_argument("--version", action="version", version=f"lhfs {__version__}")
    parser.add_argument(
        "--root",
        default=os.environ.get("LHFS_ROOT", DEFAULT_ROOT),
        help="state directory (default: $LHFS_ROOT, else %(default)s)",
    )
    groups = parser.add_subparsers(dest="group", metavar="GROUP", parser_class=Parser)
    groups.required = True
    wanted = _group_named(argv)
    for name, (module, function) in _GROUPS.items():
        if wanted in (None, name):
            add: Callable[[Any], None] = getattr(
                importlib.import_module(f"lhfs.cli.{module}"), function
            )
            add(groups)
    return parser


def _group_named(argv: list[str] | None) -> str | None:
    """The group ``argv`` names, if it names a known one before any help option."""
    args = sys.argv[1:] if argv is None else argv
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--root":
            i += 2
            continue
        if arg.startswith("--root="):
            i += 1
            continue
        return arg if arg in _GROUPS else None  # (an option, "-h" included: build them all)
    return None


def _load_store() -> None:
    """Import the backup store and its S3 client with the cyclic garbage collector paused,
    then move what the import made out of the collector's sight. An import makes objects that
    live as long as the process (this one some 100,000), so collecting among them frees
    nothing; it was a tenth of a small incremental backup's time."""
    gc.disable()
    try:
        import backupstore.store  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``timeout``, ``kill``): a command stops as on Ctrl-C,
    undoing what it started (a backup's marker), not in the middle of it. ``dr run`` sets a
    handler of its own. The services that run an event loop (``replica serve``, the engine:
    ``trio_service`` in their parsers' defaults) have none: they receive SIGTERM through the
    loop while they serve, and get the system's default after (a second SIGTERM while they
    shut down ends them). An exception raised by a handler lands wherever the interpreter is,
    there inside the loop's own machinery: it once killed a replica's loop half-way through
    its shutdown, and the process, holding the FUSE device, never ended, nor did whatever
    used the device."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


# control characters (a path with a newline in it, given or found) written as escapes
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(32), 127]}


def _one_line(message: str) -> str:
    """An error as the one line it must be: a name or path holding a newline (or another
    control character) would split it, or rewrite the terminal."""
    return message.translate(_ESCAPES)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    os.umask(0o077)  # whatever the caller's umask: state, logs and keys are the owner's only
    signal.signal(signal.SIGTERM, _terminated)
    # A command says what went wrong in one line; what its library logs on the way (retries)
    # goes to the log of a service (``replica serve``, ``dr run``, the engine), which sets one
    # up, and nowhere else.
    logging.getLogger("lhfs").addHandler(logging.NullHandler())
    try:
        try:
            args = build_parser(argv).parse_args(argv)
            if getattr(args, "trio_service", False):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if getattr(args, "store", False):
                _load_store()
                from lhfs.backups import backup

                given = getattr(args, "password_file", None)
                backup.use_password_file(Path(given) if given else None)
            func: Callable[[argparse.Namespace], int | None] = args.func
            status = func(args) or 0
        except BaseExceptionGroup as group:  # (a service's start-up failed in a nursery)
            raise sole(group) from None
    except BrokenPipeError:  # the reader of our output left (| head): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except ArgumentError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return exc.exit_code
    except LhfsError as exc:
        print(_one_line(f"lhfs: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the system refused something: say what, without a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(_one_line(f"lhfs: error: {exc.strerror or exc}{where}"), file=sys.stderr)
        return 1
    except Terminated:
        print("lhfs: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("lhfs: interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()  # (a closed pipe is found here when the output was short)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status


if __name__ == "__main__":
    sys.exit(main())
