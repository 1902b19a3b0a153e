"""``python -m lpa``: the same as the ``lpa`` console script."""

import sys

from lpa.tools.cli import main

sys.exit(main())
