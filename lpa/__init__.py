"""lpa: a Linux patch agent and a live job-status relay."""

#: The one version of lpa: setup.py reads it, and ``make deb`` checks debian/changelog against it.
__version__ = "0.1.0"
