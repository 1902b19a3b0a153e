"""The JOB_NOT_FOUND deadline: counted from the first answer, kept in the row across restarts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import psycopg2
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from lpa.protocol import ack_frame
from lpa.relay.interfaces import AgentAddress
from lpa.relay.jobs_http import AgentJobsHttp
from lpa.relay.machine import AgentLink
from lpa.relay.missing import MissingJobs
from lpa.relay.missing_record import IMissingRecord, PostgresMissingRecord
from lpa.relay.poller import AgentPoller
from tests.fakes_relay import FakeMissingRecord, FakeRelayStore
from tests.pgutil import DeadlineRowCase
from tests.test_relay_machine import FakePoller, FakeWebSocket, wire
from tests.test_relay_poller import ADDRESS, JOB, FakeAgentResource, envelope


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
        self.missing.saw_known("r1")
        self.assertEqual(self.record.calls, [("mark", "r1"), ("clear", "r1")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_answer_clears_a_time_left_by_an_earlier_relay(self) -> None:
        """The first answer that shows the job clears the row's record once, though this link
        never saw the job missing: a later JOB_NOT_FOUND gets a whole deadline."""
        self.record.recorded["r1"] = 5000.0  # JOB_NOT_FOUND long ago, kept by an earlier relay
        for _ in range(3):
            self.missing.saw_known("r1", recorded=True)
        self.assertEqual(self.record.calls, [("clear", "r1")])
        self.clock.advance(3000)
        self.missing.saw_missing("r1", "job-1", "ws")
        self.clock.advance(99)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual([e[0] for e in self.expired], ["r1"])

    def test_first_answer_clear_failure_is_one_warning(self) -> None:
        """A first-answer clear that fails: one warning naming the row, tried once per row."""
        self.record.error = RuntimeError("could not connect to server\nmore detail")
        with capturedLogs() as logged:
            self.missing.saw_known("r1", recorded=True)
            self.missing.saw_known("r1", recorded=True)
        self.assertEqual(self.record.calls, [("clear", "r1")])
        [warning] = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn]
        self.assertIn("could not clear the JOB_NOT_FOUND time kept in row r1", warning)
        self.assertIn("could not connect to server;", warning)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_answers_for_a_row_that_held_no_time_write_nothing(self) -> None:
        """A row read without a recorded time costs no write when the agent answers for it: a
        relay starting to follow thousands of agents does not write to each row."""
        for _ in range(3):
            self.missing.saw_known("r1")
        self.assertEqual(self.record.calls, [])

    def test_another_agent_job_starts_again(self) -> None:
        """The same row answered missing for another agent job (re-dispatched): a new count."""
        self.missing.saw_missing("r1", "job-1", "ws")
        self.clock.advance(90)
        self.missing.saw_missing("r1", "job-2", "ws")
        self.clock.advance(90)
        self.assertEqual(self.expired, [])
        self.clock.advance(10)
        self.assertEqual([e[0] for e in self.expired], ["r1"])


class FirstAnswerTests(SynchronousTestCase):
    """An agent link whose row holds a JOB_NOT_FOUND time left by an earlier relay; the agent
    knows the job now (it knew it again without new events), and forgets it much later."""

    not_found: ClassVar[dict[str, str]] = {
        "event": "error",
        "job_id": JOB,
        "status": "job_not_found",
        "error_code": "JOB_NOT_FOUND",
        "message": "Job not found",
    }

    def setUp(self) -> None:
        self.clock = Clock()
        self.record = FakeMissingRecord(self.clock)
        self.record.since["r1"] = -5000.0  # JOB_NOT_FOUND long ago, kept by an earlier relay
        self.store = FakeRelayStore()
        self.row = self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=JOB, agent=ADDRESS,
            missing_recorded=True,  # the relay read the row with that time in it
        )
        self.agent = FakeAgentResource()
        self.answer: tuple[int, bytes] = (200, envelope({"events": []}))
        self.agent.routes[f"/api/v1/jobs/{JOB}/events?after=0"] = lambda: self.answer
        self.http = StubTreq(self.agent)
        self.dials: list[FakeWebSocket] = []

    def link(self, make_poller: Callable[..., Any]) -> AgentLink:
        """A started link to ADDRESS following r1, with the record and a 100 s deadline."""

        def dial(address: AgentAddress, listener: Any) -> FakeWebSocket:
            self.dials.append(FakeWebSocket(address, listener))
            return self.dials[-1]

        link = AgentLink(
            ADDRESS,
            store=self.store,
            clock=self.clock,
            dial=dial,
            make_poller=make_poller,
            missing_deadline=100,
            missing_record=self.record,
        )
        link.start([self.row])
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(lambda: self.successResultOf(link.stop()))
        return link

    def poller(self, address: AgentAddress, target: Any, backstop: bool = False) -> AgentPoller:
        """A real poller (every 10 s) on the fake agent's REST API."""
        return AgentPoller(
            AgentJobsHttp(self.http, address, clock=self.clock, timeout=5),
            target,
            clock=self.clock,
            interval=10,
            max_interval=10,
            deadline=1000,
        )

    def test_subscribe_clears_then_not_found_counts_afresh(self) -> None:
        """The agent's acknowledgement of the subscribe clears the old time (once, not per
        event); a JOB_NOT_FOUND an hour later ends the row a whole deadline after it."""
        link = self.link(FakePoller)
        self.dials[0].opened()
        self.assertEqual(self.record.calls, [])
        link.ws_message(ack_frame("subscribed", JOB, "Subscribed", "t"))
        self.assertEqual((self.record.calls, self.record.since), ([("clear", "r1")], {}))
        for seq in (1, 2, 3):
            link.ws_message(wire(JOB, seq))
        self.assertEqual(self.record.calls, [("clear", "r1")])
        self.clock.advance(3600)
        link.ws_message(self.not_found)
        self.clock.advance(99)
        self.assertEqual(self.store.rows["r1"].status, "running")
        self.clock.advance(1)
        row = self.store.rows["r1"]
        self.assertEqual(row.status, "failed")
        self.assertIn(f"has not known job {JOB} for 100s", row.error_message)

    def test_acknowledged_subscribe_after_not_found_cancels_the_deadline(self) -> None:
        """After a JOB_NOT_FOUND, a subscribe the agent acknowledges (it knows the job again,
        with no new event to replay) cancels the deadline and clears the record."""
        link = self.link(FakePoller)
        self.record.since.clear()
        self.dials[0].opened()
        link.ws_message(self.not_found)
        self.clock.advance(50)
        self.dials[0].failed(handshake=False)  # the socket dropped; the redial opens it again
        self.dials[0].opened()
        link.ws_message(ack_frame("subscribed", JOB, "Subscribed", "t"))
        self.assertEqual(self.record.calls, [("mark", "r1"), ("clear", "r1")])
        self.clock.advance(100)
        self.assertEqual(self.store.rows["r1"].status, "running")

    def test_a_row_read_without_a_time_gets_no_write(self) -> None:
        """Following a row that held no JOB_NOT_FOUND time when read writes nothing, however
        the agent answers for it."""
        self.row = self.store.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id=JOB, agent=ADDRESS
        )
        link = self.link(FakePoller)
        self.dials[0].opened()
        link.ws_message(ack_frame("subscribed", JOB, "Subscribed", "t"))
        link.ws_message(wire(JOB, 1))
        self.assertEqual(self.record.calls, [])

    def test_replayed_event_clears(self) -> None:
        """An event the agent replays after the subscribe shows the job as well."""
        link = self.link(FakePoller)
        self.dials[0].opened()
        link.ws_message(wire(JOB, 1))
        self.assertEqual(self.record.calls, [("clear", "r1")])

    def test_poll_answer_clears_then_not_found_counts_afresh(self) -> None:
        """A poller's first answer (an empty events page) clears the old time, once; a later
        404 JOB_NOT_FOUND ends the row a whole deadline after it, not at once."""
        self.link(self.poller)
        self.dials[0].failed(handshake=True)  # the fallback poller polls at once
        self.http.flush()
        self.assertEqual((self.record.calls, self.record.since), ([("clear", "r1")], {}))
        self.clock.advance(10)
        self.http.flush()
        self.assertEqual(self.record.calls, [("clear", "r1")])
        self.answer = (404, envelope(error={"code": "JOB_NOT_FOUND", "message": "no"}))
        self.clock.advance(10)  # t=20: the first JOB_NOT_FOUND
        self.http.flush()
        self.assertEqual(self.record.calls, [("clear", "r1"), ("mark", "r1")])
        for _ in range(9):
            self.clock.advance(10)
            self.http.flush()
        self.assertEqual(self.store.rows["r1"].status, "running")  # t=110
        self.clock.advance(10)
        self.http.flush()
        self.assertEqual(self.store.rows["r1"].status, "failed")  # t=120: 100 s after it


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

    async def test_first_answer_clear_by_another_relay(self) -> None:
        """A relay that never marked the row clears the time an earlier one left (its first
        answer); the next JOB_NOT_FOUND starts afresh; a clear with nothing kept is a no-op."""
        await PostgresMissingRecord(self.dsn, reactor=reactor).mark(self.row, "job-1")
        self.age(5000)
        await self.record.clear(self.row)
        self.assertEqual(self.columns(), (False, None))
        await self.record.clear(self.row)
        self.assertEqual(self.columns(), (False, None))
        self.assertLess(await self.record.mark(self.row, "job-1"), 5.0)
        self.assertEqual(self.columns(), (True, "job-1"))

    async def test_database_down_fails_the_call(self) -> None:
        """No database: the call errbacks (the caller counts from its own clock)."""
        down = PostgresMissingRecord(
            "postgresql://postgres@/nowhere?host=/nonexistent-lpa-socket-dir&port=1",
            reactor=reactor,
        )
        marking: Deferred[float] = down.mark(self.row, "job-1")
        with self.assertRaises(psycopg2.OperationalError):
            await marking
