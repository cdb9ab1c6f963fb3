"""The S3 backup store: content-addressed, compressed blocks and per-backup manifests."""

from __future__ import annotations

import json
from typing import Any


def parse_json(data: bytes) -> Any:
    """JSON read from the bucket, where whoever can write it decides what is there: every way
    it can fail to parse is a ``ValueError`` (nesting deep enough to exhaust the parser's
    recursion too), which its reader turns into one line."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deep") from None
