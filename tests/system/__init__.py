"""The system suite: lpa as an operator runs it, in real processes.

These tests start the daemons with ``twistd`` or ``lpa``, kill them, build and install the Debian
packages, run the documents' commands, drive a headless Chromium, use this machine's apt and run
the Autobahn|Testsuite.  They take minutes, so ``make test`` (the unit suite, ``tests/test_*.py``)
leaves them out and ``make test-system`` runs them; ``make check`` (what CI runs) runs both.
"""

import os

#: the checkout these tests run from (two levels above this file)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
