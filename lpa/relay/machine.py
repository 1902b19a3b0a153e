"""``AgentLink``: the relay's state for one agent — one WebSocket carrying all its running jobs.

::

    start() ─▶ connecting ──handshake ok──▶ streaming ──open socket dropped──▶ connecting
                   │                          ▲  subscribe per job (after_seq),
                   │ handshake failed         │  slow backstop sweep over REST
                   ▼                          │
                polling ──handshake ok────────┘  (the factory redials with backoff; a reopened
                  every poll_interval; errors back off;  socket also sweeps over REST at once)
                  no usable answer past the deadline → the row ends failed

    any state ── stop() ──▶ stopped   (close frame sent, pollers stopped, queued events handed
                                       to the store)

The link parses what the agent sends (:func:`lpa.protocol.parse_frame`) and routes it by
``job_id`` to the :class:`~lpa.relay.followed.FollowedJob` of each row (the original relay
applied every job's events to its row); the poller's answers go to the row they were asked
for.  Each followed job applies the client's rules (:class:`~lpa.follower.JobFollower`) and
queues what they deliver for the store.  A job the agent says it does not know ends failed after
the unreachable deadline (:mod:`lpa.relay.missing`); a terminal result from the store ends the
job: unsubscribe and forget it (the original relay never left its loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.events import JobEvent
from lpa.follower import PollOutcome
from lpa.protocol import Ack, ProtocolError, Resync, StreamError, parse_frame
from lpa.relay.backoff import Backoff
from lpa.relay.followed import FollowedJob
from lpa.relay.interfaces import TRANSPORT_POLL, AgentAddress, ApplyResult, HostJob, IRelayStore
from lpa.relay.missing import MissingJobs
from lpa.relay.numbering import IncarnationWatch
from lpa.relay.poller import IPollTarget
from lpa.relay.ws_client import IWebSocketListener

_log = Logger()

CONNECTING = "connecting"
STREAMING = "streaming"
POLLING = "polling"
STOPPED = "stopped"


@implementer(IWebSocketListener, IPollTarget)
class AgentLink:
    """Follows every running job of one agent; see the module docstring for the states.

    :param dial: ``dial(address, listener)`` starts a reconnecting WebSocket and returns its
        handle (``send_json(dict) -> bool``, ``stop() -> Deferred``); production passes a
        :class:`~lpa.relay.ws_client.WebSocketDialer`.
    :param make_poller: ``make_poller(address, target, backstop=False)`` returns an
        :class:`~lpa.relay.poller.AgentPoller` (not started) polling for ``target``: the
        fallback poller, or with ``backstop=True`` the slow sweep that runs while streaming (a
        healthy-looking stream can still miss events; the sweep asks the events endpoint after
        the last seq received, which is normally empty).
    :param max_queued_events: per host job, events kept while the store is failing.
    :param missing_deadline: a job the agent says it does not know ends failed this long after
        the first such answer (the relay's unreachable deadline).
    :param missing_record: an :class:`~lpa.relay.missing_record.IMissingRecord` keeping that
        first answer's time in the row, so the deadline survives a relay restart (optional).
    """

    def __init__(
        self,
        address: AgentAddress,
        *,
        store: IRelayStore,
        clock: IReactorTime,
        dial: Callable[[AgentAddress, Any], Any],
        make_poller: Callable[..., Any],
        make_backoff: Callable[[], Backoff] = lambda: Backoff(1.0, 30.0),
        max_queued_events: int = 10000,
        missing_deadline: float = 900.0,
        missing_record: Any = None,
    ) -> None:
        self.address = address
        self.label = f"{address.host}:{address.port}"
        self.state = STOPPED
        self._store = store
        self._clock = clock
        self._dial = dial
        self._make_poller = make_poller
        self._make_backoff = make_backoff
        self._max_queued = max_queued_events
        self._followed: dict[str, FollowedJob] = {}  # by row_id
        self._ws: Any = None
        self._poller: Any = None
        self._poller_is_backstop = False
        #: why the last handshake or connection failed (for operators and tests)
        self.last_failure: str | None = None
        self._opened_before = False
        self.incarnations = IncarnationWatch(self.label)
        self._missing = MissingJobs(
            self.label,
            clock=clock,
            deadline=missing_deadline,
            on_deadline=self._missing_deadline,
            record=missing_record,
        )

    # -- what the scanner calls ------------------------------------------------------------

    @property
    def host_jobs(self) -> list[HostJob]:
        return [followed.host_job for followed in self._followed.values()]

    def start(self, host_jobs: Iterable[HostJob] = ()) -> None:
        """Follow ``host_jobs`` and start dialling."""
        for host_job in host_jobs:
            self._follow(host_job)
        self._set_state(CONNECTING)
        self._ws = self._dial(self.address, self)

    def update(self, host_jobs: Iterable[HostJob]) -> None:
        """The agent's running rows now: follow new ones, drop rows that are no longer running."""
        wanted = {host_job.row_id: host_job for host_job in host_jobs}
        for row_id, followed in list(self._followed.items()):
            current = wanted.get(row_id)
            if current is None or current.agent_job_id != followed.agent_job_id:
                self._drop(followed, "the row is no longer running with this agent job")
        for row_id, host_job in wanted.items():
            if row_id not in self._followed:
                self._follow(host_job)

    def stop(self) -> Deferred[None]:
        """Close the socket, stop polling, hand queued events to the store; fires once closed.

        In-flight store calls are not awaited: ``store.stop()`` (after every link) applies or
        keeps them within its own timeout, so a database outage cannot hang SIGTERM.  Events the
        store never got were not applied, so the next relay asks the agent for them again (it
        resumes from the seq in the database).
        """
        if self.state == STOPPED and self._ws is None:
            return succeed(None)
        self._set_state(STOPPED)
        waits: list[Deferred[None]] = []
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        ws, self._ws = self._ws, None
        if ws is not None:
            waits.append(ws.stop())
        self._missing.stop()
        for followed in list(self._followed.values()):
            followed.queue.flush()
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- following -------------------------------------------------------------------------

    def _follow(self, host_job: HostJob) -> None:
        followed = FollowedJob(
            host_job,
            agent=self.label,
            store=self._store,
            clock=self._clock,
            make_backoff=self._make_backoff,
            max_queued=self._max_queued,
            send=self._send,
            missing=self._missing,
            on_applied=self._applied,
        )
        self._followed[host_job.row_id] = followed
        _log.info(
            "following job {agent_job_id} (row {row_id}) on agent {agent} from seq {seq}",
            agent_job_id=host_job.agent_job_id,
            row_id=host_job.row_id,
            agent=self.label,
            seq=host_job.last_seq,
        )
        if self.state == STREAMING:
            followed.stream_opened()

    def _drop(self, followed: FollowedJob, why: str) -> None:
        if self._followed.get(followed.row_id) is not followed:
            return
        del self._followed[followed.row_id]
        self._missing.forget(followed.row_id)
        followed.queue.close()
        _log.info(
            "stopped following job {agent_job_id} (row {row_id}) on agent {agent}: {why}",
            agent_job_id=followed.agent_job_id,
            row_id=followed.row_id,
            agent=self.label,
            why=why,
        )
        if self.state == STREAMING:
            self._send(followed.unsubscribe())

    def _send(self, frame: dict[str, Any]) -> None:
        if self._ws is not None:
            self._ws.send_json(frame)

    def _by_agent_job(self, agent_job_id: str) -> list[FollowedJob]:
        return [f for f in self._followed.values() if f.agent_job_id == agent_job_id]

    def _set_state(self, state: str) -> None:
        if state != self.state:
            _log.info("agent {agent}: {old} → {new}", agent=self.label, old=self.state, new=state)
            self.state = state

    # -- WebSocket listener ----------------------------------------------------------------

    def _run_poller(self, backstop: bool) -> None:
        """Run the fallback poller (now) or the backstop sweep (after one interval)."""
        if self._poller is not None:
            if self._poller_is_backstop == backstop:
                return
            self._poller.stop()
        self._poller = self._make_poller(self.address, self, backstop=backstop)
        self._poller_is_backstop = backstop
        self._poller.start(now=not backstop)

    def ws_opened(self) -> None:
        if self.state == STOPPED:
            return
        reopened, self._opened_before = self._opened_before, True
        self._run_poller(backstop=True)
        self._set_state(STREAMING)
        for followed in list(self._followed.values()):
            followed.stream_opened()
        if reopened:
            # the agent may have restarted: an agent that lost or renumbered events can answer
            # a subscribe with nothing at all; its events endpoint tells (see lpa.follower)
            self._poller.poll_soon()

    def ws_failed(self, reason: str, handshake: bool) -> None:
        if self.state == STOPPED:
            return
        self.last_failure = reason
        for followed in list(self._followed.values()):
            followed.stream_lost()
        if not handshake:
            self._set_state(CONNECTING)  # the factory redials; a failed redial moves us to polling
            return
        self._run_poller(backstop=False)
        self._set_state(POLLING)

    def ws_message(self, message: dict[str, Any]) -> None:
        try:
            frame = parse_frame(message)
        except ProtocolError as error:
            _log.warn("agent {agent} sent a bad frame: {error}", agent=self.label, error=str(error))
            return
        if isinstance(frame, (JobEvent, Resync)):
            self.incarnations.saw(frame.incarnation)
        targets = self._by_agent_job(frame.job_id)
        if isinstance(frame, StreamError):
            _log.warn(
                "agent {agent} answered an error: {code} {text}",
                agent=self.label,
                code=frame.code,
                text=frame.message,
            )
        elif isinstance(frame, Resync) and targets:
            _log.info(
                "agent {agent}: resync of job {job_id} at seq {seq}",
                agent=self.label,
                job_id=frame.job_id,
                seq=frame.seq,
            )
        elif not targets or isinstance(frame, Ack):
            _log.debug(
                "agent {agent}: {frame} of job {job_id} (followed: {followed})",
                agent=self.label,
                frame=type(frame).__name__,
                job_id=frame.job_id,
                followed=bool(targets),
            )
        for followed in targets:
            followed.receive(frame)

    def _missing_deadline(self, row_id: str, reason: str, transport: str) -> None:
        followed = self._followed.get(row_id)
        if followed is not None:
            self._give_up(followed, reason, transport)

    # -- poll target -----------------------------------------------------------------------

    def poll_jobs(self) -> Sequence[tuple[HostJob, int]]:
        return [
            (f.host_job, f.follower.last_seq) for f in self._followed.values() if f.pollable
        ]

    def poll_answer(self, host_job: HostJob, outcome: PollOutcome) -> None:
        followed = self._followed.get(host_job.row_id)
        if followed is None or followed.agent_job_id != host_job.agent_job_id:
            return
        self.incarnations.saw(outcome.incarnation)
        followed.receive_polled(outcome)

    def poll_give_up(self, host_job: HostJob, reason: str) -> None:
        followed = self._followed.get(host_job.row_id)
        if followed is not None and followed.agent_job_id == host_job.agent_job_id:
            self._give_up(followed, reason, TRANSPORT_POLL)

    # -- ending rows -----------------------------------------------------------------------

    def _applied(self, followed: FollowedJob, result: ApplyResult) -> None:
        if result.terminal:
            self._drop(followed, f"the row is {result.row_status}")

    def _give_up(self, followed: FollowedJob, reason: str, transport: str) -> None:
        if followed.failing:
            return
        followed.failing = True
        _log.warn(
            "job {agent_job_id} (row {row_id}) ends failed: {reason}",
            agent_job_id=followed.agent_job_id,
            row_id=followed.row_id,
            reason=reason,
        )

        def done(result: ApplyResult) -> None:
            followed.failing = False
            self._drop(followed, f"ended: {reason}")

        def failed(failure: Failure) -> None:
            followed.failing = False
            _log.warn(
                "could not end job {agent_job_id} failed: {error}; will try again",
                agent_job_id=followed.agent_job_id,
                error=failure.getErrorMessage(),
            )

        self._store.fail_host_job(followed.host_job, reason, transport).addCallbacks(done, failed)
