"""Fakes of the agent's seams, shared by every test module.

Each fake declares the interface it stands in for, and ``tests.test_fakes`` runs ``verifyObject``
on the fake and on the production class, so fakes cannot drift from production.

* :class:`FakeProcessRunner` hands out Deferreds the test fires (``runner.calls[-1].finish(...)``)
  or answers from a queue of scripted results (``runner.respond(...)``).
* :class:`FakeBackend` runs a per-operation :class:`Script` through the job context: commands,
  progress, a lock wait, then an outcome or an exception.
* :class:`FakeSystem` and :class:`FakeJobStore` are plain in-memory stand-ins.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from zope.interface import implementer

from lpa.agent.eventlog import StoredEvents
from lpa.agent.interfaces import (
    ICommandRun,
    IJobCommands,
    IJobStore,
    IPackageBackend,
    IProcessRunner,
    ISystem,
)
from lpa.agent.model import CommandResult, Job, JobOutcome, Package, Patch
from lpa.errors import CommandNotFoundError, PackageNotFoundError, ServiceNotFoundError
from lpa.events import JobEvent

# -- process runner ----------------------------------------------------------------------------


class FakeCommand:
    """One ``run`` call of :class:`FakeProcessRunner`; the test drives how it ends."""

    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None,
        on_stdout_line: Callable[[str], None] | None,
        on_stderr_line: Callable[[str], None] | None,
        extra_fds: Mapping[int, Callable[[str], None]] | None,
    ) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self.env = dict(env) if env is not None else None
        self.on_stdout_line = on_stdout_line
        self.on_stderr_line = on_stderr_line
        self.extra_fds = dict(extra_fds or {})
        self.cancelled = False
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.deferred: Deferred[CommandResult] = Deferred(self._cancel)
        #: fires once the (pretend) child has really gone, also after a cancel
        self.exited: Deferred[None] = Deferred()

    def _cancel(self, _: Deferred[CommandResult]) -> None:
        self.cancelled = True

    @property
    def ended(self) -> bool:
        return self.deferred.called

    def emit_stdout(self, *lines: str) -> None:
        for line in lines:
            self.stdout.append(line)
            if self.on_stdout_line is not None:
                self.on_stdout_line(line)

    def emit_stderr(self, *lines: str) -> None:
        for line in lines:
            self.stderr.append(line)
            if self.on_stderr_line is not None:
                self.on_stderr_line(line)

    def emit_fd(self, fd: int, *lines: str) -> None:
        for line in lines:
            self.extra_fds[fd](line)

    def result(self, exit_code: int | None = 0, *, timed_out: bool = False) -> CommandResult:
        return CommandResult(
            argv=self.argv,
            exit_code=exit_code,
            stdout="\n".join(self.stdout),
            stderr="\n".join(self.stderr),
            timed_out=timed_out,
            signal=15 if timed_out else None,
        )

    def finish(self, exit_code: int = 0) -> None:
        """End the command with ``exit_code`` (and the lines emitted so far)."""
        self.deferred.callback(self.result(exit_code))
        self.mark_exited()

    def time_out(self) -> None:
        """End the command as the runner does when its own timeout fired."""
        self.deferred.callback(self.result(None, timed_out=True))
        self.mark_exited()

    def not_found(self) -> None:
        self.deferred.errback(CommandNotFoundError(f"command not found: {self.argv[0]}"))
        self.mark_exited()

    def mark_exited(self) -> None:
        """Say the killed child is finally gone (for cancelled commands)."""
        if not self.exited.called:
            self.exited.callback(None)


@implementer(IProcessRunner)
class FakeProcessRunner:
    """Records each command; the test ends it, or a scripted response ends it at once.

    ``respond(result_or_exception_or_callable, ...)`` queues answers consumed by the next calls:
    an ``int`` is an exit code, an exception errbacks, a callable gets the :class:`FakeCommand`
    and drives it.  With an empty queue a command stays running until the test ends it.
    ``exit_on_cancel`` (default True) marks a cancelled child as gone at once; set it False to
    test code that must wait for the kill to finish.
    """

    def __init__(self, exit_on_cancel: bool = True) -> None:
        self.calls: list[FakeCommand] = []
        self._responses: list[Any] = []
        self.exit_on_cancel = exit_on_cancel

    def respond(self, *responses: Any) -> None:
        self._responses.extend(responses)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        on_stdout_line: Callable[[str], None] | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        extra_fds: Mapping[int, Callable[[str], None]] | None = None,
    ) -> Deferred[CommandResult]:
        command = FakeCommand(argv, timeout, env, on_stdout_line, on_stderr_line, extra_fds)
        if self.exit_on_cancel:
            command.deferred.addErrback(self._exit_if_cancelled, command)
        self.calls.append(command)
        if self._responses:
            response = self._responses.pop(0)
            if isinstance(response, BaseException):
                command.deferred.errback(response)
                command.mark_exited()
            elif isinstance(response, int):
                command.finish(response)
            else:
                response(command)
        return command.deferred

    @staticmethod
    def _exit_if_cancelled(failure: Any, command: FakeCommand) -> Any:
        if failure.check(CancelledError):
            command.mark_exited()
        return failure

    def when_exited(self, deferred: Deferred[Any]) -> Deferred[None]:
        """Fire when the child behind ``deferred`` (a ``run`` result) has gone."""
        for command in self.calls:
            if command.deferred is deferred:
                return command.exited
        return succeed(None)

    @property
    def last(self) -> FakeCommand:
        return self.calls[-1]

    @property
    def running(self) -> list[FakeCommand]:
        return [c for c in self.calls if not c.ended]


# -- job commands (outliving the agent) ---------------------------------------------------------


@implementer(ICommandRun)
class FakeRun:
    """One command of :class:`FakeJobCommands`: the test emits its lines and ends it.

    Its lines are kept with their offsets, so following it again (a restarted agent) from
    given offsets hands out what comes after them, as the real files would.
    """

    times_itself = False

    def __init__(self, number: int, argv: Sequence[str], started: float) -> None:
        self.number = number
        self.argv = tuple(argv)
        self.started = started
        self.ended: Deferred[CommandResult] = Deferred()
        self.lines: dict[int, list[tuple[str, int]]] = {1: [], 2: [], 3: []}
        self.signals: list[int] = []
        self.marks: list[str] = []
        self.stopped = False
        self.state = "running"
        self.result: CommandResult | None = None
        self._on_line: Callable[[int, str, int], None] | None = None

    def follow(self, starts: Mapping[int, int], on_line: Callable[[int, str, int], None]) -> None:
        self._on_line = on_line
        self.stopped = False
        for fd, lines in self.lines.items():
            for line, end in lines:
                if end > starts.get(fd, 0):
                    on_line(fd, line, end)
        if self.result is not None:
            self.ended.callback(self.result)

    def emit(self, fd: int, *lines: str) -> None:
        for line in lines:
            kept = self.lines[fd]
            end = (kept[-1][1] if kept else 0) + len(line.encode()) + 1
            kept.append((line, end))
            if self._on_line is not None and not self.stopped:
                self._on_line(fd, line, end)

    def finish(self, exit_code: int | None = 0, signal: int | None = None) -> None:
        """The command exits (the agent following it learns at once, if it follows it)."""
        self.state = "finished"
        text = {fd: "".join(f"{line}\n" for line, _ in self.lines[fd]) for fd in (1, 2)}
        self.result = CommandResult(
            argv=self.argv, exit_code=exit_code, stdout=text[1], stderr=text[2],
            timed_out="timed_out" in self.marks, signal=signal,
        )
        if self._on_line is not None and not self.stopped and not self.ended.called:
            self.ended.callback(self.result)

    def vanish(self) -> None:
        """The wrapper went without a status (host rebooted)."""
        self.state = "vanished"

    def signal(self, signum: int) -> bool:
        if self.state != "running":
            return False
        self.signals.append(signum)
        return True

    def mark(self, reason: str) -> None:
        self.marks.append(reason)

    def stop(self) -> None:
        self.stopped = True

    def renew(self) -> FakeRun:
        """The same run as a restarted agent finds it: a new follower, a new ``ended``."""
        self.ended = Deferred()
        self._on_line = None
        self.stopped = False
        return self


@implementer(IJobCommands)
class FakeJobCommands:
    """Records launches; every run stays running until the test ends it (``runs[-1]``)."""

    outlives_agent = True

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self.by_job: dict[str, list[FakeRun]] = {}
        self.runs: list[FakeRun] = []
        self.discarded: list[str] = []
        #: when set, launch errbacks with it
        self.launch_error: BaseException | None = None

    def launch(
        self,
        job_id: str,
        number: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> Deferred[ICommandRun]:
        if self.launch_error is not None:
            return fail(self.launch_error)
        run = FakeRun(number, argv, self.clock.seconds() if self.clock is not None else 0.0)
        run.timeout = timeout  # type: ignore[attr-defined]
        self.by_job.setdefault(job_id, []).append(run)
        self.runs.append(run)
        return succeed(run)

    def attach(self, job_id: str, number: int) -> FakeRun | None:
        runs = self.by_job.get(job_id, [])
        if number > len(runs) or runs[number - 1].state == "vanished":
            return None
        again = runs[number - 1].renew()
        self.runs.append(again)
        return again

    def last_run(self, job_id: str) -> tuple[int, str] | None:
        runs = self.by_job.get(job_id)
        return (len(runs), runs[-1].state) if runs else None

    def discard(self, job_id: str) -> None:
        self.discarded.append(job_id)

    def restart(self) -> None:
        """The agent died: nobody follows the runs any more (they go on)."""
        for run in self.runs:
            run.stopped = True

    @property
    def last(self) -> FakeRun:
        return self.runs[-1]


# -- backend -----------------------------------------------------------------------------------


@attr.s(auto_attribs=True, kw_only=True)
class Script:
    """What :class:`FakeBackend` does for one operation, in this order."""

    #: commands run through ``ctx.run`` one after another
    commands: list[list[str]] = attr.ib(factory=list)
    command_timeout: float = 60.0
    ok_codes: tuple[int, ...] = (0,)
    #: ``(percent, message)`` reported before the commands
    progress: list[tuple[int, str]] = attr.ib(factory=list)
    #: a lock holder to report with ``ctx.waiting_for_lock`` before the commands
    lock_holder: str | None = None
    #: raised after the commands instead of returning the outcome
    error: BaseException | None = None
    outcome: JobOutcome | None = None
    #: when True, ``execute`` waits on ``FakeBackend.gates[job.id]`` before returning
    gate: bool = False
    #: the commands' TransactionWatch (lpa.agent.phase), if any
    transaction: Any = None
    #: status fd lines the commands handed to the backend (when not None, fd 3 is read)
    status_lines: list[str] | None = None


@implementer(IPackageBackend)
class FakeBackend:
    """A scriptable package manager; records every call."""

    name = "fake"

    def __init__(
        self,
        packages: Sequence[Package] = (),
        patches: Sequence[Patch] = (),
        scripts: Mapping[str, Script] | None = None,
    ) -> None:
        self.packages = list(packages)
        self.patches = list(patches)
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.calls: list[tuple[str, Any]] = []
        self.executed: list[Any] = []
        self.contexts: dict[str, Any] = {}
        self.gates: dict[str, Deferred[None]] = {}
        #: when set, read-only calls errback with it
        self.read_error: BaseException | None = None

    def script(self, operation: str, **kwargs: Any) -> Script:
        script = self.scripts[operation] = Script(**kwargs)
        return script

    def list_packages(
        self, name_filter: str | None = None, status: str | None = None
    ) -> Deferred[list[Package]]:
        self.calls.append(("list_packages", (name_filter, status)))
        if self.read_error is not None:
            return fail(self.read_error)
        found = [
            p
            for p in self.packages
            if (name_filter is None or name_filter in p.name)
            and (status is None or p.status.lower() == status.lower())
        ]
        return succeed(found)

    def get_package(self, name: str) -> Deferred[Package]:
        self.calls.append(("get_package", name))
        if self.read_error is not None:
            return fail(self.read_error)
        for package in self.packages:
            if package.name == name:
                return succeed(package)
        return fail(PackageNotFoundError(f"Package not found: {name}"))

    def list_patches(self, security_only: bool = False) -> Deferred[list[Patch]]:
        self.calls.append(("list_patches", security_only))
        if self.read_error is not None:
            return fail(self.read_error)
        return succeed([p for p in self.patches if p.security or not security_only])

    def execute(self, job: Any, context: Any) -> Deferred[JobOutcome]:
        self.calls.append(("execute", job.id))
        self.executed.append(job)
        self.contexts[job.id] = context
        script = self.scripts.get(job.operation, Script())
        return Deferred.fromCoroutine(self._execute(job, context, script))

    async def _execute(self, job: Any, context: Any, script: Script) -> JobOutcome:
        for percent, message in script.progress:
            context.progress(percent, message)
        if script.lock_holder is not None:
            context.waiting_for_lock(script.lock_holder)
        for argv in script.commands:
            status = script.status_lines
            await context.run(
                argv,
                timeout=script.command_timeout,
                ok_codes=script.ok_codes,
                transaction=script.transaction,
                status_fd_line=status.append if status is not None else None,
            )
        if script.gate:
            gate = self.gates.setdefault(job.id, Deferred())
            await gate
        if script.error is not None:
            raise script.error
        if script.outcome is not None:
            return script.outcome
        return JobOutcome(message=f"{job.operation} done")


# -- system ------------------------------------------------------------------------------------


@implementer(ISystem)
class FakeSystem:
    """A host with a settable boot id, uptime, services and reboot state."""

    def __init__(self, boot_id: str = "boot-1") -> None:
        self.current_boot_id = boot_id
        self.uptime = 1234
        self.info: dict[str, Any] = {
            "hostname": "fakehost",
            "os": "Debian GNU/Linux",
            "os_version": "12",
            "kernel": "6.1.0-fake",
            "architecture": "x86_64",
            "last_update_check": None,
            "last_update_apply": None,
            "pending_reboot": False,
        }
        self.services: dict[str, dict[str, Any]] = {}
        self.reboot_needed: tuple[bool, list[str]] = (False, [])
        self.reboot_requests: list[int] = []

    def boot_id(self) -> str:
        return self.current_boot_id

    def system_info(self) -> Deferred[dict[str, Any]]:
        return succeed(dict(self.info))

    def uptime_seconds(self) -> int:
        return self.uptime

    def service_status(self, name: str) -> Deferred[dict[str, Any]]:
        if name not in self.services:
            return fail(ServiceNotFoundError(f"Service not found: {name}"))
        return succeed(dict(self.services[name]))

    def reboot_argv(self, delay_seconds: int) -> list[str]:
        self.reboot_requests.append(delay_seconds)
        return ["fake-reboot", str(delay_seconds)]

    def pending_reboot(self) -> Deferred[tuple[bool, list[str]]]:
        needed, packages = self.reboot_needed
        return succeed((needed, list(packages)))


# -- store -------------------------------------------------------------------------------------


@implementer(IJobStore)
class FakeJobStore:
    """Keeps deep copies of what was saved, so later changes to live jobs do not leak in.

    ``saves`` counts ``save`` calls; ``fail_next_save`` makes the next one raise (once).
    """

    def __init__(self, entries: list[tuple[Job, Sequence[JobEvent]]] | None = None) -> None:
        self._entries: dict[str, tuple[Job, list[JobEvent]]] = {}
        for job, events in copy.deepcopy(entries or []):
            self._entries[job.id] = (job, list(events))
        self.saves = 0
        self.closed = False
        #: when set, the next ``save`` raises it (once)
        self.fail_next_save: BaseException | None = None

    @property
    def entries(self) -> list[tuple[Job, list[JobEvent]]]:
        return list(self._entries.values())

    def load(self) -> list[tuple[Job, StoredEvents]]:
        return copy.deepcopy(list(self._entries.values()))

    def save(
        self, changed: list[tuple[Job, Sequence[JobEvent]]], removed: Sequence[str] = ()
    ) -> Deferred[None]:
        if self.fail_next_save is not None:
            error, self.fail_next_save = self.fail_next_save, None
            return fail(error)
        self.saves += 1
        for job, events in changed:
            self._entries[job.id] = copy.deepcopy((job, list(events)))
        for job_id in removed:
            self._entries.pop(job_id, None)
        return succeed(None)

    def close(self) -> None:
        self.closed = True

    def job(self, job_id: str) -> Any:
        """The saved copy of one job (None when not saved)."""
        entry = self._entries.get(job_id)
        return entry[0] if entry is not None else None

    def events(self, job_id: str) -> list[JobEvent]:
        entry = self._entries.get(job_id)
        return list(entry[1]) if entry is not None else []
