"""The state root: whose it is, and what may be in it.

lhfs runs as root and deletes what a volume's configuration names: a root another user owns
(who could rewrite that configuration) is refused. One others may read is made private, but
only when it holds nothing but lhfs's state: ``--root /tmp`` given by mistake must not take
/tmp from everyone. One place decides, for the commands (``lhfs.cli.common.root_of``) and for
``doctor``, which only looks.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from lhfs.core.errors import InvalidArgument, NotPermitted

# what lhfs (or the file system under a root of its own) puts at the top of a root
_OURS = re.compile(r"volumes|backing-images|lost\+found|\.restore-image-.*|\.size-probe-.*\.tmp")


def check(root: str | Path) -> bool:
    """Refuse a root lhfs must not use (``InvalidArgument``, ``NotPermitted``: why); whether
    it is to be made private (others may read it, and it holds only lhfs's state)."""
    if not str(root):
        raise InvalidArgument("the state root is empty (--root, or LHFS_ROOT): name a directory")
    try:
        info = os.stat(root)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidArgument(f"the state root {root} is not a directory")
    if info.st_uid != os.getuid():
        raise NotPermitted(
            f"the state root {root} belongs to user {info.st_uid}, not to this one (uid "
            f"{os.getuid()}): lhfs keeps its state only in a directory of its own user"
        )
    if not info.st_mode & 0o077:
        return False
    others = [name for name in os.listdir(root) if not _OURS.fullmatch(name)]
    if others:
        raise NotPermitted(
            f"the state root {root} may be read by others and holds what is not lhfs's "
            f"({others[0]}...): give lhfs a directory of its own"
        )
    return True


def make_private(root: Path) -> None:
    os.chmod(root, os.stat(root).st_mode & 0o700)
