"""``python -m lhfs`` is the ``lhfs`` command."""

import sys

from .cli import main

sys.exit(main())
