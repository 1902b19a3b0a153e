"""lpa's trial suite; run with ``python -b -m twisted.trial --random=0 tests``."""

import warnings

# Twisted's header-name cache mixes str and bytes keys; under ``python -b`` a dict lookup that
# meets a hash collision between them warns.  That is Twisted's internal, not a bug of ours.
warnings.filterwarnings("ignore", category=BytesWarning, module=r"twisted\.web\.http_headers")
