"""JobManager: admission, a strict FIFO queue, one package-database mutation at a time, events.

::

    submit ─▶ pending ──(pump, next reactor turn)──▶ running ──▶ completed | failed
       │         │                                      │     └─▶ cancelled | timed_out
       │         └─ cancel ─▶ cancelled                 └─ allow_reboot ─▶ rebooting
       └─ AdmissionError (queue full, frozen, reboot guards)        (completed after restart)

Every state change and every output line is appended to the :class:`EventLog` (numbered per job,
kept, published); a job's terminal ``job_status`` event is followed by exactly one
``job_complete``.  History is saved at every state change and, for output lines, at most once
per ``persist_interval_seconds`` on the injected clock.

An output line is a ``KIND_OUTPUT`` event and a ``job.logs`` line; it moves ``job.seq`` and
``updated_at`` but not ``job.message``, which keeps saying what the job is doing.

Reboots (the original's ``reserve_reboot``): a reboot job, or a patch job with ``allow_reboot``
whose outcome needs one, reserves the reboot: admission freezes, every other pending job ends
``cancelled``.  After the reboot command succeeded the job waits as ``rebooting`` (not
terminal); the next start marks it ``completed``.  If the host is still up
``reboot_delay_seconds + reboot_grace_seconds`` later, the reboot job fails ``REBOOT_ERROR`` (a
patch job completes, saying so) and admission reopens.

Dispatch happens on the next reactor turn (``callLater(0)``), so ``submit`` always returns a
``pending`` job; tests using ``task.Clock`` call ``clock.advance(0)`` to let it start.

Cancel and the job timeout abort the job's :class:`JobContext`: its running command is cancelled
(the runner kills the child's process group), later commands are refused, and the mutation slot is
freed only when the backend has returned.

``stop()`` (bug 29 of the original): admission freezes (``ADMISSION_FROZEN``), pending jobs end
``cancelled``, and a running job gets ``stop_grace_seconds`` to finish on its own.  If it is still
running then, it is left running (its child lives in its own process group and is not killed),
saved as ``running`` with a log line saying the agent stopped, and the next start finalises it as
``AGENT_RESTARTED`` / ``AGENT_REBOOTED``: recovery reports "outcome unknown", never a guess.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent import classify
from lpa.agent.context import (
    ABORT_CANCELLED,
    ABORT_TIMED_OUT,
    JobContext,
    append_log,
    command_text,
)
from lpa.agent.eventlog import EventLog
from lpa.agent.interfaces import (
    IJobManager,
    IJobStore,
    IPackageBackend,
    IProcessRunner,
    ISystem,
)
from lpa.agent.model import Job, JobOutcome, JobRequest
from lpa.errors import (
    AdmissionFrozenError,
    CancelNotAllowedError,
    CommandError,
    CommandTimedOutError,
    DeleteNotAllowedError,
    JobCancelledError,
    JobNotFoundError,
    MutationInProgressError,
    QueueFullError,
    RebootBlockedError,
    ValidationError,
)
from lpa.events import (
    CANCELLED,
    COMPLETED,
    EVENT_JOB_COMPLETE,
    FAILED,
    KIND_OUTPUT,
    KIND_PROGRESS,
    KIND_STATUS,
    KIND_WAITING_FOR_LOCK,
    OP_INSTALL,
    OP_PATCH_APPLY,
    OP_REBOOT,
    OP_REMOVE,
    OP_UPDATE,
    OPERATIONS,
    PENDING,
    REBOOTING,
    RUNNING,
    TIMED_OUT,
    normalise_status,
    rfc3339_from_epoch,
)

MUTATIONS = frozenset({OP_INSTALL, OP_UPDATE, OP_REMOVE, OP_PATCH_APPLY})
#: lines kept in ``job.logs``: every output line as it comes plus the engine's own lines,
#: the newest MAX_LOG_LINES of them, the first line then counting what was dropped (the original
#: kept only up to 200 lines of failure output)
MAX_LOG_LINES = 500
#: seconds a backend gets to return after its job was aborted (command killed) before the
#: engine cancels the backend's Deferred itself
ABORT_GRACE_SECONDS = 15.0
REBOOT_COMMAND_TIMEOUT = 60.0

_log = Logger()


class _Run:
    """A running job's moving parts."""

    def __init__(self, job: Job, context: JobContext) -> None:
        self.job = job
        self.context = context
        self.timeout_call: IDelayedCall | None = None
        self.backend_deferred: Deferred[Any] | None = None
        self.abort_call: IDelayedCall | None = None


@implementer(IJobManager)
class JobManager:
    """The agent's job engine; see the module docstring for the flow."""

    def __init__(
        self,
        *,
        backend: IPackageBackend,
        system: ISystem,
        runner: IProcessRunner,
        store: IJobStore,
        clock: IReactorTime,
        events: EventLog | None = None,
        max_concurrent: int = 5,
        max_queue_depth: int = 100,
        job_timeout_seconds: float = 1800,
        history_limit: int = 500,
        max_events_per_job: int = 1000,
        uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
        stop_grace_seconds: float = 30.0,
        persist_interval_seconds: float = 1.0,
        reboot_grace_seconds: float = 900.0,
    ) -> None:
        if max_concurrent < 1 or max_queue_depth < 1 or history_limit < 1:
            raise ValueError("max_concurrent, max_queue_depth and history_limit must be >= 1")
        if job_timeout_seconds <= 0:
            raise ValueError("job_timeout_seconds must be positive")
        self._backend = backend
        self._system = system
        self._runner = runner
        self._store = store
        self._clock = clock
        self.events = events if events is not None else EventLog(clock, max_events_per_job)
        self._max_concurrent = max_concurrent
        self._max_queue_depth = max_queue_depth
        self._job_timeout = job_timeout_seconds
        self._history_limit = history_limit
        self._uuid_factory = uuid_factory
        self._stop_grace = stop_grace_seconds
        self._persist_interval = persist_interval_seconds
        self._reboot_grace = reboot_grace_seconds

        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._runs: dict[str, _Run] = {}
        self._mutation_job: str | None = None
        #: id of the job whose reboot is reserved or under way (admission frozen meanwhile)
        self._reboot_job: str | None = None
        self._reboot_grace_call: IDelayedCall | None = None
        self._pump_call: IDelayedCall | None = None
        self._flush_call: IDelayedCall | None = None
        self._loaded = False
        self._stopping = False
        self._idle_waiters: list[Callable[[], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load history, finalise jobs orphaned by the previous process, then run the queue."""
        try:
            entries = self._store.load()
        except Exception:
            return fail()
        loaded: dict[str, Job] = {}
        for job, job_events in entries:
            if job.id in self._jobs or job.id in loaded:
                continue
            loaded[job.id] = job
            self.events.restore(job.id, job_events, job.seq)
        self._jobs = {**loaded, **self._jobs}
        self._loaded = True
        boot_id = self._system.boot_id()
        for job in loaded.values():
            if not job.terminal:
                self._recover(job, boot_id)
        self._prune()
        self._persist()
        self._schedule_pump()
        _log.info("job engine started with {count} jobs in history", count=len(self._jobs))
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Freeze admission, cancel pending jobs, give running ones a grace period, save."""
        self._stopping = True
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        for job_id in list(self._queue):
            self._finish_pending(self._jobs[job_id], "Cancelled: agent shutting down")
        done: Deferred[None] = Deferred()
        if not self._runs:
            self._shutdown_timers()
            self._persist()
            self._flush_store()
            done.callback(None)
            return done

        def give_up() -> None:
            for run in self._runs.values():
                self._append_log(run.job, "Agent stopped while this job ran; outcome unknown")
                _log.warn(
                    "job {job_id} still running at shutdown; its process is left running and "
                    "the job will be finalised at the next start",
                    job_id=run.job.id,
                )
            self._idle_waiters.remove(on_idle)
            self._shutdown_timers()
            self._persist()
            self._flush_store()
            done.callback(None)

        grace = self._clock.callLater(self._stop_grace, give_up)

        def on_idle() -> None:
            grace.cancel()
            self._shutdown_timers()
            self._persist()
            self._flush_store()
            done.callback(None)

        self._idle_waiters.append(on_idle)
        return done

    def _flush_store(self) -> None:
        """Wait for a background-writing store (``JsonJobStore(background=True)``)."""
        flush = getattr(self._store, "flush", None)
        if flush is None:
            return
        try:
            flush()
        except Exception:
            _log.failure("could not save the job history at shutdown")

    def _shutdown_timers(self) -> None:
        for run in self._runs.values():
            if run.timeout_call is not None and run.timeout_call.active():
                run.timeout_call.cancel()
        for call in (self._flush_call, self._reboot_grace_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._reboot_grace_call = None

    def _recover(self, job: Job, boot_id: str) -> None:
        rebooted = bool(job.boot_id and boot_id and job.boot_id != boot_id)
        if job.status == REBOOTING or (job.operation == OP_REBOOT and rebooted):
            self._append_log(job, "Agent restarted after the reboot; marking completed")
            job.progress = 100
            self._finish(job, COMPLETED, "Host rebooted; job completed")
        else:
            when = "before the job ran" if job.status == PENDING else "during job execution"
            what = "rebooted" if rebooted else "restarted"
            self._finish(
                job,
                FAILED,
                f"Agent {what} {when}",
                error=f"Agent {'host reboot' if rebooted else 'process restart'} {when}; "
                + ("the job never ran" if job.status == PENDING
                   else "the package manager may have finished, the outcome is unknown"),
                error_code=classify.AGENT_REBOOTED if rebooted else classify.AGENT_RESTARTED,
            )

    # -- IJobManager -------------------------------------------------------------------------

    def submit(self, request: JobRequest) -> Job:
        self._validate(request)
        if self._stopping:
            raise AdmissionFrozenError("The agent is shutting down")
        if self._reboot_job is not None:
            raise AdmissionFrozenError("A reboot is in progress")
        active = self.active_count()
        if active >= self._max_queue_depth:
            raise QueueFullError(
                f"Job queue is full ({active} of {self._max_queue_depth})",
                {"active_jobs": active, "max_queue_depth": self._max_queue_depth},
            )
        if request.operation == OP_REBOOT:
            self._check_reboot_guards(request, active)
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
        self._jobs[job.id] = job
        self._emit(job, "Job created")
        self._queue.append(job.id)
        _log.info("job {job_id} ({operation}) admitted", job_id=job.id, operation=job.operation)
        if request.operation == OP_REBOOT:
            self._reserve_reboot(job)
        self._prune()
        self._persist()
        self._schedule_pump()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
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
        jobs = [j for j in reversed(self._jobs.values()) if wanted is None or j.status == wanted]
        return jobs[:limit]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.terminal or job.status == REBOOTING:
            raise CancelNotAllowedError(
                f"Job {job_id} cannot be cancelled: it is {job.status}", {"status": job.status}
            )
        if job.status == PENDING:
            self._finish_pending(job, "Job cancelled")
            self._schedule_pump()
        else:
            _log.info("cancelling running job {job_id}", job_id=job_id)
            run = self._runs.get(job_id)
            if run is not None:
                self._abort(run, ABORT_CANCELLED)
        return job

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.terminal:
            raise DeleteNotAllowedError(
                f"Job {job_id} cannot be deleted: it is {job.status}", {"status": job.status}
            )
        del self._jobs[job_id]
        self.events.forget(job_id)
        self._persist()

    def mutation_in_progress(self) -> bool:
        return self._mutation_job is not None

    def active_count(self) -> int:
        return len(self._queue) + len(self._runs)

    # -- admission helpers -------------------------------------------------------------------

    @staticmethod
    def _validate(request: Any) -> None:
        if not isinstance(request, JobRequest):
            raise ValidationError("not a job request")
        if request.operation not in OPERATIONS:
            raise ValidationError(f"unknown operation {request.operation!r}")
        # packages=() is "apply nothing" (patch_apply only): the job completes, changing nothing
        if request.operation in (OP_INSTALL, OP_UPDATE, OP_REMOVE) and not request.packages:
            raise ValidationError(f"{request.operation} needs at least one package")
        if request.reboot_delay_seconds < 0:
            raise ValidationError("reboot_delay_seconds must not be negative")

    def _check_reboot_guards(self, request: JobRequest, active: int) -> None:
        if not request.force:
            if active > 0:
                raise RebootBlockedError(
                    f"Reboot blocked: {active} active jobs", {"active_jobs": active}
                )
        elif not request.acknowledge_package_database_corruption_risk:
            if self.mutation_in_progress():
                raise MutationInProgressError(
                    "A package database mutation is in progress",
                    {"package_operation_in_progress": True},
                )
        else:
            _log.warn(
                "AUDIT: Forced reboot accepted with package database corruption risk "
                "acknowledged (mutation in progress: {mutation})",
                mutation=self.mutation_in_progress(),
            )

    def _reserve_reboot(self, job: Job) -> None:
        """Freeze admission for a reboot and cancel every other pending job."""
        self._reboot_job = job.id
        for other_id in list(self._queue):
            if other_id != job.id:
                self._finish_pending(self._jobs[other_id], "Cancelled: reboot in progress")

    def _release_reboot(self, job: Job) -> None:
        if self._reboot_job == job.id:
            self._reboot_job = None
            if self._reboot_grace_call is not None and self._reboot_grace_call.active():
                self._reboot_grace_call.cancel()
            self._reboot_grace_call = None

    # -- dispatch ----------------------------------------------------------------------------

    def _schedule_pump(self) -> None:
        if self._stopping or (self._pump_call is not None and self._pump_call.active()):
            return
        if self._queue:
            self._pump_call = self._clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        while self._queue and not self._stopping:
            job = self._jobs[self._queue[0]]
            if job.operation in MUTATIONS and self._mutation_job is not None:
                break
            if len(self._runs) >= self._max_concurrent:
                break
            self._queue.popleft()
            self._start(job)

    def _start(self, job: Job) -> None:
        context = JobContext(
            job, runner=self._runner, sink=self, job_timeout_seconds=self._job_timeout
        )
        run = _Run(job, context)
        self._runs[job.id] = run
        if job.operation in MUTATIONS:
            self._mutation_job = job.id
        job.status = RUNNING
        self._append_log(job, "Job started")
        self._emit(job, "Job started")
        self._persist()
        run.timeout_call = self._clock.callLater(self._job_timeout, self._timed_out, job.id)
        d = Deferred.fromCoroutine(self._execute(run))
        d.addErrback(lambda f: _log.failure("job {job_id} crashed", f, job_id=job.id))

    def _timed_out(self, job_id: str) -> None:
        run = self._runs.get(job_id)
        if run is not None:
            run.timeout_call = None
            _log.warn("job {job_id} exceeded its timeout; terminating", job_id=job_id)
            self._abort(run, ABORT_TIMED_OUT)

    def _abort(self, run: _Run, reason: str) -> None:
        """Kill the job's command now; if its backend still has not returned after
        ABORT_GRACE_SECONDS (it waits on something else), cancel the backend's Deferred."""
        run.context.abort(reason)
        if run.abort_call is None and run.job.id in self._runs:
            run.abort_call = self._clock.callLater(ABORT_GRACE_SECONDS, self._force_abort, run)

    def _force_abort(self, run: _Run) -> None:
        run.abort_call = None
        if run.backend_deferred is not None and not run.backend_deferred.called:
            _log.warn("backend of job {job_id} ignored the abort; cancelling it", job_id=run.job.id)
            run.backend_deferred.cancel()

    async def _execute(self, run: _Run) -> None:
        job = run.job
        try:
            if job.operation == OP_REBOOT:
                await self._reboot(run, job.request.reboot_delay_seconds)
            else:
                run.backend_deferred = maybeDeferred(self._backend.execute, job, run.context)
                outcome = await run.backend_deferred
                if run.context.aborted is not None:
                    raise run.context.abort_error()
                await self._succeeded(run, outcome)
        except Exception as error:
            self._failed(run, error)
        finally:
            self._release(run)

    def _detach(self, job: Job) -> None:
        """Forget a job's run: its timer, its place among the running, its mutation slot.

        Done before a terminal event is published, so an observer reacting to
        ``job_complete`` (e.g. by asking for a reboot) sees the engine without that job.
        """
        run = self._runs.pop(job.id, None)
        if run is not None:
            for call in (run.timeout_call, run.abort_call):
                if call is not None and call.active():
                    call.cancel()
            run.timeout_call = run.abort_call = None
        if self._mutation_job == job.id:
            self._mutation_job = None
        if job.terminal:
            self._release_reboot(job)

    def _release(self, run: _Run) -> None:
        job = run.job
        self._detach(job)
        self._schedule_pump()
        if not self._runs:
            for waiter in list(self._idle_waiters):
                self._idle_waiters.remove(waiter)
                waiter()

    async def _succeeded(self, run: _Run, outcome: JobOutcome) -> None:
        job = run.job
        if not isinstance(outcome, JobOutcome):
            raise TypeError(f"backend returned {outcome!r}, not a JobOutcome")
        job.changes = [dict(c) for c in outcome.changes]
        job.reboot_required = outcome.reboot_required
        job.reboot_packages = list(outcome.reboot_packages)
        request = job.request
        if (
            job.operation == OP_PATCH_APPLY
            and request.allow_reboot
            and outcome.reboot_required
            and not request.dry_run
        ):
            self._reserve_reboot(job)
            try:
                await self._reboot(run, request.reboot_delay_seconds, patched=outcome.message)
            except Exception as error:
                self._append_log(job, f"Reboot failed: {classify.error_chain(error)}")
                job.progress = 100
                self._finish(job, COMPLETED, f"{outcome.message}; reboot failed: {error}")
            return
        job.progress = 100
        self._append_log(job, "Job completed successfully")
        self._finish(job, COMPLETED, outcome.message)

    async def _reboot(self, run: _Run, delay: int, patched: str | None = None) -> None:
        """Run the host's reboot command; the job then waits as ``rebooting``."""
        job = run.job
        if run.timeout_call is not None and run.timeout_call.active():
            run.timeout_call.cancel()
        run.timeout_call = None
        if patched is not None:
            job.status = REBOOTING
            job.progress = 99
            self._emit(job, f"{patched}; rebooting in {delay} seconds")
            self._persist()
        else:
            self._progress(job, 10, "Preparing system reboot...")
        argv = self._system.reboot_argv(delay)
        self._append_log(job, f"Reboot command: {command_text(argv)}")
        await run.context.run(argv, timeout=REBOOT_COMMAND_TIMEOUT)
        if patched is None:
            job.status = REBOOTING
            job.progress = 99
            self._emit(job, f"Reboot scheduled in {delay} seconds")
        self._append_log(job, "Reboot command executed")
        self._persist()
        self._reboot_grace_call = self._clock.callLater(
            delay + self._reboot_grace, self._reboot_overdue, job.id
        )

    def _reboot_overdue(self, job_id: str) -> None:
        self._reboot_grace_call = None
        job = self._jobs.get(job_id)
        if job is None or job.status != REBOOTING:
            return
        _log.error("job {job_id}: the host did not reboot in time", job_id=job_id)
        if job.operation == OP_REBOOT:
            self._finish(
                job,
                FAILED,
                "The host did not reboot",
                error="The reboot command succeeded but the host did not reboot in time",
                error_code=classify.REBOOT_ERROR,
            )
        else:
            job.progress = 100
            self._finish(job, COMPLETED, "Patches applied; the host did not reboot in time")

    def _failed(self, run: _Run, error: Exception) -> None:
        job = run.job
        aborted = run.context.aborted
        if aborted == ABORT_CANCELLED or (aborted is None and isinstance(error, JobCancelledError)):
            self._append_log(job, "Job cancelled")
            self._finish(job, CANCELLED, "Job cancelled")
            return
        if aborted == ABORT_TIMED_OUT and not isinstance(error, CommandTimedOutError):
            error = CommandTimedOutError(f"Job exceeded its timeout of {self._job_timeout:g}s")
        chain = classify.error_chain(error)
        if isinstance(error, CommandTimedOutError):
            status, code = TIMED_OUT, classify.TIMEOUT
        else:
            status = FAILED
            code = classify.classify(error)
            if job.operation == OP_REBOOT:
                code = classify.REBOOT_ERROR
        if not isinstance(error, CommandError):
            _log.failure("job {job_id} failed unexpectedly", job_id=job.id)
        self._append_log(job, f"Job failed: {chain}")
        result = error.result if isinstance(error, CommandError) else None
        if result is not None:
            # the output itself is already in the logs, line by line, as it came
            job.exit_code = result.exit_code
            job.command_stdout = result.stdout
            job.command_stderr = result.stderr
            self._append_log(
                job, f"Command failed (exit {result.exit_code}): {command_text(result.argv)}"
            )
        self._finish(job, status, str(error) or type(error).__name__, error=chain, error_code=code)

    # -- JobSink (called by JobContext) ------------------------------------------------------

    def job_output(self, job: Job, line: str) -> None:
        self._append_log(job, line)
        event = self.events.append(
            job.id, status=job.status, progress=job.progress, message=line, kind=KIND_OUTPUT
        )
        job.seq = event.seq
        job.updated_at = event.timestamp
        self._persist_soon()

    def job_progress(self, job: Job, percent: int, message: str) -> None:
        self._progress(job, percent, message)

    def job_waiting_for_lock(self, job: Job, holder: str) -> None:
        message = f"Waiting for the package database lock held by {holder}"
        job.message = message
        self._append_log(job, message)
        self._emit(job, message, kind=KIND_WAITING_FOR_LOCK)
        self._persist_soon()

    # -- state and events --------------------------------------------------------------------

    def _progress(self, job: Job, percent: int, message: str) -> None:
        job.progress = percent
        self._emit(job, message, kind=KIND_PROGRESS)
        self._persist_soon()

    def _emit(
        self,
        job: Job,
        message: str,
        *,
        kind: str = KIND_STATUS,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        job.message = message
        event = self.events.append(
            job.id,
            status=job.status,
            progress=job.progress,
            message=message,
            kind=kind,
            error=error,
            error_code=error_code,
        )
        job.seq = event.seq
        job.updated_at = event.timestamp

    def _finish_pending(self, job: Job, message: str) -> None:
        self._queue.remove(job.id)
        self._append_log(job, message)
        self._finish(job, CANCELLED, message)

    def _finish(
        self,
        job: Job,
        status: str,
        message: str,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Move a job to a terminal status: its ``job_status`` event, then ``job_complete``."""
        if job.terminal:
            return
        job.status = status
        self._detach(job)
        job.error = error
        job.error_code = error_code
        job.completed_at = rfc3339_from_epoch(self._clock.seconds())
        self._emit(job, message, error=error, error_code=error_code)
        event = self.events.append(
            job.id,
            status=job.status,
            progress=job.progress,
            message=message,
            event=EVENT_JOB_COMPLETE,
            error=error,
            error_code=error_code,
        )
        job.seq = event.seq
        _log.info(
            "job {job_id} ended {status}{code}",
            job_id=job.id,
            status=status,
            code=f" ({error_code})" if error_code else "",
        )
        self._prune()
        self._persist()

    def _append_log(self, job: Job, line: str) -> None:
        append_log(job, line, MAX_LOG_LINES)

    # -- persistence -------------------------------------------------------------------------

    def _prune(self) -> None:
        excess = len(self._jobs) - self._history_limit
        if excess <= 0:
            return
        for job_id in [j.id for j in self._jobs.values() if j.terminal][:excess]:
            del self._jobs[job_id]
            self.events.forget(job_id)

    def _persist_soon(self) -> None:
        if self._stopping:
            return  # no new timers after stop(); a job's end is still saved at once
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._clock.callLater(self._persist_interval, self._persist)

    def _persist(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._loaded:
            return  # never overwrite a history not yet read
        entries = [(job, self.events.kept(job.id)) for job in self._jobs.values()]
        try:
            self._store.save(entries)
        except Exception:
            _log.failure("could not save the job history")
