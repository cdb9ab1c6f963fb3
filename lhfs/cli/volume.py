"""Volumes: ``lhfs volume create/attach/detach/ls/info/expand/scrub/checksum/rm``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from lhfs.cli.backup import RETRY_TIMEOUT
from lhfs.cli.common import (
    DEFAULT_CHUNK,
    FOUND,
    Parser,
    describe_detach,
    json_option,
    metrics_option,
    path_arg,
    placement_options,
    print_json,
    quiet_option,
    replica_count,
    replica_header,
    replica_line,
    root_of,
    say,
    seconds_arg,
    size_arg,
    verb,
)
from lhfs.core.errors import CorruptState, NotFound
from lhfs.core.units import format_size, parse_size


def cmd_volume_create(args: argparse.Namespace) -> None:
    from lhfs.volumes import images, manage

    image, image_id = (
        images.resolve(root_of(args), args.backing_image) if args.backing_image else (None, None)
    )
    settings = _settings_given(args)
    extra: dict[str, Any] = {"settings": settings} if settings else {}
    if image is not None:  # (which image it was made from: 'backing-image rm' says so)
        extra["backing_image_name"] = args.backing_image if image_id is not None else None
    try:
        vol = manage.create(
            root_of(args),
            args.name,
            args.size,
            args.chunk_size,
            replica_count(args),
            image,
            extra or None,
            args.disks,
            image_id,
        )
    except FileNotFoundError as exc:  # (the create, cut short, left nothing)
        if image is None or str(exc.filename) != str(image):
            raise
        raise NotFound(
            f"backing image {args.backing_image} was removed while volume {args.name} was "
            "being made from it: nothing was created"
        ) from None
    count = len(vol.replicas)
    text = (
        f"created volume {vol.name}: {format_size(vol.size)}, {count} replica{'s' * (count != 1)}"
    )
    say(args, manage.info(root_of(args), vol.name) if args.json else None, text)


def _settings_given(args: argparse.Namespace) -> dict[str, float]:
    from lhfs.config.volume import SETTINGS, check_setting

    return {
        name: check_setting(name, getattr(args, name))
        for name in SETTINGS
        if getattr(args, name, None) is not None
    }


def _setting_options(p: argparse.ArgumentParser) -> None:
    from lhfs.config.volume import SETTINGS

    for name, (default, low, high, meaning) in SETTINGS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=float,
            metavar="SECONDS" if meaning.startswith("seconds") else "N",
            help=f"{meaning} (default {default:g}; {low:.12g}-{high:.12g})",
        )


def cmd_volume_set(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    settings = manage.set_settings(root_of(args), args.name, _settings_given(args))
    shown = ", ".join(f"{name.replace('_', '-')} {value:g}" for name, value in settings.items())
    say(args, {"name": args.name, "settings": settings}, f"{args.name}: {shown}")


def cmd_volume_attach(args: argparse.Namespace) -> None:
    from lhfs.volumes import attachment

    result = attachment.attach(root_of(args), args.name, Path(args.device), metrics=args.metrics)
    shown = f"; metrics on http://{result['metrics']}/metrics" if result["metrics"] else ""
    say(args, result, f"attached {result['name']} at {result['device']}{shown}")


def cmd_volume_detach(args: argparse.Namespace) -> None:
    from lhfs.volumes import attachment

    report = attachment.detach(root_of(args), args.name, force=args.force)
    say(args, report, describe_detach(report))


def _print_volume(root: Path, info: dict[str, Any]) -> None:
    from lhfs.volumes import manage

    if info["state"] == "damaged":
        print(f"{info['name']}: damaged: {info['error']}")
        return
    print(
        f"{info['name']}: {info['state']}, {format_size(info['size'])}"
        + (f", device {info['device']}" if info.get("device") else "")
        + (f", loop {info['loop']}" if info.get("loop") else "")
        + (f", mounted at {info['mountpoint']}" if info.get("mountpoint") else "")
    )
    if info["state"] == manage.NOT_ANSWERING:
        print(f"  {manage.not_answering(root, info['name'], info['pid'])}")
    filesystem = info.get("filesystem")
    if filesystem and "error" in filesystem:
        print(f"  file system record damaged: {filesystem['error']}")
    elif filesystem:
        state = filesystem["state"]
        if state == "formatting":  # (a mkfs that failed, or was cut short)
            state += (
                ": mkfs never completed; the next 'lhfs mount' formats it, as --fs says or as "
                + filesystem["type"]
            )
        print(f"  file system {filesystem['type']} {filesystem['uuid']} ({state})")
    if info.get("backing_image"):
        print(f"  backing image {info['backing_image']}")
    if info.get("metrics"):
        print(f"  metrics on http://{info['metrics']}/metrics")
    restoring = info.get("restoring")
    if restoring and restoring["interrupted"]:
        print(f"  restore of {restoring['backup']} interrupted: 'lhfs volume rm {info['name']}'")
    refusal = info.get("last_refusal")
    if refusal:
        print(
            f"  {info['refused_writes']} write(s) refused since attach, the last at "
            f"{refusal['at']}: {refusal['reason']}"
        )
    leftovers = info.get("leftovers")
    if leftovers and any(leftovers.values()):
        from lhfs.volumes import attachment

        left = attachment.describe(leftovers, info["device"])
        detach = f"lhfs --root {shlex.quote(str(root))} volume detach {info['name']}"
        print(f"  its engine died and left {left} ('{detach}' cleans up)")
    print(replica_header())
    for replica in info["replicas"]:
        print(replica_line(replica))
    if info.get("snapshots"):
        print("  snapshots: " + ", ".join(s["name"] for s in info["snapshots"]))
    for base in info.get("backups") or []:
        print(
            f"  last backup to {base['target']}: {base['backup']} at {base['at'] or '?'}, "
            f"keeps snapshot {base['snapshot']}"
        )


def cmd_volume_ls(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    volumes = manage.list_volumes(root_of(args))
    cut_short = {  # (out of sight otherwise: a killed rm left it whole)
        name: f"its removal was cut short ('lhfs volume rm {name}' finishes it)"
        for name in manage.removals_cut_short(root_of(args))
    }
    if args.json:
        print_json(
            volumes
            + [{"name": n, "state": "removal cut short", "error": e} for n, e in cut_short.items()]
        )
        return
    if not volumes and not cut_short:
        root = root_of(args)  # (a root mistyped is said, not taken for an empty one)
        print("no volumes" + ("" if root.exists() else f" ({root} does not exist)"))
    for info in volumes:
        _print_volume(root_of(args), info)
    for name, why in cut_short.items():
        print(f"{name}: {why}")


def cmd_volume_info(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    info = manage.info(root_of(args), args.name)
    print_json(info) if args.json else _print_volume(root_of(args), info)


def cmd_volume_expand(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    done = manage.expand(root_of(args), args.name, args.size)
    size = format_size(args.size)
    # (already that size, attached: what is on it grown to it, after an expansion cut short)
    text = (
        f"expanded {args.name} to {size}" if done["changed"] else f"{args.name} is already {size}"
    )
    if done["loop"]:
        text += f"; {done['loop']} grown"
    if done["filesystem"]:
        text += f", and its {done['filesystem']} file system at {done['mountpoint']}"
    if done["todo"]:
        text += f"; still to do: {done['todo']}"
    if not (done["changed"] or done["loop"] or done["filesystem"] or done["todo"]):
        text += ": nothing to do"
    say(args, done, text)


def cmd_volume_checksum(args: argparse.Namespace) -> None:
    from lhfs.cli.progress import Progress
    from lhfs.volumes import manage

    with Progress(f"checksum {args.name}", quiet=args.quiet) as bar:
        checksum = manage.checksum(root_of(args), args.name, bar.update)
    say(args, {"name": args.name, "checksum": checksum}, f"{args.name} {checksum}")


def cmd_volume_key(args: argparse.Namespace) -> None:
    from lhfs.volumes import manage

    manage.export_key(root_of(args), args.name, Path(args.out))
    say(
        args,
        {"name": args.name, "file": str(Path(args.out).absolute())},
        f"wrote the key of {args.name} to {args.out} (mode 600): copy it to the replica's host "
        "and start 'lhfs replica serve --key-file' with it",
    )


def cmd_volume_rm(args: argparse.Namespace) -> None:
    from lhfs.config import volume as volumes
    from lhfs.volumes import manage

    root = root_of(args)
    text = f"removed volume {args.name}"
    marker, left = None, []
    remote = _remote_replicas(root, args.name)
    cut_short = not (volumes.volumes_dir(root) / args.name).exists()
    if cut_short and args.name in manage.removals_cut_short(root, under_way=True):
        left = manage.finish_removal(root, args.name)  # (a killed rm's: one under way refuses)
        text = f"finished the removal of volume {args.name}, which was cut short"
    elif standby := _standby_of(root, args.name):
        from lhfs.backups import dr  # (a standby: its marker in the store goes too)

        marker = dr.remove(root, args.name, args.keep_marker, args.retry_timeout)
        text += (
            f" and its marker as a DR standby in {marker}"
            if marker
            else f"; its marker as a DR standby was left in {standby['target']}: "
            f"{dr.forget_hint(args.name, standby)} removes it"
        )
    else:
        left = manage.remove(root, args.name)
    if left:
        text += f"; left, to remove by hand once their disks are back: {', '.join(left)}"
    if remote:
        where = ", ".join(f"{r['id']} at {r['address']}" for r in remote)
        text += (
            f"; its remote replica(s) {where} still hold its data: their 'lhfs replica serve' "
            "processes and directories are yours to stop and remove"
        )
    say(
        args,
        {
            "name": args.name,
            "removed": True,
            "marker_removed_from": marker,
            "left": left,
            "remote_replicas_left": remote,
        },
        text,
    )


def _remote_replicas(root: Path, name: str) -> list[dict[str, str]]:
    """The remote replicas of a volume about to be removed (none when it cannot be read):
    removing a volume forgets them, and nothing here can stop a process on another host or
    delete its directory, so the operator is told they still hold the data."""
    from lhfs.config import volume as volumes
    from lhfs.core.errors import LhfsError

    try:
        replicas = volumes.load(root, name).replicas
    except LhfsError:
        return []
    return [{"id": r["id"], "address": r.get("address")} for r in replicas if not r.get("local")]


def _standby_of(root: Path, name: str) -> dict[str, Any] | None:
    """The DR section of volume ``name`` (None: not a standby). A damaged configuration
    refuses the removal: only it says which replica directories (some perhaps on disks of
    their own) are the volume's, so nothing is deleted on its strength."""
    from lhfs.config import volume as volumes

    try:
        return volumes.load(root, name).config.get("dr")
    except CorruptState as exc:
        raise CorruptState(
            f"{exc}: refused, nothing removed (repair the file, or see 'Damaged files' in the "
            "README)"
        ) from None


def cmd_volume_scrub(args: argparse.Namespace) -> int:
    from lhfs.cli.progress import Progress
    from lhfs.volumes import manage

    with Progress(f"scrub {args.name}", quiet=args.quiet) as bar:
        report = manage.scrub(root_of(args), args.name, bar.update)
    if args.json:
        print_json(report)
    elif not report["damaged"] and not report["disputed"]:
        print(
            f"{args.name}: {len(report['layers'])} snapshot(s) on "
            f"{len(report['replicas'])} replicas verified, no corruption"
        )
    else:
        for replica, problems in report["damaged"].items():
            action = (
                "marked ERR, rebuilding"
                if replica in report["repaired"]
                else "marked ERR and held, not rebuilt: the replicas disagree elsewhere with "
                "no majority ('replica rm' it to keep the others' data)"
                if replica in report["held"]
                else "not repaired"
            )
            print(f"{replica}: corrupt ({'; '.join(problems[:3])}); {action}")
        for layer, chunks in report["disputed"].items():
            shown = ", ".join(map(str, chunks[:5])) + (" ..." if len(chunks) > 5 else "")
            print(
                f"snapshot {layer}: the replicas hold different data at chunk(s) {shown} and "
                "no majority says which is right: not repaired (a backup of it may hold the "
                "right data)"
            )
    return FOUND if report["damaged"] or report["disputed"] else 0


def parsers(groups: Any) -> None:
    group = groups.add_parser("volume", help="create, attach and inspect volumes")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    verbs.required = True

    p = verbs.add_parser("create", help="create a volume and its local replicas")
    p.add_argument("name", help="the new volume's name")
    p.add_argument("--size", required=True, type=size_arg, help="volume size, e.g. 10G")
    placement_options(p, "the volume")
    p.add_argument(
        "--backing-image", help="a backing image (name from 'backing-image ls', or a raw file)"
    )
    p.add_argument(
        "--chunk-size",
        type=size_arg,
        default=parse_size(DEFAULT_CHUNK),
        help=f"copy-on-write and rebuild unit, a power of two 4K-4M (default {DEFAULT_CHUNK})",
    )
    _setting_options(p)
    json_option(p)
    p.set_defaults(func=cmd_volume_create)
    p = verb(
        verbs,
        "set",
        cmd_volume_set,
        "change a volume's settings (an attached volume takes them at once)",
        ("name", "the volume"),
    )
    _setting_options(p)

    p = verbs.add_parser(
        "attach",
        help="start the replicas and engine, expose the volume as a file",
        description="Start the volume's replica processes and its engine in the background "
        "and expose the volume as the regular file DEVICE (created if missing). Returns once "
        "DEVICE serves I/O.",
    )
    p.add_argument("name", help="the volume")
    p.add_argument(
        "--device",
        required=True,
        type=path_arg,
        help="path of the file that becomes the volume (a new or empty file)",
    )
    metrics_option(p)
    json_option(p)
    p.set_defaults(func=cmd_volume_attach)

    p = verb(
        verbs,
        "detach",
        cmd_volume_detach,
        "flush, unmount the device, stop engine and replicas",
        ("name", "the volume"),
        description="Flush, stop the engine and its replicas, unmount the device file. A "
        "device a loop device uses is refused (lhfs umount first), unless the volume is "
        "faulted or its engine does not answer or died: then everything mounted on it is "
        "let go too, and what was cleaned up is said.",
    )
    p.add_argument("--force", action="store_true", help="let go even of a healthy volume in use")
    verb(verbs, "ls", cmd_volume_ls, "all volumes and their state")
    verb(
        verbs,
        "info",
        cmd_volume_info,
        "one volume: state, replicas, snapshots",
        ("name", "the volume"),
    )
    p = verb(
        verbs,
        "expand",
        cmd_volume_expand,
        "grow a volume (attached or not)",
        ("name", "the volume"),
    )
    p.add_argument("--size", required=True, type=size_arg, help="the new size")

    p = verb(
        verbs,
        "scrub",
        cmd_volume_scrub,
        "verify the replicas' snapshots and repair corrupt replicas",
        ("name", "the volume"),
        description="Check every snapshot of every healthy replica against its recorded "
        "checksums and against the other replicas; a corrupt replica is taken out of I/O "
        "and rebuilt. Where no majority of replicas agrees on a chunk (two that disagree), "
        "nothing is repaired in a guessed direction: the chunks are listed as disputed. "
        "Exit status: 0 nothing found, 3 corruption found (and repaired when another "
        "healthy replica was there to copy from: --json lists it under 'repaired'), 1 the "
        "scrub could not run (not attached, a rebuild under way), 2 a usage mistake.",
    )
    quiet_option(p)
    p = verb(
        verbs,
        "checksum",
        cmd_volume_checksum,
        "xxh3-128 of the whole volume content",
        ("name", "the volume"),
    )
    quiet_option(p)
    p = verb(
        verbs,
        "rm",
        cmd_volume_rm,
        "delete a detached volume and its replicas",
        ("name", "the volume"),
        description="Delete a detached volume and its replicas. A DR standby's follower stops "
        "first, and its marker in the store (which makes 'backup prune' keep the backup it "
        "holds) is removed too: with a store that cannot be reached the volume is kept, "
        "unless --keep-marker.",
    )
    p.add_argument(
        "--keep-marker",
        action="store_true",
        help="a DR standby: remove the volume and leave its marker in the store, for a store "
        "that cannot be reached now (remove it later: 'lhfs dr forget')",
    )
    p.add_argument(
        "--retry-timeout",
        type=seconds_arg,
        default=RETRY_TIMEOUT,
        metavar="SECONDS",
        help="a DR standby: give up on a store that does not answer after this long (default "
        f"{RETRY_TIMEOUT:.0f} s)",
    )
    p = verb(
        verbs,
        "key",
        cmd_volume_key,
        "write the volume's key to a file, for a replica on another host",
        ("name", "the volume"),
        description="Write a copy of the volume's key (its identity and secret) to --out, "
        "readable by its owner only. A replica served on another host needs it: 'lhfs "
        "replica serve --key-file FILE'. The secret never appears on a command line or in "
        "a log; treat the file like a private ssh key.",
    )
    p.add_argument("--out", required=True, type=path_arg, help="the file to write (must not exist)")
