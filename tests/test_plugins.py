"""The twistd dropin: both tapnames are found after a regular (non-editable) install."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def _twistd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "twistd")


class TwistdPluginTests(SynchronousTestCase):
    def _help(self) -> str:
        if not os.path.exists(_twistd()):
            self.skipTest("twistd not installed beside this interpreter")
        # A temporary cwd, so the checkout's own lpa/ and twisted/plugins/ are not on the path:
        # this proves the *installed* package carries the dropin.
        with tempfile.TemporaryDirectory() as cwd:
            done = subprocess.run(
                [_twistd(), "--help"], check=False, cwd=cwd, capture_output=True, text=True,
                timeout=120,
            )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_both_tapnames_listed(self) -> None:
        """`twistd --help` lists lpa-agent and lpa-relay from the installed dropin."""
        listing = self._help()
        self.assertIn("lpa-agent", listing)
        self.assertIn("lpa-relay", listing)

    def test_no_plugins_package_init(self) -> None:
        """The checkout ships no twisted/__init__.py or twisted/plugins/__init__.py (pip would
        overwrite Twisted's and uninstalling would delete it)."""
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.assertFalse(os.path.exists(os.path.join(top, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(top, "twisted", "plugins", "__init__.py")))
