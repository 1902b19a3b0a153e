"""The jobs the agent knows, their numbered events, and how both survive a crash.

Every change goes to the write-ahead log first; an event is published (kept for replay, sent to
the WebSocket sessions, shown by the REST API) only once its record is durable::

    emit/output/close_job ─▶ EventLog.make (next seq) ─▶ IEventJournal.append ─▶ (fdatasync)
                                                                                    │
    job.view, EventLog.publish ─▶ subscribers ◀──────── durable, in order ◀────────┘

Records (one JSON array per line of the log, see :mod:`lpa.agent.replay`): ``["j", job]`` (a
job's full state, written when it is created and at every change of status), ``["e", …]`` (an
event, its fields by position) and ``["d", job_id]`` (deleted or past retention).

Checkpoint: once the log holds ``checkpoint_bytes`` since the last one (and at start and stop),
the jobs that changed are written to the :class:`~lpa.agent.interfaces.IJobStore` (one file per
job) with their events, the durable ones and those still being written, and the log segments
before that point are deleted.  The log therefore stays small, and a finished job is written to
the store about once.

Recovery (:meth:`JobHistory.load`): the store, then the log's records on top, in order
(:mod:`lpa.agent.replay`).  After a crash the next seq of every job is therefore one above its
last durable event, and nothing a client saw is numbered again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.agent.eventlog import EventLog
from lpa.agent.incarnation import Incarnations
from lpa.agent.interfaces import IEventJournal, IJobStore
from lpa.agent.joblines import append_log
from lpa.agent.model import Job
from lpa.agent.replay import MAX_LOG_LINES, Replay, event_record, note_offset
from lpa.agent.store import job_to_dict
from lpa.events import (
    EVENT_JOB_COMPLETE,
    EVENT_JOB_STATUS,
    KIND_OUTPUT,
    KIND_PROGRESS,
    KIND_STATUS,
    KIND_WAITING_FOR_LOCK,
    JobEvent,
    rfc3339_from_epoch,
)

#: log bytes after which a checkpoint retires the log's older segments
CHECKPOINT_BYTES = 4 * 1024 * 1024

_log = Logger()


class JobHistory:
    """Jobs by id (oldest first) with their events, written ahead and checkpointed.

    :param incarnations: names this start of the agent (``load`` calls it once).
    :param history_limit: ended jobs beyond this many are forgotten, oldest first.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        events: EventLog,
        store: IJobStore,
        journal: IEventJournal,
        incarnations: Incarnations,
        history_limit: int = 500,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
    ) -> None:
        self._clock = clock
        self.events = events
        self._store = store
        self._journal = journal
        self._incarnations = incarnations
        self._history_limit = history_limit
        self._checkpoint_bytes = checkpoint_bytes
        self.jobs: dict[str, Job] = {}
        self.incarnation: str | None = None
        self.loaded = False
        #: events numbered and written, not yet durable, per job (oldest first)
        self._unsynced: dict[str, deque[JobEvent]] = {}
        #: jobs changed, and jobs removed, since the last checkpoint began
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._checkpoint: Deferred[bool] | None = None
        self._followers: list[Deferred[None]] = []
        journal.set_listener(self._durable)

    # -- start -----------------------------------------------------------------------------

    def load(self, boot_id: str) -> set[str]:
        """Read the store and the log, name this incarnation; return the ids of the jobs the
        log's records changed (they are due for the next checkpoint).

        Raises what the store raises when it cannot be read at all (the engine does not start).
        """
        incarnation = self._incarnations(boot_id)
        self.incarnation = self.events.incarnation = incarnation
        entries = self._store.load()
        stored: dict[str, Any] = {}
        for job, job_events in entries:
            if job.id not in self.jobs:
                self.jobs[job.id] = job
                stored[job.id] = job_events
        records = self._journal.recover(incarnation)
        replayed = Replay(self.jobs, stored).run(records)
        for job in self.jobs.values():
            job.incarnation = incarnation
            if job.id in stored:
                self.events.restore(job.id, stored[job.id], job.seq)
        self._dirty |= set(replayed.touched) & set(self.jobs)
        self._removed |= set(replayed.removed)
        self.loaded = True
        _log.info(
            "job history loaded: {count} jobs, {records} records replayed from the event log; "
            "incarnation {incarnation}",
            count=len(self.jobs),
            records=len(records),
            incarnation=incarnation,
        )
        return set(replayed.touched) & set(self.jobs)

    # -- jobs ------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """A new job: its record, then its "Job created" event.

        Until that event is durable the job shows as pending at seq 0 (nothing to replay yet).
        """
        job.incarnation = self.incarnation
        job.view = JobEvent(
            job_id=job.id,
            seq=0,
            status=job.status,
            progress=job.progress,
            message=job.message,
            timestamp=job.updated_at,
        )
        self.jobs[job.id] = job
        self.save(job)
        self.emit(job, "Job created")

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def save(self, job: Job) -> None:
        """Write the job's whole state (at a change of status)."""
        self._dirty.add(job.id)
        self._journal.append(["j", job_to_dict(job)], None)

    def remove(self, job_id: str) -> None:
        """Forget an ended job (deleted, or past retention) for good."""
        if self.jobs.pop(job_id, None) is None:
            return
        self.events.forget(job_id)
        self._unsynced.pop(job_id, None)
        self._dirty.discard(job_id)
        self._removed.add(job_id)
        self._journal.append(["d", job_id], None)

    def prune(self) -> None:
        excess = len(self.jobs) - self._history_limit
        if excess > 0:
            for job_id in [j.id for j in self.jobs.values() if j.terminal][:excess]:
                self.remove(job_id)

    # -- events ----------------------------------------------------------------------------

    def emit(
        self,
        job: Job,
        message: str,
        *,
        kind: str = KIND_STATUS,
        event: str | None = None,
        error: str | None = None,
        error_code: str | None = None,
        source: tuple[int, int, int] | None = None,
    ) -> JobEvent:
        """Number and write one event of ``job`` as it stands; published once durable.

        ``source`` (command, fd, end offset): the output line the event was made from; the
        record keeps it and the job's ``offsets`` move to it.
        """
        if kind != KIND_OUTPUT:
            job.message = message
        job_event = self.events.make(
            job.id,
            status=job.status,
            progress=job.progress,
            message=message,
            kind=kind,
            event=event or EVENT_JOB_STATUS,
            error=error,
            error_code=error_code,
        )
        job.seq = job_event.seq or 0
        job.updated_at = job_event.timestamp
        unsynced = self._unsynced.get(job.id)
        if unsynced is None:
            unsynced = self._unsynced[job.id] = deque()
        unsynced.append(job_event)
        self._dirty.add(job.id)
        if source is not None:
            note_offset(job, source)
        self._journal.append(event_record(job_event, source), job_event)
        return job_event

    def close_job(
        self,
        job: Job,
        status: str,
        message: str,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """The terminal ``job_status`` event, then ``job_complete``, then the job's record."""
        job.status = status
        job.error = error
        job.error_code = error_code
        job.completed_at = rfc3339_from_epoch(self._clock.seconds())
        self.emit(job, message, error=error, error_code=error_code)
        self.emit(job, message, event=EVENT_JOB_COMPLETE, error=error, error_code=error_code)
        self.save(job)

    def reclose(self, job: Job) -> None:
        """A job recovered terminal without its ``job_complete`` (the crash fell between the
        two): send what is missing, numbered after what is kept."""
        kept = self.events.kept(job.id)
        last = kept[-1] if kept else None
        if last is not None and last.event == EVENT_JOB_COMPLETE:
            return
        _log.warn(
            "job {job_id} ended {status} but its closing events were not all written; "
            "sending them again",
            job_id=job.id,
            status=job.status,
        )
        error, code = job.error, job.error_code
        if last is None or not last.terminal:
            self.emit(job, job.message, error=error, error_code=code)
        self.emit(job, job.message, event=EVENT_JOB_COMPLETE, error=error, error_code=code)

    # -- JobSink (what a JobContext reports) -----------------------------------------------

    def job_output(self, job: Job, line: str, source: tuple[int, int, int] | None = None) -> None:
        append_log(job, line, MAX_LOG_LINES)
        self.emit(job, line, kind=KIND_OUTPUT, source=source)

    def job_progress(
        self, job: Job, percent: int, message: str, source: tuple[int, int, int] | None = None
    ) -> None:
        job.progress = percent
        self.emit(job, message, kind=KIND_PROGRESS, source=source)

    def job_waiting_for_lock(
        self, job: Job, holder: str, source: tuple[int, int, int] | None = None
    ) -> None:
        message = f"Waiting for the package database lock held by {holder}"
        append_log(job, message, MAX_LOG_LINES)
        self.emit(job, message, kind=KIND_WAITING_FOR_LOCK, source=source)

    def job_note(self, job: Job, message: str) -> None:
        """A ``status`` event saying what the engine does with the job (its status unchanged)."""
        append_log(job, message, MAX_LOG_LINES)
        self.emit(job, message)

    def append_log(self, job: Job, line: str) -> None:
        append_log(job, line, MAX_LOG_LINES)

    # -- durability ------------------------------------------------------------------------

    def _durable(self, tokens: list[Any]) -> None:
        """The journal's listener: records up to these are on disk; publish their events."""
        for job_event in tokens:
            if job_event is None:
                continue
            unsynced = self._unsynced.get(job_event.job_id)
            if unsynced:
                unsynced.popleft()
                if not unsynced:
                    del self._unsynced[job_event.job_id]
            job = self.jobs.get(job_event.job_id)
            if job is None:
                continue  # removed meanwhile
            job.view = job_event
            self.events.publish(job_event)
        if self._journal.size >= self._checkpoint_bytes and self._checkpoint is None:
            self.checkpoint()

    def checkpoint(self) -> Deferred[bool]:
        """Write changed jobs to the store, then retire the log before that point.

        Fires with whether it worked, and never fails: a failure is logged and the jobs stay
        due.  Asked for while one runs, another one runs after it (covering what changed
        meanwhile).
        """
        if self._checkpoint is not None:
            follower: Deferred[None] = Deferred()
            self._followers.append(follower)
            return follower.addCallback(lambda _: self.checkpoint())
        through = self._journal.rotate()
        dirty, removed = self._dirty, self._removed
        self._dirty, self._removed = set(), set()
        changed: list[tuple[Job, Sequence[JobEvent]]] = [
            (self.jobs[i], self._checkpoint_events(i)) for i in dirty if i in self.jobs
        ]
        result: Deferred[bool] = Deferred()

        def failed(failure: Any) -> bool:
            self._dirty |= {i for i in dirty if i in self.jobs}
            self._removed |= removed
            _log.error(
                "could not write the job history checkpoint ({reason}); the event log keeps "
                "growing until it can be written: check space and permissions under state_dir",
                reason=failure.getErrorMessage(),
            )
            return False

        def done(saved: Any) -> None:
            self._checkpoint = None
            followers, self._followers = self._followers, []
            result.callback(saved)
            for follower in followers:
                follower.callback(None)

        def retire(_: object) -> Deferred[bool]:
            retired = self._journal.drop_through(through)
            retired.addErrback(
                lambda failure: _log.warn(
                    "old event log segments could not be removed ({reason}); the next start "
                    "reads them again, which changes nothing",
                    reason=failure.getErrorMessage(),
                )
            )
            return retired.addCallback(lambda _: True)

        d = maybeDeferred(self._store.save, changed, sorted(removed)).addCallbacks(retire, failed)
        self._checkpoint = d
        d.addBoth(done)
        return result

    def _checkpoint_events(self, job_id: str) -> list[JobEvent]:
        kept = self.events.kept(job_id)
        unsynced = self._unsynced.get(job_id)
        if unsynced:
            kept.extend(unsynced)
        return kept

    def durable(self) -> Deferred[None]:
        """Fire once everything written so far is durable."""
        return self._journal.drain()

    def close(self, grace: float) -> Deferred[None]:
        """Final checkpoint, then close the log, waiting at most ``grace`` seconds for it."""
        return Deferred.fromCoroutine(self._close(grace))

    async def _close(self, grace: float) -> None:
        saved = await self.checkpoint()  # it holds the events not yet synced, too
        held = await self._journal.close(grace)
        if held and saved:
            _log.warn(
                "the job event log could not be written before shutdown; the {held} records it "
                "held are in the job history checkpoint, nothing is lost",
                held=held,
            )
        elif held:
            _log.error(
                "neither the job event log nor the job history could be written before "
                "shutdown; {held} records, never published, are lost",
                held=held,
            )
        self._store.close()
