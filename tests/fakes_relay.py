"""An in-memory :class:`~lpa.relay.interfaces.IRelayStore` for relay transport tests.

It runs the same row rules as the PostgreSQL store (:mod:`lpa.relay.rows`) and records what a
real store would have notified, so transport tests can assert on rows and notifications without
a database.  Faults: set :attr:`FakeRelayStore.error` to make every call errback, or call
:meth:`FakeRelayStore.hold` to keep calls pending until :meth:`FakeRelayStore.release`.

Usage::

    store = FakeRelayStore()
    host_job = store.add_host_job(row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1",
                                  agent=AgentAddress("agent1.example", 12443))
    store.apply_events(host_job, [event], TRANSPORT_WS)
    store.rows["r1"].status, store.rows["r1"].output, store.notifications, store.calls

Notifications carry what a real one carries: ``output`` is the text new in that call (``None``
when there is none), not the row's whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lpa.relay.interfaces import AgentAddress, ApplyResult, HostJob, IRelayStore
from lpa.relay.missing_record import IMissingRecord
from lpa.relay.rows import (
    DB_RUNNING,
    ROW_MISSING,
    Reduction,
    RowState,
    apply_output,
    fail_state,
    reduce_events,
    rollup_status,
)


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class FakeRow(RowState):
    """A row as the real store reads it, plus its whole ``output`` (kept here in one piece)."""

    output: str = ""


@attr.s(auto_attribs=True, kw_only=True)
class FakeCall:
    """One recorded store call."""

    method: str  # "running_host_jobs" | "apply_events" | "fail_host_job"
    host_job: HostJob | None = None
    events: tuple[Any, ...] = ()
    transport: str | None = None
    reason: str | None = None


@implementer(IRelayStore)
class FakeRelayStore:
    """In-memory rows keyed by ``row_id``; notifications as dicts (the payload fields)."""

    def __init__(self) -> None:
        self.rows: dict[str, FakeRow] = {}
        self.host_jobs: dict[str, HostJob] = {}
        self.job_status: dict[str, str] = {}
        self.calls: list[FakeCall] = []
        self.notifications: list[dict[str, Any]] = []
        #: when set, every call errbacks with this exception (a database outage)
        self.error: Exception | None = None
        self._held: list[tuple[Deferred[Any], Any]] | None = None

    # -- test set-up ------------------------------------------------------------------------

    def add_host_job(
        self,
        *,
        row_id: str,
        job_id: str,
        host_id: str,
        agent_job_id: str,
        agent: AgentAddress | None = None,
        status: str = DB_RUNNING,
        last_seq: int = 0,
        missing_recorded: bool = False,
    ) -> HostJob:
        """Add a row (``running`` by default) and return its ``HostJob``."""
        host_job = HostJob(
            row_id=row_id,
            job_id=job_id,
            host_id=host_id,
            agent_job_id=agent_job_id,
            agent=agent or AgentAddress(host=f"{host_id}.example", port=12443),
            last_seq=last_seq,
            missing_recorded=missing_recorded,
        )
        self.host_jobs[row_id] = host_job
        self.rows[row_id] = FakeRow(status=status, last_seq=last_seq, agent_job_id=agent_job_id)
        self.job_status.setdefault(job_id, DB_RUNNING)
        return host_job

    def hold(self) -> None:
        """From now on calls stay pending until :meth:`release` (a slow database)."""
        self._held = []

    def release(self) -> None:
        """Fire every held call with its result, in order, and stop holding."""
        held, self._held = self._held or [], None
        for deferred, result in held:
            deferred.callback(result)

    # -- IRelayStore ------------------------------------------------------------------------

    def _answer(self, compute: Any) -> Deferred[Any]:
        if self.error is not None:
            return defer.fail(self.error)
        result = compute()
        if self._held is not None:
            deferred: Deferred[Any] = Deferred()
            self._held.append((deferred, result))
            return deferred
        return defer.succeed(result)

    def running_host_jobs(self) -> Deferred[Any]:
        self.calls.append(FakeCall(method="running_host_jobs"))

        def compute() -> list[HostJob]:
            return [
                attr.evolve(self.host_jobs[row_id], last_seq=row.last_seq)
                for row_id, row in self.rows.items()
                if row.status == DB_RUNNING
            ]

        return self._answer(compute)

    def apply_events(
        self, host_job: HostJob, events: Sequence[Any], transport: str
    ) -> Deferred[Any]:
        self.calls.append(
            FakeCall(method="apply_events", host_job=host_job, events=tuple(events),
                     transport=transport)
        )
        return self._answer(
            lambda: self._commit(
                host_job,
                self._reduce(
                    host_job, lambda row: reduce_events(row, host_job.agent_job_id, events)),
                transport,
            )
        )

    def fail_host_job(self, host_job: HostJob, reason: str, transport: str) -> Deferred[Any]:
        self.calls.append(
            FakeCall(method="fail_host_job", host_job=host_job, reason=reason, transport=transport)
        )
        return self._answer(
            lambda: self._commit(
                host_job, self._reduce(host_job, lambda row: fail_state(row, reason)), transport
            )
        )

    # -- the "transaction" ------------------------------------------------------------------

    def _reduce(self, host_job: HostJob, reduce: Any) -> Reduction | None:
        row = self.rows.get(host_job.row_id)
        if row is None:
            return None
        if row.agent_job_id != host_job.agent_job_id:  # re-dispatched: not ours any more
            return reduce_events(row, host_job.agent_job_id, ())
        reduced: Reduction | None = reduce(row)
        return reduced

    def _commit(
        self, host_job: HostJob, reduction: Reduction | None, transport: str
    ) -> ApplyResult:
        if reduction is None:  # the row was deleted: stop following it, as the real store says
            return ApplyResult(
                applied=0, last_seq=host_job.last_seq, row_status=ROW_MISSING, terminal=True
            )
        state = reduction.state
        assert isinstance(state, FakeRow)
        notified = 0
        if reduction.changed:
            state = attr.evolve(state, output=apply_output(state.output, reduction))
            self.rows[host_job.row_id] = state
            self.notifications.append(
                {
                    "event_type": "host",
                    "job_id": host_job.job_id,
                    "host_id": host_job.host_id,
                    "status": state.status,
                    "output": reduction.output_added or None,
                    "error_message": state.error_message,
                    "agent_job_id": host_job.agent_job_id,
                    "seq": state.last_seq,
                    "transport": transport,
                    "progress": state.progress,
                }
            )
            notified += 1
        if reduction.became_terminal:
            notified += self._rollup(host_job.job_id)
        return ApplyResult(
            applied=reduction.applied,
            last_seq=state.last_seq,
            row_status=state.status,
            terminal=state.terminal,
            notified=notified,
        )

    def _rollup(self, job_id: str) -> int:
        if self.job_status.get(job_id) in ("succeeded", "failed", "cancelled"):
            return 0
        statuses = [
            self.rows[row_id].status
            for row_id, host_job in self.host_jobs.items()
            if host_job.job_id == job_id
        ]
        status = rollup_status(statuses)
        if status is None:
            return 0
        self.job_status[job_id] = status
        self.notifications.append(
            {
                "event_type": "job",
                "job_id": job_id,
                "host_id": "",
                "status": status,
                "succeeded_count": statuses.count("succeeded"),
                "failed_count": statuses.count("failed"),
                "host_count": len(statuses),
            }
        )
        return 1


@implementer(IMissingRecord)
class FakeMissingRecord:
    """An in-memory :class:`~lpa.relay.missing_record.IMissingRecord`.

    ``recorded[row_id]`` is what ``mark`` answers (seconds since the first JOB_NOT_FOUND a
    database would hold; 0.0 when absent); set :attr:`error` to make every call errback.  Given
    a ``clock``, ``mark`` keeps the clock's time at the first call instead and answers the
    seconds since then, as a database would across a relay restart.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock
        self.since: dict[str, float] = {}  # with a clock: the first mark's time
        self.recorded: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []  # ("mark" | "clear", row_id)
        self.error: Exception | None = None

    def mark(self, row_id: str, agent_job_id: str) -> Deferred[Any]:
        self.calls.append(("mark", row_id))
        if self.error is not None:
            return defer.fail(self.error)
        if self._clock is not None:
            now = self._clock.seconds()
            return defer.succeed(now - self.since.setdefault(row_id, now))
        return defer.succeed(self.recorded.setdefault(row_id, 0.0))

    def clear(self, row_id: str) -> Deferred[Any]:
        self.calls.append(("clear", row_id))
        if self.error is not None:
            return defer.fail(self.error)
        self.recorded.pop(row_id, None)
        self.since.pop(row_id, None)
        return defer.succeed(None)
