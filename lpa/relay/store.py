"""PostgreSQL behind the relay: one transaction per call, notifications inside it.

Flow of one ``apply_events`` call::

    caller ──apply_events──▶ queue (bounded: max_pending_events events in total)
                               │ per row FIFO; one call per row at a time, rows in parallel
                               ▼
                        free connection ──BEGIN
                               SELECT … FROM patch_job_hosts WHERE id = $row FOR UPDATE
                               rows.reduce_events()          (pure rules, see lpa.relay.rows)
                               UPDATE patch_job_hosts … WHERE status NOT IN (terminal)
                               pg_notify('job_update', host payload)       (one, the last state)
                               [row turned terminal]
                                 SELECT … FROM patch_jobs WHERE id = $job FOR UPDATE
                                 count host rows → rows.rollup_status()
                                 UPDATE patch_jobs … ; pg_notify(job payload)  (exactly once)
                             COMMIT ──▶ ApplyResult

Why this shape (the original relay's bugs): update, roll-up and notify were separate
autocommit statements, so a crash lost notifications and two hosts finishing together both rolled
the job up.  Here the parent row lock serialises the roll-ups: under READ COMMITTED the second
transaction's count (a new statement after it gets the lock) sees the first one's committed row,
so exactly one of them sees "every host terminal".

Faults: every connection has a :class:`DeadConnectionDetector` (txpostgres stays dead after a
server restart without one).  A call whose transaction fails because the connection died goes
back to the head of its row's queue and runs again once a connection recovers; re-running is safe
because events at or below ``relay_last_seq`` are skipped.  While PostgreSQL is down calls wait,
up to ``max_pending_events`` events in total; past that they errback with
:class:`RelayStoreBacklogFull` and the caller resubscribes later from the row's ``relay_last_seq``
(the agent keeps its events).  ``running_host_jobs`` never waits for an outage: it fails with
:class:`RelayStoreUnavailable` so the scanner just tries again on its next tick.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import attr
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import retrying, txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from zope.interface import implementer

from lpa.errors import LpaError
from lpa.relay import notify
from lpa.relay.interfaces import AgentAddress, ApplyResult, HostJob, IRelayStore
from lpa.relay.rows import (
    DB_TERMINAL,
    ROW_MISSING,
    Reduction,
    RowState,
    fail_state,
    reduce_events,
    rollup_status,
)

_log = Logger()

DEFAULT_POOL_SIZE = 4
DEFAULT_STOP_TIMEOUT = 5.0
_TERMINAL_SQL = "('succeeded', 'failed', 'cancelled')"


class RelayStoreError(LpaError):
    """Base of the store's own errors."""


class RelayStoreBacklogFull(RelayStoreError):
    """Too many events wait for PostgreSQL; resubscribe from the row's ``relay_last_seq`` later."""


class RelayStoreUnavailable(RelayStoreError):
    """No database connection is up (for reads, which never wait for an outage)."""


class RelayStoreStopped(RelayStoreError):
    """The store is stopping or stopped; the call was not applied."""


def reconnect_delays() -> Any:
    """Reconnect at once, then back off from 0.5 s to at most 5 s (txpostgres caps at 10 s)."""
    return retrying.simpleBackoffIterator(
        initialDelay=0.5, maxDelay=5.0, factor=1.7, maxRetries=0, now=True
    )


class _Detector(DeadConnectionDetector):
    """A detector whose reconnect loop can be cancelled, so a stopped store leaves no timers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._retrying: Deferred | None = None
        self.stopped = False

    def startReconnecting(self, f: Failure) -> None:  # noqa: N802 (txpostgres hook)
        if self.stopped:
            return
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        retrying_deferred = call.start(self.reconnectionIterator())
        self._retrying = retrying_deferred

        def recovered(_: object) -> Any:
            self._retrying = None
            return self.connectionRecovered()

        def failed(failure: Failure) -> None:
            self._retrying = None
            if not failure.check(CancelledError):
                _log.failure("database reconnect loop ended", failure)

        retrying_deferred.addCallbacks(recovered, failed)

    def stop(self) -> None:
        self.stopped = True
        if self._retrying is not None:
            self._retrying.cancel()


class _QuietConnection(txpostgres.Connection):
    """A Connection whose failed rollback on a dead connection is not logged as an Unhandled Error.

    txpostgres logs a traceback (``cursor already closed``) for every transaction cut by a
    connection loss; the store already reports the loss once, as a warning.
    """

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred:  # noqa: N802
        cursor = self.cursor()
        ran = cursor.execute("begin")
        ran.addCallback(interaction, *args, **kwargs)

        def commit(result: Any) -> Deferred:
            return cursor.execute("commit").addCallback(lambda _: result)

        def rollback(failure: Failure) -> Deferred:
            undone = defer.maybeDeferred(cursor.execute, "rollback")
            undone.addErrback(lambda _: Failure(txpostgres.RollbackFailed(self, failure)))
            return undone.addCallback(lambda _: failure)

        return ran.addCallback(commit).addErrback(rollback)


def _connection_failure(connection: Any, failure: Failure) -> bool:
    """The call failed because the connection did (not because of the call): worth a retry.

    Judged from the failure itself, not from the detector's current state, which may already
    have recovered by the time the failure arrives.
    """
    return bool(failure.check(ConnectionDead) or connection.detector.deathChecker(failure))


def default_connection_factory(reactor: Any, clock: IReactorTime) -> Callable[[], Any]:
    """Unconnected txpostgres Connections, each with its own cancellable dead-connection detector."""

    def make() -> txpostgres.Connection:
        detector = _Detector(reconnectionIterator=reconnect_delays, reactor=clock)
        return _QuietConnection(reactor=reactor, detector=detector)

    return make


@attr.s(auto_attribs=True)
class _Slot:
    """One connection; whether it is usable comes from its detector (the one source of truth)."""

    connection: Any
    connected: bool = False  # it connected at least once (after that the detector knows)
    busy: bool = False
    closed: bool = False

    @property
    def up(self) -> bool:
        return self.connected and not self.closed and not self.connection.detector.connectionIsDead

    @property
    def ready(self) -> bool:
        return self.up and not self.busy


@attr.s(auto_attribs=True, eq=False)
class _Work:
    """One queued call."""

    row_id: str | None  # None: a read, not tied to a row
    run: Callable[[Any], Deferred]  # cursor -> Deferred (the transaction body)
    result: Deferred
    events: int  # what it counts against max_pending_events
    retry_on_dead: bool
    description: str


@implementer(IRelayStore)
class PostgresRelayStore:
    """:class:`IRelayStore` on a small txpostgres connection pool.

    :param dsn: libpq URL or key/value string.
    :param clock: timers (reconnect backoff, stop timeout).
    :param reactor: I/O for txpostgres.
    :param max_pending_events: events allowed to wait (queued or in flight) in total.
    :param connection_factory: makes an unconnected txpostgres-like Connection with a
        ``detector``; default :func:`default_connection_factory`.
    :param pool_size: connections; rows are written in parallel, one call per row at a time.
    :param stop_timeout: how long :meth:`stop` waits for queued calls while the database is up.
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
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._max_pending_events = max_pending_events
        self._factory = connection_factory or default_connection_factory(reactor, clock)
        self._pool_size = pool_size
        self._stop_timeout = stop_timeout
        self._slots: list[_Slot] = []
        self._queue: collections.deque[_Work] = collections.deque()
        self._busy_rows: set[str] = set()
        self._in_flight: dict[int, _Work] = {}
        self._pending_events = 0
        self._stopping = False
        self._drained: Deferred | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Open the pool; fires once every first attempt ended (never errbacks).

        Connections that could not open keep retrying in the background; calls wait for them.
        """
        attempts = []
        for _ in range(self._pool_size):
            slot = _Slot(connection=self._factory())
            self._slots.append(slot)
            slot.connection.detector.addRecoveryHandler(lambda slot=slot: self._recovered(slot))
            attempt = slot.connection.connect(self._dsn)
            attempt.addCallbacks(
                lambda _, slot=slot: self._recovered(slot),
                lambda failure, slot=slot: self._connect_failed(slot, failure),
            )
            attempts.append(attempt)

        def report(_: object) -> None:
            up = sum(1 for slot in self._slots if slot.up)
            if up == 0:
                _log.warn("database unreachable at start; retrying, calls will wait")
            else:
                _log.info("relay store connected ({up}/{size} connections)", up=up, size=len(self._slots))

        return defer.gatherResults(attempts, consumeErrors=True).addCallback(report)

    def _connect_failed(self, slot: _Slot, failure: Failure) -> None:
        if slot.closed:
            return
        first_line = (str(failure.value).strip().splitlines() or [failure.type.__name__])[0]
        _log.warn("database connection failed: {reason}", reason=first_line)
        slot.connection.detector.checkForDeadConnection(failure)

    def _recovered(self, slot: _Slot) -> None:
        if slot.closed:
            return
        if slot.connected:
            _log.info("database connection recovered")
        slot.connected = True
        self._dispatch()

    def _database_up(self) -> bool:
        return any(slot.up for slot in self._slots)

    def stop(self) -> Deferred:
        """Apply what is queued (if the database is up, within ``stop_timeout``), then close."""
        self._stopping = True
        waiting: Deferred = Deferred()
        if (self._queue or self._in_flight) and self._database_up():
            self._drained = waiting
            timer = self._clock.callLater(self._stop_timeout, self._give_up_draining)
            waiting.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        else:
            waiting.callback(None)
        return waiting.addCallback(lambda _: self._close())

    def _give_up_draining(self) -> None:
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _close(self) -> None:
        leftovers = list(self._in_flight.values()) + list(self._queue)
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
                work.result.errback(RelayStoreStopped("relay store stopped before this was applied"))
        for slot in self._slots:
            slot.closed = True
            stop_reconnecting = getattr(slot.connection.detector, "stop", None)
            if stop_reconnecting is not None:  # ours; a plain txpostgres detector cannot
                stop_reconnecting()
            try:
                slot.connection.close()
            except Exception:  # never connected, or already gone
                pass

    # -- scheduling -------------------------------------------------------------------------

    def _submit(self, work: _Work) -> Deferred:
        if self._stopping:
            return defer.fail(RelayStoreStopped("relay store is stopping"))
        if work.row_id is not None and self._pending_events + work.events > self._max_pending_events:
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

    def _next_work(self) -> _Work | None:
        for work in self._queue:
            if work.row_id is None or work.row_id not in self._busy_rows:
                self._queue.remove(work)
                return work
        return None

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not slot.ready:
                continue
            work = self._next_work()
            if work is None:
                break
            self._run(slot, work)
        self._check_drained()

    def _run(self, slot: _Slot, work: _Work) -> None:
        slot.busy = True
        if work.row_id is not None:
            self._busy_rows.add(work.row_id)
        self._in_flight[id(work)] = work
        ran = slot.connection.runInteraction(work.run)
        ran.addCallbacks(
            lambda result: self._finished(slot, work, result, None),
            lambda failure: self._finished(slot, work, None, failure),
        )

    def _finished(self, slot: _Slot, work: _Work, result: Any, failure: Failure | None) -> None:
        if self._in_flight.pop(id(work), None) is None:
            return  # the store was closed meanwhile and already answered the caller
        if work.row_id is not None:
            self._busy_rows.discard(work.row_id)
        slot.busy = False
        dead = failure is not None and _connection_failure(slot.connection, failure)
        if dead and work.retry_on_dead and not self._stopping:
            _log.warn(
                "database connection lost during {what}; it waits for reconnection",
                what=work.description,
            )
            self._queue.appendleft(work)  # it was the oldest of its row: order is kept
        else:
            self._pending_events -= work.events
            if failure is None:
                work.result.callback(result)
            else:
                if dead and not work.retry_on_dead:
                    failure = Failure(RelayStoreUnavailable(f"database connection lost: {failure.value}"))
                work.result.errback(failure)
        if dead and not self._database_up():
            self._fail_waiting_reads()
        self._dispatch()

    def _fail_waiting_reads(self) -> None:
        """Reads never wait for an outage: the scanner asks again on its next tick."""
        reads = [work for work in self._queue if work.row_id is None]
        for work in reads:
            self._queue.remove(work)
            work.result.errback(RelayStoreUnavailable("no database connection is up"))

    def _check_drained(self) -> None:
        if self._drained is not None and not self._queue and not self._in_flight:
            drained, self._drained = self._drained, None
            drained.callback(None)

    # -- IRelayStore ------------------------------------------------------------------------

    def running_host_jobs(self) -> Deferred:
        if not self._stopping and not self._database_up():
            return defer.fail(RelayStoreUnavailable("no database connection is up"))
        return self._submit(
            _Work(
                row_id=None,
                run=_running_host_jobs_tx,
                result=Deferred(),
                events=0,
                retry_on_dead=False,
                description="running_host_jobs",
            )
        )

    def apply_events(self, host_job: HostJob, events: Sequence, transport: str) -> Deferred:
        events = tuple(events)
        return self._submit(
            _Work(
                row_id=host_job.row_id,
                run=lambda cursor: Deferred.fromCoroutine(
                    _write_row(
                        cursor,
                        host_job,
                        transport,
                        lambda state: reduce_events(state, host_job.agent_job_id, events),
                    )
                ),
                result=Deferred(),
                events=max(1, len(events)),
                retry_on_dead=True,
                description=f"{len(events)} events for row {host_job.row_id}",
            )
        )

    def fail_host_job(self, host_job: HostJob, reason: str, transport: str) -> Deferred:
        return self._submit(
            _Work(
                row_id=host_job.row_id,
                run=lambda cursor: Deferred.fromCoroutine(
                    _write_row(cursor, host_job, transport, lambda state: fail_state(state, reason))
                ),
                result=Deferred(),
                events=1,
                retry_on_dead=True,
                description=f"failing row {host_job.row_id}",
            )
        )


# -- the transactions (cursor: txpostgres Cursor; each execute returns a Deferred) ---------------

_RUNNING_SQL = """
SELECT pjh.id::text, pjh.job_id::text, pjh.host_id::text, pjh.agent_job_id,
       COALESCE(NULLIF(h.fqdn, ''), host(h.ip_address)) AS address, h.agent_port,
       CASE WHEN pjh.relay_agent_job_id = pjh.agent_job_id THEN pjh.relay_last_seq ELSE 0 END
  FROM patch_job_hosts pjh JOIN hosts h ON h.id = pjh.host_id
 WHERE pjh.status = 'running'::job_status AND pjh.agent_job_id IS NOT NULL
 ORDER BY pjh.job_id, pjh.id
"""

_SELECT_ROW_SQL = """
SELECT status::text, output, error_message, agent_job_id,
       CASE WHEN relay_agent_job_id = agent_job_id THEN relay_last_seq ELSE 0 END,
       relay_progress, relay_message, job_id::text, host_id::text
  FROM patch_job_hosts WHERE id = %s FOR UPDATE
"""


async def _running_host_jobs(cursor: Any) -> list[HostJob]:
    await cursor.execute(_RUNNING_SQL)
    return [
        HostJob(
            row_id=row_id,
            job_id=job_id,
            host_id=host_id,
            agent_job_id=agent_job_id,
            agent=AgentAddress(host=address, port=int(port)),
            last_seq=int(last_seq),
        )
        for row_id, job_id, host_id, agent_job_id, address, port, last_seq in cursor.fetchall()
    ]


def _running_host_jobs_tx(cursor: Any) -> Deferred:
    return Deferred.fromCoroutine(_running_host_jobs(cursor))


async def _write_row(
    cursor: Any, host_job: HostJob, transport: str, reduce: Callable[[RowState], Reduction]
) -> ApplyResult:
    """One transaction on one row: lock, reduce, guarded update, roll-up, notify."""
    await cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    await cursor.execute(_SELECT_ROW_SQL, (host_job.row_id,))
    found = cursor.fetchone()
    if found is None:
        _log.warn("row {row_id} is gone; stop following it", row_id=host_job.row_id)
        return ApplyResult(applied=0, last_seq=host_job.last_seq, row_status=ROW_MISSING, terminal=True)
    status, output, error_message, agent_job_id, last_seq, progress, message, job_id, host_id = found
    state = RowState(
        status=status,
        output=output or "",
        error_message=error_message,
        last_seq=int(last_seq),
        progress=progress,
        message=message,
        agent_job_id=agent_job_id,
    )
    if agent_job_id != host_job.agent_job_id:
        _log.warn(
            "row {row_id} now belongs to agent job {current}, not {ours}; stop following it",
            row_id=host_job.row_id,
            current=agent_job_id,
            ours=host_job.agent_job_id,
        )
        return ApplyResult(applied=0, last_seq=state.last_seq, row_status=status, terminal=True)
    reduction = reduce(state)
    if reduction.refused:
        _log.warn(
            "refused {count} events of another agent job for row {row_id} (agent job {ours})",
            count=reduction.refused,
            row_id=host_job.row_id,
            ours=host_job.agent_job_id,
        )
    new = reduction.state
    applied = reduction.applied
    notified = 0
    if reduction.changed:
        updated = await _update_row(cursor, host_job, state, new, transport)
        if updated:
            payload = notify.build_payload(
                event_type=notify.EVENT_HOST,
                job_id=job_id,
                host_id=host_id,
                status=new.status,
                agent_job_id=host_job.agent_job_id,
                output=new.output,
                error_message=new.error_message,
                seq=new.last_seq,
                transport=transport,
                progress=new.progress,
            )
            await cursor.execute("SELECT pg_notify(%s, %s)", (notify.CHANNEL, payload))
            notified += 1
            if reduction.became_terminal:
                notified += await _roll_up(cursor, job_id)
        else:  # cannot happen under FOR UPDATE; report the row as it is rather than a lie
            new, applied = state, 0
    return ApplyResult(
        applied=applied,
        last_seq=new.last_seq,
        row_status=new.status,
        terminal=new.status in DB_TERMINAL,
        notified=notified,
    )


async def _update_row(
    cursor: Any, host_job: HostJob, old: RowState, new: RowState, transport: str
) -> bool:
    if new.output.startswith(old.output):  # appends only: do not resend the whole text
        output_sql, output_value = "output = output || %s", new.output[len(old.output) :]
    else:
        output_sql, output_value = "output = %s", new.output
    await cursor.execute(
        f"""
        UPDATE patch_job_hosts
           SET status = %s::job_status, {output_sql}, error_message = %s,
               completed_at = CASE WHEN %s THEN now() ELSE completed_at END,
               relay_last_seq = %s, relay_agent_job_id = %s, relay_transport = %s,
               relay_last_event_at = now(), relay_progress = %s, relay_message = %s
         WHERE id = %s AND status NOT IN {_TERMINAL_SQL}
        """,
        (
            new.status,
            output_value,
            new.error_message,
            new.status in DB_TERMINAL,
            new.last_seq,
            host_job.agent_job_id,
            transport,
            new.progress,
            new.message,
            host_job.row_id,
        ),
    )
    return bool(cursor.rowcount)


async def _roll_up(cursor: Any, job_id: str) -> int:
    """Under the parent row lock: end the job when every host row is terminal; 1 if notified."""
    await cursor.execute("SELECT status::text FROM patch_jobs WHERE id = %s FOR UPDATE", (job_id,))
    parent = cursor.fetchone()
    if parent is None or parent[0] in DB_TERMINAL:
        return 0
    await cursor.execute("SELECT status::text FROM patch_job_hosts WHERE job_id = %s", (job_id,))
    statuses = [row[0] for row in cursor.fetchall()]
    status = rollup_status(statuses)
    if status is None:
        return 0
    await cursor.execute(
        f"UPDATE patch_jobs SET status = %s::job_status, completed_at = now() "
        f"WHERE id = %s AND status NOT IN {_TERMINAL_SQL}",
        (status, job_id),
    )
    if not cursor.rowcount:
        return 0
    payload = notify.build_payload(
        event_type=notify.EVENT_JOB,
        job_id=job_id,
        status=status,
        succeeded_count=statuses.count("succeeded"),
        failed_count=statuses.count("failed"),
        host_count=len(statuses),
    )
    await cursor.execute("SELECT pg_notify(%s, %s)", (notify.CHANNEL, payload))
    _log.info("job {job_id} ended {status}", job_id=job_id, status=status)
    return 1
