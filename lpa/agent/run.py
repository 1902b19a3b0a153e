"""One job's run: the backend (or the reboot command) under a timeout, cancel, and its outcome.

::

    start ─▶ running ── backend.execute(job, context) ──▶ outcome ──▶ completed
    resume ──┘              │ output, progress, lock waits ─▶ history events
      │                     └ error ─▶ classified ─▶ failed | cancelled | timed_out
      ├ job timeout / cancel ─▶ abort: the running command is stopped (or, in its package
      │                         transaction, let finish), later ones refused; a backend
      │                         still busy ABORT_GRACE_SECONDS later is cancelled
      └ allow_reboot + reboot needed ─▶ reserve, reboot command ─▶ rebooting

Cancel and the job timeout abort the job's :class:`JobContext` (see there for the package
transaction), and the run ends (its slots are freed) only when the backend has returned.  A job
timed out while a transaction outlasted its extension ends at once but keeps its slots until
that command has exited.

``resume(K)``: after an agent restart, the job's backend runs again and its first K commands
are followed where they are instead of started (:mod:`lpa.agent.context`); the job timeout
counts from the job's first start.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lpa.agent import classify
from lpa.agent.context import (
    ABORT_CANCELLED,
    ABORT_TIMED_OUT,
    JobContext,
    ResumeMismatchError,
    command_text,
)
from lpa.agent.history import JobHistory
from lpa.agent.interfaces import IJobCommands, IPackageBackend, ISystem
from lpa.agent.model import Job, JobOutcome
from lpa.agent.reboot import RebootReservation
from lpa.errors import CommandError, CommandTimedOutError, JobCancelledError
from lpa.events import (
    CANCELLED,
    COMPLETED,
    FAILED,
    OP_PATCH_APPLY,
    OP_REBOOT,
    REBOOTING,
    RUNNING,
    TIMED_OUT,
)

#: seconds a backend gets to return after its job was aborted (command killed) before the
#: engine cancels the backend's Deferred itself
ABORT_GRACE_SECONDS = 15.0
REBOOT_COMMAND_TIMEOUT = 60.0

_log = Logger()


class Engine(Protocol):
    """What a run asks of the engine that owns it."""

    def finish(
        self,
        job: Job,
        status: str,
        message: str,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None: ...

    def reserve_reboot(self, job: Job) -> None: ...

    def ended(self, run: JobRun) -> None: ...


class JobRun:
    """A running job's moving parts: its context, its timers and its backend call."""

    def __init__(
        self,
        job: Job,
        *,
        engine: Engine,
        history: JobHistory,
        backend: IPackageBackend,
        system: ISystem,
        commands: IJobCommands,
        clock: IReactorTime,
        reboot: RebootReservation,
        job_timeout_seconds: float,
        kill_grace_seconds: float = 5.0,
        transaction_extension_seconds: float = 1800.0,
        resume_through: int = 0,
    ) -> None:
        self.job = job
        self._engine = engine
        self._history = history
        self._backend = backend
        self._system = system
        self._clock = clock
        self._reboot = reboot
        self._job_timeout = job_timeout_seconds
        self.context = JobContext(
            job,
            commands=commands,
            sink=history,
            clock=clock,
            job_timeout_seconds=job_timeout_seconds,
            kill_grace_seconds=kill_grace_seconds,
            transaction_extension_seconds=transaction_extension_seconds,
            resume_through=resume_through,
        )
        self.timeout_call: IDelayedCall | None = None
        self.abort_call: IDelayedCall | None = None
        self.backend_deferred: Deferred[Any] | None = None
        #: the run's work has returned (set before the engine hears of it)
        self.over = False

    def start(self) -> None:
        job = self.job
        job.status = RUNNING
        job.started_epoch = self._clock.seconds()
        self._history.append_log(job, "Job started")
        self._history.emit(job, "Job started")
        self._history.save(job)
        self._begin(self._job_timeout)

    def resume(self, state: str) -> None:
        """Go on with a job the previous agent process was running (see the module
        docstring); ``state`` is how its last command stands (``running``, ``finished``)."""
        job = self.job
        what = "is still running" if state == "running" else "finished meanwhile"
        self._history.job_note(
            job,
            f"Agent restarted; the job's package manager {what} and the job goes on from "
            "where its events end",
        )
        started = job.started_epoch if job.started_epoch is not None else self._clock.seconds()
        self._begin(max(0.0, self._job_timeout - (self._clock.seconds() - started)))

    def _begin(self, timeout: float) -> None:
        job = self.job
        self.timeout_call = self._clock.callLater(timeout, self._timed_out)
        d = Deferred.fromCoroutine(self._execute())
        d.addErrback(lambda f: _log.failure("job {job_id} crashed", f, job_id=job.id))

    @property
    def holds_slot(self) -> bool:
        """The job has ended but a command it left running still uses the package database."""
        left = self.context.left_running
        return left is not None and not left.ended.called

    def abort(self, reason: str) -> None:
        """Stop the job's command now (or let its transaction finish); if its backend still
        has not returned after ABORT_GRACE_SECONDS (it waits on something else), cancel the
        backend's Deferred."""
        self.context.abort(reason)
        if self.abort_call is None and not self.over:
            self.abort_call = self._clock.callLater(ABORT_GRACE_SECONDS, self._force_abort)

    def detach(self) -> None:
        """Cancel the run's timers (the job is ending, or the agent stops)."""
        for call in (self.timeout_call, self.abort_call):
            if call is not None and call.active():
                call.cancel()
        self.timeout_call = self.abort_call = None

    def stop(self) -> None:
        """The agent stops: timers off, the running command followed no more (it goes on)."""
        self.detach()
        self.context.stop()

    def _timed_out(self) -> None:
        self.timeout_call = None
        _log.warn("job {job_id} exceeded its timeout; terminating", job_id=self.job.id)
        self.abort(ABORT_TIMED_OUT)

    def _force_abort(self) -> None:
        self.abort_call = None
        if self.context.in_transaction:
            # a package transaction is being let finish: the backend waits on it rightly
            self.abort_call = self._clock.callLater(ABORT_GRACE_SECONDS, self._force_abort)
            return
        if self.backend_deferred is not None and not self.backend_deferred.called:
            _log.warn(
                "backend of job {job_id} ignored the abort; cancelling it", job_id=self.job.id
            )
            self.backend_deferred.cancel()

    async def _execute(self) -> None:
        job = self.job
        try:
            if job.operation == OP_REBOOT:
                await self._run_reboot(job.request.reboot_delay_seconds)
            else:
                self.backend_deferred = maybeDeferred(self._backend.execute, job, self.context)
                outcome = await self.backend_deferred
                if self.context.aborted is not None:
                    raise self.context.abort_error()
                await self._succeeded(outcome)
        except Exception as error:
            self._failed(error)
        finally:
            self.over = True
            left = self.context.left_running
            if left is not None and not left.ended.called:
                left.ended.addBoth(lambda _: self._engine.ended(self))
            else:
                self._engine.ended(self)

    async def _succeeded(self, outcome: JobOutcome) -> None:
        job = self.job
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
            self._engine.reserve_reboot(job)
            try:
                await self._run_reboot(request.reboot_delay_seconds, patched=outcome.message)
            except Exception as error:
                self._history.append_log(job, f"Reboot failed: {classify.error_chain(error)}")
                job.progress = 100
                self._engine.finish(job, COMPLETED, f"{outcome.message}; reboot failed: {error}")
            return
        job.progress = 100
        self._history.append_log(job, "Job completed successfully")
        self._engine.finish(job, COMPLETED, outcome.message)

    async def _run_reboot(self, delay: int, patched: str | None = None) -> None:
        """Run the host's reboot command; the job then waits as ``rebooting``."""
        job, history = self.job, self._history
        if self.timeout_call is not None and self.timeout_call.active():
            self.timeout_call.cancel()
        self.timeout_call = None
        if patched is not None:
            job.status = REBOOTING
            job.progress = 99
            history.emit(job, f"{patched}; rebooting in {delay} seconds")
            history.save(job)
        else:
            history.job_progress(job, 10, "Preparing system reboot...")
        argv = self._system.reboot_argv(delay)
        history.append_log(job, f"Reboot command: {command_text(argv)}")
        await self.context.run(argv, timeout=REBOOT_COMMAND_TIMEOUT)
        if patched is None:
            job.status = REBOOTING
            job.progress = 99
            history.emit(job, f"Reboot scheduled in {delay} seconds")
        history.append_log(job, "Reboot command executed")
        history.save(job)
        self._reboot.arm(job.id, delay)

    def _failed(self, error: Exception) -> None:
        job, history = self.job, self._history
        aborted = self.context.aborted
        if aborted == ABORT_CANCELLED or (aborted is None and isinstance(error, JobCancelledError)):
            history.append_log(job, "Job cancelled")
            self._engine.finish(job, CANCELLED, "Job cancelled")
            return
        if aborted == ABORT_TIMED_OUT and not isinstance(error, CommandTimedOutError):
            error = CommandTimedOutError(f"Job exceeded its timeout of {self._job_timeout:g}s")
        chain = classify.error_chain(error)
        if isinstance(error, CommandTimedOutError):
            status, code = TIMED_OUT, classify.TIMEOUT
        elif isinstance(error, ResumeMismatchError):
            status, code = FAILED, classify.AGENT_RESTARTED
        else:
            status = FAILED
            code = classify.classify(error)
            if job.operation == OP_REBOOT:
                code = classify.REBOOT_ERROR
        if not isinstance(error, CommandError):
            _log.failure("job {job_id} failed unexpectedly", job_id=job.id)
        history.append_log(job, f"Job failed: {chain}")
        result = error.result if isinstance(error, CommandError) else None
        if result is not None:
            # the output itself is already in the logs, line by line, as it came
            job.exit_code = result.exit_code
            job.command_stdout = result.stdout
            job.command_stderr = result.stderr
            history.append_log(
                job, f"Command failed (exit {result.exit_code}): {command_text(result.argv)}"
            )
        self._engine.finish(
            job, status, str(error) or type(error).__name__, error=chain, error_code=code
        )
