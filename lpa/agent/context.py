"""JobContext: what a backend sees of the engine while it executes one job.

::

    backend ──ctx.run(argv, timeout, transaction=watch)──▶ JobContext ─launch/attach─▶
        IJobCommands ──▶ ICommandRun: each line (fd, text, end offset)
                            │ fd 1/2 ─▶ sink.job_output(job, line, source=(n, fd, end))
                            │ fd 3   ─▶ status_fd_line ─▶ ctx.progress(…, source=…)
                            │ watch.begins(line) ─▶ the package transaction has started
                            ▼
          CommandResult | CommandFailedError | CommandTimedOutError | JobCancelledError

Commands are numbered per job (1, 2, …).  Every event made from a line carries where the line
ends in its file, so a restarted agent knows exactly which lines are already events.

**Cancel and timeout around the package transaction.**  ``abort(reason)`` (cancel, the job
timeout) and a command's own deadline terminate the command at once while it resolves or
downloads: SIGTERM to its process group, SIGKILL ``kill_grace_seconds`` later.  Once its
transaction has begun (the backend's :class:`~lpa.agent.phase.TransactionWatch` saw it), no
signal is sent: a cancel is recorded with an event and the command runs to its end; a timeout
gets one extension of ``transaction_extension_seconds``, with an event.  Either way the job then
ends ``cancelled``/``timed_out`` and no further command runs.  Should the extension run out too,
the job ends ``timed_out`` at once and the command is left to finish (:attr:`left_running`; the
engine keeps the package-database slot until it has).  A SIGKILL already scheduled is dropped
if the transaction begins meanwhile.

**Resuming after a restart** (``resume_through=K``): the backend runs again from its start; its
first K commands are the recorded runs, followed again instead of started (the same argv, or
the job fails), lines up to the recorded offsets feed the backend's callbacks without making
events, and the backend's own progress reports before command K are not repeated.

A line saying the package database lock is held (apt, dpkg, dnf, yum, zypper wording) also
becomes one ``waiting_for_lock`` event per command.

The module is a little over 400 lines because launching, re-attaching after a restart, the
transaction watch and the dpkg-safe cancel all act on the one command a job runs at a time.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.agent.interfaces import ICommandRun, IJobCommands, IJobContext, IProcessRunner
from lpa.agent.joblines import (
    MAX_LINE_CHARS,
    append_log,
    bounded_line,
    command_text,
    lock_holder,
)
from lpa.agent.model import CommandResult, Job
from lpa.agent.phase import TransactionWatch
from lpa.errors import CommandError, CommandFailedError, CommandTimedOutError, JobCancelledError

#: abort reasons
ABORT_CANCELLED = "cancelled"
ABORT_TIMED_OUT = "timed_out"

__all__ = [
    "ABORT_CANCELLED",
    "ABORT_TIMED_OUT",
    "MAX_LINE_CHARS",
    "JobContext",
    "JobSink",
    "ResumeMismatchError",
    "append_log",
    "bounded_line",
    "command_text",
    "lock_holder",
]

#: where an event's line ends: (command number, fd, offset just past the line)
Source = tuple[int, int, int]

_log = Logger()

class JobSink(Protocol):
    """The part of the engine a context reports to."""

    def job_output(self, job: Job, line: str, source: Source | None = None) -> None: ...

    def job_progress(
        self, job: Job, percent: int, message: str, source: Source | None = None
    ) -> None: ...

    def job_waiting_for_lock(self, job: Job, holder: str, source: Source | None = None) -> None: ...

    def job_note(self, job: Job, message: str) -> None: ...


class ResumeMismatchError(CommandError):
    """After a restart the backend asked for another command than the one recorded."""


@attr.s(auto_attribs=True, eq=False)
class _Active:
    """The command a context is waiting for, and its timers."""

    run: ICommandRun
    watch: TransactionWatch | None
    recorded: dict[int, int]
    status_line: Callable[[str], None] | None
    done: Deferred[Any]
    in_transaction: bool = False
    terminating: bool = False
    timed_out: bool = False
    extended: bool = False
    cancel_noted: bool = False
    lock_reported: bool = False
    deadline_call: IDelayedCall | None = None
    kill_call: IDelayedCall | None = None
    extension_call: IDelayedCall | None = None

    def cancel_timers(self) -> None:
        for call in (self.deadline_call, self.kill_call, self.extension_call):
            if call is not None and call.active():
                call.cancel()
        self.deadline_call = self.kill_call = self.extension_call = None


_EXTENSION_OVER = object()


@implementer(IJobContext)
class JobContext:
    """The per-job facade a backend drives: commands, progress, lock waits (see the module
    docstring).

    :param commands: starts and finds the job's commands; or give ``runner`` (an
        ``IProcessRunner``) for commands that die with the agent.
    :param resume_through: the number of recorded commands to follow again (a resumed job).
    """

    def __init__(
        self,
        job: Job,
        *,
        sink: JobSink,
        commands: IJobCommands | None = None,
        runner: IProcessRunner | None = None,
        clock: IReactorTime | None = None,
        job_timeout_seconds: float | None = None,
        kill_grace_seconds: float = 5.0,
        transaction_extension_seconds: float = 1800.0,
        resume_through: int = 0,
    ) -> None:
        if commands is None:
            from lpa.agent.piped import PipedCommands

            assert runner is not None, "a JobContext needs commands or a runner"
            commands = PipedCommands(runner)
        if clock is None:
            from twisted.internet import reactor as clock
        self.job = job
        self._commands = commands
        self._sink = sink
        self._clock: IReactorTime = clock  # type: ignore[assignment]
        self._job_timeout_seconds = job_timeout_seconds
        self._kill_grace = kill_grace_seconds
        self._extension = transaction_extension_seconds
        self._resume_through = resume_through
        self._number = 0
        self._active: _Active | None = None
        self._source: Source | None = None
        self._quiet = False
        #: None while the job may go on, else ABORT_CANCELLED or ABORT_TIMED_OUT
        self.aborted: str | None = None
        #: a command the job ended without (its extension ran out); it still runs
        self.left_running: ICommandRun | None = None

    # -- IJobContext -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        ok_codes: Sequence[int] = (0,),
        status_fd_line: Callable[[str], None] | None = None,
        transaction: TransactionWatch | None = None,
    ) -> Deferred[CommandResult]:
        return Deferred.fromCoroutine(
            self._run(list(argv), timeout, env, tuple(ok_codes), status_fd_line, transaction)
        )

    def progress(self, percent: int, message: str) -> None:
        if self._reporting():
            percent = max(0, min(100, int(percent)))
            self._sink.job_progress(self.job, percent, message, source=self._source)

    def waiting_for_lock(self, holder: str) -> None:
        if self._reporting():
            self._sink.job_waiting_for_lock(self.job, holder, source=self._source)

    # -- engine side -------------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """Commands recorded before a restart are still ahead (their reports were made)."""
        return self._number < self._resume_through

    @property
    def in_transaction(self) -> bool:
        """The running command has begun its package transaction."""
        return self._active is not None and self._active.in_transaction

    def _abort_reason(self) -> str | None:
        """``aborted`` as it is now: read through a call after an ``await``, so the type checker
        does not carry over what it knew before the await (abort() may have run meanwhile)."""
        return self.aborted

    def abort(self, reason: str) -> None:
        """End the job's work: the running command is stopped, or, in its transaction, let
        finish; any later command is refused."""
        if self.aborted is None:
            self.aborted = reason
        active = self._active
        if active is None:
            return
        if not active.in_transaction:
            self._terminate(active, reason)
        elif reason == ABORT_CANCELLED:
            if not active.cancel_noted:
                active.cancel_noted = True
                self._note(
                    f"Cancel requested; finishing the current {self._name(active)} transaction"
                )
        else:
            self._extend(active, "The job's timeout")

    def stop(self) -> None:
        """The agent stops: stop following the running command (it goes on) and the timers."""
        active = self._active
        if active is not None:
            active.cancel_timers()
            active.run.stop()

    def abort_error(self, result: CommandResult | None = None) -> Exception:
        """The exception that ends an aborted job's work (cancel or job timeout)."""
        if self.aborted == ABORT_TIMED_OUT:
            return CommandTimedOutError(
                f"Job exceeded its timeout of {self._job_timeout_seconds:g}s"
                if self._job_timeout_seconds is not None
                else "Job exceeded its timeout",
                result,
            )
        return JobCancelledError("Job cancelled")

    # -- commands ----------------------------------------------------------------------------

    async def _run(
        self,
        argv: list[str],
        timeout: float,
        env: Mapping[str, str] | None,
        ok_codes: tuple[int, ...],
        status_line: Callable[[str], None] | None,
        watch: TransactionWatch | None,
    ) -> CommandResult:
        if self.aborted is not None:
            raise self.abort_error()
        self._number += 1
        number = self._number
        text = command_text(argv)
        recorded: dict[int, int] = {}
        if number <= self._resume_through:
            run = self._commands.attach(self.job.id, number)
            if run is None or tuple(run.argv) != tuple(argv):
                raise ResumeMismatchError(
                    f"the agent restarted and cannot follow command {number} of the job again: "
                    f"it would run {text}, the recorded one is "
                    f"{command_text(run.argv) if run is not None else 'missing'}"
                )
            recorded = {fd: self.job.offsets.get(f"{number}:{fd}", 0) for fd in (1, 2, 3)}
            _log.info("job {job_id} follows command {number} again: {command}",
                      job_id=self.job.id, number=number, command=text)
        else:
            _log.info("job {job_id} runs {command}", job_id=self.job.id, command=text)
            run = await self._commands.launch(self.job.id, number, argv, env=env, timeout=timeout)
        active = _Active(run, watch, recorded, status_line, Deferred())
        active.in_transaction = watch is not None and watch.always
        self._active = active
        starts = dict(recorded)
        if status_line is not None:
            starts[3] = 0
        if watch is not None and not watch.always:
            starts[watch.fd] = 0
        run.follow(starts, lambda fd, line, end: self._line(active, fd, line, end))
        run.ended.addBoth(self._ended, active)
        if not run.times_itself and not active.done.called:
            remaining = timeout - (self._clock.seconds() - run.started)
            active.deadline_call = self._clock.callLater(
                max(0.0, remaining), self._deadline, active, timeout
            )
        late = self._abort_reason()
        if late is not None and not active.done.called:
            self.abort(late)  # aborted while the command was being started
        try:
            outcome = await active.done
        finally:
            active.cancel_timers()
            self._active = None
        if outcome is _EXTENSION_OVER:
            self.left_running = run
            raise CommandTimedOutError(
                f"The {self._name(active)} transaction still ran {self._extension:g}s after the "
                f"timeout; it was left to finish: {text}"
            )
        if isinstance(outcome, BaseException):
            if self.aborted is not None:
                raise self.abort_error() from outcome
            raise outcome
        result: CommandResult = outcome
        if self.aborted is not None:
            raise self.abort_error(result)
        if result.timed_out or active.timed_out or active.extended:
            raise CommandTimedOutError(f"Command timed out after {timeout:g}s: {text}", result)
        if result.exit_code not in ok_codes:
            raise CommandFailedError(f"Command failed (exit {result.exit_code}): {text}", result)
        return result

    def _ended(self, outcome: Any, active: _Active) -> None:
        if isinstance(outcome, Failure):
            outcome = outcome.value
        if not active.done.called:
            active.done.callback(outcome)

    def _line(self, active: _Active, fd: int, line: str, end: int) -> None:
        if active.done.called:
            return  # the job is done with it (or left it running past the extension)
        replayed = end <= active.recorded.get(fd, 0)
        watch = active.watch
        if watch is not None and not active.in_transaction and watch.begins(fd, line):
            self._transaction_began(active, replayed)
        source = (active.run.number, fd, end)
        if fd == 3:
            if active.status_line is not None:
                self._source, self._quiet = source, replayed
                try:
                    active.status_line(line)
                except Exception:
                    _log.failure("a status line of job {job_id} failed", job_id=self.job.id)
                finally:
                    self._source, self._quiet = None, False
            return
        if replayed:
            return
        try:
            line = bounded_line(line.rstrip("\r\n"))
            self._sink.job_output(self.job, line, source=source)
            if not active.lock_reported:
                holder = lock_holder(line)
                if holder is not None:
                    active.lock_reported = True
                    self._sink.job_waiting_for_lock(self.job, holder, source=source)
        except Exception:
            _log.failure("could not record an output line of job {job_id}", job_id=self.job.id)

    def _reporting(self) -> bool:
        if self._quiet or (self._source is None and self.replaying):
            return False
        return self.aborted is None or self.in_transaction

    # -- phases, timeouts, signals -----------------------------------------------------------

    def _transaction_began(self, active: _Active, replayed: bool) -> None:
        active.in_transaction = True
        if replayed:
            return
        _log.info("job {job_id}: the {name} transaction has begun",
                  job_id=self.job.id, name=self._name(active))
        if active.kill_call is not None and active.kill_call.active():
            active.kill_call.cancel()
            active.kill_call = None
            self._note(
                f"The package manager began its {self._name(active)} transaction while it was "
                "being stopped; it is no longer killed and finishes the transaction"
            )

    def _deadline(self, active: _Active, timeout: float) -> None:
        active.deadline_call = None
        if active.in_transaction:
            self._extend(active, f"The command's timeout of {timeout:g}s")
            return
        _log.warn("job {job_id}: command {number} timed out; terminating it",
                  job_id=self.job.id, number=active.run.number)
        active.timed_out = True
        self._terminate(active, ABORT_TIMED_OUT)

    def _extend(self, active: _Active, what: str) -> None:
        if active.extended:
            return
        active.extended = True
        self._note(
            f"{what} was reached during the {self._name(active)} transaction; it is not "
            f"interrupted: up to {self._extension:g}s more to finish it, then the job ends "
            "timed_out"
        )
        active.extension_call = self._clock.callLater(self._extension, self._extension_over, active)

    def _extension_over(self, active: _Active) -> None:
        active.extension_call = None
        _log.warn("job {job_id}: the package transaction outlasted its extension; it is left "
                  "running and the job ends timed_out", job_id=self.job.id)
        if not active.done.called:
            active.done.callback(_EXTENSION_OVER)

    def _terminate(self, active: _Active, reason: str) -> None:
        if active.terminating:
            return
        active.terminating = True
        try:
            active.run.mark(reason)
        except OSError as error:
            _log.warn("job {job_id}: could not record why its command is stopped ({reason})",
                      job_id=self.job.id, reason=error.strerror or str(error))
        active.run.signal(signal.SIGTERM)
        if not active.done.called:
            active.kill_call = self._clock.callLater(self._kill_grace, self._kill, active)

    def _kill(self, active: _Active) -> None:
        active.kill_call = None
        if not active.in_transaction:
            active.run.signal(signal.SIGKILL)

    def _note(self, message: str) -> None:
        try:
            self._sink.job_note(self.job, message)
        except Exception:
            _log.failure("could not record a note of job {job_id}", job_id=self.job.id)

    @staticmethod
    def _name(active: _Active) -> str:
        return active.watch.name if active.watch is not None else "package"
