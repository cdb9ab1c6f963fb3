"""Which backups a retention policy keeps (``lhfs backup prune``): restic's ``forget`` rules.

``--keep-last N`` keeps the N newest backups. ``--keep-hourly N`` (daily, weekly, monthly,
yearly) keeps, going from the newest to the oldest, the newest backup of each of the N most
recent hours (days, ISO weeks, months, years) that have a backup. The rules add up: a backup
is kept when any rule keeps it, and the reasons are reported. Periods are in UTC, so that the
same policy keeps the same backups whatever the host's time zone. The newest backup is always
kept, whatever the policy says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PERIODS: dict[str, Callable[[time.struct_time], str]] = {
    "hourly": lambda t: time.strftime("%Y-%m-%d %H", t),
    "daily": lambda t: time.strftime("%Y-%m-%d", t),
    "weekly": lambda t: time.strftime("%G-W%V", t),
    "monthly": lambda t: time.strftime("%Y-%m", t),
    "yearly": lambda t: time.strftime("%Y", t),
}
RULES = ("last", *PERIODS)


def keep(backups: list[dict[str, Any]], policy: dict[str, int]) -> dict[str, list[str]]:
    """``{name: reasons}`` of the backups ``policy`` keeps (``{"last": 3, "daily": 7}``).
    ``backups``: dicts with ``name`` and ``time`` (seconds since the epoch: when its
    snapshot was taken, restic's time of a snapshot)."""
    newest_first = sorted(backups, key=lambda b: (b["time"], b["name"]), reverse=True)
    kept: dict[str, list[str]] = {}
    for n, backup in enumerate(newest_first[: policy.get("last", 0)]):
        kept.setdefault(backup["name"], []).append(f"last {n + 1}")
    for period, bucket_of in PERIODS.items():
        left = policy.get(period, 0)
        seen: str | None = None
        for backup in newest_first:
            if left <= 0:
                break
            bucket = bucket_of(time.gmtime(backup["time"]))
            if bucket != seen:
                seen = bucket
                left -= 1
                kept.setdefault(backup["name"], []).append(f"{period} {bucket}")
    if newest_first:
        kept.setdefault(newest_first[0]["name"], []).append("newest")
    return kept
