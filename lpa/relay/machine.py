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

Events reach a host job only by ``job_id`` (the original relay applied every job's events to its row).  Per host job they go to
``store.apply_events`` one call at a time; events arriving meanwhile are batched into the next
call.  A failing store pauses that job (its events are kept, up to a bound; beyond it they are
dropped and fetched again from the last applied seq — never lost silently) and retries with
backoff.  A terminal result ends the job: unsubscribe and forget it (the original relay never left its loop).

Events at or below the seq already received are duplicates, except a snapshot (``resync``,
409/410, job detail) from an agent that lost or renumbered events: its final state is applied,
a lower non-final seq is continued from (:mod:`lpa.relay.numbering`).  A job the agent says it
does not know ends failed after the unreachable deadline (:mod:`lpa.relay.missing`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import attr
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.events import EVENT_JOB_COMPLETE, EVENT_JOB_STATUS, KIND_SNAPSHOT, JobEvent
from lpa.relay.backoff import Backoff
from lpa.relay.interfaces import (
    TRANSPORT_POLL,
    TRANSPORT_WS,
    AgentAddress,
    ApplyResult,
    HostJob,
    IRelayStore,
)
from lpa.relay.jobs_http import PollOutcome, incarnation_of
from lpa.relay.missing import MissingJobs
from lpa.relay.numbering import (
    APPLY,
    BEHIND_FORMAT,
    RENUMBER,
    IncarnationWatch,
    judge_snapshot,
)
from lpa.relay.poller import IPollTarget, snapshot_event
from lpa.relay.ws_client import IWebSocketListener

_log = Logger()

CONNECTING = "connecting"
STREAMING = "streaming"
POLLING = "polling"
STOPPED = "stopped"


@attr.s(auto_attribs=True, eq=False)
class _Followed:
    """One host job the link follows."""

    host_job: HostJob
    #: last seq the store confirmed applied (from the DB at first)
    applied_seq: int
    #: highest seq received (queued or applied): the resume point for subscribe and poll
    received_seq: int
    queue: list[tuple[JobEvent, str]] = attr.ib(factory=list)
    in_flight: Deferred | None = None
    retry: IDelayedCall | None = None
    backoff: Backoff | None = None
    #: events were dropped while the store was down: resubscribe from applied_seq on resume
    resubscribe: bool = False
    failing: bool = False  # a fail_host_job call is in flight
    #: the highest seq ever received: after an agent renumbered (received_seq moved down) the
    #: row's seq may be up to this high
    seq_floor: int = 0
    #: a terminal event was received (queued or applied)
    received_terminal: bool = False
    #: the agent's incarnation with the last event received (None: unknown or an old agent)
    incarnation: str | None = None

    @property
    def agent_job_id(self) -> str:
        return self.host_job.agent_job_id


@implementer(IWebSocketListener, IPollTarget)
class AgentLink:
    """Follows every running job of one agent; see the module docstring for the states.

    :param dial: ``dial(address, listener)`` starts a reconnecting WebSocket and returns its
        handle (``send_json(dict) -> bool``, ``stop() -> Deferred``); production passes a
        :class:`~lpa.relay.ws_client.WebSocketDialer`.
    :param make_poller: ``make_poller(address, target, backstop=False)`` returns an
        :class:`~lpa.relay.poller.AgentPoller` (not started) polling for ``target``: the
        fallback poller, or with ``backstop=True`` the slow sweep that runs while streaming
        (as Fleet's sweep backstop: a healthy-looking stream can still miss events; the sweep asks the
        events endpoint after the last seq received, which is normally empty).
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
        make_poller: Callable[[AgentAddress, Any], Any],
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
        self._followed: dict[str, _Followed] = {}  # by row_id
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

    def stop(self) -> Deferred:
        """Close the socket, stop polling, hand queued events to the store; fires once closed.

        In-flight store calls are not awaited: ``store.stop()`` (after every link) applies or
        keeps them within its own timeout, so a database outage cannot hang SIGTERM.  Events the
        store never got were not applied, so the next relay asks the agent for them again (it
        resumes from the seq in the database).
        """
        if self.state == STOPPED and self._ws is None:
            return succeed(None)
        self._set_state(STOPPED)
        waits: list[Deferred] = []
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        ws, self._ws = self._ws, None
        if ws is not None:
            waits.append(ws.stop())
        self._missing.stop()
        for followed in list(self._followed.values()):
            if followed.retry is not None and followed.retry.active():
                followed.retry.cancel()
            followed.retry = None
            self._pump(followed, force=True)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- following -------------------------------------------------------------------------

    def _follow(self, host_job: HostJob) -> None:
        followed = _Followed(
            host_job=host_job,
            applied_seq=host_job.last_seq,
            received_seq=host_job.last_seq,
            seq_floor=host_job.last_seq,
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
            self._subscribe(followed)

    def _drop(self, followed: _Followed, why: str) -> None:
        if self._followed.get(followed.host_job.row_id) is not followed:
            return
        del self._followed[followed.host_job.row_id]
        self._missing.forget(followed.host_job.row_id)
        if followed.retry is not None and followed.retry.active():
            followed.retry.cancel()
        followed.retry = None
        followed.queue.clear()
        _log.info(
            "stopped following job {agent_job_id} (row {row_id}) on agent {agent}: {why}",
            agent_job_id=followed.agent_job_id,
            row_id=followed.host_job.row_id,
            agent=self.label,
            why=why,
        )
        if self.state == STREAMING and self._ws is not None:
            self._ws.send_json({"action": "unsubscribe", "job_id": followed.agent_job_id})

    def _by_agent_job(self, agent_job_id: str) -> list[_Followed]:
        return [f for f in self._followed.values() if f.agent_job_id == agent_job_id]

    def _subscribe(self, followed: _Followed) -> None:
        self._ws.send_json(
            {
                "action": "subscribe",
                "job_id": followed.agent_job_id,
                "after_seq": followed.received_seq,
            }
        )

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
            followed.resubscribe = False
            self._subscribe(followed)
        if reopened:
            # the agent may have restarted: an agent that lost or renumbered events can answer
            # a subscribe with nothing at all; its events endpoint tells (see lpa.relay.jobs_http)
            self._poller.poll_soon()

    def ws_failed(self, reason: str, handshake: bool) -> None:
        if self.state == STOPPED:
            return
        self.last_failure = reason
        if not handshake:
            self._set_state(CONNECTING)  # the factory redials; a failed redial moves us to polling
            return
        self._run_poller(backstop=False)
        self._set_state(POLLING)

    def ws_message(self, message: dict) -> None:
        event = message.get("event")
        incarnation = incarnation_of(message)
        self.incarnations.saw(incarnation)
        if event in (EVENT_JOB_STATUS, EVENT_JOB_COMPLETE):
            try:
                job_event = JobEvent.from_wire(message)
            except ValueError as error:
                _log.warn(
                    "agent {agent} sent a bad event: {error}", agent=self.label, error=str(error)
                )
                return
            self._route(job_event, TRANSPORT_WS, incarnation)
        elif event == "resync":
            self._resync(message, incarnation)
        elif event == "error":
            self._agent_error(message)
        else:  # connected, subscribed, unsubscribed, anything newer
            _log.debug(
                "agent {agent}: {event} {job_id}",
                agent=self.label,
                event=event,
                job_id=message.get("job_id"),
            )

    def _route(self, job_event: JobEvent, transport: str, incarnation: str | None) -> None:
        targets = self._by_agent_job(job_event.job_id)
        if not targets:
            _log.debug(
                "agent {agent}: event of job {job_id} nobody follows; ignored",
                agent=self.label,
                job_id=job_event.job_id,
            )
            return
        for followed in targets:
            self._missing.saw_known(followed.host_job.row_id)
            self._receive(followed, [job_event], transport, incarnation)

    def _resync(self, message: dict, incarnation: str | None) -> None:
        job_id = message.get("job_id")
        detail = message.get("job")
        targets = self._by_agent_job(job_id) if isinstance(job_id, str) else []
        if not targets:
            return
        try:
            snapshot = snapshot_event(
                job_id, detail if isinstance(detail, dict) else message, message.get("seq")
            )
        except ValueError as error:
            _log.warn(
                "agent {agent}: unreadable resync for {job_id}: {error}",
                agent=self.label,
                job_id=job_id,
                error=str(error),
            )
            return
        _log.info(
            "agent {agent}: resync of job {job_id} at seq {seq}",
            agent=self.label,
            job_id=job_id,
            seq=snapshot.seq,
        )
        for followed in targets:
            self._missing.saw_known(followed.host_job.row_id)
            self._receive(followed, [snapshot], TRANSPORT_WS, incarnation)

    def _agent_error(self, message: dict) -> None:
        code = message.get("error_code") or str(message.get("status", "")).upper()
        job_id = message.get("job_id")
        _log.warn(
            "agent {agent} answered an error: {code} {text}",
            agent=self.label,
            code=code,
            text=message.get("message"),
        )
        if code == "JOB_NOT_FOUND" and isinstance(job_id, str):
            for followed in self._by_agent_job(job_id):
                self._missing.saw_missing(followed.host_job.row_id, job_id, TRANSPORT_WS)

    def _missing_deadline(self, row_id: str, reason: str, transport: str) -> None:
        followed = self._followed.get(row_id)
        if followed is not None:
            self._give_up(followed, reason, transport)

    # -- poll target -----------------------------------------------------------------------

    def poll_jobs(self) -> Sequence[tuple[HostJob, int]]:
        return [
            (f.host_job, f.received_seq)
            for f in self._followed.values()
            if f.retry is None and not f.failing
        ]

    def poll_answer(self, host_job: HostJob, outcome: PollOutcome) -> None:
        followed = self._followed.get(host_job.row_id)
        if followed is None or followed.agent_job_id != host_job.agent_job_id:
            return
        self.incarnations.saw(outcome.incarnation)
        if outcome.gone is not None:
            self._missing.saw_missing(host_job.row_id, host_job.agent_job_id, TRANSPORT_POLL)
            return
        self._missing.saw_known(host_job.row_id)
        events = [e for e in outcome.events if e.job_id == followed.agent_job_id]
        self._receive(followed, events, TRANSPORT_POLL, outcome.incarnation)

    def poll_give_up(self, host_job: HostJob, reason: str) -> None:
        followed = self._followed.get(host_job.row_id)
        if followed is not None and followed.agent_job_id == host_job.agent_job_id:
            self._give_up(followed, reason, TRANSPORT_POLL)

    # -- applying --------------------------------------------------------------------------

    def _receive(
        self,
        followed: _Followed,
        events: Iterable[JobEvent],
        transport: str,
        incarnation: str | None = None,
    ) -> None:
        if followed.resubscribe and transport == TRANSPORT_WS:
            return  # dropped for the store: the stream resumes from applied_seq on resubscribe
        for job_event in events:
            if job_event.seq is not None:
                if job_event.seq <= followed.received_seq:
                    # already queued or applied (replay overlap, poll after WS …), unless it is
                    # the snapshot of an agent that lost or renumbered events
                    if not self._behind(followed, job_event, incarnation):
                        continue
                else:
                    followed.received_seq = job_event.seq
                if job_event.terminal and job_event.seq <= followed.seq_floor:
                    # numbered below what the row may hold (the agent renumbered): hand it over
                    # as the agent's final snapshot, which the store applies whatever its seq
                    job_event = attr.evolve(job_event, kind=KIND_SNAPSHOT)
                followed.seq_floor = max(followed.seq_floor, followed.received_seq)
            if job_event.terminal:
                followed.received_terminal = True
            followed.queue.append((job_event, transport))
        if incarnation is not None:
            followed.incarnation = incarnation
        if len(followed.queue) > self._max_queued:
            _log.warn(
                "job {agent_job_id}: {count} events wait for the store; dropping them to fetch "
                "again from seq {seq}",
                agent_job_id=followed.agent_job_id,
                count=len(followed.queue),
                seq=followed.applied_seq,
            )
            followed.queue.clear()
            followed.received_seq = followed.applied_seq
            followed.resubscribe = True
        self._pump(followed)

    def _behind(self, followed: _Followed, job_event: JobEvent, incarnation: str | None) -> bool:
        """A snapshot at or below the seq received: True to apply it (see lpa.relay.numbering)."""
        if job_event.kind != KIND_SNAPSHOT:
            return False
        judgement = judge_snapshot(
            self.label,
            job_event,
            had_seq=followed.received_seq,
            had_terminal=followed.received_terminal,
            incarnation_before=followed.incarnation,
            incarnation_now=incarnation,
        )
        if judgement.warn is not None:
            _log.warn(BEHIND_FORMAT, row_id=followed.host_job.row_id, **judgement.warn)
        if judgement.action == RENUMBER and job_event.seq is not None:
            followed.received_seq = job_event.seq
        return judgement.action == APPLY

    def _pump(self, followed: _Followed, force: bool = False) -> None:
        if followed.in_flight is not None or not followed.queue:
            return
        if followed.retry is not None and not force:
            return
        transport = followed.queue[0][1]
        batch: list[JobEvent] = []
        while followed.queue and followed.queue[0][1] == transport:
            batch.append(followed.queue.pop(0)[0])
        applying = self._store.apply_events(followed.host_job, batch, transport)
        followed.in_flight = applying
        applying.addCallbacks(
            self._applied,
            self._apply_failed,
            callbackArgs=(followed,),
            errbackArgs=(followed, batch, transport),
        )

    def _applied(self, result: ApplyResult, followed: _Followed) -> None:
        followed.in_flight = None
        followed.backoff = None
        followed.applied_seq = max(followed.applied_seq, result.last_seq)
        if result.terminal:
            self._drop(followed, f"the row is {result.row_status}")
            return
        self._resume(followed)

    def _apply_failed(
        self, failure: Failure, followed: _Followed, batch: list[JobEvent], transport: str
    ) -> None:
        followed.in_flight = None
        followed.queue[:0] = [(job_event, transport) for job_event in batch]
        if followed.backoff is None:
            followed.backoff = self._make_backoff()
        delay = followed.backoff.next_delay()
        _log.warn(
            "store refused {count} events of job {agent_job_id}: {error}; retrying in {delay:.1f}s",
            count=len(batch),
            agent_job_id=followed.agent_job_id,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        if self.state == STOPPED or self._followed.get(followed.host_job.row_id) is not followed:
            return  # the store keeps what it was given on stop; nothing more we can do
        followed.retry = self._clock.callLater(delay, self._resume, followed)

    def _resume(self, followed: _Followed) -> None:
        followed.retry = None
        if followed.resubscribe:
            followed.resubscribe = False
            if self.state == STREAMING:
                self._ws.send_json({"action": "unsubscribe", "job_id": followed.agent_job_id})
                self._subscribe(followed)
        self._pump(followed)

    def _give_up(self, followed: _Followed, reason: str, transport: str) -> None:
        if followed.failing:
            return
        followed.failing = True
        _log.warn(
            "job {agent_job_id} (row {row_id}) ends failed: {reason}",
            agent_job_id=followed.agent_job_id,
            row_id=followed.host_job.row_id,
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
