"""lpa: a Linux patch agent and a live job-status relay."""

__version__ = "0.1.0"
