"""The ops feed on a real PostgreSQL: LISTEN, snapshots, samples, and LISTEN again after a cut;
its subscriptions on a stand-in connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg2.extensions import Notify
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.relay.feed import KIND_RESYNC, KIND_UPDATE, FeedUnavailable, JobUpdateFeed
from lpa.relay.store import default_connection_factory
from tests import pg
from tests.logcheck import assert_no_unhandled, capture_events
from tests.pgutil import Seeder


class ListenDetector:
    """The part of the store's dead-connection detector the feed uses."""

    def __init__(self) -> None:
        self.connectionIsDead = False
        self.handlers: list[Callable[[], object]] = []
        self.stopped = False

    def addRecoveryHandler(self, handler: Callable[[], object]) -> None:  # noqa: N802
        self.handlers.append(handler)

    def checkForDeadConnection(self, failure: Failure) -> Failure:  # noqa: N802
        return failure

    def stop(self) -> None:
        self.stopped = True


class ListenConnection:
    """What the feed uses of a txpostgres Connection: it connects at once, LISTEN succeeds,
    ``notify`` delivers a notification as psycopg2 would, and ``close`` is recorded."""

    def __init__(self) -> None:
        self.detector = ListenDetector()
        self.observers: list[Callable[[Any], object]] = []
        self.dsn: str | None = None
        self.operations: list[str] = []
        self.closed = False

    def addNotifyObserver(self, observer: Callable[[Any], object]) -> None:  # noqa: N802
        self.observers.append(observer)

    def connect(self, dsn: str) -> Deferred[None]:
        self.dsn = dsn
        return succeed(None)

    def runOperation(self, sql: str) -> Deferred[None]:  # noqa: N802
        self.operations.append(sql)
        return succeed(None)

    def runQuery(self, sql: str) -> Deferred[list[tuple[Any, ...]]]:  # noqa: N802
        return Deferred()  # a sample or snapshot never answers: not what these tests are about

    def notify(self, channel: str, payload: str) -> None:
        for observer in list(self.observers):
            observer(Notify(4242, channel, payload))

    def close(self) -> None:
        self.closed = True


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await deferLater(reactor, 0.05, lambda: None)


class FeedTests(TestCase):
    timeout = 60

    async def start_feed(self, dsn: str, sample_interval: float = 0.2) -> JobUpdateFeed:
        feed = JobUpdateFeed(
            dsn,
            clock=reactor,
            connection_factory=default_connection_factory(reactor, reactor),
            sample_interval=sample_interval,
        )
        self.addCleanup(feed.stop)
        await feed.start()
        await until(lambda: feed.listening, "feed listening")
        return feed

    async def test_notifications_reach_subscribers(self) -> None:
        """A NOTIFY job_update committed by another session reaches every subscriber."""
        events = capture_events(self)
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        feed = await self.start_feed(dsn)
        heard: list[tuple[str, str]] = []
        feed.subscribe(lambda kind, payload: heard.append((kind, payload)))
        seeder.execute("SELECT pg_notify('job_update', '{\"job_id\":\"j1\"}')")
        seeder.execute("SELECT pg_notify('other_channel', 'x')")
        await until(lambda: bool(heard), "notification heard")
        self.assertEqual(heard, [(KIND_UPDATE, '{"job_id":"j1"}')])
        await until(lambda: feed.queue_usage is not None, "sample taken")
        self.assertEqual((feed.queue_usage, feed.running_rows), (0.0, 0))
        assert_no_unhandled(events)

    async def test_snapshot_reads_jobs_and_hosts(self) -> None:
        """The snapshot lists running jobs with their hosts and jobs ended in the last hour."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        running = seeder.job("running")
        row = seeder.host_job(running, seeder.host("web1.example", "192.0.2.1"), "a1")
        seeder.execute(
            "UPDATE patch_job_hosts SET relay_progress = 40, relay_transport = 'ws', "
            "relay_last_event_at = now(), relay_last_seq = 7, started_at = now() WHERE id = %s",
            (row.row_id,))
        ended = seeder.job("succeeded")
        seeder.execute("UPDATE patch_jobs SET completed_at = now() WHERE id = %s", (ended,))
        old = seeder.job("failed")
        seeder.execute(
            "UPDATE patch_jobs SET completed_at = now() - interval '2 hours' WHERE id = %s", (old,))
        feed = await self.start_feed(dsn)
        document = await feed.snapshot()
        self.assertEqual([job["job_id"] for job in document["running"]], [running])
        self.assertEqual([job["job_id"] for job in document["finished"]], [ended])
        [host] = document["running"][0]["hosts"]
        self.assertEqual(
            (host["host"], host["status"], host["progress"], host["transport"], host["seq"]),
            ("web1.example", "running", 40, "ws", 7))
        self.assertLess(abs(document["now"] - host["last_event_at"]), 60)
        await until(lambda: feed.running_rows == 1, "sample counts the running row")
        self.assertIsNotNone(feed.oldest_running_seconds)

    async def test_listens_again_after_the_connection_is_cut(self) -> None:
        """A killed LISTEN session reconnects, LISTENs again and tells subscribers to resync."""
        dsn = pg.database(self, migrated=True)
        seeder = Seeder(dsn)
        self.addCleanup(seeder.close)
        feed = await self.start_feed(dsn, sample_interval=0.2)
        heard: list[tuple[str, str]] = []
        feed.subscribe(lambda kind, payload: heard.append((kind, payload)))
        seeder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await until(lambda: (KIND_RESYNC, "") in heard, "resync after reconnect")
        self.assertTrue(feed.listening)
        seeder.execute("SELECT pg_notify('job_update', 'after')")
        await until(lambda: (KIND_UPDATE, "after") in heard, "notification after reconnect")
        self.flushLoggedErrors()

    async def test_snapshot_refused_while_down(self) -> None:
        """Without a live connection the snapshot fails with FeedUnavailable, at once."""
        feed = JobUpdateFeed(
            "postgresql://nobody@127.0.0.1:1/none",
            clock=reactor,
            connection_factory=default_connection_factory(reactor, reactor),
        )
        self.addCleanup(feed.stop)
        await feed.start()
        self.assertFalse(feed.listening)
        failure = self.failureResultOf(feed.snapshot(), FeedUnavailable)
        self.assertIn("no database connection", str(failure.value))
        await deferLater(reactor, 0.2, lambda: None)  # stop between attempts, not during one


class SubscriptionTests(SynchronousTestCase):
    def test_cancel_stops_one_subscriber_and_is_idempotent(self) -> None:
        """The function subscribe returns stops that subscriber only; calling it twice is
        harmless."""
        connection = ListenConnection()
        clock = Clock()
        feed = JobUpdateFeed("postgresql:///pm", clock=clock,
                             connection_factory=lambda: connection)
        self.successResultOf(feed.start())
        self.assertEqual((connection.operations, feed.listening), (["LISTEN job_update"], True))
        cancelled: list[str] = []
        kept: list[str] = []
        cancel = feed.subscribe(lambda kind, payload: cancelled.append(payload))
        feed.subscribe(lambda kind, payload: kept.append(payload))
        connection.notify("job_update", "one")
        cancel()
        cancel()
        connection.notify("job_update", "two")
        self.assertEqual((cancelled, kept, feed.subscriber_count), (["one"], ["one", "two"], 1))
        feed.stop()
        self.assertTrue(connection.closed and connection.detector.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])
