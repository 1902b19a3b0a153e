"""The JSON-lines log observer, and the level every configured observer logs at."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from types import SimpleNamespace
from typing import ClassVar

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpa.logs import JsonLinesObserver, json_observer, observer_for_twistd


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
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("boom {thing}", thing=object())
        record = json.loads(out.getvalue())
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("object object", record["thing"])

    def test_factory(self) -> None:
        """The twistd --logger factory writes JSON lines on stdout, at info: no debug lines."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        log = Logger(namespace="t", observer=LogPublisher(json_observer()))
        log.debug("per frame")
        log.info("started")
        self.assertEqual([json.loads(line)["message"] for line in out.getvalue().splitlines()],
                         ["started"])


class ConfiguredObserverTests(SynchronousTestCase):
    def test_text_at_info_by_default(self) -> None:
        """Text at the default level drops debug lines (they were 50 MB a settle of a big fleet)."""
        from lpa.logs import configured_observer

        out = io.StringIO()
        log = Logger(namespace="t", observer=LogPublisher(configured_observer("text", out=out)))
        log.debug("agent a1: Ack of job j1")
        log.info("following job {job}", job="j1")
        self.assertNotIn("Ack", out.getvalue())
        self.assertIn("following job j1", out.getvalue())

    def test_json_with_level_filter(self) -> None:
        """json at warn writes JSON lines and drops info events."""
        from lpa.logs import configured_observer

        out = io.StringIO()
        observer = configured_observer("json", "warn", out)
        assert observer is not None
        log = Logger(namespace="t", observer=LogPublisher(observer))
        log.info("quiet")
        log.warn("loud {n}", n=1)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([r["message"] for r in records], ["loud 1"])

    def test_component_set_on_application(self) -> None:
        """Attached to a twistd application, the wrapper registers its observer there."""
        from twisted.application.service import Application, Service
        from twisted.logger import ILogObserver

        from lpa.logs import LogConfiguredService, configured_observer

        observer = configured_observer("json", "info", io.StringIO())
        application = Application("t")
        LogConfiguredService(Service(), observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)


class TwistdLogfileTests(SynchronousTestCase):
    def test_logfile_kept(self) -> None:
        """With twistd --logfile, the config's JSON observer writes to that file, not stdout."""
        from lpa.logs import observer_for_twistd

        path = self.mktemp()

        class Options(dict[str, str]):
            parent: ClassVar[dict[str, str]] = {"logfile": path}

        observer = observer_for_twistd(Options(), "json")
        assert observer is not None
        Logger(namespace="t", observer=LogPublisher(observer)).info("to the file")
        with open(path) as handle:
            self.assertEqual(json.loads(handle.readline())["message"], "to the file")

    def test_where_twistd_would_write(self) -> None:
        """Without --logfile: stdout under -n; daemonized, twistd.log in the working directory."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)

        foreground = SimpleNamespace(parent={"nodaemon": True})  # twistd -n
        Logger(namespace="t", observer=LogPublisher(observer_for_twistd(foreground, "text"))
               ).info("to stdout")
        self.assertIn("to stdout", out.getvalue())
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.patch(os, "getcwd", lambda: directory)
        self.patch(signal, "getsignal", lambda signum: signal.SIG_IGN)

        self.assertFalse(os.path.exists(os.path.join(directory, "twistd.log")))
        observer = observer_for_twistd(SimpleNamespace(parent={}), "text", "warn")
        Logger(namespace="t", observer=LogPublisher(observer)).info("quiet")
        with open(os.path.join(directory, "twistd.log")) as written:
            self.assertEqual(written.read(), "")  # there, and at warn: the info line is not
