"""JobContext: what a backend sees of the engine while it executes one job.

::

    backend ──ctx.run(argv, timeout)──▶ JobContext ──run()──▶ IProcessRunner ──▶ child
                                           │ each line ─▶ sink.output(job, line) ─▶ output event
                                           │ abort(reason) ◀── JobManager (cancel / job timeout)
                                           ▼
                        CommandResult | CommandFailedError | CommandTimedOutError | JobCancelledError

A line saying the package database lock is held (apt, dpkg, dnf, yum, zypper wording) also
becomes one ``waiting_for_lock`` event per command, so every backend reports lock waits.

``abort`` cancels the running command's Deferred (the runner kills the child's process group)
and makes every later ``run`` fail at once, so a backend cannot start another command for a job
that is ending.  When the runner offers ``when_exited(deferred)``, ``run`` waits until the killed
child has really gone before it raises: the engine frees the package-database slot only then.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lpa.agent.interfaces import IJobContext, IProcessRunner
from lpa.agent.model import CommandResult, Job
from lpa.errors import CommandFailedError, CommandTimedOutError, JobCancelledError

#: longest output line kept in an event or a log line (longer lines are cut, marked "…")
MAX_LINE_CHARS = 4096

#: abort reasons
ABORT_CANCELLED = "cancelled"
ABORT_TIMED_OUT = "timed_out"

_log = Logger()

#: package-manager lines saying the database lock is held; group 1 = pid, group 2 = program
_LOCK_WAIT_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"[Ii]t is held by process (\d+)(?: \(([^)]+)\))?"),  # apt, dpkg
    re.compile(r"locked by the application with pid (\d+)(?: \(([^)]+)\))?"),  # zypper
    re.compile(r"Waiting for process with pid (\d+)()"),  # dnf
    re.compile(r"Another app is currently holding the yum lock()()"),  # yum
    re.compile(r"Waiting for (?:cache |repository )?lock()()", re.IGNORECASE),
)


def lock_holder(line: str) -> str | None:
    """Who holds the package database lock, if ``line`` says a manager waits for it."""
    for pattern in _LOCK_WAIT_PATTERNS:
        match = pattern.search(line)
        if match is not None:
            pid, program = match.group(1), match.group(2)
            if pid and program:
                return f"{program} (pid {pid})"
            if pid:
                return f"pid {pid}"
            return "another process"
    return None


class JobSink(Protocol):
    """The part of JobManager a context reports to."""

    def job_output(self, job: Job, line: str) -> None: ...

    def job_progress(self, job: Job, percent: int, message: str) -> None: ...

    def job_waiting_for_lock(self, job: Job, holder: str) -> None: ...


_DROPPED = re.compile(r"\.\.\. (\d+) earlier lines dropped")


def append_log(job: Job, line: str, limit: int) -> None:
    """Append to ``job.logs`` keeping the newest ``limit`` lines; the first then counts drops."""
    logs = job.logs
    logs.append(line)
    if len(logs) <= limit:
        return
    marker = _DROPPED.fullmatch(logs[0])
    if marker is not None:
        del logs[1]
        logs[0] = f"... {int(marker.group(1)) + 1} earlier lines dropped"
    else:
        del logs[0:2]
        logs.insert(0, "... 2 earlier lines dropped")


def bounded_line(line: str) -> str:
    if len(line) > MAX_LINE_CHARS:
        return line[: MAX_LINE_CHARS - 1] + "…"
    return line


def command_text(argv: Sequence[str]) -> str:
    return shlex.join(argv)


@implementer(IJobContext)
class JobContext:
    """The per-job facade a backend drives: commands, progress, lock waits."""

    def __init__(
        self,
        job: Job,
        *,
        runner: IProcessRunner,
        sink: JobSink,
        job_timeout_seconds: float | None = None,
    ) -> None:
        self.job = job
        self._runner = runner
        self._sink = sink
        self._job_timeout_seconds = job_timeout_seconds
        self._current: Deferred[CommandResult] | None = None
        #: the lock wait was reported for the running command (reported once per command)
        self._lock_reported = False
        #: None while the job may go on, else ABORT_CANCELLED or ABORT_TIMED_OUT
        self.aborted: str | None = None

    # -- IJobContext -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        ok_codes: Sequence[int] = (0,),
        status_fd_line: Callable[[str], None] | None = None,
    ) -> Deferred[CommandResult]:
        return Deferred.fromCoroutine(
            self._run(list(argv), timeout, env, tuple(ok_codes), status_fd_line)
        )

    def progress(self, percent: int, message: str) -> None:
        if self.aborted is None:  # an ending job reports nothing more (nor raises from callbacks)
            self._sink.job_progress(self.job, max(0, min(100, int(percent))), message)

    def waiting_for_lock(self, holder: str) -> None:
        if self.aborted is None:
            self._sink.job_waiting_for_lock(self.job, holder)

    # -- engine side -------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """End the job's work: terminate the running command; refuse any later one."""
        if self.aborted is None:
            self.aborted = reason
        if self._current is not None and not self._current.called:
            self._current.cancel()

    # -- internals ---------------------------------------------------------------------------

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

    def _check_not_aborted(self) -> None:
        if self.aborted is not None:
            raise self.abort_error()

    def _line(self, line: str) -> None:
        if self.aborted is not None:
            return
        try:
            line = bounded_line(line.rstrip("\r\n"))
            self._sink.job_output(self.job, line)
            if not self._lock_reported:
                holder = lock_holder(line)
                if holder is not None:
                    self._lock_reported = True
                    self._sink.job_waiting_for_lock(self.job, holder)
        except Exception:
            _log.failure("could not record an output line of job {job_id}", job_id=self.job.id)

    async def _run(
        self,
        argv: list[str],
        timeout: float,
        env: Mapping[str, str] | None,
        ok_codes: tuple[int, ...],
        status_fd_line: Callable[[str], None] | None,
    ) -> CommandResult:
        self._check_not_aborted()
        extra_fds = None
        if status_fd_line is not None:
            callback = status_fd_line

            def status_line(line: str) -> None:
                if self.aborted is None:
                    callback(line)

            extra_fds = {3: status_line}
        _log.info("job {job_id} runs {command}", job_id=self.job.id, command=command_text(argv))
        self._lock_reported = False
        deferred = self._runner.run(
            argv,
            timeout=timeout,
            env=env,
            on_stdout_line=self._line,
            on_stderr_line=self._line,
            extra_fds=extra_fds,
        )
        self._current = deferred
        try:
            result: CommandResult = await deferred
        except CancelledError:
            await self._wait_exited(deferred)
            raise self.abort_error() from None
        finally:
            self._current = None
        if self.aborted is not None:
            raise self.abort_error(result)
        text = command_text(argv)
        if result.timed_out:
            raise CommandTimedOutError(f"Command timed out after {timeout:g}s: {text}", result)
        if result.exit_code not in ok_codes:
            raise CommandFailedError(f"Command failed (exit {result.exit_code}): {text}", result)
        return result

    async def _wait_exited(self, deferred: Deferred[Any]) -> None:
        when_exited = getattr(self._runner, "when_exited", None)
        if when_exited is None:
            return
        try:
            await when_exited(deferred)
        except Exception:
            _log.failure("waiting for a killed command of job {job_id}", job_id=self.job.id)
