"""``lhfs engine-run``: the background process of an attached volume (internal)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lhfs.cli.common import log_option, path_arg, root_of


def cmd_engine_run(args: argparse.Namespace) -> None:
    from lhfs.engine.daemon import run

    code = run(
        root_of(args),
        args.name,
        Path(args.device),
        args.metrics,
        Path(args.log) if args.log else None,
        args.device_made,
    )
    if code:
        raise SystemExit(code)


def parsers(groups: Any) -> None:
    p = groups.add_parser(
        "engine-run", help="(internal) an attached volume's engine: 'volume attach' starts it"
    )
    p.add_argument("name", help="the volume")
    p.add_argument("device", type=path_arg, help="the file the volume is served as")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there")
    p.add_argument("--device-made", action="store_true", help="the attach made the device file")
    log_option(p)
    p.set_defaults(func=cmd_engine_run, trio_service=True)  # (see ``lhfs.cli.Terminated``)
