"""Replica processes and directories: ``lhfs replica init/serve/inspect/add/rm/ls``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from lhfs.cli.common import (
    DEFAULT_CHUNK,
    Parser,
    dir_arg,
    json_option,
    log_option,
    path_arg,
    print_json,
    quiet_option,
    replica_header,
    replica_line,
    root_of,
    say,
    size_arg,
    verb,
)
from lhfs.core.errors import LhfsError, UsageError
from lhfs.core.units import check_chunk_size, format_size, parse_size


def cmd_replica_init(args: argparse.Namespace) -> None:
    from lhfs.store.chunkstore import ChunkStore
    from lhfs.wire.auth import VolumeKey

    check_chunk_size(args.chunk_size)  # (what a volume may have, before anything is made)
    owner = VolumeKey.load(Path(args.key_file)).id_hex if args.key_file else None
    store = ChunkStore.create(
        Path(args.dir),
        args.size,
        args.chunk_size,
        Path(args.backing_image) if args.backing_image else None,
        volume_id=owner,
    )
    with store:
        info = store.info()
    if args.json:
        print_json(info)
    else:
        print(
            f"initialised {args.dir}: {format_size(info['size'])}, "
            f"chunks of {format_size(info['chunk_size'])}"
        )


def cmd_replica_serve(args: argparse.Namespace) -> None:
    import trio

    from lhfs.core import logs
    from lhfs.replica.server import run
    from lhfs.wire.auth import VolumeKey
    from lhfs.wire.client import format_address, parse_address

    host, port = parse_address(args.listen)
    key = VolumeKey.load(Path(args.key_file))
    context = None
    warning = None
    if args.tls_cert or args.tls_key:
        from lhfs.wire.tls import server_context, validity

        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        context = server_context(Path(args.tls_cert), Path(args.tls_key))
        warning = validity(Path(args.tls_cert))
    logs.setup(Path(args.log) if args.log else None)
    if warning:  # (it serves all the same: the operator may be renewing the certificate)
        logging.getLogger("lhfs.replica").warning("%s", warning)

    def ready(bound: tuple[str, int]) -> None:
        print(f"serving {args.dir} on {format_address(*bound)}", flush=True)

    trio.run(run, Path(args.dir), key, host, port, ready, args.local, context)


def cmd_replica_inspect(args: argparse.Namespace) -> None:
    from lhfs.store.chunkstore import ChunkStore

    with ChunkStore.open(Path(args.dir)) as store:
        info = store.info()
        info["layers"] = store.list_layers()
    if args.json:
        print_json(info)
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


def cmd_replica_ls(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    replicas = manage.replica_list(root_of(args), args.volume)
    if args.json:
        print_json(replicas)
        return
    print(replica_header())
    for replica in replicas:
        print(replica_line(replica))


def cmd_replica_add(args: argparse.Namespace) -> None:

    from lhfs.cli.progress import Progress
    from lhfs.config import volume as volumes
    from lhfs.volumes import manage

    ca = None
    if args.tls_ca:
        from lhfs.wire.tls import read_ca

        ca = read_ca(Path(args.tls_ca))
    added = manage.replica_add(root_of(args), args.volume, args.address, ca, args.disk)
    if args.no_wait:
        data = {**added, "mode": "WO", "rebuild_stats": None}
        say(args, data, f"added replica {added['id']} at {added['address']}; rebuilding")
        return
    if not args.json:
        print(f"added replica {added['id']} at {added['address']}; rebuilding")
    size = volumes.load(root_of(args), args.volume).size
    with Progress(f"rebuild {added['id']}", quiet=args.quiet) as bar:
        while True:
            state = manage.replica_state(root_of(args), args.volume, added["id"])
            if state is None:  # (its engine does not answer now)
                time.sleep(0.2)
                continue
            if state["mode"] == "RW":
                bar.update(100)
                break
            if state["mode"] == "ERR" and state.get("rebuild_progress") is None:
                raise LhfsError(
                    f"replica {added['id']}: {state.get('error') or 'rebuild failed'}; it stays "
                    f"in {args.volume} and is tried again ('lhfs replica rm {args.volume} "
                    f"{added['id']}' gives it up)"
                )
            percent = state.get("rebuild_progress") or 0
            bar.update(percent, int(size * percent / 100), size)  # of the volume compared
            time.sleep(0.2)
    stats = state.get("rebuild_stats") or {}
    relayed = stats.get("bytes_relayed", 0)
    say(
        args,
        {**added, "mode": "RW", "rebuild_stats": stats},
        f"replica {added['id']} is RW: copied {stats.get('chunks_copied', 0)} of "
        f"{stats.get('chunks_compared', 0)} chunks ({format_size(stats.get('bytes_copied', 0))}) "
        f"in {stats.get('seconds', 0):.1f}s"
        + (
            f"; {format_size(relayed)} passed through the engine, the new replica could not "
            "reach its source directly"
            if relayed
            else ""
        ),
    )


def cmd_replica_rm(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    left = manage.replica_remove(root_of(args), args.volume, args.id, args.accept_loss)
    say(
        args,
        {"volume": args.volume, "id": args.id, "removed": True, "left": left},
        f"removed replica {args.id} from {args.volume}"
        + (f"; left, to remove by hand once its disk is back: {', '.join(left)}" if left else ""),
    )


def cmd_replica_accept(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    recorded = manage.replica_accept(root_of(args), args.volume, args.id)
    say(
        args,
        {"volume": args.volume, "id": args.id, "accepted": True, "recorded": recorded},
        f"replica {args.id} of {args.volume} serves as it is at the next attach (the writes "
        f"after the copy it holds, up to revision {recorded}, are given up)",
    )


def parsers(groups: Any) -> None:
    replica = groups.add_parser("replica", help="replica processes and directories")
    verbs = replica.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True

    p = verbs.add_parser(
        "init",
        help="initialise an empty replica directory",
        description="Create the files of a new, empty volume copy in DIR.",
    )
    p.add_argument(
        "--dir", required=True, type=dir_arg, help="replica directory (created if missing)"
    )
    p.add_argument("--size", required=True, type=size_arg, help="volume size, e.g. 10G")
    p.add_argument(
        "--chunk-size",
        type=size_arg,
        default=parse_size(DEFAULT_CHUNK),
        help=f"copy-on-write and rebuild unit, a power of two from 4K to 4M (default "
        f"{DEFAULT_CHUNK})",
    )
    p.add_argument(
        "--backing-image", type=path_arg, help="raw image copied in as the chain's bottom"
    )
    p.add_argument(
        "--key-file",
        type=path_arg,
        help="the volume's key ('lhfs volume key'): the directory then belongs to that volume",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_replica_init)

    p = verbs.add_parser(
        "serve",
        help="run one replica process in the foreground",
        description="Serve the replica in DIR over TCP until SIGTERM, to the holders of one "
        "volume's key only (every connection proves it holds the key before anything else is "
        "accepted). An empty DIR is served uninitialised, for an engine to initialise and "
        "rebuild; a DIR that belongs to another volume is refused. A DIR that does not open "
        "for damage (layer files cut or lost, a volume.json lhfs could not have written) is "
        "served damaged, without --local: nothing is served from it, and its engine has it set "
        "aside beside itself (kept) and an empty one rebuilt in its place while another replica "
        "serves. Prints 'serving DIR on "
        "HOST:PORT' once it accepts connections (port 0 picks a free port).",
    )
    p.add_argument("--dir", required=True, type=dir_arg, help="replica directory")
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    p.add_argument(
        "--key-file",
        required=True,
        type=path_arg,
        help="the volume's key file, readable by its owner only (on the engine's host: "
        "'lhfs volume key VOLUME --out FILE', then copy it here)",
    )
    p.add_argument(
        "--tls-cert", metavar="FILE", type=path_arg, help="serve TLS on TCP with this certificate"
    )
    p.add_argument("--tls-key", metavar="FILE", type=path_arg, help="the private key of --tls-cert")
    p.add_argument(
        "--local",
        metavar="NAME",
        help="also listen on the abstract Unix socket NAME (what an engine on this host uses "
        "for the replicas it starts: cheaper than TCP)",
    )
    log_option(p)
    p.set_defaults(func=cmd_replica_serve, trio_service=True)  # (see ``lhfs.cli.Terminated``)

    p = verbs.add_parser(
        "inspect",
        help="show a stopped replica directory's chain",
        description="Open a replica directory that no process serves and list its layers.",
    )
    p.add_argument("--dir", required=True, type=dir_arg, help="replica directory")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_replica_inspect)

    p = verbs.add_parser(
        "add",
        help="add a replica and rebuild it online",
        description="Add a new local replica, or the 'lhfs replica serve' at --address, to an "
        "attached volume. It receives new writes at once and is filled by copying only the "
        "chunks whose checksums differ; returns when it is RW.",
    )
    p.add_argument("volume", help="the volume")
    p.add_argument("--address", help="HOST:PORT of a replica served elsewhere")
    p.add_argument(
        "--disk",
        type=dir_arg,
        help="a local replica on this disk (the mount point of a file system no other replica "
        "of the volume is on) instead of under the root",
    )
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=path_arg,
        help="the replica at --address serves TLS: trust certificates signed by this CA "
        "(PEM), checked against HOST",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the rebuild started")
    quiet_option(p)
    json_option(p)
    p.set_defaults(func=cmd_replica_add)

    p = verb(
        verbs,
        "rm",
        cmd_replica_rm,
        "remove a replica from a volume",
        ("volume", "the volume"),
        ("id", "the replica (an id 'replica ls' shows: r1, r2...)"),
        description="Remove a replica from a volume (and its directory, if it is local). The "
        "last replica holding every acknowledged write is refused: the last one recorded "
        "healthy, or the one a faulted volume waits for.",
    )
    p.add_argument(
        "--accept-loss",
        action="store_true",
        help="of a detached volume, remove it all the same (it is lost for good, a disk or a "
        "host gone): writes only it held are lost, and the next attach serves the freshest "
        "replica that answers",
    )
    verb(
        verbs,
        "accept",
        cmd_replica_accept,
        "serve an older copy of a replica as it is (its newer copy lost for good)",
        ("volume", "the volume (detached)"),
        ("id", "the replica the attach refused as an older copy (r1, r2...)"),
        description="An attach serves no replica that answers below the revision recorded for "
        "it: an older copy of its directory (a host restored from an earlier image) would "
        "serve old data, and the other replicas be rebuilt from it. When the newer copy is "
        "lost for good, this lets the replica serve as it is at the next attach of the "
        "detached volume: the writes after that copy are lost.",
    )
    verb(
        verbs,
        "ls",
        cmd_replica_ls,
        "a volume's replicas, their mode and rebuild progress",
        ("volume", "the volume"),
    )
