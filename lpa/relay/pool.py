"""A few txpostgres connections that group waiting writes into one transaction each.

::

    submit(work) ──▶ queue (bounded: max_pending_events events in total)
                       │  whenever a connection is free, it takes EVERY waiting write whose row
                       │  is not in flight elsewhere (a row's writes stay in order, one
                       │  transaction at a time), up to max_batch_events, and runs them as ONE
                       │  transaction: run_batch(cursor, items) → outcome.results
                       ▼
                  free connection ──BEGIN … COMMIT──▶ each work's Deferred fires with its result

So under load the number of transactions (and of notifying commits, which PostgreSQL serialises
cluster-wide) stays about constant while the events per transaction grow, and an idle relay
still writes each event at once.  A work not tied to a row (a read) runs alone.

Faults:

* a transaction cut by a dead connection goes back to the head of the queue, in order, and runs
  again once a connection recovers (re-running is safe: events at or below ``relay_last_seq``
  are skipped); while PostgreSQL is down writes wait, up to ``max_pending_events`` events, past
  that they errback with :class:`RelayStoreBacklogFull`; reads never wait
  (:class:`RelayStoreUnavailable`);
* a deadlock or serialisation failure is retried the same way;
* any other failure of a batch of several works re-runs them one transaction each, so only the
  work that really fails errbacks;
* each ``lane`` has its own connections: the store's output refreshes (rewriting a large
  TOASTed value) never hold up the notifying transactions;
* the outage is logged once: one ``warn`` when the last connection is found dead ("went away"),
  one ``info`` when the first is back, each naming ``user@host:port/database``.

The module is over 400 lines on purpose: queueing, batching, lanes, the drain at stop and the
outage log all act on one queue and one set of connection slots; split, each part would reach
into the others' state.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import attr
import psycopg2
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.errors import LpaError
from lpa.relay.pgadapter import describe_dsn, first_line, is_connection_failure

_log = Logger()

#: two: one transaction commits (notifying commits hold PostgreSQL's NOTIFY lock through their WAL
#: flush, one at a time cluster-wide) while the next one is built; more connections only split the
#: waiting rows into smaller transactions that still commit one after another
DEFAULT_POOL_SIZE = 2
DEFAULT_STOP_TIMEOUT = 5.0
#: one transaction applies at most this many events (bounds its statements' size)
DEFAULT_MAX_BATCH_EVENTS = 5000

STARTING = "starting"
UP = "up"
DOWN = "down"


class RelayStoreError(LpaError):
    """Base of the store's own errors."""


class RelayStoreBacklogFull(RelayStoreError):
    """Too many events wait for PostgreSQL; resubscribe from the row's ``relay_last_seq`` later."""


class RelayStoreUnavailable(RelayStoreError):
    """No database connection is up (for reads, which never wait for an outage)."""


class RelayStoreStopped(RelayStoreError):
    """The store is stopping or stopped; the call was not applied."""


@attr.s(auto_attribs=True, eq=False)
class Work:
    """One queued call."""

    row_id: str | None  # None: not tied to a row; runs alone with ``run``
    result: Deferred[Any]
    events: int  # what it counts against max_pending_events
    description: str
    item: Any = None  # what run_batch gets for a row's work
    #: transaction -> Deferred (work that needs no row)
    run: Callable[[Any], Deferred[Any]] | None = None
    retry_on_dead: bool = True
    alone: bool = False  # run in a transaction of its own (its batch failed)
    #: works of different lanes never share a transaction (the store keeps output refreshes,
    #: which notify nobody, out of the notifying transactions)
    lane: str = "events"


@attr.s(auto_attribs=True, eq=False)
class _Slot:
    """One connection; whether it is usable comes from its detector (the one source of truth)."""

    connection: Any
    lane: str = "events"  # the works it runs
    connected: bool = False  # it connected at least once (after that the detector knows)
    busy: bool = False
    closed: bool = False

    @property
    def up(self) -> bool:
        return self.connected and not self.closed and not self.connection.detector.connectionIsDead

    @property
    def ready(self) -> bool:
        return self.up and not self.busy


class BatchingPool:
    """Connections, a queue, group commit.

    :param run_batch: ``run_batch(transaction, items) -> Deferred`` firing with an object whose
        ``results`` list answers ``items`` in order; runs inside the transaction (each
        connection's ``runTransaction``, see :mod:`lpa.relay.pgadapter`).
    :param on_commit: called with that object after the transaction committed.
    :param connection_factory: makes an unconnected txpostgres-like Connection with a
        ``detector`` (see :mod:`lpa.relay.pgadapter`).
    :param pool_size: connections of the ``events`` lane (writes and reads).
    :param lanes: more lanes and their connections, e.g. ``{"refresh": 1}``: a lane's works run
        only on its own connections, so a slow lane never holds up another.
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock: IReactorTime,
        run_batch: Callable[[Any, list[Any]], Deferred[Any]],
        connection_factory: Callable[[], Any],
        on_commit: Callable[[Any], None] = lambda outcome: None,
        pool_size: int = DEFAULT_POOL_SIZE,
        lanes: dict[str, int] | None = None,
        max_pending_events: int = 10000,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self._clock = clock
        self._run_batch = run_batch
        self._on_commit = on_commit
        self._factory = connection_factory
        self._lanes = {"events": pool_size, **(lanes or {})}
        self._max_pending_events = max_pending_events
        self._max_batch_events = max_batch_events
        self._stop_timeout = stop_timeout
        self._slots: list[_Slot] = []
        self._queue: collections.deque[Work] = collections.deque()
        self._busy_rows: set[str] = set()
        self._in_flight: dict[int, list[Work]] = {}
        self._pending_events = 0
        self._stopping = False
        self._drained: Deferred[Any] | None = None
        self.state = STARTING
        #: committed transactions and the calls they answered (logged at close)
        self.transactions = 0
        self.calls = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Deferred[Any]:
        """Open the connections; fires once every first attempt ended (never errbacks).

        Connections that could not open keep retrying in the background; writes wait for them.
        """
        attempts = []
        failures: list[Failure] = []
        for lane, count in self._lanes.items():
            self._slots.extend(_Slot(connection=self._factory(), lane=lane) for _ in range(count))
        for slot in self._slots:
            detector = slot.connection.detector
            detector.addRecoveryHandler(lambda slot=slot: self._recovered(slot))
            if hasattr(detector, "on_dead"):
                detector.on_dead = lambda failure, slot=slot: self._died(slot, failure)
            attempt = slot.connection.connect(self._dsn)
            attempt.addCallbacks(
                lambda _, slot=slot: self._recovered(slot),
                lambda failure, slot=slot: self._connect_failed(slot, failure, failures),
            )
            attempts.append(attempt)

        def report(_: object) -> None:
            up = sum(1 for slot in self._slots if slot.up)
            if up:
                self.state = UP
                _log.info(
                    "relay store connected to {where} ({up}/{size} connections)",
                    where=self.where, up=up, size=len(self._slots),
                )
                return
            self.state = DOWN
            _log.warn(
                "database {where} unreachable at start ({reason}); retrying, writes wait",
                where=self.where,
                reason=first_line(failures[0]) if failures else "no connection",
            )

        return defer.gatherResults(attempts, consumeErrors=True).addCallback(report)

    def _connect_failed(self, slot: _Slot, failure: Failure, failures: list[Failure]) -> None:
        if slot.closed:
            return
        failures.append(failure)
        slot.connection.detector.checkForDeadConnection(failure)

    def _died(self, slot: _Slot, failure: Failure) -> None:
        """A connection was found dead; the last one to die means the database went away."""
        if self.state != UP or self._stopping or any(other.up for other in self._slots):
            return
        self.state = DOWN
        _log.warn(
            "database {where} went away ({reason}); {events} events wait and are applied "
            "when it returns",
            where=self.where,
            reason=first_line(failure),
            events=self._pending_events,
        )

    def _recovered(self, slot: _Slot) -> None:
        if slot.closed:
            return
        slot.connected = True
        if self.state == DOWN and not self._stopping:
            self.state = UP
            _log.info(
                "database {where} is back; applying {events} waiting events",
                where=self.where,
                events=self._pending_events,
            )
        self._dispatch()

    def database_up(self) -> bool:
        return any(slot.up for slot in self._slots)

    def stats(self) -> dict[str, int]:
        """Connections configured, up, running a transaction; calls and events waiting."""
        return {
            "size": len(self._slots),
            "up": sum(1 for slot in self._slots if slot.up),
            "in_use": sum(1 for slot in self._slots if slot.busy),
            "waiting": len(self._queue),
            "pending_events": self._pending_events,
        }

    def stop(self) -> Deferred[Any]:
        """Apply what is queued (if the database is up, within ``stop_timeout``), then close."""
        self._stopping = True
        waiting: Deferred[Any] = Deferred()
        if (self._queue or self._in_flight) and self.database_up():
            self._drained = waiting
            timer = self._clock.callLater(self._stop_timeout, self._give_up_draining)

            def cancel_timer(result: object) -> object:
                if timer.active():
                    timer.cancel()
                return result

            waiting.addBoth(cancel_timer)
        else:
            waiting.callback(None)
        return waiting.addCallback(lambda _: self._close())

    def _give_up_draining(self) -> None:
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _close(self) -> None:
        _log.info(
            "relay store closing: {calls} calls applied in {transactions} transactions",
            calls=self.calls, transactions=self.transactions,
        )
        leftovers = [w for works in self._in_flight.values() for w in works] + list(self._queue)
        if leftovers:
            rows = sorted({work.row_id for work in leftovers if work.row_id})
            _log.error(
                "relay store stopped with {count} events not applied (rows {rows}); "
                "the relay resubscribes from relay_last_seq next start",
                count=sum(work.events for work in leftovers),
                rows=", ".join(rows),
            )
        self._queue.clear()
        self._in_flight.clear()
        self._busy_rows.clear()
        self._pending_events = 0
        for work in leftovers:
            if not work.result.called:
                work.result.errback(
                    RelayStoreStopped("relay store stopped before this was applied")
                )
        for slot in self._slots:
            slot.closed = True
            stop_reconnecting = getattr(slot.connection.detector, "stop", None)
            if stop_reconnecting is not None:  # ours; a plain txpostgres detector cannot
                stop_reconnecting()
            with contextlib.suppress(Exception):  # never connected, or already gone
                slot.connection.close()

    # -- queueing ---------------------------------------------------------------------------

    def submit(self, work: Work, *, while_draining: bool = False) -> Deferred[Any]:
        """Queue ``work``; its ``result`` fires when it committed (or errbacks).

        :param while_draining: accepted while :meth:`stop` still applies what is queued (the
            store's own last output refreshes); refused once the pool closed.
        """
        if self._stopping and not (while_draining and self._drained is not None):
            return defer.fail(RelayStoreStopped("relay store is stopping"))
        if not work.retry_on_dead and not self.database_up():  # reads never wait
            return defer.fail(RelayStoreUnavailable(f"no connection to {self.where} is up"))
        too_many = self._pending_events + work.events > self._max_pending_events
        if work.row_id is not None and too_many:
            _log.warn(
                "relay store backlog full ({pending} events waiting); refused {what}",
                pending=self._pending_events,
                what=work.description,
            )
            return defer.fail(
                RelayStoreBacklogFull(
                    f"{self._pending_events} events already wait for the database "
                    f"(max_pending_events={self._max_pending_events})"
                )
            )
        self._pending_events += work.events
        self._queue.append(work)
        self._dispatch()
        return work.result

    def rows_with_work(self) -> set[str]:
        """Rows with a call queued or in flight."""
        return self._busy_rows | {work.row_id for work in self._queue if work.row_id is not None}

    @property
    def pending_events(self) -> int:
        return self._pending_events

    def _next_batch(self, lane: str) -> list[Work]:
        """The works ``lane``'s next transaction runs: a lone one, or every eligible row's."""
        taken: list[Work] = []
        blocked = set(self._busy_rows)  # a row waits while an earlier call of it is not taken
        events = 0
        for work in self._queue:
            if work.lane != lane:
                if work.row_id is not None:
                    blocked.add(work.row_id)
                continue
            if work.row_id is None or work.alone:
                if not taken and work.row_id not in blocked:
                    taken = [work]
                    break
                if work.row_id is not None:
                    blocked.add(work.row_id)
                continue
            if work.row_id in blocked:
                continue
            if taken and events + work.events > self._max_batch_events:
                blocked.add(work.row_id)
                continue
            taken.append(work)
            events += work.events
        if taken:
            chosen = {id(work) for work in taken}
            self._queue = collections.deque(w for w in self._queue if id(w) not in chosen)
        return taken

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not slot.ready:
                continue
            works = self._next_batch(slot.lane)
            if works:
                self._run(slot, works)
        self._check_drained()

    def _run(self, slot: _Slot, works: list[Work]) -> None:
        slot.busy = True
        self._busy_rows.update(work.row_id for work in works if work.row_id is not None)
        self._in_flight[id(works)] = works
        lone = works[0].run if len(works) == 1 else None
        if lone is not None:
            ran = slot.connection.runTransaction(lone)
        else:
            ran = slot.connection.runTransaction(
                lambda tx: self._run_batch(tx, [work.item for work in works])
            )
        ran.addCallbacks(
            lambda result: self._finished(slot, works, result, None),
            lambda failure: self._finished(slot, works, None, failure),
        )

    def _finished(
        self, slot: _Slot, works: list[Work], result: Any, failure: Failure | None
    ) -> None:
        if self._in_flight.pop(id(works), None) is None:
            return  # the pool was closed meanwhile and already answered the callers
        for work in works:
            if work.row_id is not None:
                self._busy_rows.discard(work.row_id)
        slot.busy = False
        if failure is None:
            self._succeeded(works, result)
        elif is_connection_failure(failure):
            self._requeue_or_fail(works, failure, dead=True)
        elif failure.check(psycopg2.extensions.TransactionRollbackError):
            _log.warn(
                "database {where} rolled back a transaction of {count} calls ({reason}); "
                "running it again",
                where=self.where, count=len(works), reason=first_line(failure),
            )
            self._requeue_or_fail(works, failure, dead=False)
        elif len(works) > 1:
            _log.warn(
                "a transaction of {count} calls failed ({reason}); running them one by one",
                count=len(works), reason=first_line(failure),
            )
            for work in works:
                work.alone = True
            self._queue.extendleft(reversed(works))
        else:
            self._answer(works[0], failure)
        self._dispatch()

    def _succeeded(self, works: list[Work], result: Any) -> None:
        self.transactions += 1
        self.calls += len(works)
        if len(works) == 1 and works[0].run is not None:
            self._answer(works[0], result)
            return
        try:
            self._on_commit(result)
        except Exception:
            _log.failure("relay store bookkeeping after a commit failed")
        for work, answer in zip(works, result.results, strict=True):
            self._answer(work, answer)

    def _requeue_or_fail(self, works: list[Work], failure: Failure, *, dead: bool) -> None:
        # while stop() drains, a batch cut by a connection the restart killed goes to another
        # (within stop_timeout): the last output refreshes must not be dropped on the floor
        draining = self._drained is not None
        keep = [work for work in works
                if work.retry_on_dead and (not self._stopping or draining)]
        self._queue.extendleft(reversed(keep))  # they were the oldest of their rows: order kept
        for work in works:
            if work not in keep:
                error: Any = failure
                if dead:
                    error = RelayStoreUnavailable(f"connection to {self.where} lost: "
                                                  f"{first_line(failure)}")
                self._answer(work, error)
        if dead and not self.database_up():
            self._fail_waiting_reads()

    def _answer(self, work: Work, outcome: Any) -> None:
        self._pending_events -= work.events
        if isinstance(outcome, (Failure, Exception)):
            work.result.errback(outcome)
        else:
            work.result.callback(outcome)

    def _fail_waiting_reads(self) -> None:
        """Reads never wait for an outage: the scanner asks again on its next tick."""
        reads = [work for work in self._queue if not work.retry_on_dead]
        for work in reads:
            self._queue.remove(work)
            self._answer(work, RelayStoreUnavailable(f"no connection to {self.where} is up"))

    def _check_drained(self) -> None:
        if self._drained is not None and not self._queue and not self._in_flight:
            drained, self._drained = self._drained, None
            drained.callback(None)
