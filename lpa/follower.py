"""Following one job of one agent: which events to deliver, and what to ask next.

:class:`JobFollower` is pure: no socket, no HTTP client, no clock.  A driver (the ``lpa agent
watch`` command, the relay's per-agent link, a test) feeds it what arrived and does what the
returned :class:`Step` says.  A follower is per job and never owns the socket, so one WebSocket
can carry many followers: the driver routes frames by ``job_id``::

    stream_opened() ─▶ send subscribe {job_id, after_seq: last_seq}
    receive(frame):
      job event, seq == last_seq + 1   ─▶ deliver (job_complete delivered: done)
      job event, seq <= last_seq       ─▶ duplicate (replay overlap), dropped
      job event, seq >  last_seq + 1   ─▶ gap: send subscribe again from last_seq (once until
                                          the agent acknowledges it), deliver nothing
      resync                           ─▶ its snapshot replaces the stream: deliver it,
                                          last_seq = its seq (terminal snapshot: done)
      error JOB_NOT_FOUND              ─▶ gone
      other error for this job         ─▶ refused: poll instead
    stream_lost()  (handshake failed, or the socket dropped)  ─▶ poll
    poll_path() ─▶ GET …/events?after=last_seq          receive_answer(answer):
      200 page                         ─▶ deliver in order; terminal and read to the end: done
      410 EVENTS_EXPIRED               ─▶ the detail in error.details is the snapshot
      409 EVENTS_AHEAD (N past the     ─▶ the detail (details.job, else one GET /jobs/{id})
          job's last seq)                 is the snapshot; last_seq follows it
      404 JOB_NOT_FOUND                ─▶ gone
      404/405 otherwise (no such path: an original agent) ─▶ poll GET /jobs/{id} from now on
    poll_path() ─▶ GET /jobs/{id}  (original agent)  ─▶ a snapshot when something changed;
                                                        terminal: done; 404: gone

Every event is delivered at most once and in ``seq`` order; snapshots (``KIND_SNAPSHOT``) are
the only events that may move ``last_seq`` backwards (an agent that restarted with fewer events).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attr

from lpa import protocol
from lpa.events import EVENT_JOB_COMPLETE, JobEvent
from lpa.protocol import Ack, Answer, Frame, ProtocolError, Resync, StreamError

#: where the follower reads from now
STREAM = "stream"  # the WebSocket
EVENTS = "events"  # GET /api/v1/jobs/{id}/events?after=N
DETAIL = "detail"  # GET /api/v1/jobs/{id} (an agent without the events endpoint)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Step:
    """What one input produced: events to deliver, frames to send, and what went wrong."""

    #: deliver these, in this order
    events: tuple[JobEvent, ...] = ()
    #: send these frames on the stream (a subscribe)
    send: tuple[dict[str, Any], ...] = ()
    #: the agent refused our subscription (the follower now polls)
    refused: StreamError | None = None
    #: a REST answer the follower could not use (retry later); one line
    problem: str | None = None
    #: poll again at once (the follower switched endpoints)
    again: bool = False


_NOTHING = Step()


class JobFollower:
    """Follows ``job_id`` from ``after_seq``; see the module docstring for the rules.

    :ivar last_seq: the highest event number delivered (the resume point)
    :ivar latest: the last event delivered (None before the first)
    :ivar outcome: the last delivered event other than ``job_complete``: at the end, the
        terminal ``job_status`` (or snapshot) that states how the job ended
    :ivar source: :data:`STREAM`, :data:`EVENTS` or :data:`DETAIL`
    :ivar done: the job ended and its last event was delivered
    :ivar gone: why the agent does not know the job any more, or None
    """

    def __init__(self, job_id: str, after_seq: int = 0) -> None:
        self.job_id = job_id
        self.last_seq = after_seq
        self.latest: JobEvent | None = None
        self.outcome: JobEvent | None = None
        self.source = EVENTS
        self.done = False
        self.gone: str | None = None
        #: a subscribe was sent and its acknowledgement has not arrived: gaps are expected
        self._subscribing = False
        #: the next poll reads the job's detail once (after a 409), then the events again
        self._detail_once = False

    @property
    def over(self) -> bool:
        """Nothing more will come: done, or the agent forgot the job."""
        return self.done or self.gone is not None

    # -- the stream --------------------------------------------------------------------------

    def subscribe(self) -> dict[str, Any]:
        """The subscribe frame resuming after :attr:`last_seq`."""
        self._subscribing = True
        return protocol.subscribe_frame(self.job_id, self.last_seq)

    def stream_opened(self) -> Step:
        """The WebSocket is open (again): subscribe from where we are."""
        if self.over:
            return _NOTHING
        self.source = STREAM
        return Step(send=(self.subscribe(),))

    def stream_lost(self) -> None:
        """The handshake failed or the socket dropped: poll until a stream opens again."""
        self._subscribing = False
        if self.source == STREAM:
            self.source = EVENTS

    def rewind(self, seq: int) -> Step:
        """Events after ``seq`` were lost downstream (e.g. a store dropped them): fetch again."""
        if self.over or seq >= self.last_seq:
            return _NOTHING
        self.last_seq = seq
        if self.source == STREAM:
            return Step(send=(self.subscribe(),))
        return _NOTHING

    def receive(self, frame: Frame) -> Step:
        """One parsed frame from the stream (frames of other jobs are ignored)."""
        if self.over or frame.job_id != self.job_id:
            return _NOTHING
        if isinstance(frame, JobEvent):
            return self._stream_event(frame)
        if isinstance(frame, Resync):
            self._subscribing = False
            return Step(events=self._snapshot(frame.snapshot, authoritative=True))
        if isinstance(frame, Ack):
            if frame.event == protocol.EVENT_SUBSCRIBED:
                self._subscribing = False
            return _NOTHING
        if isinstance(frame, StreamError):
            self._subscribing = False
            if frame.code == protocol.JOB_NOT_FOUND:
                self.gone = f"the agent does not know job {self.job_id} (JOB_NOT_FOUND)"
                return _NOTHING
            self.source = EVENTS
            return Step(refused=frame)
        return _NOTHING  # a frame kind of a newer agent

    def _stream_event(self, event: JobEvent) -> Step:
        if event.seq is None:
            return _NOTHING  # the stream always numbers its events
        if event.seq <= self.last_seq:
            return _NOTHING
        if event.seq > self.last_seq + 1:
            if self._subscribing or self.source != STREAM:
                return _NOTHING  # the replay we asked for is on its way
            return Step(send=(self.subscribe(),))
        return Step(events=(self._deliver(event),))

    # -- polling -----------------------------------------------------------------------------

    def poll_path(self) -> str:
        """The ``GET`` path to poll now."""
        if self.source == DETAIL or self._detail_once:
            return protocol.job_path(self.job_id)
        return protocol.events_path(self.job_id, self.last_seq)

    def receive_answer(self, answer: Answer) -> Step:
        """The answer to the request :meth:`poll_path` named."""
        if self.over:
            return _NOTHING
        if self.source == DETAIL or self._detail_once:
            return self._detail_answer(answer)
        return self._events_answer(answer)

    def _events_answer(self, answer: Answer) -> Step:
        if answer.ok:
            try:
                page = protocol.parse_events_page(answer.data, self.job_id)
            except ProtocolError as error:
                return Step(problem=f"{protocol.events_path(self.job_id, self.last_seq)}: {error}")
            delivered = []
            for event in page.events:
                if event.seq is None or event.seq <= self.last_seq:
                    continue
                if event.seq > self.last_seq + 1:
                    break  # a hole in the page: the next poll asks after it
                delivered.append(self._deliver(event))
            if page.terminal and page.last_seq is not None and self.last_seq >= page.last_seq:
                if self.latest is not None and self.latest.terminal:
                    self.done = True
                elif not self.done:
                    # ended, and every event is behind us: its detail is the final word
                    self._detail_once = True
                    return Step(events=tuple(delivered), again=True)
            return Step(events=tuple(delivered))
        if answer.code == protocol.JOB_NOT_FOUND:
            self.gone = f"the agent does not know job {self.job_id} (JOB_NOT_FOUND)"
            return _NOTHING
        details = answer.error.details if answer.error is not None else None
        if answer.status == 410 and answer.code == protocol.EVENTS_EXPIRED:
            return self._detail_snapshot(details, answer)
        if answer.status == 409:  # EVENTS_AHEAD: details {last_seq, incarnation, job}
            detail = details.get("job") if isinstance(details, Mapping) else None
            if not isinstance(detail, Mapping) and isinstance(details, Mapping):
                detail = details if "status" in details else None
            if isinstance(detail, Mapping):
                return self._detail_snapshot(detail, answer)
            self._detail_once = True
            return Step(again=True)
        if answer.status in (404, 405):
            self.source = DETAIL  # an original agent: no events endpoint
            return Step(again=True)
        return Step(problem=f"GET {self.poll_path()}: {answer.describe()}")

    def _detail_answer(self, answer: Answer) -> Step:
        if answer.status == 404:
            self.gone = f"the agent does not know job {self.job_id} (HTTP 404)"
            return _NOTHING
        if not answer.ok:
            return Step(problem=f"GET {self.poll_path()}: {answer.describe()}")
        once, self._detail_once = self._detail_once, False
        return self._detail_snapshot(answer.data, answer, authoritative=once)

    def _detail_snapshot(
        self, detail: Any, answer: Answer, *, authoritative: bool = True
    ) -> Step:
        try:
            snapshot = protocol.snapshot_event(self.job_id, detail)
        except ProtocolError as error:
            return Step(problem=f"unreadable job detail (HTTP {answer.status}): {error}")
        return Step(events=self._snapshot(snapshot, authoritative=authoritative))

    # -- delivery ----------------------------------------------------------------------------

    def _deliver(self, event: JobEvent) -> JobEvent:
        if event.seq is not None:
            self.last_seq = event.seq
        self.latest = event
        if event.event == EVENT_JOB_COMPLETE:
            self.done = True
        else:
            self.outcome = event
        return event

    def _snapshot(self, snapshot: JobEvent, *, authoritative: bool) -> tuple[JobEvent, ...]:
        """Deliver a snapshot; ``authoritative`` ones (resync, 409/410) reset ``last_seq``.

        A polled detail of an agent that numbers nothing is delivered only when it changes what
        was last delivered.
        """
        latest = self.latest
        unnumbered = snapshot.seq is None and not authoritative
        if unnumbered and latest is not None and _same_state(latest, snapshot):
            if snapshot.terminal:
                self.done = True
            return ()
        if snapshot.seq is not None and not authoritative and snapshot.seq <= self.last_seq:
            if snapshot.terminal and self.latest is not None and self.latest.terminal:
                self.done = True
            return ()
        self.latest = self.outcome = snapshot
        if snapshot.seq is not None:
            self.last_seq = snapshot.seq
        if snapshot.terminal:
            self.done = True
        return (snapshot,)


def _same_state(a: JobEvent, b: JobEvent) -> bool:
    return (a.status, a.progress, a.message, a.error, a.error_code) == (
        b.status,
        b.progress,
        b.message,
        b.error,
        b.error_code,
    )
