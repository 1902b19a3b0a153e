"""Numbered, kept and published job events: the spine shared by the engine and the WebSocket.

The engine numbers an event with :meth:`EventLog.make` (the job's next ``seq``, exactly one more
than the last, stamped with the agent's incarnation), writes it to the write-ahead log, and calls
:meth:`EventLog.publish` once it is durable: only then is it kept for replay (the newest
``max_events_per_job`` per job) and handed to every subscriber.  :meth:`EventLog.last_seq`,
:meth:`EventLog.after` and :meth:`EventLog.kept` therefore only ever show durable events.
:meth:`EventLog.append` does both at once (fakes and in-memory engines).

Delivery to one subscriber is isolated from the others: each event is fired through its own
Deferred per subscriber, and a subscriber that raises is logged and stays subscribed, so it can
neither block the engine nor make anyone else miss an event.  Subscribers must not block; a slow
consumer (a WebSocket session) buffers on its own side with its own bound.

Replay without gap or duplicate: everything runs on the reactor thread, so a reader that calls
:meth:`EventLog.after` and :meth:`EventLog.subscribe` in the same turn sees each event exactly
once, in one of the two; readers still de-duplicate by ``seq``.  Should a job's numbering ever
jump (events lost to a damaged disk), the events before the jump are dropped from what is kept,
so a reader asking from before it gets :class:`EventsExpiredError` (and a snapshot), never a
silent gap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.events import (
    EVENT_JOB_STATUS,
    KIND_STATUS,
    JobEvent,
    rfc3339_from_epoch,
)

Subscriber = Callable[[JobEvent], object]
#: a job's stored events, or a callable that decodes them on first use
StoredEvents = Iterable[JobEvent] | Callable[[], Iterable[JobEvent]]


class EventsExpiredError(Exception):
    """The events a reader asked for are older than what is kept.

    ``oldest_kept`` is the seq of the oldest event still kept (None when none are).
    """

    def __init__(self, job_id: str, after_seq: int, oldest_kept: int | None) -> None:
        super().__init__(
            f"events of job {job_id} after seq {after_seq} are no longer kept "
            f"(oldest kept: {oldest_kept})"
        )
        self.job_id = job_id
        self.after_seq = after_seq
        self.oldest_kept = oldest_kept


class Subscription:
    """A handle returned by :meth:`EventLog.subscribe`; ``cancel()`` stops delivery."""

    def __init__(self, log: EventLog, subscriber: Subscriber) -> None:
        self._log = log
        self.subscriber = subscriber
        self.active = True

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._log._subscriptions.remove(self)


class EventLog:
    """Per-job numbered events with bounded retention and a broadcast to subscribers."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        max_events_per_job: int = 1000,
        incarnation: str | None = None,
    ) -> None:
        if max_events_per_job < 2:
            raise ValueError("max_events_per_job must be at least 2")
        self._clock = clock
        self._max = max_events_per_job
        #: stamped on every event this log numbers (see ``JobEvent.incarnation``)
        self.incarnation = incarnation
        self._kept: dict[str, deque[JobEvent]] = {}
        self._stored: dict[str, Callable[[], Iterable[JobEvent]]] = {}
        self._last_seq: dict[str, int] = {}
        self._numbered: dict[str, int] = {}
        self._subscriptions: list[Subscription] = []

    # -- writing ---------------------------------------------------------------------------

    def make(
        self,
        job_id: str,
        *,
        status: str,
        progress: int,
        message: str,
        kind: str = KIND_STATUS,
        event: str = EVENT_JOB_STATUS,
        error: str | None = None,
        error_code: str | None = None,
    ) -> JobEvent:
        """Number one event (the job's next seq); nothing is kept or published yet."""
        seq = self._numbered.get(job_id, 0) + 1
        self._numbered[job_id] = seq
        return JobEvent(
            job_id=job_id,
            seq=seq,
            status=status,
            progress=progress,
            message=message,
            timestamp=rfc3339_from_epoch(self._clock.seconds()),
            kind=kind,
            event=event,
            error=error,
            error_code=error_code,
            incarnation=self.incarnation,
        )

    def publish(self, job_event: JobEvent) -> None:
        """Keep a numbered (durable) event and hand it to every subscriber."""
        job_id = job_event.job_id
        if job_id not in self._numbered:
            return  # the job was forgotten while this event was being written
        seq = job_event.seq or 0
        last = self._last_seq.get(job_id, 0)
        if seq <= last:
            return
        kept = self._materialise(job_id)
        if seq != last + 1:
            kept.clear()  # a jump: what came before can no longer be replayed without a gap
        kept.append(job_event)
        self._last_seq[job_id] = seq
        self._publish(job_event)

    def append(
        self,
        job_id: str,
        *,
        status: str,
        progress: int,
        message: str,
        kind: str = KIND_STATUS,
        event: str = EVENT_JOB_STATUS,
        error: str | None = None,
        error_code: str | None = None,
    ) -> JobEvent:
        """Number, keep and publish one event at once; return it (fakes, in-memory engines)."""
        job_event = self.make(
            job_id,
            status=status,
            progress=progress,
            message=message,
            kind=kind,
            event=event,
            error=error,
            error_code=error_code,
        )
        self.publish(job_event)
        return job_event

    def restore(self, job_id: str, events: StoredEvents, last_seq: int) -> None:
        """Load a job's kept events from the store at start-up (no publishing).

        ``events`` may be a callable: it is called (decoded) the first time they are needed.
        ``last_seq`` must be the seq of the last of them (or the job's seq when none is kept).
        """
        self._kept.pop(job_id, None)
        self._stored.pop(job_id, None)
        if callable(events):
            self._stored[job_id] = events
        else:
            self._kept[job_id] = deque(events, maxlen=self._max)
        kept = self._kept.get(job_id)
        last = max(last_seq, (kept[-1].seq or 0) if kept else 0)
        if kept and (kept[-1].seq or 0) < last:
            kept.clear()  # the newest events are missing: offer none rather than a gap
        self._last_seq[job_id] = self._numbered[job_id] = last

    def forget(self, job_id: str) -> None:
        """Drop a job's events (job deleted or past retention)."""
        self._kept.pop(job_id, None)
        self._stored.pop(job_id, None)
        self._last_seq.pop(job_id, None)
        self._numbered.pop(job_id, None)

    # -- reading ---------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int:
        """The seq of the job's last published (durable) event (0 when it has none)."""
        return self._last_seq.get(job_id, 0)

    def numbered_seq(self, job_id: str) -> int:
        """The seq of the job's last numbered event, durable or not."""
        return self._numbered.get(job_id, 0)

    def kept(self, job_id: str) -> list[JobEvent]:
        """Every kept event of the job, oldest first."""
        if job_id not in self._kept and job_id not in self._stored:
            return []
        return list(self._materialise(job_id))

    def after(self, job_id: str, after_seq: int) -> list[JobEvent]:
        """Kept events with ``seq > after_seq``, oldest first.

        Raises :class:`EventsExpiredError` when events between ``after_seq`` and the oldest kept
        one were dropped, so a reader is never silently handed a gap.
        """
        last = self._last_seq.get(job_id, 0)
        if after_seq >= last:
            return []
        kept = self._materialise(job_id) if job_id in self._last_seq else None
        if not kept or (kept[0].seq or 0) > after_seq + 1:
            raise EventsExpiredError(job_id, after_seq, kept[0].seq if kept else None)
        return [e for e in kept if (e.seq or 0) > after_seq]

    def _materialise(self, job_id: str) -> deque[JobEvent]:
        kept = self._kept.get(job_id)
        if kept is None:
            stored = self._stored.pop(job_id, None)
            kept = self._kept[job_id] = deque(stored() if stored else (), maxlen=self._max)
        return kept

    # -- broadcast -------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Subscription:
        """Call ``subscriber(event)`` for every event appended from now on."""
        subscription = Subscription(self, subscriber)
        self._subscriptions.append(subscription)
        return subscription

    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def _publish(self, job_event: JobEvent) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.active:
                continue
            d: Deferred[JobEvent] = Deferred()
            d.addCallback(subscription.subscriber)
            d.addErrback(self._subscriber_failed, job_event)
            d.callback(job_event)

    def _subscriber_failed(self, failure: Failure, job_event: JobEvent) -> None:
        self._log.failure(
            "subscriber failed on event {seq} of job {job_id}",
            failure,
            job_id=job_event.job_id,
            seq=job_event.seq,
        )
