"""PostgreSQL behind the relay: :class:`PostgresRelayStore`, the :class:`IRelayStore` it provides.

::

    apply_events / fail_host_job ──▶ BatchingPool (lpa.relay.pool): queue, group commit,
                                       outages, stop
                                          │ one transaction for every row waiting
                                          ▼
                                     writepath.apply_batch (lpa.relay.writepath): the SQL,
                                          │ the parents' roll-up in lpa.relay.rollup,
                                          │ on connections from
                                          ▼
                                     lpa.relay.pgadapter: txpostgres without tracebacks

This module holds what ties them together: the calls of the interface, and when each row's
``patch_job_hosts.output`` is due a refresh.  A row's output lines are written at once to
``relay_output_pending`` and moved into ``output`` when the row has not been refreshed for
``output_interval`` seconds (checked on every batch of a small output, and by a timer every
quarter of the interval, which queues refresh-only transactions on their own lane), when the row
ends, at a clean stop, and at start for anything a previous relay left waiting.  So ``output`` is
at most about ``output_interval`` (+ a quarter, + a transaction) behind while a job runs, and
complete when its terminal notification fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.relay import writepath
from lpa.relay.interfaces import HostJob, IRelayStore
from lpa.relay.pgadapter import connection_factory as default_connection_factory
from lpa.relay.pool import (
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_POOL_SIZE,
    DEFAULT_STOP_TIMEOUT,
    BatchingPool,
    RelayStoreBacklogFull,
    RelayStoreError,
    RelayStoreStopped,
    RelayStoreUnavailable,
    Work,
)
from lpa.relay.writepath import CALL_EVENTS, CALL_FAIL, CALL_FOLD, BatchOutcome, RowCall

__all__ = [
    "PostgresRelayStore",
    "RelayStoreBacklogFull",
    "RelayStoreError",
    "RelayStoreStopped",
    "RelayStoreUnavailable",
    "default_connection_factory",
]

_log = Logger()

#: how stale ``patch_job_hosts.output`` may get while a job runs
DEFAULT_OUTPUT_INTERVAL = 1.0
#: forget a row's last refresh time after this long without writes (memory stays flat)
_FORGET_AFTER = 60.0
#: the pool lane (and its one connection) of refresh-only transactions
_REFRESH = "refresh"


@implementer(IRelayStore)
class PostgresRelayStore:
    """:class:`IRelayStore` on a small txpostgres pool with group commit.

    :param dsn: libpq URL or key/value string.
    :param clock: timers (reconnect backoff, output refresh, stop timeout).
    :param reactor: I/O for txpostgres.
    :param max_pending_events: events allowed to wait (queued or in flight) in total.
    :param connection_factory: makes an unconnected txpostgres-like Connection with a
        ``detector``; default :func:`lpa.relay.pgadapter.connection_factory`.
    :param pool_size: connections of the notifying transactions, each taking every row
        waiting; one more connection runs the refresh-only transactions.
    :param stop_timeout: how long :meth:`stop` waits for queued calls while the database is up.
    :param output_interval: seconds between refreshes of a running row's ``output``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock: IReactorTime,
        reactor: Any,
        max_pending_events: int = 10000,
        connection_factory: Callable[[], Any] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        output_interval: float = DEFAULT_OUTPUT_INTERVAL,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
    ) -> None:
        self._clock = clock
        self._output_interval = output_interval
        self._pool = BatchingPool(
            dsn,
            clock=clock,
            run_batch=self._run_batch,
            on_commit=self._committed,
            connection_factory=connection_factory or default_connection_factory(reactor, clock),
            pool_size=pool_size,
            lanes={_REFRESH: 1},
            max_pending_events=max_pending_events,
            max_batch_events=max_batch_events,
            stop_timeout=stop_timeout,
        )
        #: row -> when its output last got every pending line (clock seconds)
        self._refreshed: dict[str, float] = {}
        #: rows with lines in relay_output_pending, as far as this relay knows -> since when
        self._pending: dict[str, float] = {}
        self._refresher = LoopingCall(self._refresh_due)
        self._refresher.clock = clock
        self._stopping = False
        self._observers: list[Callable[..., None]] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Deferred[Any]:
        """Open the pool; fires once every first attempt ended (never errbacks).

        Connections that could not open keep retrying in the background; calls wait for them.
        Output lines a previous relay left waiting are moved into their rows first.
        """
        started = self._pool.start()

        def then(_: object) -> None:
            self._look_for_waiting_lines()
            self._refresher.start(self._output_interval / 4, now=False).addErrback(
                lambda failure: _log.failure("output refresh loop ended", failure)
            )

        return started.addCallback(then)

    def _look_for_waiting_lines(self) -> None:
        """Refresh every row with lines in relay_output_pending (at start and at stop)."""
        self._pool.submit(
            Work(
                row_id=None,
                result=Deferred(),
                events=0,
                description="rows with output waiting",
                run=lambda tx: Deferred.fromCoroutine(writepath.rows_with_pending_output(tx)),
            )
        ).addCallbacks(self._refresh_rows, self._sweep_failed)

    def _sweep_failed(self, failure: Failure) -> None:
        if not failure.check(RelayStoreStopped):
            _log.warn("could not look for output left waiting: {error}",
                      error=failure.getErrorMessage())

    def stop(self) -> Deferred[Any]:
        """Apply what is queued (if the database is up, within ``stop_timeout``), then close.

        While it drains, every row written is refreshed, and so is every row with lines waiting:
        a clean stop leaves each ``output`` complete.
        """
        if self._refresher.running:
            self._refresher.stop()
        self._stopping = True
        if self._pool.database_up():  # every row with lines waiting, whoever left them
            self._look_for_waiting_lines()
        return self._pool.stop()

    # -- what the relay's metrics read ------------------------------------------------------

    def database_up(self) -> bool:
        """A connection to the database is up."""
        return self._pool.database_up()

    def pool_stats(self) -> dict[str, int]:
        """``{size, up, in_use, waiting, pending_events}`` of the connection pool."""
        return self._pool.stats()

    def observe_transactions(self, callback: Callable[..., None]) -> None:
        """Call ``callback(rows, payloads)`` after each write transaction commits: the calls it
        carried, and ``(event_type, bytes)`` of each notification it sent."""
        self._observers.append(callback)

    # -- IRelayStore ------------------------------------------------------------------------

    def running_host_jobs(self) -> Deferred[Any]:
        return self._pool.submit(
            Work(
                row_id=None,
                result=Deferred(),
                events=0,
                description="running_host_jobs",
                run=lambda tx: Deferred.fromCoroutine(writepath.running_host_jobs(tx)),
                retry_on_dead=False,
            )
        )

    def apply_events(
        self, host_job: HostJob, events: Sequence[Any], transport: str
    ) -> Deferred[Any]:
        events = tuple(events)
        call = RowCall(kind=CALL_EVENTS, row_id=host_job.row_id, host_job=host_job,
                       events=events, transport=transport)
        return self._submit(call, max(1, len(events)),
                            f"{len(events)} events for row {host_job.row_id}")

    def fail_host_job(self, host_job: HostJob, reason: str, transport: str) -> Deferred[Any]:
        call = RowCall(kind=CALL_FAIL, row_id=host_job.row_id, host_job=host_job,
                       reason=reason, transport=transport)
        return self._submit(call, 1, f"failing row {host_job.row_id}")

    def _submit(self, call: RowCall, events: int, description: str) -> Deferred[Any]:
        return self._pool.submit(
            Work(row_id=call.row_id, result=Deferred(), events=events, description=description,
                 item=call)
        )

    # -- output refresh ---------------------------------------------------------------------

    def _run_batch(self, tx: Any, calls: list[RowCall]) -> Deferred[Any]:
        return Deferred.fromCoroutine(writepath.apply_batch(tx, calls, due=self._due))

    def _due(self, row_id: str) -> bool:
        if self._stopping:
            return True
        last = self._refreshed.get(row_id)
        return last is None or self._clock.seconds() - last >= self._output_interval

    def _committed(self, outcome: BatchOutcome) -> None:
        for observe in self._observers:
            observe(len(outcome.results), outcome.payloads)
        now = self._clock.seconds()
        for row_id in outcome.folded:
            self._refreshed[row_id] = now
            self._pending.pop(row_id, None)
        for row_id in outcome.pending:
            self._pending.setdefault(row_id, now)
        for row_id in outcome.finished:
            self._refreshed.pop(row_id, None)
            self._pending.pop(row_id, None)
        if self._stopping:  # a transaction that began before stop() left lines waiting
            for row_id in sorted(outcome.pending - outcome.finished):
                self._fold(row_id)

    def _refresh_due(self) -> None:
        """Timer: refresh rows whose oldest waiting line waited ``output_interval``.

        A row that keeps streaming small output is refreshed by its own next transaction (see
        ``_due``); this catches rows gone quiet and outputs too large for that.
        """
        now = self._clock.seconds()
        busy = self._pool.rows_with_work()
        for row_id in [r for r, since in self._pending.items()
                       if r not in busy and now - since >= self._output_interval]:
            self._fold(row_id)
        stale = [r for r, at in self._refreshed.items()
                 if now - at > _FORGET_AFTER and r not in self._pending]
        for row_id in stale:
            del self._refreshed[row_id]

    def _refresh_rows(self, row_ids: list[str]) -> None:
        for row_id in row_ids:
            self._pending.setdefault(row_id, self._clock.seconds())
            self._fold(row_id)

    def _fold(self, row_id: str) -> None:
        """Queue a refresh-only call; while stopping, on the notifying connections (the
        refresh connection may still be reconnecting) and accepted as part of the drain."""
        work = Work(row_id=row_id, result=Deferred(), events=0,
                    description=f"output refresh of row {row_id}",
                    item=RowCall(kind=CALL_FOLD, row_id=row_id),
                    lane="events" if self._stopping else _REFRESH)
        submitted = self._pool.submit(work, while_draining=self._stopping)
        submitted.addErrback(self._fold_failed, row_id)

    def _fold_failed(self, failure: Failure, row_id: str) -> None:
        if not failure.check(RelayStoreStopped, RelayStoreBacklogFull):
            _log.warn("could not refresh the output of row {row_id}: {error}",
                      row_id=row_id, error=failure.getErrorMessage())
