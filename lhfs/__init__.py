"""lhfs: a replicated block volume in userspace.

Layers, bottom to top: the chunk store (one replica's copy of a volume, ``store``), the replica
process that serves it over TCP (``replica_server``, ``protocol``, ``replica_client``), and the
command line (``cli``).
"""

__version__ = "0.1.0"
