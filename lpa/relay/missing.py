"""Jobs a reachable agent says it does not know: each ends failed after a deadline, not at once.

An agent answers ``JOB_NOT_FOUND`` (REST 404 or a WebSocket ``error``) for a job whose history
it lost (state directory wiped, host reinstalled, a backup restored).  An lpa agent answers only
after it loaded its history, so one such answer is already strong evidence; the deadline (the
same ``ws_relay_unreachable_deadline_secs`` as for an unreachable agent) guards against a
transient mistake — another agent briefly on the address, a proxy answering for it — and keeps
one rule for "the relay gave up on this host".  Any answer that shows the agent knows the job
again (an event, a snapshot, an empty events page) clears it::

    saw_missing(row) ──first──▶ warn, timer(deadline) ──fires──▶ on_deadline(row, reason)
         │  again: nothing new (past the deadline: on_deadline at once, e.g. after a failed write)
    saw_known(row) ──▶ timer cancelled, "knows job again", record cleared
         │  never missing here: a time the row held when read is cleared quietly; then nothing
    forget(row) / stop() ──▶ timer cancelled quietly

The first-seen time lives in memory and, through an optional
:class:`~lpa.relay.missing_record.IMissingRecord`, in the row (``relay_missing_since``): when the
row already holds an earlier time (this relay restarted, or took the agent over from another
relay) the deadline counts from that one.  If the record cannot be written (database down) the
deadline counts from this relay's own first answer, as it would without a record.  The first
answer that shows the job clears a time the row held when the relay read it
(``HostJob.missing_recorded``) even if this link never saw the job missing (the rule of the
unreachable record, :mod:`lpa.relay.poller`): a time left by an earlier relay, while the agent
had forgotten the job, must not end the row at once when the agent, having known the job again
without new events, forgets it once more much later.  That is one write per such row per link,
and none for the rows that hold no time (nearly all: a relay starting to follow thousands of
agents does not write to each row).
"""

from __future__ import annotations

from collections.abc import Callable

import attr
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpa.relay.missing_record import IMissingRecord, first_line

_log = Logger()


@attr.s(auto_attribs=True, eq=False)
class _Missing:
    agent_job_id: str
    since: float
    transport: str
    timer: IDelayedCall | None = None


class MissingJobs:
    """The missing jobs of one agent link (see the module docstring).

    :param on_deadline: ``on_deadline(row_id, reason, transport)``; ``reason`` is the sentence
        for the row's ``error_message``.
    :param record: where the first-seen time is also kept (see the module docstring).
    """

    def __init__(
        self,
        label: str,
        *,
        clock: IReactorTime,
        deadline: float,
        on_deadline: Callable[[str, str, str], None],
        record: IMissingRecord | None = None,
    ) -> None:
        self._label = label
        self._clock = clock
        self.deadline = deadline
        self._on_deadline = on_deadline
        self._record = record
        self._rows: dict[str, _Missing] = {}
        #: rows whose record this link cleared since it followed them (see the module docstring)
        self._cleared: set[str] = set()

    def __contains__(self, row_id: str) -> bool:
        return row_id in self._rows

    def saw_missing(self, row_id: str, agent_job_id: str, transport: str) -> None:
        """The agent said it does not know ``agent_job_id`` (the job of row ``row_id``)."""
        now = self._clock.seconds()
        missing = self._rows.get(row_id)
        if missing is not None and missing.agent_job_id == agent_job_id:
            missing.transport = transport
            if now - missing.since >= self.deadline:
                self._expire(row_id)
            return
        self.forget(row_id)
        missing = _Missing(agent_job_id=agent_job_id, since=now, transport=transport)
        self._rows[row_id] = missing
        missing.timer = self._clock.callLater(self.deadline, self._expire, row_id)
        _log.warn(
            "agent {agent} does not know job {agent_job_id} (row {row_id}): its job history was "
            "lost or it was reinstalled; the row ends failed in {deadline:g}s unless the agent "
            "knows the job again",
            agent=self._label,
            agent_job_id=agent_job_id,
            row_id=row_id,
            deadline=self.deadline,
        )
        if self._record is not None:
            self._record.mark(row_id, agent_job_id).addCallbacks(
                self._marked,
                self._record_failed,
                callbackArgs=(row_id, missing),
                errbackArgs=(agent_job_id,),
            )

    def _marked(self, elapsed: float, row_id: str, missing: _Missing) -> None:
        """The row held an earlier first-seen time: count the deadline from it."""
        if self._rows.get(row_id) is not missing:
            return  # known again, ended or stopped meanwhile
        now = self._clock.seconds()
        if elapsed <= now - missing.since + 1.0:
            return  # recorded just now (or the clocks agree): nothing to correct
        missing.since = now - elapsed
        _log.info(
            "agent {agent} has not known job {agent_job_id} (row {row_id}) for {elapsed:.0f}s "
            "already (recorded before this relay followed it)",
            agent=self._label,
            agent_job_id=missing.agent_job_id,
            row_id=row_id,
            elapsed=elapsed,
        )
        if missing.timer is not None and missing.timer.active():
            missing.timer.cancel()
        missing.timer = None
        if elapsed >= self.deadline:
            self._expire(row_id)
        else:
            missing.timer = self._clock.callLater(self.deadline - elapsed, self._expire, row_id)

    def _record_failed(self, failure: Failure, agent_job_id: str) -> None:
        _log.warn(
            "could not record in the database when agent {agent} stopped knowing job "
            "{agent_job_id}: {error}; its deadline counts from this relay's first answer",
            agent=self._label,
            agent_job_id=agent_job_id,
            error=first_line(failure.value),
        )

    def saw_known(self, row_id: str, recorded: bool = False) -> None:
        """The agent answered for the job of ``row_id``: it knows it (again).

        ``recorded``: the row held a time when the relay read it (``HostJob.missing_recorded``).
        """
        missing = self._rows.get(row_id)
        if missing is None:
            if recorded and row_id not in self._cleared:
                self._clear(row_id)  # a time an earlier relay (or link) left
            return
        self.forget(row_id)
        self._clear(row_id)
        _log.info(
            "agent {agent} knows job {agent_job_id} (row {row_id}) again",
            agent=self._label,
            agent_job_id=missing.agent_job_id,
            row_id=row_id,
        )

    def _clear(self, row_id: str) -> None:
        self._cleared.add(row_id)
        if self._record is not None:
            self._record.clear(row_id).addErrback(self._clear_failed, row_id)

    def _clear_failed(self, failure: Failure, row_id: str) -> None:
        _log.warn(
            "could not clear the JOB_NOT_FOUND time kept in row {row_id} (agent {agent}): "
            "{error}; should the agent forget that job again, its deadline may count from the "
            "older time",
            agent=self._label,
            row_id=row_id,
            error=first_line(failure.value),
        )

    def forget(self, row_id: str) -> None:
        """Stop tracking ``row_id`` quietly (the row ended or is no longer followed)."""
        self._cleared.discard(row_id)
        missing = self._rows.pop(row_id, None)
        if missing is not None and missing.timer is not None and missing.timer.active():
            missing.timer.cancel()

    def stop(self) -> None:
        for row_id in list(self._rows):
            self.forget(row_id)
        self._cleared.clear()

    def _expire(self, row_id: str) -> None:
        missing = self._rows.get(row_id)
        if missing is None:
            return
        if missing.timer is not None and missing.timer.active():
            missing.timer.cancel()
        missing.timer = None  # stays tracked: a failed write is retried at the next answer
        elapsed = self._clock.seconds() - missing.since
        self._on_deadline(
            row_id,
            f"agent {self._label} has not known job {missing.agent_job_id} for {elapsed:.0f}s "
            f"(JOB_NOT_FOUND; deadline {self.deadline:g}s): its job history was lost or it was "
            "reinstalled",
            missing.transport,
        )
