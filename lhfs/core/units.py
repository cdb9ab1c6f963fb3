"""Parsing and printing sizes with binary suffixes (``512K``, ``64M``, ``10G``, ``1T``), and
the one time format of everything lhfs records or prints (RFC 3339, UTC, to the second)."""

from __future__ import annotations

import re
import time

from lhfs.core.errors import InvalidArgument

MAX_SIZE = 1 << 50  # 1 PiB: beyond what any replica's file system holds as one file
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits and a suffix, nothing around them (``\d`` took other scripts' digits, ``１0M``,
# and ``$`` a trailing newline): matched whole (``fullmatch``).
_SIZE_RE = re.compile(r"([0-9]+)([KMGTP]?)(?:i?B)?", re.IGNORECASE | re.ASCII)
# A time as ``rfc3339`` writes it, or with a fraction of a second (a peer may send one):
# matched whole (``fullmatch``).
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


def parse_size(text: str) -> int:
    """Return the byte count of ``text``; suffixes are powers of 1024, a bare number is bytes."""
    match = _SIZE_RE.fullmatch(text)
    if not match or len(match.group(1)) > 30:
        raise InvalidArgument(f"not a size: {text!r} (use a number with K, M, G, T or P, e.g. 64M)")
    size = int(match.group(1)) * _SUFFIX[match.group(2).upper()]
    if size > MAX_SIZE:
        raise InvalidArgument(f"{text!r} is more than the largest size lhfs handles (1P)")
    return size


def check_chunk_size(chunk_size: int) -> None:
    """A volume's chunk size (its unit of copy-on-write, checksums and rebuild): a power of
    two from 4K to 4M. Checked where a volume is made, and where one is about to be made
    from what a backup store says."""
    if chunk_size < 4096 or chunk_size > 4 << 20 or chunk_size & (chunk_size - 1):
        raise InvalidArgument("the chunk size must be a power of two from 4K to 4M")


def format_size(n: int) -> str:
    """Print ``n`` bytes with the largest suffix that keeps it exact, else one decimal."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if n >= unit:
            if n % unit == 0:
                return f"{n // unit}{suffix}"
            return f"{n / unit:.1f}{suffix}"
    return f"{n}B"


def format_sizes(*sizes: int) -> list[str]:
    """``format_size`` of each, or each in bytes where two different sizes would read the
    same once rounded ("a volume of 16T does not fit: ... at most 16.0T")."""
    shown = [format_size(n) for n in sizes]

    def read(text: str) -> float:
        return float(text[:-1]) * _SUFFIX.get(text[-1], 1)

    if len({read(text) for text in shown}) < len(set(sizes)):
        return [f"{n} bytes" for n in sizes]
    return shown


def rfc3339(stamp: float | None = None) -> str:
    """``stamp`` (seconds since the epoch; now when None) as ``2026-12-04T22:18:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
