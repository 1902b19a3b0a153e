"""JobManager: the agent's job engine as the REST API and the WebSocket see it (``IJobManager``).

It wires four state machines, one module each::

    admission.JobQueue          admission, the strict FIFO, run slots, one mutation at a time
    run.JobRun                  one job's run: backend, timeout, cancel, outcome, reboot command
    reboot.RebootReservation    one reboot at a time; admission frozen while it is due
    history.JobHistory          jobs, numbered events, the write-ahead log, checkpoints, recovery

::

    submit ─▶ pending ──(pump, next reactor turn)──▶ running ──▶ completed | failed
       │         │                                      │     └─▶ cancelled | timed_out
       │         └─ cancel ─▶ cancelled                 └─ allow_reboot ─▶ rebooting
       └─ AdmissionError (queue full, frozen, reboot guards)        (completed after restart)

Every state change and every output line is an event, numbered per job and published only once
it is durable in the write-ahead log; a job's terminal ``job_status`` is followed by exactly one
``job_complete``.  An output line is a ``KIND_OUTPUT`` event and a ``job.logs`` line; it moves
``job.seq`` and ``updated_at`` but not ``job.message``, which keeps saying what the job is doing.

Start: the history is read (store, then the log on top) and this start gets its incarnation.
A job the previous process left running whose last command outlived it (still running, or
finished with a recorded status: :class:`~lpa.agent.interfaces.IJobCommands`) is *resumed*:
its backend runs again, following its recorded commands from where its durable events end
(:mod:`lpa.agent.recovery`, :mod:`lpa.agent.run`, :mod:`lpa.agent.context`), so it ends as its
package manager did.  Any other job left pending or running (no command started, or the
last one gone without a status: the host rebooted) is finalised ``failed`` with
``AGENT_RESTARTED`` (same boot id) or ``AGENT_REBOOTED`` (another one), numbered after its last
durable event: "outcome unknown", never a guess.  A ``rebooting`` job (or a reboot job after a
reboot) is completed.

``stop()`` (bug 29 of the original), written once: admission freezes (``ADMISSION_FROZEN``),
pending jobs end ``cancelled``.  Running jobs whose commands outlive the agent are left at once
(their package manager goes on; the next start resumes them); otherwise a running job gets
``stop_grace_seconds`` to finish on its own, and if it is still running then it is left
running, saved ``running`` with a log line saying the agent stopped, and the next start
finalises it.  Then one last checkpoint, and the log is closed.

It stays a little over 400 lines: wiring the four state machines and shutting them down in one
order is the engine's job, and each machine's own logic already sits in its own module.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent import classify, recovery
from lpa.agent.admission import MUTATIONS, JobQueue
from lpa.agent.context import ABORT_CANCELLED
from lpa.agent.eventlog import EventLog
from lpa.agent.history import CHECKPOINT_BYTES, JobHistory
from lpa.agent.incarnation import Incarnations, MemoryIncarnations
from lpa.agent.interfaces import (
    IEventJournal,
    IJobCommands,
    IJobManager,
    IJobStore,
    IPackageBackend,
    IProcessRunner,
    ISystem,
)
from lpa.agent.model import Job
from lpa.agent.piped import PipedCommands
from lpa.agent.reboot import RebootReservation
from lpa.agent.replay import MAX_LOG_LINES
from lpa.agent.run import ABORT_GRACE_SECONDS, JobRun
from lpa.agent.wal import VolatileJournal
from lpa.errors import (
    CancelNotAllowedError,
    DeleteNotAllowedError,
    JobNotFoundError,
    ValidationError,
)
from lpa.events import (
    CANCELLED,
    COMPLETED,
    FAILED,
    OP_REBOOT,
    PENDING,
    REBOOTING,
    normalise_status,
    rfc3339_from_epoch,
)

__all__ = ["ABORT_GRACE_SECONDS", "MAX_LOG_LINES", "MUTATIONS", "JobManager"]

_log = Logger()


@implementer(IJobManager)
class JobManager:
    """The agent's job engine; see the module docstring for the flow.

    :param store: the job history's checkpoint (one file per job).
    :param journal: the write-ahead log; default: a :class:`~lpa.agent.wal.VolatileJournal`
        (nothing survives the process: for tests of other parts).
    :param incarnations: names each start; default: counted in memory.
    :param close_grace_seconds: at stop, how long a failing disk may hold up the last writes.
    :param commands: starts the jobs' commands; default: children of this process over
        ``runner`` (:class:`~lpa.agent.piped.PipedCommands`, nothing outlives the agent).
    :param transaction_extension_seconds: how much longer a command may run past a timeout
        once its package transaction has begun.
    """

    def __init__(
        self,
        *,
        backend: IPackageBackend,
        system: ISystem,
        runner: IProcessRunner,
        store: IJobStore,
        clock: IReactorTime,
        events: EventLog | None = None,
        journal: IEventJournal | None = None,
        incarnations: Incarnations | None = None,
        max_concurrent: int = 5,
        max_queue_depth: int = 100,
        job_timeout_seconds: float = 1800,
        history_limit: int = 500,
        max_events_per_job: int = 1000,
        uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
        stop_grace_seconds: float = 30.0,
        reboot_grace_seconds: float = 900.0,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        close_grace_seconds: float = 10.0,
        commands: IJobCommands | None = None,
        kill_grace_seconds: float = 5.0,
        transaction_extension_seconds: float = 1800.0,
    ) -> None:
        if max_concurrent < 1 or max_queue_depth < 1 or history_limit < 1:
            raise ValueError("max_concurrent, max_queue_depth and history_limit must be >= 1")
        if job_timeout_seconds <= 0:
            raise ValueError("job_timeout_seconds must be positive")
        self._backend = backend
        self._system = system
        self._commands: IJobCommands = commands if commands is not None else PipedCommands(runner)
        self._kill_grace = kill_grace_seconds
        self._extension = transaction_extension_seconds
        self._clock = clock
        self.events = events if events is not None else EventLog(clock, max_events_per_job)
        self._job_timeout = job_timeout_seconds
        self._uuid_factory = uuid_factory
        self._stop_grace = stop_grace_seconds
        self._close_grace = close_grace_seconds
        self._history = JobHistory(
            clock=clock,
            events=self.events,
            store=store,
            journal=journal if journal is not None else VolatileJournal(),
            incarnations=incarnations if incarnations is not None else MemoryIncarnations(),
            history_limit=history_limit,
            checkpoint_bytes=checkpoint_bytes,
        )
        self._queue = JobQueue(
            clock,
            start=self._start,
            max_concurrent=max_concurrent,
            max_queue_depth=max_queue_depth,
        )
        self._reboot = RebootReservation(
            clock, on_overdue=self._reboot_overdue, grace_seconds=reboot_grace_seconds
        )
        self._runs: dict[str, JobRun] = {}
        self._idle: Deferred[bool] | None = None

    @property
    def incarnation(self) -> str | None:
        return self._history.incarnation

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Read the history, finalise jobs orphaned by the previous process, run the queue."""
        boot_id = self._system.boot_id()
        try:
            replayed = self._history.load(boot_id)
        except Exception:
            return fail()
        for job in list(self._history.jobs.values()):
            if not job.terminal:
                if not self._resume(job):
                    self._recover(job, boot_id)
            elif job.id in replayed:
                self._history.reclose(job)
        recovery.discard_stale_runs(self._commands, self._history.jobs)
        self._history.prune()
        if replayed:
            self._history.checkpoint()  # retire what the last run left in the log
        self._queue.schedule_pump()
        _log.info(
            "job engine started with {count} jobs in history", count=len(self._history.jobs)
        )
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Freeze admission, cancel pending jobs, give running ones a grace period, close."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for job in self._queue.freeze("The agent is shutting down"):
            self._cancel_pending(job, "Cancelled: agent shutting down")
        if self._runs and self._commands.outlives_agent:
            for run in self._runs.values():
                self._history.append_log(
                    run.job,
                    "Agent stopped while this job ran; its package manager goes on and the "
                    "next start follows the job again",
                )
                self._history.save(run.job)
                _log.info(
                    "job {job_id} still running at shutdown; its command goes on and the next "
                    "start resumes the job",
                    job_id=run.job.id,
                )
        elif self._runs:
            idle: Deferred[bool] = Deferred()
            self._idle = idle
            grace = self._clock.callLater(self._stop_grace, lambda: idle.callback(False))
            if not await idle:
                for run in self._runs.values():
                    self._history.append_log(
                        run.job, "Agent stopped while this job ran; outcome unknown"
                    )
                    self._history.save(run.job)
                    _log.warn(
                        "job {job_id} still running at shutdown; its process is left running "
                        "and the job will be finalised at the next start",
                        job_id=run.job.id,
                    )
            elif grace.active():
                grace.cancel()
            self._idle = None
        for run in self._runs.values():
            run.stop()
        self._reboot.cancel_timer()
        await self._history.close(self._close_grace)

    def _resume(self, job: Job) -> bool:
        """Resume ``job`` if its last command outlived the previous process; say if it did."""
        state = recovery.resumable(job, self._commands)
        if state is None:
            return False
        number, how = state
        self._queue.occupy(job)
        run = self._make_run(job, resume_through=number)
        self._runs[job.id] = run
        run.resume(how)
        return True

    def _recover(self, job: Job, boot_id: str) -> None:
        status, message, error, code = recovery.finalisation(job, boot_id)
        if status == COMPLETED:
            self._history.append_log(job, "Agent restarted after the reboot; marking completed")
            job.progress = 100
        self.finish(job, status, message, error=error, error_code=code)

    # -- IJobManager -------------------------------------------------------------------------

    def submit(self, request: object) -> Job:
        request = self._queue.admit(request, reboot_reserved=self._reboot.reserved)
        now = rfc3339_from_epoch(self._clock.seconds())
        job = Job(
            id=str(self._uuid_factory()),
            operation=request.operation,
            status=PENDING,
            created_at=now,
            updated_at=now,
            request=request,
            boot_id=self._system.boot_id(),
        )
        self._history.add(job)
        self._queue.enqueue(job)
        _log.info("job {job_id} ({operation}) admitted", job_id=job.id, operation=job.operation)
        if request.operation == OP_REBOOT:
            self.reserve_reboot(job)
        self._history.prune()
        return job

    def get(self, job_id: str) -> Job:
        job = self._history.get(job_id)
        if job is None:
            raise JobNotFoundError(f"Job not found: {job_id}")
        return job

    def list_jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        if limit < 0:
            raise ValidationError("limit must not be negative")
        wanted = None
        if status is not None:
            try:
                wanted = normalise_status(status)
            except ValueError as error:
                raise ValidationError(str(error)) from None
        jobs = [
            j
            for j in reversed(self._history.jobs.values())
            if wanted is None or j.shown_status == wanted
        ]
        return jobs[:limit]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.terminal or job.status == REBOOTING:
            raise CancelNotAllowedError(
                f"Job {job_id} cannot be cancelled: it is {job.status}", {"status": job.status}
            )
        if job.status == PENDING:
            self._cancel_pending(job, "Job cancelled")
        else:
            _log.info("cancelling running job {job_id}", job_id=job_id)
            run = self._runs.get(job_id)
            if run is not None:
                run.abort(ABORT_CANCELLED)
        return job

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.terminal:
            raise DeleteNotAllowedError(
                f"Job {job_id} cannot be deleted: it is {job.status}", {"status": job.status}
            )
        self._history.remove(job_id)

    def mutation_in_progress(self) -> bool:
        return self._queue.mutation_job is not None

    def active_count(self) -> int:
        return self._queue.active_count()

    # -- the engine side of a run (run.Engine) -----------------------------------------------

    def _start(self, job: Job) -> None:
        run = self._make_run(job)
        self._runs[job.id] = run
        run.start()

    def _make_run(self, job: Job, resume_through: int = 0) -> JobRun:
        return JobRun(
            job,
            engine=self,
            history=self._history,
            backend=self._backend,
            system=self._system,
            commands=self._commands,
            clock=self._clock,
            reboot=self._reboot,
            job_timeout_seconds=self._job_timeout,
            kill_grace_seconds=self._kill_grace,
            transaction_extension_seconds=self._extension,
            resume_through=resume_through,
        )

    def ended(self, run: JobRun) -> None:
        """A run's work returned (its backend, or its reboot command, or the command its job
        left running): free its slots."""
        if self._runs.get(run.job.id) is run:
            del self._runs[run.job.id]
            run.detach()
        self._queue.release(run.job.id)
        if run.job.terminal and run.context.left_running is not None:
            self._forget_runs(run.job.id)
        if not self._runs and self._idle is not None and not self._idle.called:
            self._idle.callback(True)

    def finish(
        self,
        job: Job,
        status: str,
        message: str,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Move a job to a terminal status: its ``job_status`` event, then ``job_complete``.

        The job leaves the engine first (timers, slots, reboot reservation), so an observer
        reacting to ``job_complete`` (e.g. by asking for a reboot) sees the engine without it.
        """
        if job.terminal:
            return
        run = self._runs.get(job.id)
        if run is not None:
            run.detach()
        if run is None or not run.holds_slot:
            self._queue.release(job.id)
        self._reboot.release(job.id)
        self._history.close_job(job, status, message, error=error, error_code=error_code)
        if run is None or not run.holds_slot:
            self._forget_runs(job.id)
        _log.info(
            "job {job_id} ended {status}{code}",
            job_id=job.id,
            status=status,
            code=f" ({error_code})" if error_code else "",
        )
        self._history.prune()

    def _forget_runs(self, job_id: str) -> None:
        """Once the job's end is durable its commands' files go (a crash before then leaves
        them for the next start, which resumes the job from them)."""
        if not self._commands.outlives_agent:
            return
        self._history.durable().addCallback(lambda _: self._commands.discard(job_id))

    def reserve_reboot(self, job: Job) -> None:
        """Freeze admission for a reboot and cancel every other pending job."""
        self._reboot.reserve(job.id)
        for other in list(self._queue.pending):
            if other is not job:
                self._cancel_pending(other, "Cancelled: reboot in progress")

    def _cancel_pending(self, job: Job, message: str) -> None:
        self._queue.withdraw(job)
        self._history.append_log(job, message)
        self.finish(job, CANCELLED, message)

    def _reboot_overdue(self, job_id: str) -> None:
        job = self._history.get(job_id)
        if job is None or job.status != REBOOTING:
            return
        _log.error("job {job_id}: the host did not reboot in time", job_id=job_id)
        if job.operation == OP_REBOOT:
            self.finish(
                job,
                FAILED,
                "The host did not reboot",
                error="The reboot command succeeded but the host did not reboot in time",
                error_code=classify.REBOOT_ERROR,
            )
        else:
            job.progress = 100
            self.finish(job, COMPLETED, "Patches applied; the host did not reboot in time")

    # -- JobSink (a JobContext may report to the engine itself) ------------------------------

    def job_output(self, job: Job, line: str, source: tuple[int, int, int] | None = None) -> None:
        self._history.job_output(job, line, source)

    def job_progress(
        self, job: Job, percent: int, message: str, source: tuple[int, int, int] | None = None
    ) -> None:
        self._history.job_progress(job, percent, message, source)

    def job_waiting_for_lock(
        self, job: Job, holder: str, source: tuple[int, int, int] | None = None
    ) -> None:
        self._history.job_waiting_for_lock(job, holder, source)

    def job_note(self, job: Job, message: str) -> None:
        self._history.job_note(job, message)
