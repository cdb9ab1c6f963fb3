"""What a DR follower (``lhfs dr run``) exposes to Prometheus: how far behind its source the
standby is, the last backup it applied, what it is doing, and what it moved. Read from the
follower's own status when scraped (see ``lhfs.engine.metrics`` for the conventions)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterator
from typing import Any

from lhfs.engine.metrics import gauge

FOLLOWER_STATES = ("standby", "applying", "retrying", "failed", "stopped")


class FollowerCollector:
    def __init__(self, volume: str, status: Callable[[], dict[str, Any]]) -> None:
        self.volume = volume
        self.status = status  # () -> the follower's status fields, and its totals

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        vol, data = self.volume, self.status()
        since = data.get("current_at") or data.get("created") or time.time()
        yield gauge(
            "lhfs_dr_lag_seconds",
            "Seconds since the standby last held the newest backup",
            [([vol], max(0.0, time.time() - since))],
        )
        applied = data.get("last_restored_created")
        stamp = calendar.timegm(time.strptime(applied, "%Y-%m-%dT%H:%M:%SZ")) if applied else 0
        yield gauge(
            "lhfs_dr_last_applied_backup_timestamp_seconds",
            "When the backup the standby holds was taken",
            [([vol], stamp)],
        )
        state = data.get("state", "standby")
        yield gauge(
            "lhfs_dr_follower_state",
            "1 for the follower's state",
            [([vol, s], int(state == s)) for s in FOLLOWER_STATES],
            ["state"],
        )
        for name, key, text in (
            ("lhfs_dr_fetched_bytes", "bytes", "Bytes of blocks fetched from the store"),
            ("lhfs_dr_increments", "increments", "Backups applied"),
            ("lhfs_dr_errors", "errors", "Store failures met (and retried)"),
        ):
            family = CounterMetricFamily(name, text, labels=["volume"])
            family.add_metric([vol], data.get("totals", {}).get(key, 0))
            yield family
