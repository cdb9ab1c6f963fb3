"""Files only their owner may read (volume keys, backup passwords, S3 credentials).

One place, because a secret in a file that others can read has leaked already, and every
kind of secret file lhfs takes must refuse such a file the same way, with the fix in the
message. The file is opened without following a symbolic link and checked on the descriptor
it is read from, so it cannot be swapped between the check and the read; opened without
waiting (a FIFO would block the open until a writer came, for ever), and read whole or not at
all (a secret cut short is another secret).
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from lhfs.core.errors import InvalidArgument, NotFound

LIMIT = 1 << 16  # no secret file of lhfs is larger


def read_private(path: Path, what: str) -> bytes:
    """The content of ``path`` (at most ``LIMIT`` bytes), a regular file only its owner may
    read; ``what`` names it in errors ("key file", "password file"). A larger file is
    refused, never read in part."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{what} {path} is not a regular file")
        if info.st_uid not in (os.getuid(), 0):  # (its owner could change it at any time)
            raise InvalidArgument(
                f"{what} {path} belongs to user {info.st_uid}: use a file of your own "
                f"('chown {os.getuid()} {path}')"
            )
        if info.st_mode & 0o077:
            raise InvalidArgument(
                f"{what} {path} may be read by others (mode {info.st_mode & 0o777:o}): "
                f"'chmod 600 {path}'"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        data = b""
        while len(data) <= LIMIT:  # (one byte past the limit tells a larger file)
            piece = os.read(fd, LIMIT + 1 - len(data))
            if not piece:
                return data
            data += piece
        raise InvalidArgument(
            f"{what} {path} is larger than {LIMIT >> 10} KiB, the most lhfs reads of one: refused"
        )
    finally:
        os.close(fd)
