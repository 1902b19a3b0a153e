"""Scripted fakes for backend and HostSystem tests.

* :class:`ScriptedRunner` (``IProcessRunner``) answers each command at once from rules matched
  on argv tokens, so a backend coroutine that runs several commands completes synchronously.
* :class:`FakeJobContext` (``IJobContext``) runs commands through any runner (scripted, or the
  real ``ProcessRunner`` for live tests) with the real context's ``ok_codes`` semantics, and
  records progress and lock waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from lpa.agent.interfaces import IJobContext, IProcessRunner
from lpa.agent.model import CommandResult, Job, JobRequest, PackageSpec
from lpa.errors import CommandFailedError, CommandTimedOutError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(*parts: str) -> str:
    """A fixture's text without its ``#`` header comment (where we say its origin) and without
    a trailing ``# exit N`` line (the captured exit status, see :func:`fixture_exit`)."""
    with open(os.path.join(FIXTURES, *parts), encoding="utf-8") as source:
        lines = source.read().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    while lines and lines[-1].startswith("# exit "):
        lines.pop()
    return "".join(lines)


def fixture_exit(*parts: str) -> int:
    """The exit status recorded on a fixture's trailing ``# exit N`` line (0 when absent)."""
    with open(os.path.join(FIXTURES, *parts), encoding="utf-8") as source:
        lines = source.read().splitlines()
    return int(lines[-1].split()[-1]) if lines and lines[-1].startswith("# exit ") else 0


@attr.s(auto_attribs=True)
class Rule:
    """Answer commands whose argv contains every token of ``match`` (in any position)."""

    match: tuple[str, ...]
    exit_code: int | None = 0
    stdout: str = ""
    stderr: str = ""
    fd3: tuple[str, ...] = ()
    error: BaseException | None = None
    timed_out: bool = False
    #: how many times the rule may answer (None = always)
    times: int | None = None

    def matches(self, argv: Sequence[str]) -> bool:
        return (self.times is None or self.times > 0) and all(token in argv for token in self.match)


@attr.s(auto_attribs=True)
class Call:
    argv: tuple[str, ...]
    timeout: float
    env: dict[str, str] | None
    had_status_fd: bool = False


@implementer(IProcessRunner)
class ScriptedRunner:
    """Answers each ``run`` at once from the first matching :class:`Rule` (default: exit 0)."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.calls: list[Call] = []

    def on(self, *match: str, **kwargs: Any) -> Rule:
        rule = Rule(match=tuple(match), **kwargs)
        self.rules.append(rule)
        return rule

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
        argv = tuple(argv)
        self.calls.append(Call(argv, timeout, dict(env) if env is not None else None,
                               bool(extra_fds)))
        rule = next((r for r in self.rules if r.matches(argv)), None)
        if rule is None:
            return succeed(CommandResult(argv=argv, exit_code=0, stdout="", stderr=""))
        if rule.times is not None:
            rule.times -= 1
        if rule.error is not None:
            return fail(rule.error)
        for line in rule.stdout.splitlines():
            if on_stdout_line is not None:
                on_stdout_line(line)
        for line in rule.fd3:
            if extra_fds and 3 in extra_fds:
                extra_fds[3](line)
        return succeed(
            CommandResult(
                argv=argv,
                exit_code=rule.exit_code,
                stdout=rule.stdout,
                stderr=rule.stderr,
                timed_out=rule.timed_out,
            )
        )

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [call.argv for call in self.calls]


@implementer(IJobContext)
class FakeJobContext:
    """A job context over ``runner``: CommandFailedError outside ``ok_codes``, records reports."""

    def __init__(self, runner: Any, job: Job) -> None:
        self.job = job
        self._runner = runner
        self.progress_reports: list[tuple[int, str]] = []
        self.lock_waits: list[str] = []
        self.output: list[str] = []
        #: (argv, TransactionWatch or None) of every command run
        self.transactions: list[tuple[tuple[str, ...], Any]] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        ok_codes: Sequence[int] = (0,),
        status_fd_line: Callable[[str], None] | None = None,
        transaction: Any = None,
    ) -> Deferred[CommandResult]:
        self.transactions.append((tuple(argv), transaction))
        extra_fds = {3: status_fd_line} if status_fd_line is not None else None
        deferred: Deferred[CommandResult] = self._runner.run(
            list(argv),
            timeout=timeout,
            env=env,
            on_stdout_line=self.output.append,
            on_stderr_line=self.output.append,
            extra_fds=extra_fds,
        )

        def check(result: CommandResult) -> CommandResult:
            if result.timed_out:
                raise CommandTimedOutError(f"timed out: {argv[0]}", result)
            if result.exit_code not in ok_codes:
                raise CommandFailedError(
                    f"Command failed (exit {result.exit_code}): {' '.join(argv)}", result
                )
            return result

        return deferred.addCallback(check)

    def progress(self, percent: int, message: str) -> None:
        self.progress_reports.append((percent, message))

    def waiting_for_lock(self, holder: str) -> None:
        self.lock_waits.append(holder)


def make_job(
    operation: str, *names: str, versions: Mapping[str, str] | None = None, **options: Any
) -> Job:
    """A running Job for ``operation`` on ``names`` (no names = None, "all")."""
    versions = versions or {}
    packages = tuple(PackageSpec(n, versions.get(n)) for n in names) if names else None
    if options.pop("empty", False):
        packages = ()
    request = JobRequest(operation=operation, packages=packages, **options)
    return Job(
        id="00000000-0000-4000-8000-000000000001",
        operation=operation,
        status="running",
        created_at="2026-11-25T20:00:00Z",
        updated_at="2026-11-25T20:00:00Z",
        request=request,
    )
