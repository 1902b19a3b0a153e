"""The unreachable deadline: counted from the first failed poll, kept in the row across restarts."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from lpa.relay.jobs_http import AgentJobsHttp
from lpa.relay.missing_record import (
    IMissingRecord,
    PostgresMissingRecord,
    PostgresUnreachableRecord,
)
from lpa.relay.poller import AgentPoller
from tests.fakes_relay import FakeMissingRecord
from tests.pgutil import DeadlineRowCase
from tests.test_relay_poller import (
    ADDRESS,
    JOB,
    FakeAgentResource,
    RecordingTarget,
    envelope,
    host_job,
)


class Refused:
    """An HTTP client whose every request is refused (the agent is gone)."""

    def get(self, url: str) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")


class UnreachableDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.record = FakeMissingRecord(self.clock)
        self.http: Any = Refused()

    def poller(self, target: RecordingTarget, deadline: float = 100) -> AgentPoller:
        """A started poller (every 10 s) of ``target`` on the refusing agent, with the record."""
        poller = AgentPoller(
            AgentJobsHttp(self.http, ADDRESS, clock=self.clock, timeout=5),
            target,
            clock=self.clock,
            interval=10,
            max_interval=10,
            deadline=deadline,
            record=self.record,
        )
        self.addCleanup(poller.stop)
        poller.start()
        return poller

    def test_interfaces(self) -> None:
        """The clocked fake and both PostgreSQL records provide the same interface."""
        verifyObject(IMissingRecord, self.record)
        verifyClass(IMissingRecord, PostgresMissingRecord)
        verifyClass(IMissingRecord, PostgresUnreachableRecord)

    def test_relay_restart_ends_the_row_at_the_original_deadline(self) -> None:
        """A restarted relay (a new poller, the same record) ends the row at the first deadline."""
        before = self.poller(RecordingTarget(host_job()))
        self.clock.advance(60)
        before.stop()  # the relay restarts 60 s into the outage
        target = RecordingTarget(host_job())
        with capturedLogs() as logged:
            self.poller(target)
        [info] = [formatEvent(e) for e in logged if "already" in e["log_format"]]
        self.assertIn("for 60s already", info)
        self.clock.advance(30)
        self.assertEqual(target.given_up, [])
        self.clock.advance(10)  # t=100: the deadline of the outage's first failure
        [(row_id, reason)] = target.given_up
        self.assertEqual(row_id, "r1")
        self.assertIn("for 100s (deadline 100s)", reason)
        self.assertEqual(self.record.calls, [("mark", "r1"), ("mark", "r1")])

    def test_recorded_past_the_deadline_ends_at_the_first_failure(self) -> None:
        """A record older than the deadline ends the row at this relay's first failed poll."""
        self.record.since["r1"] = -500.0
        target = RecordingTarget(host_job())
        self.poller(target)
        self.assertEqual([r for r, _ in target.given_up], ["r1"])

    def test_answer_clears_the_record(self) -> None:
        """A usable answer clears the recorded time: the next outage counts afresh."""
        resource = FakeAgentResource()
        answers = iter([(500, b""), (200, envelope({"events": []})), (500, b"")])
        resource.routes[f"/api/v1/jobs/{JOB}/events?after=0"] = lambda: next(answers)
        stub = StubTreq(resource)
        self.http = stub
        self.poller(RecordingTarget(host_job()))
        stub.flush()
        self.clock.advance(10)
        stub.flush()
        self.assertEqual(self.record.calls, [("mark", "r1"), ("clear", "r1")])
        self.assertEqual(self.record.since, {})
        self.clock.advance(10)
        stub.flush()
        self.assertEqual(self.record.since, {"r1": 20.0})  # the third poll, at t=20

    def test_first_answer_clears_a_record_left_by_another_relay(self) -> None:
        """A time left in the row by a relay that stopped during an outage is cleared by this
        poller's first answer: a later short outage counts from its own start, never from the
        old time (which would end the row at once)."""
        self.record.since["r1"] = -5000.0  # an outage long ago, recorded by an earlier relay
        resource = FakeAgentResource()
        answers = iter([(200, envelope({"events": []})), (500, b""), (500, b"")])
        resource.routes[f"/api/v1/jobs/{JOB}/events?after=0"] = lambda: next(answers)
        stub = StubTreq(resource)
        self.http = stub
        target = RecordingTarget(host_job())
        self.poller(target)
        stub.flush()
        self.assertEqual(self.record.calls, [("clear", "r1")])
        self.clock.advance(10)
        stub.flush()
        self.clock.advance(10)
        stub.flush()
        self.assertEqual(target.given_up, [])
        self.assertEqual(self.record.since, {"r1": 10.0})  # this outage's first failure

    def test_record_failure_counts_from_our_clock(self) -> None:
        """A record that cannot be written: one warning, the deadline from this poller's first
        failure."""
        self.record.error = RuntimeError("could not connect to server\nmore detail")
        target = RecordingTarget(host_job())
        with capturedLogs() as logged:
            self.poller(target)
            self.clock.advance(90)
        [warning] = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn
                     and "could not record" in e["log_format"]]
        self.assertIn("could not connect to server;", warning)
        self.assertEqual(target.given_up, [])
        self.clock.advance(10)
        self.assertEqual([r for r, _ in target.given_up], ["r1"])


class PostgresUnreachableRecordTests(DeadlineRowCase):
    """The record against a real database, in its own columns (not the JOB_NOT_FOUND ones)."""

    since = "relay_unreachable_since"

    def setUp(self) -> None:
        super().setUp()
        self.record = PostgresUnreachableRecord(self.dsn, reactor=reactor)

    def columns(self) -> tuple[Any, ...]:
        row: tuple[Any, ...] = self.seed.one(
            "SELECT relay_unreachable_since IS NOT NULL, relay_unreachable_agent_job_id, "
            "relay_missing_since IS NOT NULL FROM patch_job_hosts WHERE id = %s", (self.row,))
        return row

    async def test_mark_keeps_the_first_time_until_cleared(self) -> None:
        """The first mark records now, a later one (another relay) answers the seconds since it;
        clear() forgets it; the JOB_NOT_FOUND columns are left alone."""
        self.assertLess(await self.record.mark(self.row, "job-1"), 5.0)
        self.assertEqual(self.columns(), (True, "job-1", False))
        self.age(500)
        again = PostgresUnreachableRecord(self.dsn, reactor=reactor)  # a restarted relay
        elapsed = await again.mark(self.row, "job-1")
        self.assertTrue(499.0 <= elapsed < 510.0, elapsed)
        await again.clear(self.row)
        self.assertEqual(self.columns(), (False, None, False))

    async def test_event_redispatch_and_terminal_rows_start_again(self) -> None:
        """An event applied since, another agent job, or a terminal row: no earlier time."""
        await self.record.mark(self.row, "job-1")
        self.age(50)
        self.seed.execute("UPDATE patch_job_hosts SET relay_last_event_at = now() - "
                          "interval '10 seconds' WHERE id = %s", (self.row,))
        self.assertLess(await self.record.mark(self.row, "job-1"), 5.0)
        self.age(50)
        self.seed.execute("UPDATE patch_job_hosts SET agent_job_id = 'job-2' WHERE id = %s",
                          (self.row,))
        self.assertLess(await self.record.mark(self.row, "job-2"), 5.0)
        self.assertEqual(self.columns(), (True, "job-2", False))
        self.seed.execute("UPDATE patch_job_hosts SET status = 'failed', "
                          "relay_unreachable_since = NULL WHERE id = %s", (self.row,))
        self.assertEqual(await self.record.mark(self.row, "job-2"), 0.0)
        self.assertEqual(self.columns(), (False, "job-2", False))
