"""lpa's trial suite; run with ``python -b -m twisted.trial --random=0 tests``."""
