"""The replica protocol (``protocol``: handshake, frames, batching sends) and its client
(``client``), which the engine, rebuilds, backups and replicas pulling from a peer use."""
