"""``python -m secateurs ...``: the same command line as the ``secateurs`` script."""

import sys

from .cli import main

sys.exit(main())
