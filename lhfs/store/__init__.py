"""One replica's copy of a volume on disk: layers of chunks (``layer``), the backing image
under them (``backing``) and the copy-on-write chain that reads and writes them
(``chunkstore``). Synchronous, single-threaded, no network."""
