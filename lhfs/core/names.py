"""Names a user gives (volumes, snapshots, backing images, backups): they end up in file
names, object keys and URLs, so one rule checks them everywhere, before anything is touched."""

from __future__ import annotations

import re

from lhfs.core.errors import InvalidArgument

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched whole: "$" lets "x\n" by
IMAGE_BACKUPS = "image-"  # a backup store keeps a backing image's backups as this + its name
# A backup's name: its snapshot's (or image's) and a suffix (``-<time>-<hex>``, 15 more).
MAX_BACKUP_NAME = 64 + 15
BACKUP_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_BACKUP_NAME - 1}}}")


def check_name(name: str, what: str = "name") -> str:
    """Names end up in file names and URLs: letters, digits, ``.``, ``_``, ``-``; 1-64 long."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_backup_name(name: str, what: str = "backup name") -> str:
    """A backup's name as lhfs makes it (``check_name``'s rule, up to ``MAX_BACKUP_NAME``
    long: a snapshot's name of 64 and its suffix)."""
    if not isinstance(name, str) or not BACKUP_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-{MAX_BACKUP_NAME} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return name


def check_volume_name(name: str, what: str = "volume name") -> str:
    """The name of a volume being made (created, restored into, a DR standby): a name
    (``check_name``) that does not start with ``image-``. A backup store keeps a backing
    image's backups as those of the volume ``image-<name>``: a volume of such a name would mix
    its backups with the image's, listed, pruned and restored as one. (One made before such
    names were kept is backed up still, while no image of the root takes its name.)"""
    check_name(name, what)
    if name.startswith(IMAGE_BACKUPS):
        raise InvalidArgument(
            f"invalid {what} {name!r}: names starting with {IMAGE_BACKUPS!r} are reserved for "
            "backing images' backups"
        )
    return name


MAX_IMAGE_NAME = 64 - len(IMAGE_BACKUPS)  # (its backups are those of the volume image-NAME)


def image_name_fits(name: str) -> bool:
    """Whether a backing image's backups can be named (``image-<name>``, a name of 64 at most):
    refused for a new image, and before a system backup takes anything for an older one."""
    return len(name) <= MAX_IMAGE_NAME
