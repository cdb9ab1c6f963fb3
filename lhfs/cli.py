"""The ``lhfs`` command line: parses arguments, calls the library, maps errors to exit codes.

This is the one place where an ``LhfsError`` becomes a single line on stderr and an exit status
(1: the operation failed, 2: bad usage); no user mistake ends in a traceback.
"""

from __future__ import annotations

import argparse
import gc
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

    trio.run(run, Path(args.dir), host, port, ready, args.local)


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


# -- volumes ----------------------------------------------------------------------------------


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root)


def cmd_volume_create(args: argparse.Namespace) -> None:
    from . import images, manage

    image = images.resolve(_root(args), args.backing_image) if args.backing_image else None
    vol = manage.create(_root(args), args.name, args.size, args.chunk_size, args.replicas, image)
    print(f"created volume {vol.name}: {format_size(vol.size)}, {len(vol.replicas)} replicas")


def cmd_volume_attach(args: argparse.Namespace) -> None:
    from . import manage

    result = manage.attach(_root(args), args.name, Path(args.device))
    print(f"attached {result['name']} at {result['device']}")


def cmd_volume_detach(args: argparse.Namespace) -> None:
    from . import manage

    manage.detach(_root(args), args.name)
    print(f"detached {args.name}")


def _replica_line(r: dict[str, Any]) -> str:
    progress = "" if r.get("rebuild_progress") is None else f" rebuild {r['rebuild_progress']}%"
    error = f"  ({r['error']})" if r.get("error") else ""
    return f"  {r['id']:6} {r['mode']:4} {r.get('address') or 'local':22}{progress}{error}"


def _print_volume(info: dict[str, Any]) -> None:
    print(
        f"{info['name']}: {info['state']}, {format_size(info['size'])}"
        + (f", device {info['device']}" if info.get("device") else "")
    )
    restoring = info.get("restoring")
    if restoring and restoring["interrupted"]:
        print(f"  restore of {restoring['backup']} interrupted: 'lhfs volume rm {info['name']}'")
    for replica in info["replicas"]:
        print(_replica_line(replica))
    if info.get("snapshots"):
        print("  snapshots: " + ", ".join(s["name"] for s in info["snapshots"]))


def cmd_volume_ls(args: argparse.Namespace) -> None:
    from . import manage

    volumes = manage.list_volumes(_root(args))
    if args.json:
        _print_json(volumes)
        return
    if not volumes:
        print("no volumes")
    for info in volumes:
        _print_volume(info)


def cmd_volume_info(args: argparse.Namespace) -> None:
    from . import manage

    info = manage.info(_root(args), args.name)
    _print_json(info) if args.json else _print_volume(info)


def cmd_volume_expand(args: argparse.Namespace) -> None:
    from . import manage

    manage.expand(_root(args), args.name, args.size)
    print(f"expanded {args.name} to {format_size(args.size)}")


def cmd_volume_checksum(args: argparse.Namespace) -> None:
    from . import manage

    print(f"{args.name} {manage.checksum(_root(args), args.name)}")


def cmd_volume_rm(args: argparse.Namespace) -> None:
    from . import manage

    manage.remove(_root(args), args.name)
    print(f"removed volume {args.name}")


def cmd_engine_run(args: argparse.Namespace) -> None:
    from .daemon import run

    code = run(_root(args), args.name, Path(args.device))
    if code:
        raise SystemExit(code)


def cmd_mount(args: argparse.Namespace) -> None:
    from .mount import mount

    result = mount(_root(args), args.name, Path(args.mountpoint), args.fs)
    how = "formatted and mounted" if result["formatted"] else "mounted"
    print(f"{how} {result['name']} at {result['mountpoint']} ({result['loop']})")


def cmd_umount(args: argparse.Namespace) -> None:
    from .mount import umount

    result = umount(_root(args), Path(args.mountpoint))
    print(f"unmounted {result['mountpoint']} and detached {result['name']}")


# -- snapshots --------------------------------------------------------------------------------


def cmd_snapshot_create(args: argparse.Namespace) -> None:
    from . import manage

    snap = manage.snapshot_create(_root(args), args.volume, args.name)
    _print_json(snap) if args.json else print(f"created snapshot {snap['name']}")


def cmd_snapshot_ls(args: argparse.Namespace) -> None:
    from . import manage

    snaps = manage.snapshot_list(_root(args), args.volume)
    if args.json:
        _print_json(snaps)
        return
    for snap in snaps:
        mark = "" if snap.get("active", True) else "  (not in the volume's chain)"
        print(f"{snap['name']:32} {snap['created']}  {format_size(snap['size']):>8}{mark}")


def cmd_snapshot_rm(args: argparse.Namespace) -> None:
    from . import manage

    manage.snapshot_remove(_root(args), args.volume, args.name)
    print(f"removed snapshot {args.name}")


def cmd_snapshot_revert(args: argparse.Namespace) -> None:
    from . import manage

    manage.snapshot_revert(_root(args), args.volume, args.name)
    print(f"reverted {args.volume} to {args.name}")


def cmd_replica_ls(args: argparse.Namespace) -> None:
    from . import manage

    replicas = manage.info(_root(args), args.volume)["replicas"]
    if args.json:
        _print_json(replicas)
        return
    for replica in replicas:
        print(_replica_line(replica))


def cmd_replica_add(args: argparse.Namespace) -> None:
    import time

    from . import manage
    from .progress import Progress

    added = manage.replica_add(_root(args), args.volume, args.address)
    print(f"added replica {added['id']} at {added['address']}; rebuilding")
    if args.no_wait:
        return
    with Progress(f"rebuild {added['id']}", quiet=args.quiet) as bar:
        while True:
            state = manage.replica_state(_root(args), args.volume, added["id"])
            if state["mode"] == "RW":
                bar.update(100)
                break
            if state["mode"] == "ERR" and state.get("rebuild_progress") is None:
                raise LhfsError(f"replica {added['id']}: {state.get('error') or 'rebuild failed'}")
            bar.update(state.get("rebuild_progress") or 0)
            time.sleep(0.2)
    stats = state.get("rebuild_stats") or {}
    relayed = stats.get("bytes_relayed", 0)
    print(
        f"replica {added['id']} is RW: copied {stats.get('chunks_copied', 0)} of "
        f"{stats.get('chunks_compared', 0)} chunks ({format_size(stats.get('bytes_copied', 0))}) "
        f"in {stats.get('seconds', 0):.1f}s"
        + (
            f"; {format_size(relayed)} passed through the engine, the new replica could not "
            "reach its source directly"
            if relayed
            else ""
        )
    )


def cmd_replica_rm(args: argparse.Namespace) -> None:
    from . import manage

    manage.replica_remove(_root(args), args.volume, args.id)
    print(f"removed replica {args.id} from {args.volume}")


def cmd_volume_scrub(args: argparse.Namespace) -> None:
    from . import manage

    report = manage.scrub(_root(args), args.name)
    if args.json:
        _print_json(report)
        return
    if not report["damaged"]:
        print(
            f"{args.name}: {len(report['layers'])} snapshot(s) on "
            f"{len(report['replicas'])} replicas verified, no corruption"
        )
    for replica, problems in report["damaged"].items():
        print(f"{replica}: corrupt ({'; '.join(problems[:3])}); marked ERR, rebuilding")


# -- backing images ---------------------------------------------------------------------------


def cmd_image_create(args: argparse.Namespace) -> None:
    from . import images

    info = images.create(_root(args), args.name, Path(args.source))
    print(f"created backing image {info['name']}: {format_size(info['size'])}, id {info['id']}")


def cmd_image_ls(args: argparse.Namespace) -> None:
    from . import images

    found = images.list_images(_root(args))
    if args.json:
        _print_json(found)
        return
    for info in found:
        print(f"{info['name']:24} {format_size(info['size']):>8}  {info['id']}")


def cmd_image_backup(args: argparse.Namespace) -> None:
    from . import backup
    from .progress import Progress

    with Progress(f"backup {args.name}", quiet=args.quiet) as bar:
        url = backup.backup_image(_root(args), args.name, args.target, bar.update)
    print(url)


# -- backups ----------------------------------------------------------------------------------


def cmd_backup_create(args: argparse.Namespace) -> None:
    from . import backup
    from .progress import Progress

    with Progress(f"backup {args.volume}", quiet=args.quiet) as bar:
        url, stats = backup.create(
            _root(args), args.volume, args.target, args.snapshot, bar.update, args.block_size
        )
    if not args.quiet:
        print(
            f"read {stats.read} of {stats.blocks} blocks, uploaded {stats.uploaded} "
            f"({format_size(stats.uploaded_bytes)}), {stats.reused} already stored"
        )
    print(url)


def cmd_backup_ls(args: argparse.Namespace) -> None:
    from . import backup

    backups = backup.list_backups(args.target, args.volume)
    if args.json:
        _print_json(backups)
        return
    for b in backups:
        size = format_size(b["size"]) if b["size"] else "-"
        print(f"{b['volume']:16} {b['name']:36} {b['state']:11} {size:>8} {b['url']}")


def cmd_backup_rm(args: argparse.Namespace) -> None:
    from . import backup

    removed = backup.remove(args.url)
    print(f"deleted {args.url}; {removed} unreferenced block(s) collected")


def cmd_backup_restore(args: argparse.Namespace) -> None:
    from . import backup
    from .progress import Progress

    with Progress(f"restore {args.name}", quiet=args.quiet) as bar:
        vol = backup.restore(_root(args), args.url, args.name, args.replicas, bar.update)
    print(f"restored {args.url} into volume {vol.name} ({format_size(vol.size)})")


# -- DR volumes -------------------------------------------------------------------------------


def cmd_dr_create(args: argparse.Namespace) -> None:
    from . import dr

    vol = dr.create(
        _root(args),
        args.name,
        args.target,
        args.volume,
        args.replicas,
        args.interval,
        args.retry_max,
    )
    print(f"created standby volume {vol.name} ({format_size(vol.size)}) following {args.volume}")
    if args.no_wait:
        return
    _wait_restored(args)


def _wait_restored(args: argparse.Namespace) -> None:
    """Follow the first restore with a progress bar; store errors are shown, not fatal (the
    follower keeps retrying, and keeps running in the background after Ctrl-C)."""
    import time

    from . import dr
    from .progress import Progress

    shown_error = None
    with Progress(f"restore {args.name}", quiet=args.quiet) as bar:
        while True:
            status = dr.status(_root(args), args.name)
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
    print(f"{args.name} holds backup {status['last_restored_backup']}; following in the background")


def cmd_dr_status(args: argparse.Namespace) -> None:
    from . import dr

    status = dr.status(_root(args), args.name)
    if args.json:
        _print_json(status)
        return
    print(
        f"{status['name']}: {status['state']}, following {status['source_volume']} in "
        f"{status['target']}"
    )
    print(f"  last restored backup: {status['last_restored_backup'] or '(none yet)'}")
    if status["applying"]:
        print(f"  applying {status['applying']}: {status['progress'] or 0:.0f}%")
    print(f"  lag: {status['lag_seconds']:.0f}s")
    if status["last_error"]:
        print(f"  last error ({status['last_error_at']}): {status['last_error']}")
    if status["state"] == "stopped":
        print(f"  no follower runs: 'lhfs dr start {status['name']}' resumes")


def cmd_dr_activate(args: argparse.Namespace) -> None:
    from . import dr
    from .progress import Progress

    with Progress(f"activate {args.name}", quiet=args.quiet) as bar:
        result = dr.activate(_root(args), args.name, args.offline, bar.update)
    print(f"activated {args.name} at backup {result['backup']}: it is a normal volume now")


def cmd_dr_start(args: argparse.Namespace) -> None:
    from . import dr

    pid = dr.start(_root(args), args.name)
    print(f"{args.name} is following its source (follower pid {pid})")


def cmd_dr_stop(args: argparse.Namespace) -> None:
    from . import dr

    dr.stop_following(_root(args), args.name)
    print(f"{args.name} stopped following (still a standby; 'lhfs dr start' resumes)")


def cmd_dr_run(args: argparse.Namespace) -> None:
    from . import dr

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        code = dr.run(_root(args), args.name)
    except SystemExit as stop:  # SIGTERM: the follower has flushed and let go of its lock
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    # Downloads still under way belong to an abandoned increment (its blocks stay marked
    # unknown): exit at once instead of waiting for a slow store to answer them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- parser -----------------------------------------------------------------------------------


def _verb(
    verbs: Any,
    name: str,
    func: Callable[[argparse.Namespace], None],
    text: str,
    *positionals: str,
    json: bool = False,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """One subcommand: positional arguments, an optional --json, the function it runs."""
    p = verbs.add_parser(name, help=text, description=description or text[:1].upper() + text[1:])
    for positional in positionals:
        p.add_argument(positional)
    if json:
        p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=func)
    return p


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Only the group that ``argv`` names is built, unless it names
    none (help, a mistake): building all forty parsers took 15 ms of every command's start,
    most of it argparse looking on disk, for each parser, for translations of its messages."""
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
    wanted = _group_named(argv)
    for name, add in _GROUPS.items():
        if wanted in (None, name):
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


def _replica_parsers(groups: Any) -> None:
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
    p.add_argument(
        "--local",
        metavar="NAME",
        help="also listen on the abstract Unix socket NAME (what an engine on this host uses "
        "for the replicas it starts: cheaper than TCP)",
    )
    p.set_defaults(func=cmd_replica_serve)

    p = verbs.add_parser(
        "inspect",
        help="show a stopped replica directory's chain",
        description="Open a replica directory that no process serves and list its layers.",
    )
    p.add_argument("--dir", required=True, help="replica directory")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_replica_inspect)

    p = verbs.add_parser(
        "add",
        help="add a replica and rebuild it online",
        description="Add a new local replica, or the 'lhfs replica serve' at --address, to an "
        "attached volume. It receives new writes at once and is filled by copying only the "
        "chunks whose checksums differ; returns when it is RW.",
    )
    p.add_argument("volume")
    p.add_argument("--address", help="HOST:PORT of a replica served elsewhere")
    p.add_argument("--no-wait", action="store_true", help="return once the rebuild started")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_replica_add)

    _verb(verbs, "rm", cmd_replica_rm, "remove a replica from a volume", "volume", "id")
    _verb(
        verbs,
        "ls",
        cmd_replica_ls,
        "a volume's replicas, their mode and rebuild progress",
        "volume",
        json=True,
    )


def _image_parsers(groups: Any) -> None:
    group = groups.add_parser("backing-image", help="shared read-only images under volumes")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    p = _verb(
        verbs, "create", cmd_image_create, "import a raw image (known by its content)", "name"
    )
    p.add_argument("--from", dest="source", required=True, help="the raw image file")
    _verb(verbs, "ls", cmd_image_ls, "backing images: names, sizes, content ids", json=True)
    p = _verb(verbs, "backup", cmd_image_backup, "store a backing image in a backup target", "name")
    p.set_defaults(store=True)
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _mount_parsers(groups: Any) -> None:
    p = groups.add_parser(
        "mount",
        help="attach, format if never formatted, and mount a volume",
        description="Attach the volume if needed, put a loop device on it, create a "
        "filesystem only if the volume was never formatted (a durable record decides, "
        "checked against the device's real content), and mount it.",
    )
    p.add_argument("name")
    p.add_argument("mountpoint")
    p.add_argument("--fs", default="ext4", help="filesystem for a new volume (default ext4)")
    p.set_defaults(func=cmd_mount)


def _umount_parsers(groups: Any) -> None:
    _verb(groups, "umount", cmd_umount, "unmount, free the loop device, detach", "mountpoint")


def _engine_parsers(groups: Any) -> None:
    p = groups.add_parser(
        "engine-run", help="(internal) an attached volume's engine: 'volume attach' starts it"
    )
    p.add_argument("name")
    p.add_argument("device")
    p.set_defaults(func=cmd_engine_run)


def _volume_parsers(groups: Any) -> None:
    group = groups.add_parser("volume", help="create, attach and inspect volumes")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    p = verbs.add_parser("create", help="create a volume and its local replicas")
    p.add_argument("name")
    p.add_argument("--size", required=True, type=_size, help="volume size, e.g. 10G")
    p.add_argument("--replicas", type=int, default=3, help="number of replicas (default 3)")
    p.add_argument(
        "--backing-image", help="a backing image (name from 'backing-image ls', or a raw file)"
    )
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=parse_size(DEFAULT_CHUNK),
        help=f"copy-on-write and rebuild unit, a power of two 4K-4M (default {DEFAULT_CHUNK})",
    )
    p.set_defaults(func=cmd_volume_create)

    p = verbs.add_parser(
        "attach",
        help="start the replicas and engine, expose the volume as a file",
        description="Start the volume's replica processes and its engine in the background "
        "and expose the volume as the regular file DEVICE (created if missing). Returns once "
        "DEVICE serves I/O.",
    )
    p.add_argument("name")
    p.add_argument("--device", required=True, help="path of the file that becomes the volume")
    p.set_defaults(func=cmd_volume_attach)

    _verb(
        verbs,
        "detach",
        cmd_volume_detach,
        "flush, unmount the device, stop engine and replicas",
        "name",
    )
    _verb(verbs, "ls", cmd_volume_ls, "all volumes and their state", json=True)
    _verb(
        verbs, "info", cmd_volume_info, "one volume: state, replicas, snapshots", "name", json=True
    )
    p = _verb(verbs, "expand", cmd_volume_expand, "grow a volume (attached or not)", "name")
    p.add_argument("--size", required=True, type=_size, help="the new size")

    _verb(
        verbs,
        "scrub",
        cmd_volume_scrub,
        "verify the replicas' snapshots and repair corrupt replicas",
        "name",
        json=True,
        description="Check every snapshot of every healthy replica against its recorded "
        "checksums and against the other replicas; a corrupt replica is taken out of I/O "
        "and rebuilt.",
    )
    _verb(verbs, "checksum", cmd_volume_checksum, "xxh3-128 of the whole volume content", "name")
    _verb(verbs, "rm", cmd_volume_rm, "delete a detached volume and its replicas", "name")


def _backup_parsers(groups: Any) -> None:
    group = groups.add_parser("backup", help="incremental backups to S3, and restores")
    group.set_defaults(store=True)
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    p = _verb(
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
        type=_size,
        help="backup block size of a volume's first backup to this target, a power of two "
        "4K-64M (default 2M); later backups keep it",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p = _verb(verbs, "ls", cmd_backup_ls, "backups in a target, complete or in progress", json=True)
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--volume", help="only this volume's backups")
    p = _verb(verbs, "rm", cmd_backup_rm, "delete a backup and collect unreferenced blocks")
    p.add_argument("url", help="s3://BUCKET/PREFIX?volume=V&backup=B")
    p = _verb(
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
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _dr_parsers(groups: Any) -> None:
    group = groups.add_parser(
        "dr",
        help="standby volumes that follow another volume's backups",
        description="A DR (standby) volume follows a source volume's backups in a target by "
        "incremental restore, in a background follower that survives store outages (it retries "
        "for as long as it takes) and restarts (it resumes from the last backup it fully "
        "restored). It cannot be attached until it is activated. The follower uses the "
        "AWS_* variables of the command that started it.",
    )
    group.set_defaults(store=True)
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    p = _verb(
        verbs,
        "create",
        cmd_dr_create,
        "create a standby volume following a source volume's backups",
        "name",
        description="Create the standby volume NAME, restore the newest complete backup of "
        "--volume from --target into it and keep applying newer ones in the background. "
        "Returns once the first backup is restored (--no-wait: at once).",
    )
    p.add_argument("--target", required=True, help="s3://BUCKET/PREFIX of the backups")
    p.add_argument("--volume", required=True, help="the source volume's name in the target")
    p.add_argument("--replicas", type=int, default=3, help="replicas of the standby (default 3)")
    p.add_argument(
        "--interval", type=float, default=30.0, help="seconds between polls (default 30)"
    )
    p.add_argument(
        "--retry-max",
        type=float,
        default=300.0,
        help="longest wait between retries while the store fails (default 300 s)",
    )
    p.add_argument("--no-wait", action="store_true", help="return before the first restore")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _verb(
        verbs,
        "status",
        cmd_dr_status,
        "last restored backup, lag, last error",
        "name",
        json=True,
        description="The standby's state (restoring, standby, applying, retrying, failed, "
        "stopped), the last fully restored backup, the lag (seconds since it was last known "
        "to hold the newest backup) and the last store error.",
    )
    p = _verb(
        verbs,
        "activate",
        cmd_dr_activate,
        "apply the newest backup and make the standby a normal volume",
        "name",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="the store is gone: keep the last fully restored backup instead",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _verb(
        verbs,
        "start",
        cmd_dr_start,
        "start the background follower again (after a reboot or a stop)",
        "name",
    )
    _verb(verbs, "stop", cmd_dr_stop, "stop the follower; the volume stays a standby", "name")
    _verb(
        verbs,
        "run",
        cmd_dr_run,
        "run the follower in the foreground (for a service manager)",
        "name",
    )


def _snapshot_parsers(groups: Any) -> None:
    group = groups.add_parser("snapshot", help="create, list, remove and revert snapshots")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    p = _verb(
        verbs,
        "create",
        cmd_snapshot_create,
        "crash-consistent snapshot on every replica",
        "volume",
        json=True,
    )
    p.add_argument("name", nargs="?", help="snapshot name (default: snap-DATE-TIME)")
    _verb(verbs, "ls", cmd_snapshot_ls, "the chain, oldest first", "volume", json=True)
    _verb(
        verbs,
        "rm",
        cmd_snapshot_rm,
        "remove a snapshot; its data merges into its child",
        "volume",
        "name",
    )
    _verb(
        verbs,
        "revert",
        cmd_snapshot_revert,
        "(detached) make the head a fresh layer on a snapshot",
        "volume",
        "name",
    )


_GROUPS: dict[str, Callable[[Any], None]] = {
    "replica": _replica_parsers,
    "volume": _volume_parsers,
    "backup": _backup_parsers,
    "dr": _dr_parsers,
    "backing-image": _image_parsers,
    "snapshot": _snapshot_parsers,
    "mount": _mount_parsers,
    "umount": _umount_parsers,
    "engine-run": _engine_parsers,
}


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


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    try:
        args = build_parser(argv).parse_args(argv)
        if getattr(args, "store", False):
            _load_store()
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except LhfsError as exc:
        print(f"lhfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the system refused something: say what, without a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lhfs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lhfs: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
