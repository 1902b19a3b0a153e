"""Numbered, kept and published job events: the spine shared by the engine and the WebSocket.

``JobManager`` appends; :class:`EventLog` gives each event the job's next ``seq`` (exactly one
more than the last), keeps the newest ``max_events_per_job`` per job for replay, and hands each
event to every subscriber.  Delivery to one subscriber is isolated from the others: each event is
fired through its own Deferred per subscriber, and a subscriber that raises is logged and stays
subscribed, so it can neither block the engine nor make anyone else miss an event.  Subscribers
must not block; a slow consumer (a WebSocket session) buffers on its own side with its own bound.

Replay without gap or duplicate: everything runs on the reactor thread, so a reader that calls
:meth:`EventLog.after` and :meth:`EventLog.subscribe` in the same turn sees each event exactly
once, in one of the two; readers still de-duplicate by ``seq``.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.events import (
    EVENT_JOB_STATUS,
    KIND_STATUS,
    JobEvent,
    rfc3339_from_epoch,
)

Subscriber = Callable[[JobEvent], object]


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

    def __init__(self, log: "EventLog", subscriber: Subscriber) -> None:
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

    def __init__(self, clock: IReactorTime, max_events_per_job: int = 1000) -> None:
        if max_events_per_job < 2:
            raise ValueError("max_events_per_job must be at least 2")
        self._clock = clock
        self._max = max_events_per_job
        self._kept: dict[str, deque[JobEvent]] = {}
        self._last_seq: dict[str, int] = {}
        self._subscriptions: list[Subscription] = []

    # -- writing ---------------------------------------------------------------------------

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
        """Number, keep and publish one event; return it."""
        seq = self._last_seq.get(job_id, 0) + 1
        job_event = JobEvent(
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
        )
        self._last_seq[job_id] = seq
        kept = self._kept.get(job_id)
        if kept is None:
            kept = self._kept[job_id] = deque(maxlen=self._max)
        kept.append(job_event)
        self._publish(job_event)
        return job_event

    def restore(self, job_id: str, events: Iterable[JobEvent], last_seq: int) -> None:
        """Load a job's kept events from the store at start-up (no publishing)."""
        kept = deque(events, maxlen=self._max)
        self._kept[job_id] = kept
        self._last_seq[job_id] = max(last_seq, kept[-1].seq if kept else 0)

    def forget(self, job_id: str) -> None:
        """Drop a job's events (job deleted or past retention)."""
        self._kept.pop(job_id, None)
        self._last_seq.pop(job_id, None)

    # -- reading ---------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int:
        """The seq of the job's last event (0 when it has none)."""
        return self._last_seq.get(job_id, 0)

    def kept(self, job_id: str) -> list[JobEvent]:
        """Every kept event of the job, oldest first."""
        return list(self._kept.get(job_id, ()))

    def after(self, job_id: str, after_seq: int) -> list[JobEvent]:
        """Kept events with ``seq > after_seq``, oldest first.

        Raises :class:`EventsExpiredError` when events between ``after_seq`` and the oldest kept
        one were dropped, so a reader is never silently handed a gap.
        """
        kept = self._kept.get(job_id)
        last = self._last_seq.get(job_id, 0)
        if after_seq >= last:
            return []
        if not kept or kept[0].seq > after_seq + 1:
            raise EventsExpiredError(job_id, after_seq, kept[0].seq if kept else None)
        return [e for e in kept if e.seq > after_seq]

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
            d.addErrback(
                lambda f, e=job_event: self._log.failure(
                    "subscriber failed on event {seq} of job {job_id}",
                    f,
                    job_id=e.job_id,
                    seq=e.seq,
                )
            )
            d.callback(job_event)
