"""Names a user gives (volumes, snapshots, backing images, backups): they end up in file
names, object keys and URLs, so one rule checks them everywhere, before anything is touched."""

from __future__ import annotations

import re

from lhfs.core.errors import InvalidArgument

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Names end up in file names and URLs: letters, digits, ``.``, ``_``, ``-``; 1-64 long."""
    if not _NAME_RE.match(name or ""):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
