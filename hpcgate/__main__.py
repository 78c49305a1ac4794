"""``python -m hpcgate`` is the same as the ``hpcgate`` console script."""

import sys

from hpcgate.cli import main

sys.exit(main())
