"""PostgresRelayStore while PostgreSQL stops and starts under it (a real cluster, one at a time).

Every test here watches the whole log: an outage is one ``warn`` ("went away") and one ``info``
("is back"), naming the database, and never a traceback (no "Unhandled Error", no critical event,
no failure) — so no test needs ``flushLoggedErrors``.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from lpa.relay.interfaces import TRANSPORT_POLL, TRANSPORT_WS
from lpa.relay.pgadapter import describe_dsn
from lpa.relay.store import PostgresRelayStore
from tests import pg
from tests.pgutil import Seeder, event
from tests.test_store import StoreTestBase


class LogWatch:
    """Every log event of the test, and Deferreds that fire when a given format is logged."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[str, Deferred[Any]]] = []

    def __call__(self, log_event: dict[str, Any]) -> None:
        self.events.append(log_event)
        text = log_event.get("log_format") or ""
        for wanted, waiting in list(self._waiting):
            if wanted in text:
                self._waiting.remove((wanted, waiting))
                waiting.callback(log_event)

    def when(self, wanted: str) -> Deferred[Any]:
        """Fires with the first event whose format contains ``wanted`` (from now on)."""
        waiting: Deferred[Any] = Deferred()
        self._waiting.append((wanted, waiting))
        return waiting

    def matching(self, wanted: str) -> list[dict[str, Any]]:
        return [e for e in self.events if wanted in (e.get("log_format") or "")]

    def tracebacks(self) -> list[str]:
        """Events that are failures, critical, or say "Unhandled"."""
        return [
            formatEvent(e) for e in self.events
            if e.get("log_failure") is not None or e.get("isError")
            or e.get("log_level") is LogLevel.critical
            or "Unhandled" in (formatEvent(e) or "")
        ]


class OutageTests(StoreTestBase):
    """The cluster is stopped and started again under a live store."""

    def setUp(self) -> None:
        super().setUp()
        self.logs = LogWatch()
        observer = cast(ILogObserver, self.logs)  # a log observer is any such callable
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def outage(self) -> None:
        server = pg.cluster()
        self.seed.close()
        self.listener.close()
        server.stop()
        self.addCleanup(server.start)  # no-op when the test already started it again

    def back(self) -> None:
        pg.cluster().start()
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)

    def assert_one_outage_no_traceback(self) -> None:
        where = describe_dsn(self.dsn)
        [gone] = self.logs.matching("went away")
        [back] = self.logs.matching("is back")
        self.assertEqual((gone["log_level"], back["log_level"]), (LogLevel.warn, LogLevel.info))
        self.assertEqual((gone["where"], back["where"]), (where, where))
        self.assertIn(f"database {where} went away", formatEvent(gone))
        self.assertEqual(self.logs.tracebacks(), [])

    async def test_restart_in_the_middle_queues_and_applies_in_order(self) -> None:
        """Calls made while PostgreSQL is down wait and are applied in order after it returns."""
        job = self.seed.job()
        row1 = self.seed.host_job(job, self.seed.host("h1.example", "192.0.2.1"), "a1")
        row2 = self.seed.host_job(job, self.seed.host("h2.example", "192.0.2.2"), "a2")
        store = await self.make(pool_size=2)
        await store.apply_events(row1, [event("a1", 1, "running")], TRANSPORT_WS)
        gone = self.logs.when("went away")
        self.outage()
        # the idle connections find out by themselves (no call needed): wait for that, so what
        # follows does not race the reactor noticing the closed sockets
        await gone
        unavailable = await store.running_host_jobs().addErrback(lambda f: f.value)
        self.assertEqual(type(unavailable).__name__, "RelayStoreUnavailable")
        calls = []
        for seq in range(2, 12):
            calls.append(store.apply_events(
                row1, [event("a1", seq, "running", kind="output", message=f"line {seq}")],
                TRANSPORT_WS))
            calls.append(store.apply_events(
                row2, [event("a2", seq - 1, "running", kind="output", message=f"two {seq}")],
                TRANSPORT_POLL))
        calls.append(store.apply_events(row1, [event("a1", 12, "completed")], TRANSPORT_WS))
        calls.append(store.apply_events(row2, [event("a2", 11, "completed")], TRANSPORT_WS))
        self.assertFalse(any(call.called for call in calls))
        self.back()
        results = await defer.gatherResults(calls)
        self.assertTrue(all(result.applied == 1 for result in results))
        self.assertEqual(self.seed.row(row1.row_id)["output"],
                         "\n".join(f"line {seq}" for seq in range(2, 12)))
        self.assertEqual(self.seed.row(row2.row_id)["output"],
                         "\n".join(f"two {seq}" for seq in range(2, 12)))
        self.assertEqual(self.seed.row(row1.row_id)["relay_last_seq"], 12)
        self.assertEqual(self.seed.job_status(job), "succeeded")
        self.assertEqual(len(await store.running_host_jobs()), 0)
        self.assert_one_outage_no_traceback()

    async def test_restart_mid_batch_loses_nothing_and_logs_no_traceback(self) -> None:
        """PostgreSQL stopping while batches are in flight: every call still applies exactly
        once and in order; the log says went away / is back once, with no traceback."""
        job = self.seed.job()
        rows = [self.seed.host_job(job, self.seed.host(f"h{n}.example", f"192.0.2.{n + 1}"),
                                   f"a{n}") for n in range(6)]
        store = await self.make(pool_size=3)
        calls = []
        for seq in range(1, 41):
            for row in rows:
                calls.append(store.apply_events(
                    row, [event(row.agent_job_id, seq, "running", kind="output",
                                message=f"{row.agent_job_id} {seq}")], TRANSPORT_WS))
        server = pg.cluster()
        self.seed.close()
        self.listener.close()
        self.addCleanup(lambda: None if server.running else server.start())
        back = self.logs.when("is back")
        await deferToThread(server.stop)  # the reactor runs on: batches are cut mid-flight
        await deferToThread(server.start)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        results = await defer.gatherResults(calls)
        self.assertEqual(sum(result.applied for result in results), 6 * 40)
        if self.logs.matching("went away") and not self.logs.matching("is back"):
            # the batches all committed before the stop; the store found its connections dead
            # and waits out its reconnect delay: a stop now could not refresh outputs (its
            # lines stay waiting for the next start), so wait until it is back, as a clean
            # stop of a relay whose database is up
            await back
        await store.stop()  # a clean stop with the database up leaves every output complete
        for row in rows:
            saved = self.seed.row(row.row_id)
            self.assertEqual(saved["relay_last_seq"], 40)
            self.assertEqual(saved["output"], "\n".join(f"{row.agent_job_id} {seq}"
                                                        for seq in range(1, 41)))
        if self.logs.matching("went away"):  # the stop may have fallen between two batches
            await back
            self.assert_one_outage_no_traceback()
        self.assertEqual(self.logs.tracebacks(), [])

    async def test_call_after_pg_ctl_restart_is_applied(self) -> None:
        """After `pg_ctl restart` between calls, the next call reconnects and is applied."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h1.example"), "a1")
        store = await self.make(pool_size=1)
        await store.apply_events(row, [event("a1", 1, "running")], TRANSPORT_WS)
        self.outage()
        self.back()  # stop + start: the store's connection is now dead without knowing it
        result = await store.apply_events(row, [event("a1", 2, "completed")], TRANSPORT_WS)
        self.assertEqual((result.applied, result.row_status), (1, "succeeded"))
        self.assertEqual(self.seed.job_status(job), "succeeded")
        self.assert_one_outage_no_traceback()

    async def test_start_while_database_down_then_apply_when_up(self) -> None:
        """A store started during an outage fires start(), queues calls, applies them once up;
        it says once that the database is unreachable, naming it, and once that it is back."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h1.example"), "a1")
        self.outage()
        store = await self.make(pool_size=2)
        [unreachable] = self.logs.matching("unreachable at start")
        self.assertIn(describe_dsn(self.dsn), formatEvent(unreachable))
        waiting = store.apply_events(row, [event("a1", 1, "completed")], TRANSPORT_WS)
        self.assertFalse(waiting.called)
        self.back()
        self.assertEqual((await waiting).row_status, "succeeded")
        self.assertEqual(self.seed.job_status(job), "succeeded")
        self.assertEqual(len(self.logs.matching("is back")), 1)
        self.assertEqual(self.logs.tracebacks(), [])

    async def test_backlog_bound_refuses_with_clear_error(self) -> None:
        """Past max_pending_events waiting events a call errbacks with RelayStoreBacklogFull."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h1.example"), "a1")
        store = await self.make(pool_size=1, max_pending_events=5)
        self.outage()
        waiting = store.apply_events(
            row, [event("a1", seq, "running") for seq in (1, 2, 3)], TRANSPORT_WS)
        refused = await store.apply_events(
            row, [event("a1", seq, "running") for seq in (4, 5, 6)], TRANSPORT_WS
        ).addErrback(lambda f: f.value)
        self.assertEqual(type(refused).__name__, "RelayStoreBacklogFull")
        self.assertIn("max_pending_events=5", str(refused))
        self.back()
        self.assertEqual((await waiting).last_seq, 3)
        self.assertEqual(self.seed.row(row.row_id)["relay_last_seq"], 3)

    async def test_stop_during_outage_reports_what_was_not_applied(self) -> None:
        """stop() while PostgreSQL is down errbacks queued calls (RelayStoreStopped), says so."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h1.example"), "a1")
        store = PostgresRelayStore(self.dsn, clock=reactor, reactor=reactor, pool_size=1)
        await store.start()
        gone = self.logs.when("went away")
        self.outage()
        await gone
        waiting = store.apply_events(row, [event("a1", 1, "running")], TRANSPORT_WS)
        await store.stop()
        stopped = await waiting.addErrback(lambda f: f.value)
        self.assertEqual(type(stopped).__name__, "RelayStoreStopped")
        [said] = self.logs.matching("not applied")
        self.assertEqual((said["log_level"], said["count"]), (LogLevel.error, 1))
        late = await store.apply_events(row, [event("a1", 2, "running")], TRANSPORT_WS).addErrback(
            lambda f: f.value)
        self.assertEqual(type(late).__name__, "RelayStoreStopped")
        self.back()
        self.assertEqual(self.seed.row(row.row_id)["relay_last_seq"], 0)
