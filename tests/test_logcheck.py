"""tests/logcheck.py finds unhandled errors, critical events and tracebacks, and nothing else."""

from __future__ import annotations

import json

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.logcheck import assert_no_unhandled, capture_events, problems

CLEAN_TEXT = """\
2026-11-30T10:00:00+0000 [-] Loading lpa-relay...
2026-11-30T10:00:01+0000 [lpa.relay.store#warn] database went away; queueing updates
2026-11-30T10:00:02+0000 [lpa.relay.tap#info] SIGHUP: nothing to reload
"""


class FileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path: str = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_clean_text_log(self) -> None:
        """Warnings and info lines of twistd's text log are no problem; a missing file neither."""
        assert_no_unhandled(self.write(CLEAN_TEXT), self.mktemp())

    def test_text_problems(self) -> None:
        """Unhandled Error, a traceback and a critical line are each reported with their line."""
        path = self.write(CLEAN_TEXT + "2026-11-30T10:00:03+0000 [-] Unhandled Error\n"
                          "Traceback (most recent call last):\n  File x\n"
                          "2026-11-30T10:00:04+0000 [lpa.x#critical] boom\n")
        found = problems(path)
        self.assertEqual([p.split(":", 2)[1] for p in found], ["4", "5", "7"])
        error = self.assertRaises(AssertionError, assert_no_unhandled, path)
        self.assertIn("3 unhandled error(s)", str(error))
        assert_no_unhandled(path, allow=("Unhandled Error", "Traceback", "boom"))

    def test_json_lines(self) -> None:
        """JSON lines: level critical or a traceback field is a problem, an error level is not."""
        lines = [{"level": "info", "message": "up"}, {"level": "error", "message": "db refused"},
                 {"level": "critical", "message": "Unhandled error in Deferred:"},
                 {"level": "error", "message": "bug", "traceback": "Traceback ..."}]
        path = self.write("".join(json.dumps(line) + "\n" for line in lines))
        self.assertEqual(len(problems(path)), 2)


class EventTests(SynchronousTestCase):
    def test_events(self) -> None:
        """Captured events: critical, log.failure and legacy isError are problems; warn is not."""
        events = capture_events(self)
        log = Logger(namespace="t")
        log.warn("fine {x}", x=1)
        assert_no_unhandled(events)
        log.emit(LogLevel.critical, "Unhandled error in Deferred:")
        log.failure("bug", Failure(ZeroDivisionError("z")))
        self.flushLoggedErrors(ZeroDivisionError)
        found = problems(events)
        self.assertEqual(len(found), 2, found)
        self.assertIn("ZeroDivisionError", found[1])
