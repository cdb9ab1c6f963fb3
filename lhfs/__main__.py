"""``python -m lhfs`` is the ``lhfs`` command."""

import sys

from lhfs.cli import main

sys.exit(main())
