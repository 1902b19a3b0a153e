"""The JOB_NOT_FOUND deadline: counted from the first answer, kept in the row across restarts."""

from __future__ import annotations

from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from lpa.relay.missing import MissingJobs
from lpa.relay.missing_record import IMissingRecord, PostgresMissingRecord
from tests.fakes_relay import FakeMissingRecord
from tests.pgutil import DeadlineRowCase


class MissingJobsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.record = FakeMissingRecord()
        self.expired: list[tuple[str, str, str]] = []
        self.missing = MissingJobs(
            "agent1.example:12443",
            clock=self.clock,
            deadline=100,
            on_deadline=lambda *args: self.expired.append(args),
            record=self.record,
        )
        self.addCleanup(self.missing.stop)

    def test_interfaces(self) -> None:
        """The fake and the PostgreSQL record provide the same interface."""
        verifyObject(IMissingRecord, self.record)
        verifyClass(IMissingRecord, PostgresMissingRecord)

    def test_counts_from_the_recorded_time(self) -> None:
        """A time kept in the row (before a relay restart) shortens the deadline to what is left."""
        self.record.recorded["r1"] = 60.0
        self.missing.saw_missing("r1", "job-1", "ws")
        self.clock.advance(39)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        [(row_id, reason, transport)] = self.expired
        self.assertEqual((row_id, transport), ("r1", "ws"))
        self.assertIn("has not known job job-1 for 100s", reason)

    def test_recorded_past_the_deadline_ends_at_once(self) -> None:
        """A recorded time older than the deadline ends the row at the first answer."""
        self.record.recorded["r1"] = 250.0
        self.missing.saw_missing("r1", "job-1", "poll")
        self.assertEqual([e[0] for e in self.expired], ["r1"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_record_failure_counts_from_our_clock(self) -> None:
        """A record that cannot be written: one warning, the deadline from this relay's answer."""
        self.record.error = RuntimeError("could not connect to server\nmore detail")
        with capturedLogs() as logged:
            self.missing.saw_missing("r1", "job-1", "ws")
        [warning] = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn
                     and "could not record" in e["log_format"]]
        self.assertIn("could not connect to server;", warning)
        self.clock.advance(100)
        self.assertEqual([e[0] for e in self.expired], ["r1"])

    def test_known_again_clears_the_record(self) -> None:
        """When the agent knows the job again the recorded time is cleared too."""
        self.missing.saw_missing("r1", "job-1", "ws")
        self.missing.saw_known("r1")
        self.missing.saw_known("r2")  # never missing: nothing to clear
        self.assertEqual(self.record.calls, [("mark", "r1"), ("clear", "r1")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_another_agent_job_starts_again(self) -> None:
        """The same row answered missing for another agent job (re-dispatched): a new count."""
        self.missing.saw_missing("r1", "job-1", "ws")
        self.clock.advance(90)
        self.missing.saw_missing("r1", "job-2", "ws")
        self.clock.advance(90)
        self.assertEqual(self.expired, [])
        self.clock.advance(10)
        self.assertEqual([e[0] for e in self.expired], ["r1"])


class PostgresMissingRecordTests(DeadlineRowCase):
    """The record against a real database (each call opens its own connection in a thread)."""

    since = "relay_missing_since"

    def setUp(self) -> None:
        super().setUp()
        self.record = PostgresMissingRecord(self.dsn, reactor=reactor)

    def columns(self) -> tuple[Any, ...]:
        row: tuple[Any, ...] = self.seed.one(
            "SELECT relay_missing_since IS NOT NULL, relay_missing_agent_job_id "
            "FROM patch_job_hosts WHERE id = %s", (self.row,))
        return row

    async def test_mark_keeps_the_first_time(self) -> None:
        """The first mark records now; a later one answers the seconds since that first one."""
        self.assertLess(await self.record.mark(self.row, "job-1"), 5.0)
        self.assertEqual(self.columns(), (True, "job-1"))
        self.age(50)
        elapsed = await self.record.mark(self.row, "job-1")
        self.assertTrue(49.0 <= elapsed < 60.0, elapsed)

    async def test_mark_restarts_after_an_event_or_a_redispatch(self) -> None:
        """An event applied since, or another agent job on the row, starts the count again."""
        await self.record.mark(self.row, "job-1")
        self.age(50)
        self.seed.execute("UPDATE patch_job_hosts SET relay_last_event_at = now() - "
                          "interval '10 seconds' WHERE id = %s", (self.row,))
        self.assertLess(await self.record.mark(self.row, "job-1"), 5.0)
        self.age(50)
        self.seed.execute("UPDATE patch_job_hosts SET agent_job_id = 'job-2' WHERE id = %s",
                          (self.row,))
        self.assertLess(await self.record.mark(self.row, "job-2"), 5.0)
        self.assertEqual(self.columns(), (True, "job-2"))

    async def test_clear_and_terminal_rows(self) -> None:
        """clear() forgets the time; a terminal row or another agent job is never marked."""
        await self.record.mark(self.row, "job-1")
        await self.record.clear(self.row)
        self.assertEqual(self.columns(), (False, None))
        self.assertEqual(await self.record.mark(self.row, "other-job"), 0.0)
        self.seed.execute("UPDATE patch_job_hosts SET status = 'failed' WHERE id = %s", (self.row,))
        self.assertEqual(await self.record.mark(self.row, "job-1"), 0.0)
        self.assertEqual(self.columns(), (False, None))

    async def test_database_down_fails_the_call(self) -> None:
        """No database: the call errbacks (the caller counts from its own clock)."""
        down = PostgresMissingRecord(
            "postgresql://postgres@/nowhere?host=/nonexistent-lpa-socket-dir&port=1",
            reactor=reactor,
        )
        marking: Deferred[float] = down.mark(self.row, "job-1")
        with self.assertRaises(psycopg2.OperationalError):
            await marking
