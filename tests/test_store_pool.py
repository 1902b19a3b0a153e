"""BatchingPool's scheduling (group commit, per-row order, outages, backlog, stop) on fakes.

The transactions themselves are tested against a real cluster in test_store*.py; here every
connection is a fake whose transactions the test ends by hand, on a task.Clock, and ``run_batch``
records what each transaction was given.
"""

from __future__ import annotations

from typing import Any

import attr
import psycopg2
import psycopg2.errors
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.reconnection import ConnectionDead

from lpa.relay.pgadapter import is_connection_failure
from lpa.relay.pool import (
    BatchingPool,
    RelayStoreBacklogFull,
    RelayStoreStopped,
    RelayStoreUnavailable,
    Work,
)


class FakeDetector:
    deathChecker = staticmethod(is_connection_failure)

    def __init__(self) -> None:
        self.connectionIsDead = False
        self.handlers: list[Any] = []
        self.stopped = False
        self.on_dead: Any = None

    def addRecoveryHandler(self, handler: Any) -> None:  # noqa: N802 (txpostgres API)
        self.handlers.append(handler)

    def checkForDeadConnection(self, failure: Failure) -> Failure:  # noqa: N802
        if self.deathChecker(failure) and not self.connectionIsDead:
            self.connectionIsDead = True
            if self.on_dead is not None:
                self.on_dead(failure)
        return failure

    def recover(self) -> None:
        self.connectionIsDead = False
        for handler in self.handlers:
            handler()

    def stop(self) -> None:
        self.stopped = True


class FakeConnection:
    """Runs each interaction at once with ``cursor=None``; a dead one fails like txpostgres."""

    def __init__(self, connect_error: Exception | None = None) -> None:
        self.detector = FakeDetector()
        self.closed = False
        self._connect_error = connect_error

    def connect(self, dsn: str) -> Deferred[Any]:
        if self._connect_error is not None:
            return defer.fail(self._connect_error)
        return defer.succeed(None)

    def runTransaction(self, interaction: Any) -> Deferred[Any]:  # noqa: N802
        if self.detector.connectionIsDead:
            return defer.fail(ConnectionDead())
        ran = defer.maybeDeferred(interaction, None)
        return ran.addErrback(self.detector.checkForDeadConnection)

    def close(self) -> None:
        self.closed = True


@attr.s(auto_attribs=True)
class Outcome:
    results: list[Any]


class PoolTests(SynchronousTestCase):
    def make(
        self, pool_size: int = 2, connect_error: Exception | None = None, **kwargs: Any
    ) -> BatchingPool:
        self.clock = Clock()
        self.connections: list[FakeConnection] = []
        #: one entry per transaction: (items, the Deferred the test fires with an Outcome)
        self.transactions: list[tuple[list[Any], Deferred[Any]]] = []
        self.committed: list[Any] = []

        def factory() -> FakeConnection:
            connection = FakeConnection(connect_error)
            self.connections.append(connection)
            return connection

        def run_batch(cursor: Any, items: list[Any]) -> Deferred[Any]:
            ran: Deferred[Any] = Deferred()
            self.transactions.append((list(items), ran))
            return ran

        pool = BatchingPool(
            "postgresql://relay@db.example:5433/manager", clock=self.clock, run_batch=run_batch,
            connection_factory=factory, on_commit=self.committed.append, pool_size=pool_size,
            **kwargs)
        self.successResultOf(pool.start())
        return pool

    def write(self, pool: BatchingPool, row: str, name: str, events: int = 1) -> Deferred[Any]:
        return pool.submit(Work(row_id=row, result=Deferred(), events=events,
                                description=name, item=name))

    def read(self, pool: BatchingPool) -> Deferred[Any]:
        return pool.submit(Work(row_id=None, result=Deferred(), events=0, description="read",
                                run=lambda cursor: defer.succeed("rows"), retry_on_dead=False))

    def open_transactions(self) -> list[tuple[list[Any], Deferred[Any]]]:
        return [(items, ran) for items, ran in self.transactions if not ran.called]

    def commit(self, index: int = 0) -> None:
        items, ran = self.open_transactions()[index]
        ran.callback(Outcome([f"done {item}" for item in items]))

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_rows_share_one_transaction(self) -> None:
        """Writes of many rows that arrive while a transaction runs go into ONE next transaction."""
        pool = self.make(pool_size=1)
        first = self.write(pool, "r0", "r0:1")
        calls = [self.write(pool, f"r{n}", f"r{n}:1") for n in range(1, 51)]
        self.assertEqual([items for items, _ in self.transactions], [["r0:1"]])
        self.commit()
        self.assertEqual(self.successResultOf(first), "done r0:1")
        [(items, _)] = self.open_transactions()
        self.assertEqual(items, [f"r{n}:1" for n in range(1, 51)])
        self.commit()
        self.assertEqual([self.successResultOf(c) for c in calls],
                         [f"done r{n}:1" for n in range(1, 51)])
        self.assertEqual(len(self.committed), 2)
        self.successResultOf(pool.stop())

    def test_a_row_is_in_one_transaction_at_a_time_in_order(self) -> None:
        """A row's later calls wait for its transaction in flight and then go in order; other
        rows run on the free connection meanwhile."""
        pool = self.make(pool_size=2)
        self.write(pool, "r1", "r1:1")
        second = self.write(pool, "r1", "r1:2")
        third = self.write(pool, "r1", "r1:3")
        other = self.write(pool, "r2", "r2:1")
        self.assertEqual([items for items, _ in self.open_transactions()],
                         [["r1:1"], ["r2:1"]])
        self.commit(1)
        self.successResultOf(other)
        self.assertEqual(len(self.open_transactions()), 1)  # r1's next calls still wait
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:2", "r1:3"]])
        self.commit()
        self.assertEqual((self.successResultOf(second), self.successResultOf(third)),
                         ("done r1:2", "done r1:3"))
        self.successResultOf(pool.stop())

    def test_each_lane_has_its_own_connections(self) -> None:
        """A refresh runs on the refresh lane's connection beside the writes; a row's later
        write still waits for it, other rows do not."""
        pool = self.make(pool_size=1, lanes={"refresh": 1})
        self.write(pool, "r0", "r0")
        pool.submit(Work(row_id="r1", result=Deferred(), events=0, description="refresh r1",
                         item="refresh r1", lane="refresh"))
        self.write(pool, "r1", "r1:1")  # behind its row's refresh
        self.write(pool, "r2", "r2:1")
        self.assertEqual([items for items, _ in self.open_transactions()],
                         [["r0"], ["refresh r1"]])
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()],
                         [["refresh r1"], ["r2:1"]])
        self.commit(0)
        self.commit(0)
        self.assertEqual(self.open_transactions()[0][0], ["r1:1"])
        self.commit()
        self.successResultOf(pool.stop())

    def test_batch_bounded_by_events(self) -> None:
        """A transaction takes at most max_batch_events events; the rest go in the next one."""
        pool = self.make(pool_size=1, max_batch_events=10)
        self.write(pool, "r0", "r0")
        for n in range(1, 5):
            self.write(pool, f"r{n}", f"r{n}", events=4)
        self.commit()
        self.assertEqual(self.open_transactions()[0][0], ["r1", "r2"])
        self.commit()
        self.assertEqual(self.open_transactions()[0][0], ["r3", "r4"])
        self.commit()
        self.successResultOf(pool.stop())

    def test_connection_death_requeues_the_batch_in_order(self) -> None:
        """A transaction cut by a dead connection waits, in order, and runs again after recovery;
        reads meanwhile fail at once."""
        pool = self.make(pool_size=1)
        self.write(pool, "r0", "r0:1")
        first = self.write(pool, "r1", "r1:1")
        second = self.write(pool, "r1", "r1:2")
        self.commit()
        _, ran = self.open_transactions()[0]
        ran.errback(psycopg2.OperationalError("server closed the connection unexpectedly"))
        self.assertNoResult(first)
        self.assertEqual(self.open_transactions(), [])
        self.failureResultOf(self.read(pool), RelayStoreUnavailable)
        self.connections[0].detector.recover()
        self.assertEqual(self.open_transactions()[0][0], ["r1:1", "r1:2"])
        self.commit()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         ("done r1:1", "done r1:2"))
        self.successResultOf(pool.stop())

    def test_reactor_loss_reason_counts_as_a_dead_connection(self) -> None:
        """ConnectionDone (the reactor's reason when the socket closes under a query) requeues
        the calls instead of failing them: the race behind an outage test that failed once."""
        pool = self.make(pool_size=1)
        call = self.write(pool, "r1", "r1:1")
        _, ran = self.open_transactions()[0]
        ran.errback(ConnectionDone("Connection was closed cleanly."))
        self.assertNoResult(call)
        self.assertTrue(self.connections[0].detector.connectionIsDead)
        self.connections[0].detector.recover()
        self.commit()
        self.assertEqual(self.successResultOf(call), "done r1:1")
        self.successResultOf(pool.stop())

    def test_failing_batch_is_split_so_only_the_bad_call_fails(self) -> None:
        """Any other error of a batch runs its calls one transaction each: only the bad one
        fails."""
        pool = self.make(pool_size=1)
        self.write(pool, "r0", "r0")
        good = self.write(pool, "r1", "good")
        bad = self.write(pool, "r2", "bad")
        self.commit()
        with capturedLogs() as logged:
            self.open_transactions()[0][1].errback(psycopg2.DataError("invalid input"))
        [said] = [e for e in logged if "one by one" in e["log_format"]]
        self.assertEqual(said["count"], 2)
        self.assertEqual(self.open_transactions()[0][0], ["good"])
        self.commit()
        self.successResultOf(good)
        self.assertEqual(self.open_transactions()[0][0], ["bad"])
        self.open_transactions()[0][1].errback(psycopg2.DataError("invalid input"))
        self.failureResultOf(bad, psycopg2.DataError)
        self.successResultOf(pool.stop())

    def test_a_split_row_runs_one_call_at_a_time_while_others_pass(self) -> None:
        """After a failed batch is split, a row's lone calls run one at a time, in order, and
        its later writes wait behind them; other rows' writes go ahead meanwhile; a read never
        joins a batch but runs alone in the next free transaction."""
        pool = self.make(pool_size=2)
        self.write(pool, "r0", "r0")
        self.write(pool, "r9", "r9")  # both connections busy: what follows waits
        first = self.write(pool, "r1", "r1:1")
        second = self.write(pool, "r1", "r1:2")
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()],
                         [["r9"], ["r1:1", "r1:2"]])
        other = self.write(pool, "r5", "r5:1")
        read = self.read(pool)
        third = self.write(pool, "r1", "r1:3")
        with capturedLogs():
            self.open_transactions()[1][1].errback(psycopg2.DataError("invalid input"))
        self.assertEqual([items for items, _ in self.open_transactions()], [["r9"], ["r1:1"]])
        self.commit(0)  # r9 frees its connection: r1:2 must wait for r1:1, r5:1 need not
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:1"], ["r5:1"]])
        self.assertNoResult(read)
        self.commit(1)
        self.successResultOf(other)
        self.assertEqual(self.successResultOf(read), "rows")  # alone, on the freed connection
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:1"]])
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:2"]])
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:3"]])
        self.commit(0)
        self.assertEqual([self.successResultOf(call) for call in (first, second, third)],
                         ["done r1:1", "done r1:2", "done r1:3"])
        self.successResultOf(pool.stop())

    def test_a_later_write_never_passes_its_rows_lone_call(self) -> None:
        """A row's lone call that cannot join the batch being built (another row's write was
        taken first) holds back that row's later writes too: they never commit before it."""
        pool = self.make(pool_size=2)
        self.write(pool, "r0", "r0")
        self.write(pool, "r9", "r9")
        second = self.write(pool, "r1", "r1:1")
        self.write(pool, "r1", "r1:2")
        self.commit(0)
        with capturedLogs():
            self.open_transactions()[1][1].errback(psycopg2.DataError("invalid input"))
        third = self.write(pool, "r1", "r1:3")
        # r9's connection dies under it: r9 goes back to the head of the queue, before r1:2
        self.open_transactions()[0][1].errback(
            psycopg2.OperationalError("server closed the connection unexpectedly"))
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:1"]])
        self.commit(0)
        self.assertEqual(self.successResultOf(second), "done r1:1")
        self.assertEqual([items for items, _ in self.open_transactions()], [["r9"]])
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:2"]])
        self.commit(0)
        self.assertEqual([items for items, _ in self.open_transactions()], [["r1:3"]])
        self.commit(0)
        self.successResultOf(third)
        self.connections[1].detector.recover()
        self.successResultOf(pool.stop())

    def test_deadlock_is_retried(self) -> None:
        """A transaction PostgreSQL rolled back (deadlock, serialisation) simply runs again."""
        pool = self.make(pool_size=1)
        call = self.write(pool, "r1", "r1:1")
        self.open_transactions()[0][1].errback(psycopg2.errors.DeadlockDetected("deadlock"))
        self.assertNoResult(call)
        self.commit()
        self.successResultOf(call)
        self.successResultOf(pool.stop())

    def test_backlog_counts_events_across_rows(self) -> None:
        """max_pending_events bounds waiting events over all rows; freed room is usable again."""
        pool = self.make(pool_size=1, max_pending_events=3)
        first = self.write(pool, "r1", "r1:1", events=2)
        self.write(pool, "r2", "r2:1")
        with capturedLogs():
            self.failureResultOf(self.write(pool, "r2", "r2:2"), RelayStoreBacklogFull)
        self.commit()
        self.successResultOf(first)
        later = self.write(pool, "r2", "r2:2")
        self.commit()
        self.commit()
        self.successResultOf(later)
        self.successResultOf(pool.stop())

    def test_stop_moves_a_batch_cut_by_a_dead_connection_to_a_live_one(self) -> None:
        """While stop() drains, a batch whose connection turns out dead (PostgreSQL restarted
        under it) runs again on another connection instead of being dropped."""
        pool = self.make(pool_size=2)
        first = self.write(pool, "r1", "r1:1")
        second = self.write(pool, "r2", "r2:1")
        stopping = pool.stop()
        [(items, ran), _] = self.open_transactions()
        ran.errback(psycopg2.OperationalError("server closed the connection unexpectedly"))
        self.assertNoResult(stopping)
        self.commit()  # the live connection's own batch
        self.assertEqual(self.open_transactions()[0][0], items)  # the cut one, on that same one
        self.commit()
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(stopping)

    def test_stop_waits_then_gives_up_and_says_so(self) -> None:
        """stop() waits stop_timeout for queued calls, then errbacks the rest and closes."""
        pool = self.make(pool_size=1, stop_timeout=5.0)
        stuck = self.write(pool, "r1", "r1:1")
        queued = self.write(pool, "r1", "r1:2")
        stopping = pool.stop()
        self.assertNoResult(stopping)
        self.failureResultOf(self.write(pool, "r1", "r1:3"), RelayStoreStopped)
        with capturedLogs() as logged:
            self.clock.advance(5.0)
        self.successResultOf(stopping)
        self.failureResultOf(stuck, RelayStoreStopped)
        self.failureResultOf(queued, RelayStoreStopped)
        self.assertTrue(self.connections[0].closed and self.connections[0].detector.stopped)
        [said] = [e for e in logged if "not applied" in e.get("log_format", "")]
        self.assertEqual((said["count"], said["rows"]), (2, "r1"))

    def test_calls_wait_for_first_connection(self) -> None:
        """With the first connect failing, start() fires, says so once, and writes wait."""
        with capturedLogs() as logged:
            pool = self.make(pool_size=2, connect_error=psycopg2.OperationalError(
                'connection to server at "db.example" (192.0.2.9), port 5433 failed: '
                "Connection refused"))
        [said] = [e for e in logged if e["log_level"] is LogLevel.warn]
        self.assertIn("relay@db.example:5433/manager unreachable at start", said["log_format"]
                      .format(**said))
        self.assertIn("port 5433 failed: Connection refused", said["reason"])
        call = self.write(pool, "r1", "r1:1")
        self.assertEqual(self.transactions, [])
        self.failureResultOf(self.read(pool), RelayStoreUnavailable)
        self.connections[0].detector.recover()
        self.commit()
        self.successResultOf(call)
        self.successResultOf(pool.stop())

    def test_outage_is_one_warning_and_one_info(self) -> None:
        """Every connection dying is one "went away" warning naming the database; the first one
        back is one "is back" info; a single lost connection is no outage."""
        pool = self.make(pool_size=3)
        lost = Failure(psycopg2.OperationalError("server closed the connection unexpectedly"))
        with capturedLogs() as logged:
            self.connections[0].detector.checkForDeadConnection(lost)
            self.assertEqual(list(logged), [])  # two connections are still up
            self.connections[0].detector.recover()
            for connection in self.connections:
                connection.detector.checkForDeadConnection(lost)
            for connection in self.connections:
                connection.detector.recover()
        self.assertEqual(
            [(e["log_level"], e["log_format"].split(" {where} ")[1].split(" ")[0]) for e in logged],
            [(LogLevel.warn, "went"), (LogLevel.info, "is")])
        self.assertEqual({e["where"] for e in logged}, {"relay@db.example:5433/manager"})
        self.assertEqual(logged[0]["reason"], "server closed the connection unexpectedly")
        self.successResultOf(pool.stop())
