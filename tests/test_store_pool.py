"""PostgresRelayStore's scheduling (per-row order, outages, backlog, stop) on fake connections.

The transactions themselves are tested against a real cluster in test_store.py; here every
connection is a fake whose interactions the test fires by hand, on a task.Clock.
"""

from __future__ import annotations

import psycopg2
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.reconnection import defaultDeathChecker

from lpa.relay.interfaces import TRANSPORT_WS, ApplyResult
from lpa.relay.store import (
    PostgresRelayStore,
    RelayStoreBacklogFull,
    RelayStoreStopped,
    RelayStoreUnavailable,
)
from tests.fakes_relay import FakeRelayStore
from tests.pgutil import event

OK = ApplyResult(applied=1, last_seq=1, row_status="running", terminal=False, notified=1)


class FakeDetector:
    deathChecker = staticmethod(defaultDeathChecker)

    def __init__(self) -> None:
        self.connectionIsDead = False
        self.handlers: list = []
        self.stopped = False

    def addRecoveryHandler(self, handler) -> None:  # noqa: N802 (txpostgres API)
        self.handlers.append(handler)

    def checkForDeadConnection(self, failure: Failure) -> Failure:  # noqa: N802
        if self.deathChecker(failure):
            self.connectionIsDead = True
        return failure

    def recover(self) -> None:
        self.connectionIsDead = False
        for handler in self.handlers:
            handler()

    def stop(self) -> None:
        self.stopped = True


class FakeConnection:
    """Each runInteraction waits in ``pending`` until the test fires it."""

    def __init__(self, connect_result: Deferred | None = None) -> None:
        self.detector = FakeDetector()
        self.pending: list[Deferred] = []
        self.closed = False
        self._connect_result = connect_result
        #: reconnect between the death and the store seeing the failure (a real race)
        self.recover_before_caller = False

    def connect(self, dsn: str) -> Deferred:
        return self._connect_result if self._connect_result is not None else defer.succeed(None)

    def runInteraction(self, interaction) -> Deferred:  # noqa: N802
        if self.detector.connectionIsDead:
            from txpostgres.reconnection import ConnectionDead

            return defer.fail(ConnectionDead())
        ran: Deferred = Deferred()
        self.pending.append(ran)
        ran.addErrback(self.detector.checkForDeadConnection)
        return ran.addErrback(self._maybe_recover)

    def _maybe_recover(self, failure: Failure) -> Failure:
        if self.recover_before_caller and self.detector.connectionIsDead:
            self.detector.recover()
        return failure

    def close(self) -> None:
        self.closed = True


class PoolTests(SynchronousTestCase):
    def make(self, pool_size: int = 2, connect_result: Deferred | None = None, **kwargs):
        self.clock = Clock()
        self.connections: list[FakeConnection] = []

        def factory() -> FakeConnection:
            connection = FakeConnection(connect_result)
            self.connections.append(connection)
            return connection

        store = PostgresRelayStore(
            "postgresql:///x", clock=self.clock, reactor=None, connection_factory=factory,
            pool_size=pool_size, **kwargs)
        self.successResultOf(store.start())
        return store

    def rows(self):
        fake = FakeRelayStore()
        one = fake.add_host_job(row_id="r1", job_id="j", host_id="h1", agent_job_id="a1")
        two = fake.add_host_job(row_id="r2", job_id="j", host_id="h2", agent_job_id="a2")
        return one, two

    def pending(self) -> list[Deferred]:
        return [d for connection in self.connections for d in connection.pending if not d.called]

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_call_per_row_at_a_time(self) -> None:
        """Calls of one row run one after another; another row runs in parallel."""
        store = self.make()
        one, two = self.rows()
        first = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        second = store.apply_events(one, [event("a1", 2, "running")], TRANSPORT_WS)
        other = store.apply_events(two, [event("a2", 1, "running")], TRANSPORT_WS)
        running = self.pending()
        self.assertEqual(len(running), 2)  # first (row 1) and other (row 2); second waits
        running[0].callback(OK)
        self.assertEqual(self.successResultOf(first), OK)
        self.assertNoResult(second)
        self.assertEqual(len(self.pending()), 2)  # second now runs
        for ran in self.pending():
            ran.callback(OK)
        self.successResultOf(second)
        self.successResultOf(other)
        self.successResultOf(store.stop())

    def test_connection_death_requeues_and_retries_after_recovery(self) -> None:
        """A call cut by a dead connection waits, in order, and runs again after recovery."""
        store = self.make(pool_size=1)
        one, _ = self.rows()
        first = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        second = store.apply_events(one, [event("a1", 2, "running")], TRANSPORT_WS)
        self.pending()[0].errback(psycopg2.OperationalError("server closed the connection"))
        self.assertNoResult(first)
        self.assertEqual(self.pending(), [])
        self.failureResultOf(store.running_host_jobs(), RelayStoreUnavailable)
        self.connections[0].detector.recover()
        [retried] = self.pending()
        retried.callback(OK)
        self.assertEqual(self.successResultOf(first), OK)
        self.assertNoResult(second)  # strictly after first
        self.pending()[0].callback(OK)
        self.successResultOf(second)
        self.successResultOf(store.stop())

    def test_retry_even_when_recovery_came_first(self) -> None:
        """A connection failure is retried even if the detector already recovered meanwhile."""
        store = self.make(pool_size=1)
        one, _ = self.rows()
        call = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        [ran] = self.pending()
        self.connections[0].recover_before_caller = True
        ran.errback(Failure(psycopg2.InterfaceError("connection already closed")))
        self.assertFalse(self.connections[0].detector.connectionIsDead)
        self.assertNoResult(call)
        self.pending()[0].callback(OK)
        self.assertEqual(self.successResultOf(call), OK)
        self.successResultOf(store.stop())

    def test_other_errors_reach_the_caller(self) -> None:
        """A failure that is not the connection's errbacks the call; the connection is reused."""
        store = self.make(pool_size=1)
        one, two = self.rows()
        bad = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        good = store.apply_events(two, [event("a2", 1, "running")], TRANSPORT_WS)
        self.pending()[0].errback(psycopg2.DataError("invalid input"))
        self.failureResultOf(bad, psycopg2.DataError)
        self.pending()[0].callback(OK)
        self.successResultOf(good)
        self.successResultOf(store.stop())

    def test_backlog_counts_events_across_rows(self) -> None:
        """max_pending_events bounds waiting events over all rows; freed room is usable again."""
        store = self.make(pool_size=1, max_pending_events=3)
        one, two = self.rows()
        first = store.apply_events(one, [event("a1", 1, "running"), event("a1", 2, "running")],
                                   TRANSPORT_WS)
        store.apply_events(two, [event("a2", 1, "running")], TRANSPORT_WS)
        self.failureResultOf(
            store.apply_events(two, [event("a2", 2, "running")], TRANSPORT_WS), RelayStoreBacklogFull)
        self.pending()[0].callback(OK)
        self.successResultOf(first)
        later = store.apply_events(two, [event("a2", 2, "running")], TRANSPORT_WS)
        for _ in range(2):
            self.pending()[0].callback(OK)
        self.successResultOf(later)
        self.successResultOf(store.stop())

    def test_stop_waits_then_gives_up_and_says_so(self) -> None:
        """stop() waits stop_timeout for queued calls, then errbacks the rest and closes."""
        store = self.make(pool_size=1, stop_timeout=5.0)
        one, _ = self.rows()
        stuck = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        queued = store.apply_events(one, [event("a1", 2, "running")], TRANSPORT_WS)
        stopping = store.stop()
        self.assertNoResult(stopping)
        self.failureResultOf(
            store.apply_events(one, [event("a1", 3, "running")], TRANSPORT_WS), RelayStoreStopped)
        with capturedLogs() as logged:
            self.clock.advance(5.0)
        self.successResultOf(stopping)
        self.failureResultOf(stuck, RelayStoreStopped)
        self.failureResultOf(queued, RelayStoreStopped)
        self.assertTrue(self.connections[0].closed and self.connections[0].detector.stopped)
        [said] = [e for e in logged if "not applied" in e.get("log_format", "")]
        self.assertEqual((said["count"], said["rows"]), (2, "r1"))

    def test_calls_wait_for_first_connection(self) -> None:
        """With the first connect still failing, start() fires and calls wait for recovery."""
        store = self.make(pool_size=1, connect_result=defer.fail(
            psycopg2.OperationalError("could not connect")))
        one, _ = self.rows()
        call = store.apply_events(one, [event("a1", 1, "running")], TRANSPORT_WS)
        self.assertEqual(self.pending(), [])
        self.failureResultOf(store.running_host_jobs(), RelayStoreUnavailable)
        self.connections[0].detector.recover()
        self.pending()[0].callback(OK)
        self.successResultOf(call)
        self.successResultOf(store.stop())
