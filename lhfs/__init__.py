"""lhfs: a replicated block volume in userspace.

The packages are the layers, in the order a write travels through them: ``cli`` (the command
line) over ``backups`` (backups and DR) and ``volumes`` (volume management, mount) over
``backupstore`` (S3, a package of its own), ``engine`` (FUSE channel, frontend, engine,
rebuild, scrub), ``config`` (a volume's record under a root), ``replica`` (the replica
process), ``wire`` (its protocol and client), ``store`` (the chunk store on disk) and ``core``
(what all of them share). A module imports only from its own layer or those below it
(``tests/test_layers.py`` checks it).
"""

from lhfs.core import __version__

__all__ = ["__version__"]
