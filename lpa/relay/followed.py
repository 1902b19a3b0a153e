"""One running row an agent link follows: the protocol's rules, then the store.

The rules of following a job are the client's own (:class:`~lpa.follower.JobFollower`, the
same as ``lpa agent watch``: order, duplicates, gaps, resync, 409/410 snapshots, an agent that
lost or renumbered events, JOB_NOT_FOUND); this object does what each of its steps says::

    frame (WebSocket) ──▶ follower.receive ──────┐
    poll outcome ───────▶ follower.receive_polled ┴─▶ Step
        events      ─▶ ApplyQueue (lpa.relay.applying) ─▶ store.apply_events, one call at a time
        send        ─▶ the link's WebSocket (subscribe from the last seq received …)
        renumbered  ─▶ one warning: the agent lost or renumbered events, by how much
        missing     ─▶ the link's JOB_NOT_FOUND deadline (lpa.relay.missing)
        known       ─▶ cleared (and, the first time, a time an earlier relay left in the row)
    the queue dropped events (store down too long) ─▶ follower.rewind(applied seq, later)
        … the store takes events again ─▶ follower.resume(): unsubscribe, subscribe from there

The follower never ends on JOB_NOT_FOUND here (``gone_is_final=False``): the row ends failed
only at the link's deadline, and any answer that shows the job again cancels it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.follower import JobFollower, PollOutcome, Step
from lpa.protocol import Frame
from lpa.relay.applying import ApplyQueue
from lpa.relay.backoff import Backoff
from lpa.relay.interfaces import TRANSPORT_POLL, TRANSPORT_WS, ApplyResult, HostJob, IRelayStore
from lpa.relay.missing import MissingJobs
from lpa.relay.numbering import BEHIND_FORMAT, behind_fields

_log = Logger()


class FollowedJob:
    """One host job of an agent link (see the module docstring).

    :param send: sends one frame on the link's WebSocket (nothing when it is not open).
    :param on_applied: ``on_applied(followed, result)`` after each store call that succeeded.
    """

    __slots__ = ("_missing", "_send", "agent", "failing", "follower", "host_job", "queue")

    def __init__(
        self,
        host_job: HostJob,
        *,
        agent: str,
        store: IRelayStore,
        clock: IReactorTime,
        make_backoff: Callable[[], Backoff],
        max_queued: int,
        send: Callable[[dict[str, Any]], None],
        missing: MissingJobs,
        on_applied: Callable[[FollowedJob, ApplyResult], None],
    ) -> None:
        self.host_job = host_job
        self.agent = agent
        self.follower = JobFollower(host_job.agent_job_id, host_job.last_seq, gone_is_final=False)
        self.queue = ApplyQueue(
            host_job,
            store=store,
            clock=clock,
            make_backoff=make_backoff,
            max_queued=max_queued,
            on_applied=lambda result: on_applied(self, result),
            on_ready=lambda: self._do(self.follower.resume(), TRANSPORT_WS),
            on_dropped=self._dropped,
        )
        self._send = send
        self._missing = missing
        #: a fail_host_job call is in flight
        self.failing = False

    @property
    def row_id(self) -> str:
        return self.host_job.row_id

    @property
    def agent_job_id(self) -> str:
        return self.host_job.agent_job_id

    @property
    def pollable(self) -> bool:
        """Worth polling now: the store takes its events and it is not being ended."""
        return not self.queue.retrying and not self.failing

    def stream_opened(self) -> None:
        """The link's WebSocket opened: subscribe from the last seq received."""
        self._do(self.follower.stream_opened(), TRANSPORT_WS)

    def stream_lost(self) -> None:
        self.follower.stream_lost()

    def receive(self, frame: Frame) -> None:
        """A frame of this job from the WebSocket."""
        self._do(self.follower.receive(frame), TRANSPORT_WS)

    def receive_polled(self, outcome: PollOutcome) -> None:
        """What a poll of this job found."""
        self._do(self.follower.receive_polled(outcome), TRANSPORT_POLL)

    def unsubscribe(self) -> dict[str, Any]:
        """The frame that stops the agent sending this job's events."""
        return self.follower.unsubscribe()

    def _dropped(self, applied_seq: int) -> None:
        self._do(self.follower.rewind(applied_seq, later=True), TRANSPORT_WS)

    def _do(self, step: Step, transport: str) -> None:
        for frame in step.send:
            self._send(frame)
        if step.renumbered is not None:
            _log.warn(
                BEHIND_FORMAT, row_id=self.row_id, **behind_fields(self.agent, step.renumbered)
            )
        if step.missing is not None:
            self._missing.saw_missing(self.row_id, self.agent_job_id, transport)
        elif self.follower.known:  # step.found, or any later answer: cheap, the link dedupes
            self._missing.saw_known(self.row_id, self.host_job.missing_recorded)
        if step.events:
            self.queue.add(step.events, transport)
