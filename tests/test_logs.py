"""The JSON-lines log observer."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpa.logs import JsonLinesObserver, json_observer


class JsonLinesObserverTests(SynchronousTestCase):
    def _log(self) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        publisher = LogPublisher(JsonLinesObserver(out))
        return Logger(namespace="lpa.test", observer=publisher), out

    def test_one_object_per_line_with_fields(self) -> None:
        """An event becomes one JSON line with level, message and its structured fields."""
        log, out = self._log()
        log.warn("job {job_id} waited {seconds:.1f}s", job_id="j1", seconds=2.5)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        record = json.loads(lines[0])
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "lpa.test")
        self.assertEqual(record["message"], "job j1 waited 2.5s")
        self.assertEqual(record["job_id"], "j1")
        self.assertEqual(record["seconds"], 2.5)

    def test_failure_has_traceback_and_odd_values_survive(self) -> None:
        """A failure carries its traceback; values JSON cannot hold are written as repr."""
        log, out = self._log()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("boom {thing}", thing=object())
        record = json.loads(out.getvalue())
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("object object", record["thing"])

    def test_factory(self) -> None:
        """The twistd --logger factory returns an observer."""
        self.assertIsInstance(json_observer(), JsonLinesObserver)
