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
      resync                           ─▶ its snapshot replaces the stream
      error JOB_NOT_FOUND              ─▶ missing
      other error for this job         ─▶ refused: poll instead
    stream_lost()  (handshake failed, or the socket dropped)  ─▶ poll
    poll_path() ─▶ GET …/events?after=last_seq          receive_answer(answer):
      200 page                         ─▶ deliver in order; terminal and read to the end: done
      200 page, nothing after N, its   ─▶ the agent numbers below us without saying 409 (an
          last_seq below N                older agent): GET /jobs/{id} is the snapshot
      410 EVENTS_EXPIRED               ─▶ the detail in error.details is the snapshot
      409 EVENTS_AHEAD (N past the     ─▶ the detail (details.job, else one GET /jobs/{id}),
          job's last seq)                 at details.last_seq, is the snapshot
      404 JOB_NOT_FOUND                ─▶ missing
      404/405 otherwise (no such path: an original agent) ─▶ poll GET /jobs/{id} from now on
    poll_path() ─▶ GET /jobs/{id}  (original agent)  ─▶ a snapshot when something changed;
                                                        terminal: done; 404: missing
    receive_polled(outcome)  ─▶ what another follower read over REST (the relay polls with a
                                 follower of its own per pass, :class:`PollOutcome`)

Every event is delivered at most once and in ``seq`` order (:mod:`lpa.jobseq`: the numbering
rules, and what a snapshot numbered at or below ``last_seq`` means: :class:`Step` says so in
``renumbered``).

By default JOB_NOT_FOUND ends the follow (``gone``); with ``gone_is_final=False`` (the relay,
which gives the agent a deadline) each one is a ``Step.missing`` and the next answer that shows
the job again (an event, a snapshot, an events page, the ``subscribed`` acknowledgement) a
``Step.found``; ``known`` says whether the last answer showed the job.  A driver that lost
delivered events downstream calls :meth:`JobFollower.rewind` (``later``: the stream waits for
:meth:`JobFollower.resume`).

A little over 400 lines on purpose: the follower is one state machine (subscribe, replay,
resync, gaps, fallback to the events endpoint) and reads best whole; it has no I/O to split off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attr

from lpa import protocol
from lpa.events import KIND_SNAPSHOT, JobEvent
from lpa.jobseq import GAP, NEXT, JobSequence, Renumbered
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
    #: send these frames on the stream (a subscribe; an unsubscribe before it on resume)
    send: tuple[dict[str, Any], ...] = ()
    #: the agent refused our subscription (the follower now polls)
    refused: StreamError | None = None
    #: a REST answer the follower could not use (retry later); one line
    problem: str | None = None
    #: poll again at once (the follower switched endpoints)
    again: bool = False
    #: events of an answer that could not be read (skipped), one line each
    rejected: tuple[str, ...] = ()
    #: the agent lost or renumbered events (its snapshot is among ``events`` or was no news)
    renumbered: Renumbered | None = None
    #: the agent said it does not know the job (one line)
    missing: str | None = None
    #: the agent knows the job again after saying it did not
    found: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PollOutcome:
    """What one pass over REST found for a job, for a follower that did not ask itself.

    ``events`` in order (possibly none: the agent knows the job and has nothing new), or
    ``gone``: the agent said it does not know the job (one sentence).  ``incarnation``: the
    agent's current one, when its answers carried it.
    """

    events: tuple[JobEvent, ...] = ()
    gone: str | None = None
    incarnation: str | None = None


_NOTHING = Step()


class JobFollower:
    """Follows ``job_id`` from ``after_seq``; see the module docstring for the rules.

    :param events_endpoint: False when the agent is known to lack the events endpoint (an
        original agent): poll its detail from the start.
    :param gone_is_final: False to keep following after a JOB_NOT_FOUND (see the module doc).

    :ivar seq: what was delivered (:class:`~lpa.jobseq.JobSequence`: ``last_seq``, ``latest``,
        ``outcome``, ``done`` … also readable here)
    :ivar source: :data:`STREAM`, :data:`EVENTS` or :data:`DETAIL`
    :ivar gone: why the agent does not know the job, or None
    :ivar known: the agent's last answer showed it knows the job (False before any answer and
        after a JOB_NOT_FOUND)
    """

    __slots__ = (
        "_detail_once", "_detail_seq", "_found", "_gone_is_final", "_held", "_renumbered",
        "_subscribing", "gone", "job_id", "known", "seq", "source"
    )

    def __init__(
        self, job_id: str, after_seq: int = 0, *, events_endpoint: bool = True,
        gone_is_final: bool = True,
    ) -> None:
        self.job_id = job_id
        self.seq = JobSequence(job_id, after_seq)
        self.source = EVENTS if events_endpoint else DETAIL
        self.gone: str | None = None
        self.known = False
        self._gone_is_final = gone_is_final
        #: a subscribe was sent and its acknowledgement has not arrived: gaps are expected
        self._subscribing = False
        #: the next poll reads the job's detail once (after a 409), then the events again
        self._detail_once = False
        #: that detail's seq when the answer before named it (a page's or a 409's last_seq)
        self._detail_seq: int | None = None
        #: rewound for later: the stream is ignored until resume()
        self._held = False
        #: what the input being handled found, added to its Step
        self._renumbered: Renumbered | None = None
        self._found = False

    @property
    def last_seq(self) -> int:
        """The highest event number delivered (the resume point)."""
        return self.seq.last_seq

    @property
    def latest(self) -> JobEvent | None:
        """The last event delivered (None before the first)."""
        return self.seq.latest

    @property
    def outcome(self) -> JobEvent | None:
        """The last delivered event other than ``job_complete`` (how the job ended, at the end)."""
        return self.seq.outcome

    @property
    def done(self) -> bool:
        """The job ended and its last event was delivered."""
        return self.seq.done

    @property
    def over(self) -> bool:
        """Nothing more will come: done, or the agent forgot the job (when that is final)."""
        return self.seq.done or (self.gone is not None and self._gone_is_final)

    # -- the stream --------------------------------------------------------------------------

    def subscribe(self) -> dict[str, Any]:
        """The subscribe frame resuming after :attr:`last_seq`."""
        self._subscribing = True
        return protocol.subscribe_frame(self.job_id, self.seq.last_seq)

    def unsubscribe(self) -> dict[str, Any]:
        """The unsubscribe frame for this job (the driver stops following it)."""
        self._subscribing = False
        return protocol.unsubscribe_frame(self.job_id)

    def stream_opened(self) -> Step:
        """The WebSocket is open (again): subscribe from where we are."""
        if self.over:
            return _NOTHING
        self.source = STREAM
        self._held = False
        return Step(send=(self.subscribe(),))

    def stream_lost(self) -> None:
        """The handshake failed or the socket dropped: poll until a stream opens again."""
        self._subscribing = False
        if self.source == STREAM:
            self.source = EVENTS

    def rewind(self, seq: int, *, later: bool = False) -> Step:
        """Events after ``seq`` were lost downstream (e.g. a store dropped them): fetch again.

        With ``later``, the stream is ignored until :meth:`resume` (the driver cannot take
        events now), and what was delivered is forgotten: a terminal snapshot that comes again
        is news again.
        """
        if self.gone is not None and self._gone_is_final:
            return _NOTHING
        if later:
            self.seq.rewind(seq)
            self._held = True
            return _NOTHING
        if self.seq.done or seq >= self.seq.last_seq:
            return _NOTHING
        self.seq.rewind(seq)
        if self.source == STREAM:
            return Step(send=(self.subscribe(),))
        return _NOTHING

    def resume(self) -> Step:
        """After ``rewind(…, later=True)``: ask the stream again from :attr:`last_seq`."""
        if not self._held:
            return _NOTHING
        self._held = False
        if self.source != STREAM or self.over:
            return _NOTHING
        return Step(send=(self.unsubscribe(), self.subscribe()))

    def receive(self, frame: Frame) -> Step:
        """One parsed frame from the stream (frames of other jobs are ignored)."""
        if self.over or frame.job_id != self.job_id:
            return _NOTHING
        self._begin()
        if isinstance(frame, (JobEvent, Resync)):
            if self._held:
                return _NOTHING  # rewound: the stream is asked again on resume()
            self._known()
            if isinstance(frame, Resync):
                self._subscribing = False
                return self._step(self._snapshot(frame.snapshot, frame.incarnation),
                                  frame.incarnation)
            return self._step(self._stream_event(frame), frame.incarnation)
        if isinstance(frame, Ack):
            if frame.event != protocol.EVENT_SUBSCRIBED:
                return _NOTHING
            self._subscribing = False
            self._known()  # the agent refuses a job it does not know (JOB_NOT_FOUND)
            return self._step(_NOTHING)
        if isinstance(frame, StreamError):
            self._subscribing = False
            if frame.code == protocol.JOB_NOT_FOUND:
                return self._missing(f"the agent does not know job {self.job_id} (JOB_NOT_FOUND)")
            self.source = EVENTS
            return Step(refused=frame)
        return _NOTHING  # a frame kind of a newer agent

    def _stream_event(self, event: JobEvent) -> Step:
        if event.kind == KIND_SNAPSHOT:
            return self._snapshot(event, event.incarnation)
        place = self.seq.place(event)
        if place == GAP:
            if self._subscribing or self.source != STREAM:
                return _NOTHING  # the replay we asked for is on its way
            return Step(send=(self.subscribe(),))
        if place == NEXT:
            return Step(events=(self.seq.deliver(event),))
        return _NOTHING  # a replay overlap (the stream numbers every event)

    # -- polling -----------------------------------------------------------------------------

    @property
    def polls_events(self) -> bool:
        """:meth:`poll_path` names the events endpoint (not the job's detail)."""
        return self.source != DETAIL and not self._detail_once

    def poll_path(self) -> str:
        """The ``GET`` path to poll now."""
        if not self.polls_events:
            return protocol.job_path(self.job_id)
        return protocol.events_path(self.job_id, self.seq.last_seq)

    def receive_answer(self, answer: Answer) -> Step:
        """The answer to the request :meth:`poll_path` named."""
        if self.over:
            return _NOTHING
        self._begin()
        asked = self.poll_path()
        if not self.polls_events:
            return self._detail_answer(answer, asked)
        return self._events_answer(answer, asked)

    def _events_answer(self, answer: Answer, asked: str) -> Step:
        if answer.ok:
            try:
                page = protocol.parse_events_page(answer.data, self.job_id)
            except ProtocolError as error:
                return Step(problem=f"GET {asked}: {error}")
            self._known()
            cursor, delivered = self.seq.last_seq, []
            for event in page.events:
                place = self.seq.place(event)
                if place == GAP:
                    break  # a hole in the page: the next poll asks after it
                if place == NEXT:
                    delivered.append(self.seq.deliver(event))
            if not delivered and page.last_seq is not None and page.last_seq < cursor:
                # numbered below us, and the agent does not say 409: its detail at its last seq
                self._detail_once, self._detail_seq = True, page.last_seq
                return self._step(Step(again=True), page.incarnation)
            step = Step(events=tuple(delivered), rejected=page.rejected)
            at_end = page.last_seq is None or self.seq.last_seq >= page.last_seq
            if page.terminal and (at_end or not delivered):
                latest = self.seq.latest
                if at_end and latest is not None and latest.terminal:
                    self.seq.done = True
                elif not self.seq.done:
                    # ended, and every event is behind us: its detail is the final word
                    self._detail_once = True
                    step = attr.evolve(step, again=True)
            return self._step(step, page.incarnation)
        if answer.code == protocol.JOB_NOT_FOUND:
            return self._missing(f"the agent does not know job {self.job_id} (JOB_NOT_FOUND)")
        details = answer.error.details if answer.error is not None else None
        if answer.status == 410 and answer.code == protocol.EVENTS_EXPIRED:
            return self._detail_snapshot(details, asked)
        if answer.status == 409:  # EVENTS_AHEAD: details {last_seq, incarnation, job}
            info = details if isinstance(details, Mapping) else {}
            now, seq = _text(info.get("incarnation")), _count(info.get("last_seq"))
            detail = info.get("job")
            if not isinstance(detail, Mapping) and "status" in info:
                detail = info  # an agent that puts the detail itself there
            if isinstance(detail, Mapping):
                return self._detail_snapshot(detail, asked, seq=seq, now=now)
            self._detail_once, self._detail_seq = True, seq
            return self._step(Step(again=True), now)
        if answer.status in (404, 405):
            self.source = DETAIL  # an original agent: no events endpoint
            return Step(again=True)
        return Step(problem=f"GET {asked}: {answer.describe()}")

    def _detail_answer(self, answer: Answer, asked: str) -> Step:
        if answer.status == 404:
            return self._missing(f"the agent does not know job {self.job_id} (HTTP 404)")
        if not answer.ok:
            return Step(problem=f"GET {asked}: {answer.describe()}")
        once, seq = self._detail_once, self._detail_seq
        self._detail_once, self._detail_seq = False, None
        return self._detail_snapshot(answer.data, asked, seq=seq, authoritative=once)

    def _detail_snapshot(
        self, detail: Any, asked: str, *, seq: int | None = None, authoritative: bool = True,
        now: str | None = None,
    ) -> Step:
        try:
            snapshot = protocol.snapshot_event(self.job_id, detail, seq)
        except ProtocolError as error:
            return Step(problem=f"GET {asked}: unreadable job detail ({error})")
        self._known()
        now = now or _text(detail.get("incarnation"))
        return self._step(self._snapshot(snapshot, now, authoritative=authoritative), now)

    def receive_polled(self, outcome: PollOutcome) -> Step:
        """What a pass over REST found (another follower's requests; see the module doc)."""
        if self.over:
            return _NOTHING
        self._begin()
        if outcome.gone is not None:
            return self._missing(outcome.gone)
        self._known()
        delivered: list[JobEvent] = []
        for event in outcome.events:
            if event.job_id != self.job_id:
                continue
            if event.kind == KIND_SNAPSHOT:
                delivered += self._snapshot(event, outcome.incarnation).events
                continue
            place = self.seq.place(event)
            if place == GAP:
                break  # our cursor moved down meanwhile: the next poll asks after it
            if place == NEXT:
                delivered.append(self.seq.deliver(event))
        return self._step(Step(events=tuple(delivered)), outcome.incarnation)

    # -- what one input found ----------------------------------------------------------------

    def _begin(self) -> None:
        self._renumbered, self._found = None, False

    def _step(self, step: Step, incarnation: str | None = None) -> Step:
        """``step`` with what this input found; the input's ``incarnation`` is now current."""
        self.seq.saw(incarnation)
        if self._renumbered is None and not self._found:
            return step
        return attr.evolve(step, renumbered=self._renumbered, found=self._found)

    def _snapshot(
        self, snapshot: JobEvent, now: str | None, *, authoritative: bool = True
    ) -> Step:
        events, renumbered = self.seq.snapshot(snapshot, authoritative=authoritative, now=now)
        self._renumbered = renumbered or self._renumbered
        return Step(events=events)

    def _known(self) -> None:
        self.known = True
        if self.gone is not None and not self._gone_is_final:
            self.gone = None
            self._found = True

    def _missing(self, reason: str) -> Step:
        self.gone, self.known = reason, False
        return Step(missing=reason)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
