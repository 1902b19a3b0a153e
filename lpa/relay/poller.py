"""Polling an agent's jobs over mTLS: the fallback when its WebSocket handshake fails, and the
slow backstop sweep while it streams.

One :class:`AgentPoller` per agent link, driven by a ``LoopingCall`` on the injected clock::

    every interval:  for each followed job of the agent (IPollTarget.poll_jobs)
        AgentJobsHttp.fetch(job, after=N)        (one pass with the follower's rules:
                                                  lpa.relay.jobs_http)
          → target.poll_answer(host_job, outcome)   events, "not known", the incarnation
    a failed request:   the interval doubles up to ``max_interval``; a job whose agent stays
                        unreachable past ``deadline`` ends failed (the original polled forever)
    poll_soon():        one pass now (the link asks after a reconnect: an agent restart is when
                        an agent can lose or renumber events)

The first failure's time lives in memory and, through an optional
:class:`~lpa.relay.missing_record.IMissingRecord`, in the row (``relay_unreachable_since``):
when the row already holds an earlier time (this relay restarted, another relay followed the
agent before, or the link swapped pollers) the deadline counts from that one, so restarting
relays cannot keep a row of an agent gone for good running.  If the record cannot be written
the deadline counts from this poller's own first failure.  A usable answer clears both; the
first answer a poller gets for a row clears the row's record even if this poller never saw it
fail, so a time left by an earlier relay cannot end the row at the next short outage.
"""

from __future__ import annotations

from collections.abc import Sequence

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from lpa.follower import PollOutcome
from lpa.relay.interfaces import HostJob
from lpa.relay.jobs_http import AgentJobsHttp, PollError
from lpa.relay.missing_record import IMissingRecord, first_line

_log = Logger()


class IPollTarget(Interface):
    """What a poller feeds: the agent link."""

    def poll_jobs() -> Sequence[tuple[HostJob, int]]:
        """The host jobs to poll now, each with the seq to poll after."""

    def poll_answer(host_job: HostJob, outcome: PollOutcome) -> None:
        """The agent answered for ``host_job``: events to apply (maybe none), or "not known"."""

    def poll_give_up(host_job: HostJob, reason: str) -> None:
        """End ``host_job`` failed: no usable answer from its agent until the deadline."""


class IAgentPoller(Interface):
    """Polling one agent's jobs for an :class:`IPollTarget`."""

    def start(now: bool = True) -> None:
        """Start the loop (first pass now unless ``now`` is False)."""

    def stop() -> None:
        """Stop the loop and cancel an in-flight request."""

    def poll_soon() -> None:
        """Run one pass now (unless one is running), then go on at the interval."""


@attr.s(auto_attribs=True, eq=False)
class _Failing:
    agent_job_id: str
    since: float


@implementer(IAgentPoller)
class AgentPoller:
    """A ``LoopingCall`` polling every followed job of one agent; errors back off.

    :param record: where the first failure's time is also kept (see the module docstring).
    """

    def __init__(
        self,
        http: AgentJobsHttp,
        target: IPollTarget,
        *,
        clock: IReactorTime,
        interval: float,
        max_interval: float,
        deadline: float,
        record: IMissingRecord | None = None,
    ) -> None:
        self._http = http
        self._record = record
        self._target = target
        self._clock = clock
        self.base_interval = interval
        self.max_interval = max(interval, max_interval)
        self.deadline = deadline
        self.interval = interval
        self._failing_since: dict[str, _Failing] = {}
        #: rows whose record this poller cleared (or found failing and cleared) since it started
        self._cleared: set[str] = set()
        self._loop: LoopingCall | None = None
        self._tick_deferred: Deferred[None] | None = None
        self._stopped = False

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self, now: bool = True) -> None:
        if self._loop is None:
            self._stopped = False
            self._run_loop(self.interval, now)

    def stop(self) -> None:
        """Stop polling; an in-flight request is cancelled."""
        self._stopped = True
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        tick, self._tick_deferred = self._tick_deferred, None
        if tick is not None:
            tick.cancel()

    def poll_soon(self) -> None:
        if self._loop is None or self._tick_deferred is not None:
            return  # not running, or a pass is polling right now anyway
        self._loop.stop()
        self._run_loop(self.interval, now=True)

    def _run_loop(self, interval: float, now: bool) -> None:
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(interval, now=now).addErrback(
            lambda f: _log.failure("poll loop of {agent} died", f, agent=self._http.label)
        )

    def _tick(self) -> Deferred[None]:
        tick = Deferred.fromCoroutine(self.poll_once())
        self._tick_deferred = tick

        def done(result: object) -> None:
            if self._tick_deferred is tick:
                self._tick_deferred = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                _log.failure("poll tick of {agent} failed", result, agent=self._http.label)

        tick.addBoth(done)
        return tick

    async def poll_once(self) -> None:
        """One pass over the agent's followed jobs."""
        jobs = list(self._target.poll_jobs())
        now = self._clock.seconds()
        failed = False
        unreachable: str | None = None
        wait: float | None = None
        for host_job, after_seq in jobs:
            if unreachable is not None:
                self._failing(host_job, unreachable, now)
                continue
            if wait is not None:
                continue  # rate limited: the rest of the pass waits for the next tick
            try:
                outcome = await self._http.fetch(host_job.agent_job_id, after_seq)
            except PollError as error:
                if self._stopped:
                    return
                failed = True
                if error.retry_after is not None:
                    wait = error.retry_after
                    _log.info(
                        "agent {agent} rate-limits polls; waiting {wait:g}s",
                        agent=self._http.label,
                        wait=wait,
                    )
                    continue
                _log.warn(
                    "poll of job {agent_job_id} failed: {reason}",
                    agent_job_id=host_job.agent_job_id,
                    agent=self._http.label,
                    reason=str(error),
                )
                self._failing(host_job, error.cause, now)
                if error.transport:
                    unreachable = error.cause
                continue
            if self._stopped:
                return
            self._answered(host_job)
            self._target.poll_answer(host_job, outcome)
        followed = {host_job.row_id for host_job, _ in jobs}
        for row_id in list(self._failing_since):
            if row_id not in followed:
                del self._failing_since[row_id]
        self._cleared &= followed
        self._reschedule(failed, wait)

    def _failing(self, host_job: HostJob, cause: str, now: float) -> None:
        """No usable answer for ``host_job``; past the deadline the job ends failed."""
        failing = self._failing_since.get(host_job.row_id)
        if failing is None or failing.agent_job_id != host_job.agent_job_id:
            failing = _Failing(agent_job_id=host_job.agent_job_id, since=now)
            self._failing_since[host_job.row_id] = failing
            if self._record is not None:
                self._record.mark(host_job.row_id, host_job.agent_job_id).addCallbacks(
                    self._marked,
                    self._record_failed,
                    callbackArgs=(host_job.row_id, failing),
                    errbackArgs=(host_job.agent_job_id,),
                )
        since = failing.since
        if now - since >= self.deadline:
            del self._failing_since[host_job.row_id]
            self._target.poll_give_up(
                host_job,
                f"the relay got no usable answer from agent {self._http.label} for "
                f"{now - since:.0f}s (deadline {self.deadline:g}s): {cause}",
            )

    def _marked(self, elapsed: float, row_id: str, failing: _Failing) -> None:
        """The row held an earlier first-failure time: count the deadline from it."""
        if self._failing_since.get(row_id) is not failing:
            return  # answered, ended or no longer followed meanwhile
        now = self._clock.seconds()
        if elapsed <= now - failing.since + 1.0:
            return  # recorded just now (or the clocks agree): nothing to correct
        failing.since = now - elapsed
        _log.info(
            "agent {agent} has given no usable answer for job {agent_job_id} (row {row_id}) for "
            "{elapsed:.0f}s already (recorded before this poller followed it)",
            agent=self._http.label,
            agent_job_id=failing.agent_job_id,
            row_id=row_id,
            elapsed=elapsed,
        )

    def _record_failed(self, failure: Failure, agent_job_id: str) -> None:
        _log.warn(
            "could not record in the database when agent {agent} stopped answering for job "
            "{agent_job_id}: {error}; its deadline counts from this relay's first failed poll",
            agent=self._http.label,
            agent_job_id=agent_job_id,
            error=first_line(failure.value),
        )

    def _answered(self, host_job: HostJob) -> None:
        """A usable answer for ``host_job``: its deadline (and the row's record) is cleared.

        The first answer this poller gets for a row clears the row's record too, even when this
        poller never saw the row failing: a time left by a relay that restarted (or lost the
        agent to us) while the agent was away must not end the row at the next short outage.
        """
        failing = self._failing_since.pop(host_job.row_id, None)
        first = host_job.row_id not in self._cleared
        if (failing is not None or first) and self._record is not None:
            self._cleared.add(host_job.row_id)
            agent_job_id = failing.agent_job_id if failing else host_job.agent_job_id
            self._record.clear(host_job.row_id).addErrback(self._record_failed, agent_job_id)

    def _reschedule(self, failed: bool, wait: float | None = None) -> None:
        interval = min(self.max_interval, self.interval * 2) if failed else self.base_interval
        if wait is not None:
            interval = max(interval, wait)
        if interval != self.interval and self._loop is not None:
            self.interval = interval
            self._loop.stop()
            self._run_loop(interval, now=False)
        self.interval = interval
