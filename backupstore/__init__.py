"""The S3 backup store: content-addressed, compressed blocks and per-backup manifests."""
