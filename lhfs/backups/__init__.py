"""Volumes and the backup store together: back a snapshot up and restore it (``backup``),
and standby volumes that follow a bucket by incremental restore (``dr``)."""
