"""The job event stream's protocol logic for one WebSocket connection, without sockets.

:class:`JobStreamSession` is a plain object driven by the thin Autobahn protocol in
:mod:`lpa.agent.ws`: it receives decoded text (or the fact of a binary frame), the transport's
pause/resume signals and the :class:`~lpa.agent.eventlog.EventLog` broadcast, and it answers
through an :class:`~lpa.agent.interfaces.IStreamChannel` (``send_text``, ``close``)::

    client ──text──▶ receive_text ──▶ subscribe / unsubscribe ──▶ ack, replay, error
    EventLog.append ──publish──▶ _on_live_event ──filter, dedupe──▶ outbox ──▶ send_text
    transport buffer full ──pause_sending──▶ outbox grows ── > send_buffer_events ──▶ close 1008

Every frame leaves through one outbox, in order.  A job's events are de-duplicated by ``seq``
(``_last_sent``), so a replay and live events that arrive while the replay is being written
(re-entrantly, or while the transport is paused) come out once each, in ``seq`` order.

Filtering: a connection gets only what it subscribed to, nothing before its first
``subscribe``.  There is no implicit all-jobs mode (the original's was on for every connection
and could not be turned off, so its own relay applied other jobs' states to its row): a client
that wants every job says so with ``subscribe`` without ``job_id`` (or with ``"all"``).
``subscribe`` with a ``job_id`` adds that job; a rejected one (``JOB_NOT_FOUND``,
``INVALID_JOB_ID``, ``TOO_MANY_SUBSCRIPTIONS``) subscribes to nothing.  ``unsubscribe`` with a
``job_id`` stops that job (also in all-jobs mode); ``unsubscribe`` without one stops everything.

Replay (``after_seq: N``) always sends the kept events after N, even ones this connection
already got live in all-jobs mode: the client asked for them, and de-duplicates by ``seq``.
N older than what is kept, or ahead of the job's last event, gets a ``resync`` carrying the job's
snapshot (``job``: ``Job.to_detail()``), ``seq``, the last event number, and the agent's current
``incarnation`` (so a client can tell a restart that renumbered events); live events follow.
A finished job subscribed without ``after_seq`` gets its terminal ``job_status`` and its
``job_complete`` from the log at once (or a ``resync`` when they are no longer kept).

Bounds: ``max_subscriptions`` job subscriptions (plus all-mode exclusions) per connection, an
``error`` event past it; ``send_buffer_events`` frames queued while the transport is paused,
past it the connection is closed with 1008 and a reason that says how to resume, so no event is
ever dropped silently and memory stays bounded.  A whole replay is queued before the first write
(that is what keeps live events after it), so ``send_buffer_events`` must exceed the EventLog's
``max_events_per_job`` (defaults 2000 and 1000).

One state machine, one module: it is a little over 400 lines because subscriptions, replay and
the bounded outbox share the de-duplication state and are only correct together.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from lpa import validation
from lpa.agent.eventlog import EventLog, EventsExpiredError, Subscription
from lpa.agent.interfaces import IStreamChannel
from lpa.errors import InvalidJobIdError, JobNotFoundError
from lpa.events import EVENT_JOB_COMPLETE, KIND_SNAPSHOT, TERMINAL_STATUSES, JobEvent

#: close code and reason prefix for a consumer that does not read fast enough (RFC 6455 1008)
CLOSE_SLOW_CONSUMER = 1008

ALL = "all"

# error codes of ``error`` events (``status`` carries the same code in lower case, as the
# original agent did with ``invalid_message``)
INVALID_JSON = "INVALID_JSON"
INVALID_MESSAGE = "INVALID_MESSAGE"
UNKNOWN_ACTION = "UNKNOWN_ACTION"
INVALID_JOB_ID = InvalidJobIdError.code
JOB_NOT_FOUND = JobNotFoundError.code
TOO_MANY_SUBSCRIPTIONS = "TOO_MANY_SUBSCRIPTIONS"
BINARY_NOT_SUPPORTED = "BINARY_NOT_SUPPORTED"
INTERNAL_ERROR = "INTERNAL_ERROR"

_ECHO_LIMIT = 100  # characters of a client-supplied job id echoed back in an error event



class _Rejected(Exception):
    """A client message that gets an ``error`` event (and changes nothing)."""

    def __init__(self, code: str, message: str, job_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


class JobStreamSession:
    """One connection's subscriptions, replay and bounded send queue."""

    _log = Logger()

    def __init__(
        self,
        events: EventLog,
        jobs: Any,
        channel: IStreamChannel,
        *,
        now: Callable[[], str],
        connection_id: str,
        max_subscriptions: int = 256,
        send_buffer_events: int = 2000,
    ) -> None:
        self._events = events
        self._jobs = jobs
        self._channel = channel
        self._now = now
        self.connection_id = connection_id
        self._max_subscriptions = max_subscriptions
        self._send_buffer_events = send_buffer_events

        #: True after ``subscribe`` without a job_id (explicit all-jobs mode)
        self._all_jobs = False
        self._jobs_subscribed: set[str] = set()
        self._jobs_excluded: set[str] = set()  # unsubscribed while in all-jobs mode
        #: highest seq queued per job still able to emit; dropped at job_complete
        self._last_sent: dict[str, int] = {}

        self._outbox: deque[str] = deque()
        self._paused = False
        self._flushing = False
        self._subscription: Subscription | None = None
        self.closed = False

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the EventLog and greet the client with ``connected``."""
        self._subscription = self._events.subscribe(self._on_live_event)
        self._enqueue(
            self._ack("connected", "", f"WebSocket connected: {self.connection_id}")
        )
        self._flush()

    def stop(self) -> None:
        """Connection gone: stop listening and drop whatever was not sent."""
        self.closed = True
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        self._outbox.clear()

    def pause_sending(self) -> None:
        """The transport's buffer is full: queue from now on (bounded)."""
        self._paused = True

    def resume_sending(self) -> None:
        """The transport drained: send what was queued."""
        self._paused = False
        self._flush()

    @property
    def subscription_count(self) -> int:
        """Jobs subscribed one by one (the all-jobs mode counts as one)."""
        return len(self._jobs_subscribed) + (1 if self._all_jobs else 0)

    @property
    def queued(self) -> int:
        """Frames waiting for the transport."""
        return len(self._outbox)

    # -- input -----------------------------------------------------------------------------

    def receive_binary(self) -> None:
        """Binary frames carry nothing in this protocol: say so, keep the connection."""
        if self.closed:
            return
        self._send_error(
            _Rejected(BINARY_NOT_SUPPORTED, "binary frames are not supported; send JSON text")
        )
        self._flush()

    def receive_text(self, text: str) -> None:
        """Handle one client message; anything wrong gets an ``error`` event, nothing else."""
        if self.closed:
            return
        try:
            self._handle(self._parse(text))
        except _Rejected as rejected:
            self._send_error(rejected)
        except Exception:
            # a fault of ours (e.g. the job manager raised): log it, tell this client, keep going
            self._log.failure(
                "ws {connection_id}: failed on a message", connection_id=self.connection_id
            )
            self._send_error(_Rejected(INTERNAL_ERROR, "internal error; see the agent's log"))
        # everything this message queued (ack, replay) went into the outbox before the first
        # write, so a live event arriving during the writes lands after the replay
        self._flush()

    def _parse(self, text: str) -> Mapping[str, Any]:
        try:
            message = json.loads(text)
        except ValueError as e:
            raise _Rejected(INVALID_JSON, f"Invalid message: not JSON ({e})") from None
        except RecursionError:
            raise _Rejected(INVALID_JSON, "Invalid message: JSON nested too deeply") from None
        if not isinstance(message, dict):
            raise _Rejected(INVALID_MESSAGE, "Invalid message: expected a JSON object")
        return message

    def _handle(self, message: Mapping[str, Any]) -> None:
        action = message.get("action")
        if action == "subscribe":
            job_id = self._optional_job_id(message)
            after_seq = message.get("after_seq")
            if after_seq is not None and (
                not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0
            ):
                raise _Rejected(
                    INVALID_MESSAGE,
                    "Invalid message: after_seq must be a non-negative integer",
                    job_id or "",
                )
            if job_id is None:
                if after_seq is not None:
                    raise _Rejected(
                        INVALID_MESSAGE, "Invalid message: after_seq needs a job_id"
                    )
                self._subscribe_all()
            else:
                self._subscribe_job(job_id, after_seq)
        elif action == "unsubscribe":
            job_id = self._optional_job_id(message)
            if job_id is None:
                self._unsubscribe_all()
            else:
                self._unsubscribe_job(job_id)
        elif isinstance(action, str):
            raise _Rejected(UNKNOWN_ACTION, f"Invalid message: unknown action {action[:40]!r}")
        else:
            raise _Rejected(INVALID_MESSAGE, "Invalid message: missing string member 'action'")

    def _optional_job_id(self, message: Mapping[str, Any]) -> str | None:
        raw = message.get("job_id")
        if raw is None or raw == ALL:
            return None
        try:
            return validation.job_id(raw)
        except InvalidJobIdError:
            echoed = raw[:_ECHO_LIMIT] if isinstance(raw, str) else ""
            raise _Rejected(INVALID_JOB_ID, "job_id must be a UUID", echoed) from None

    # -- subscriptions ---------------------------------------------------------------------

    def _subscribe_all(self) -> None:
        self._all_jobs = True
        self._jobs_excluded.clear()
        self._enqueue(self._ack("subscribed", ALL, "Subscribed to all job events"))

    def _unsubscribe_all(self) -> None:
        self._all_jobs = False
        self._jobs_subscribed.clear()
        self._jobs_excluded.clear()
        self._last_sent.clear()
        self._enqueue(self._ack("unsubscribed", ALL, "Unsubscribed from all job events"))

    def _unsubscribe_job(self, job_id: str) -> None:
        self._jobs_subscribed.discard(job_id)
        if self._all_jobs and job_id not in self._jobs_excluded:
            self._check_room(job_id)
            self._jobs_excluded.add(job_id)
        self._last_sent.pop(job_id, None)
        self._enqueue(self._ack("unsubscribed", job_id, f"Unsubscribed from job: {job_id}"))

    def _check_room(self, job_id: str) -> None:
        if len(self._jobs_subscribed) + len(self._jobs_excluded) >= self._max_subscriptions:
            raise _Rejected(
                TOO_MANY_SUBSCRIPTIONS,
                f"at most {self._max_subscriptions} job subscriptions per connection",
                job_id,
            )

    def _subscribe_job(self, job_id: str, after_seq: int | None) -> None:
        try:
            job = self._jobs.get(job_id)
        except JobNotFoundError:
            raise _Rejected(JOB_NOT_FOUND, f"job {job_id} not found", job_id) from None
        if job_id not in self._jobs_subscribed:
            self._check_room(job_id)
        self._jobs_excluded.discard(job_id)
        self._jobs_subscribed.add(job_id)
        self._enqueue(self._ack("subscribed", job_id, f"Subscribed to job: {job_id}"))
        if after_seq is not None:
            self._replay(job, after_seq)
        elif job.shown_status in TERMINAL_STATUSES:  # ended, as far as is durable
            self._send_terminal(job)

    def _replay(self, job: Any, after_seq: int) -> None:
        """Queue the kept events after ``after_seq`` (or a resync) before any later live one."""
        last = self._events.last_seq(job.id)
        if after_seq > last:
            self._queue_resync(job, f"after_seq {after_seq} is ahead of the last event {last}")
            return
        try:
            replay = self._events.after(job.id, after_seq)
        except EventsExpiredError as e:
            self._queue_resync(
                job,
                f"events after seq {after_seq} are no longer kept "
                f"(oldest kept: {e.oldest_kept})",
            )
            return
        for job_event in replay:
            self._queue_job_event(job_event, replaying=True)

    def _send_terminal(self, job: Any) -> None:
        """A finished job: its terminal ``job_status`` and ``job_complete``, or a snapshot."""
        kept = self._events.kept(job.id)
        complete = next((e for e in reversed(kept) if e.event == EVENT_JOB_COMPLETE), None)
        if complete is None:
            self._queue_resync(job, "the job has ended; its closing events are no longer kept")
            return
        last = complete.seq
        closing = [e for e in kept if last is not None and e.seq == last - 1 and e.terminal]
        closing.append(complete)
        for job_event in closing:
            self._queue_job_event(job_event, replaying=True)

    def _queue_resync(self, job: Any, why: str) -> None:
        last = self._events.last_seq(job.id)
        detail = job.to_detail()  # as of the last durable event, like ``seq``
        frame = {
            "event": "resync",
            "job_id": job.id,
            "seq": last,
            "kind": KIND_SNAPSHOT,
            "status": detail["status"],
            "progress": detail["progress"],
            "message": f"{why}; this is the job's current state",
            "timestamp": self._now(),
            "job": detail,
            "incarnation": getattr(self._jobs, "incarnation", None),
        }
        if detail["error"] is not None or detail["error_code"] is not None:
            frame["error"] = detail["error"]
            frame["error_code"] = detail["error_code"]
        self._last_sent[job.id] = last
        if detail["status"] in TERMINAL_STATUSES:
            self._last_sent.pop(job.id, None)
        self._enqueue(frame)

    # -- live events -----------------------------------------------------------------------

    def _wants(self, job_id: str) -> bool:
        if job_id in self._jobs_subscribed:
            return True
        return self._all_jobs and job_id not in self._jobs_excluded

    def _on_live_event(self, job_event: JobEvent) -> None:
        if self.closed or not self._wants(job_event.job_id):
            return
        self._queue_job_event(job_event, replaying=False)
        self._flush()

    def _queue_job_event(self, job_event: JobEvent, *, replaying: bool) -> None:
        seq = job_event.seq or 0
        last = self._last_sent.get(job_event.job_id)
        if not replaying and last is not None and seq <= last:
            return  # already queued by a replay
        if job_event.event == EVENT_JOB_COMPLETE:
            self._last_sent.pop(job_event.job_id, None)  # nothing follows: keep the map small
        else:
            self._last_sent[job_event.job_id] = seq
        self._enqueue(job_event.to_wire())

    # -- output ----------------------------------------------------------------------------

    def _ack(self, event: str, job_id: str, message: str) -> dict[str, Any]:
        return {
            "event": event,
            "job_id": job_id,
            "status": event,
            "progress": 0,
            "message": message,
            "timestamp": self._now(),
        }

    def _send_error(self, rejected: _Rejected) -> None:
        self._log.info(
            "ws {connection_id}: rejected a message ({code}: {reason})",
            connection_id=self.connection_id,
            code=rejected.code,
            reason=rejected.message,
        )
        frame = self._ack("error", rejected.job_id, rejected.message)
        frame["status"] = rejected.code.lower()
        frame["error"] = rejected.message
        frame["error_code"] = rejected.code
        self._enqueue(frame)

    def _enqueue(self, frame: Mapping[str, Any]) -> None:
        if self.closed:
            return
        self._outbox.append(json.dumps(frame, separators=(",", ":")))
        if len(self._outbox) > self._send_buffer_events:
            self._overflow()

    def _overflow(self) -> None:
        reason = (
            f"slow consumer: more than {self._send_buffer_events} events unsent; "
            "reconnect and resume with after_seq"
        )
        self._log.warn(
            "ws {connection_id}: closing, {reason}",
            connection_id=self.connection_id,
            reason=reason,
        )
        self.stop()
        self._channel.close(CLOSE_SLOW_CONSUMER, reason)

    def _flush(self) -> None:
        """Write queued frames in order; re-entrant calls just leave theirs in the queue."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._outbox and not self._paused and not self.closed:
                self._channel.send_text(self._outbox.popleft())
        finally:
            self._flushing = False
