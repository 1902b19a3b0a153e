"""The ops port's own database connection: ``LISTEN job_update``, samples, status snapshots.

One dedicated txpostgres connection, apart from the store's write pool (LISTEN is
session-scoped, and a listener must never sit inside a long transaction)::

    start ─▶ connect ─▶ LISTEN job_update ─▶ notifications ─▶ every subscriber(kind, payload)
                │                                                  (the status page's SSE)
                │ every sample_interval: SELECT pg_notification_queue_usage(), running rows …
                │   (also the liveness check: an idle LISTEN socket can die unnoticed)
                ▼ connection lost (detector) ─▶ reconnect with backoff ─▶ LISTEN again
                                                 ─▶ subscribers get ("resync", "")
                                                    (NOTIFYs sent meanwhile are lost: the page
                                                     reads a fresh snapshot)

:meth:`JobUpdateFeed.snapshot` reads the running jobs and those that ended in the last hour,
host by host, for the page's first paint and every resync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from lpa.relay import notify

_log = Logger()

KIND_UPDATE = "job_update"
KIND_RESYNC = "resync"

Subscriber = Callable[[str, str], object]

#: jobs and host rows a snapshot returns at most (the page is for people, not for exports)
MAX_JOBS = 100
MAX_ROWS = 5000
FINISHED_WINDOW = "1 hour"

_SAMPLE_SQL = """
SELECT pg_notification_queue_usage(),
       (SELECT count(*) FROM patch_job_hosts WHERE status = 'running'::job_status),
       (SELECT extract(epoch FROM now() - min(started_at)) FROM patch_job_hosts
         WHERE status = 'running'::job_status)
"""

_SNAPSHOT_SQL = f"""
WITH shown AS (
    SELECT id FROM patch_jobs
     WHERE status = 'running'::job_status
        OR (status IN ('succeeded', 'failed', 'cancelled')
            AND completed_at > now() - interval '{FINISHED_WINDOW}')
     ORDER BY created_at DESC LIMIT {MAX_JOBS}
)
SELECT extract(epoch FROM now()), j.id::text, j.kind::text, j.status::text,
       extract(epoch FROM j.created_at), extract(epoch FROM j.completed_at),
       r.id::text, r.host_id::text,
       COALESCE(NULLIF(h.display_name, ''), NULLIF(h.fqdn, ''), host(h.ip_address)),
       r.status::text, r.relay_progress, r.relay_transport,
       extract(epoch FROM r.relay_last_event_at), r.error_message, r.relay_message,
       r.relay_last_seq, r.agent_job_id, extract(epoch FROM r.started_at),
       extract(epoch FROM r.completed_at)
  FROM patch_jobs j JOIN shown s ON s.id = j.id
  LEFT JOIN patch_job_hosts r ON r.job_id = j.id
  LEFT JOIN hosts h ON h.id = r.host_id
 ORDER BY j.created_at DESC, j.id, 9
 LIMIT {MAX_ROWS}
"""


def _epoch(value: Any) -> float | None:
    return None if value is None else float(value)


def snapshot_from_rows(rows: list[tuple[Any, ...]], now: float) -> dict[str, Any]:
    """The JSON document of ``GET /api/status`` from the snapshot query's rows."""
    jobs: dict[str, dict[str, Any]] = {}
    for row in rows:
        (job_id, kind, status, created, completed, row_id, host_id, name, host_status,
         progress, transport, last_event, error, message, seq, agent_job_id, started,
         ended) = row
        job = jobs.get(job_id)
        if job is None:
            job = jobs[job_id] = {
                "job_id": job_id, "kind": kind, "status": status,
                "created_at": _epoch(created), "completed_at": _epoch(completed), "hosts": [],
            }
        if row_id is not None:
            job["hosts"].append({
                "row_id": row_id, "host_id": host_id, "host": name, "status": host_status,
                "progress": progress, "transport": transport,
                "last_event_at": _epoch(last_event), "error_message": error,
                "message": message, "seq": int(seq or 0), "agent_job_id": agent_job_id,
                "started_at": _epoch(started), "completed_at": _epoch(ended),
            })
    running = [job for job in jobs.values() if job["status"] not in _TERMINAL]
    finished = [job for job in jobs.values() if job["status"] in _TERMINAL]
    return {"now": now, "running": running, "finished": finished,
            "truncated": len(rows) >= MAX_ROWS}


_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class IJobUpdateFeed(Interface):
    """What the ops port reads: notifications as they come, and snapshots."""

    listening = Attribute("LISTEN is in effect on a live connection")

    def subscribe(subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(kind, payload)`` from now on; return the function that stops it."""

    def snapshot() -> Deferred[dict[str, Any]]:
        """Fire with the status document, or errback with :class:`FeedUnavailable`."""


@implementer(IJobUpdateFeed)
class JobUpdateFeed:
    """The LISTEN connection, its periodic sample, and the status snapshot.

    :param connection_factory: makes an unconnected txpostgres Connection with a cancellable
        ``detector`` (the store's :func:`~lpa.relay.store.default_connection_factory`).
    :param sample_interval: seconds between samples (queue usage, running rows).
    :param on_notification: called for each notification received (a metrics counter).
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock: IReactorTime,
        connection_factory: Callable[[], Any],
        sample_interval: float = 15.0,
        on_notification: Callable[[], object] = lambda: None,
        on_reconnect: Callable[[], object] = lambda: None,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._factory = connection_factory
        self._on_notification = on_notification
        self._on_reconnect = on_reconnect
        self._connection: Any = None
        self._subscribers: list[Subscriber] = []
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = clock
        self._sample_interval = sample_interval
        self._stopped = False
        #: LISTEN is in effect on a live connection
        self.listening = False
        #: the last sample: fraction of the NOTIFY queue in use, running rows, oldest (s)
        self.queue_usage: float | None = None
        self.running_rows: int | None = None
        self.oldest_running_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect and LISTEN; fires once the first attempt ended (never errbacks)."""
        self._connection = connection = self._factory()
        connection.addNotifyObserver(self._notified)
        connection.detector.addRecoveryHandler(self._recovered)
        connecting: Deferred[None] = connection.connect(self._dsn)
        connecting.addCallback(lambda _: self._listen(first=True))
        connecting.addErrback(self._connect_failed)
        self._sampler.start(self._sample_interval, now=False).addErrback(
            lambda failure: _log.failure("ops feed sampler ended", failure))
        return connecting

    def _connect_failed(self, failure: Failure) -> None:
        if self._stopped:
            return
        _log.warn("ops feed: database connection failed ({reason}); retrying",
                  reason=_first_line(failure))
        self._connection.detector.checkForDeadConnection(failure)

    def _recovered(self) -> Deferred[None] | None:
        if self._stopped:
            return None
        _log.info("ops feed: database connection recovered; LISTEN job_update again")
        self._on_reconnect()
        return self._listen(first=False)

    def _listen(self, first: bool) -> Deferred[None]:
        listening: Deferred[object] = self._connection.runOperation(f"LISTEN {notify.CHANNEL}")

        def done(_: object) -> None:
            self.listening = True
            if not first:
                self._broadcast(KIND_RESYNC, "")

        def failed(failure: Failure) -> None:
            self.listening = False
            if not self._stopped:
                _log.warn("ops feed: LISTEN failed ({reason})", reason=_first_line(failure))
                self._connection.detector.checkForDeadConnection(failure)

        return listening.addCallbacks(done, failed)

    def stop(self) -> None:
        self._stopped = True
        self.listening = False
        if self._sampler.running:
            self._sampler.stop()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        stop_reconnecting = getattr(connection.detector, "stop", None)
        if stop_reconnecting is not None:
            # an attempt in progress cannot be cancelled; closing ends it
            with contextlib.suppress(Exception):
                stop_reconnecting()
        with contextlib.suppress(Exception):  # never connected, or already gone
            connection.close()

    # -- notifications ---------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(kind, payload)`` from now on; returns the function that stops it."""
        self._subscribers.append(subscriber)

        def cancel() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return cancel

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _notified(self, notification: Any) -> None:
        if notification.channel != notify.CHANNEL:
            return
        self._on_notification()
        self._broadcast(KIND_UPDATE, notification.payload)

    def _broadcast(self, kind: str, payload: str) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(kind, payload)
            except Exception:
                _log.failure("ops feed subscriber failed")

    # -- reads -----------------------------------------------------------------------------

    def _live(self) -> Any:
        connection = self._connection
        if connection is None or not self.listening or connection.detector.connectionIsDead:
            return None
        return connection

    async def _sample(self) -> None:
        connection = self._live()
        if connection is None:
            self.queue_usage = None
            return
        try:
            rows = await connection.runQuery(_SAMPLE_SQL)
        except Exception as error:
            _log.warn("ops feed: sample query failed ({reason})", reason=_first_line(error))
            self.queue_usage = None
            return
        usage, running, oldest = rows[0]
        self.queue_usage = float(usage)
        self.running_rows = int(running)
        self.oldest_running_seconds = None if oldest is None else max(0.0, float(oldest))

    def snapshot(self) -> Deferred[dict[str, Any]]:
        """Fire with the status document (see :func:`snapshot_from_rows`)."""
        connection = self._live()
        if connection is None:
            return defer.fail(FeedUnavailable("the ops feed has no database connection"))
        reading: Deferred[list[tuple[Any, ...]]] = connection.runQuery(_SNAPSHOT_SQL)

        def shape(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
            now = float(rows[0][0]) if rows else self._clock.seconds()
            return snapshot_from_rows([tuple(row[1:]) for row in rows], now)

        return reading.addCallback(shape)


class FeedUnavailable(Exception):
    """The feed's connection is down; the status page says so and retries on the next event."""


def _first_line(error: Any) -> str:
    value = getattr(error, "value", error)
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__
