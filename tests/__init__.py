"""lpa's trial suite: the unit suite here (``tests/test_*.py``), the system suite in ``system/``.

``make test`` runs the unit suite, ``make test-system`` the system suite and ``make check`` both
(``python -b -m twisted.trial --random=0 tests``).
"""
