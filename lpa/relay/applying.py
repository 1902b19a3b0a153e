"""One host job's events on their way to the store: one call at a time, batched, retried.

::

    add(events, transport) ─▶ queue ─▶ store.apply_events(host_job, batch, transport)
                                        one call in flight; what arrives meanwhile is the next
                                        batch (a batch never mixes transports)
       ok        ─▶ on_applied(result)  (terminal: the link stops following the row)
                    on_ready()          (the link may ask the agent again: see on_dropped)
       failed    ─▶ the batch goes back to the front; a retry after the backoff's delay, then
                    on_ready() and the queue is sent again
       more than ``max_queued`` waiting (the store stays down) ─▶ the queue is dropped and
                    on_dropped(applied_seq): the events are fetched again from the last seq
                    the store confirmed, never lost silently

The relay-wide backpressure (stop reading agents while the store is behind) is
:class:`~lpa.relay.pressure.StoreGauge`, around the store this queue writes to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.events import JobEvent
from lpa.relay.backoff import Backoff
from lpa.relay.interfaces import ApplyResult, HostJob, IRelayStore

_log = Logger()


class ApplyQueue:
    """The store calls of one host job (see the module docstring).

    :param applied_seq: the last seq the store confirmed (the row's, at first).
    """

    __slots__ = (
        "_backoff", "_clock", "_closed", "_flushing", "_in_flight", "_make_backoff", "_max_queued",
        "_on_applied", "_on_dropped", "_on_ready", "_queue", "_retry", "_store", "applied_seq",
        "host_job"
    )

    def __init__(
        self,
        host_job: HostJob,
        *,
        store: IRelayStore,
        clock: IReactorTime,
        make_backoff: Callable[[], Backoff],
        max_queued: int,
        on_applied: Callable[[ApplyResult], None],
        on_ready: Callable[[], None],
        on_dropped: Callable[[int], None],
    ) -> None:
        self.host_job = host_job
        self.applied_seq = host_job.last_seq
        self._store = store
        self._clock = clock
        self._make_backoff = make_backoff
        self._max_queued = max_queued
        self._on_applied = on_applied
        self._on_ready = on_ready
        self._on_dropped = on_dropped
        self._queue: list[tuple[JobEvent, str]] = []
        self._in_flight: Deferred[ApplyResult] | None = None
        self._retry: IDelayedCall | None = None
        self._backoff: Backoff | None = None
        #: no longer followed (close) or the link stops (flush): no callbacks, no retries
        self._closed = False
        self._flushing = False

    @property
    def waiting(self) -> int:
        """Events queued and not yet handed to the store."""
        return len(self._queue)

    @property
    def retrying(self) -> bool:
        """The store refused the last call: a retry is scheduled."""
        return self._retry is not None

    def add(self, events: Sequence[JobEvent], transport: str) -> None:
        """Queue ``events`` (from ``transport``) and send them when the store is free."""
        if self._closed:
            return
        self._queue.extend((event, transport) for event in events)
        if len(self._queue) > self._max_queued:
            _log.warn(
                "job {agent_job_id}: {count} events wait for the store; dropping them to fetch "
                "again from seq {seq}",
                agent_job_id=self.host_job.agent_job_id,
                count=len(self._queue),
                seq=self.applied_seq,
            )
            self._queue.clear()
            self._on_dropped(self.applied_seq)
        self._pump()

    def close(self) -> None:
        """The row is no longer followed: forget the queue; answers still on their way are
        ignored."""
        self._closed = True
        self._cancel_retry()
        self._queue.clear()

    def flush(self) -> None:
        """The link stops: hand what is queued to the store now, and retry nothing after."""
        self._cancel_retry()
        self._closed = self._flushing = True
        self._pump()

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _pump(self) -> None:
        if self._in_flight is not None or not self._queue or self._retry is not None:
            return
        if self._closed and not self._flushing:
            return
        transport = self._queue[0][1]
        batch: list[JobEvent] = []
        while self._queue and self._queue[0][1] == transport:
            batch.append(self._queue.pop(0)[0])
        applying = self._store.apply_events(self.host_job, batch, transport)
        self._in_flight = applying
        applying.addCallbacks(self._applied, self._failed, errbackArgs=(batch, transport))

    def _applied(self, result: ApplyResult) -> None:
        self._in_flight = None
        self._backoff = None
        self.applied_seq = max(self.applied_seq, result.last_seq)
        if self._closed:
            self._pump()  # stopping: the rest of the queue still goes to the store
            return
        self._on_applied(result)
        if not self._closed:
            self._on_ready()
            self._pump()

    def _failed(self, failure: Failure, batch: list[JobEvent], transport: str) -> None:
        self._in_flight = None
        if self._backoff is None:
            self._backoff = self._make_backoff()
        delay = self._backoff.next_delay()
        _log.warn(
            "store refused {count} events of job {agent_job_id}: {error}; retrying in {delay:.1f}s",
            count=len(batch),
            agent_job_id=self.host_job.agent_job_id,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        if self._closed:
            return  # the store keeps what it was given on stop; nothing more we can do
        self._queue[:0] = [(event, transport) for event in batch]
        self._retry = self._clock.callLater(delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._on_ready()
        self._pump()
