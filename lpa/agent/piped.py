"""Job commands as children of the agent, over an ``IProcessRunner``: they die with it.

The job engine's default when it is given no :class:`~lpa.agent.detached.DetachedCommands`
(tests of other parts, tools): each command runs through the runner with pipes, as read-only
queries do, the runner enforces the command timeout itself (``times_itself``), and nothing can
be found again after a restart (:meth:`PipedCommands.attach` is always None), so a job
interrupted by a restart is finalised, never resumed.
"""

from __future__ import annotations

import signal as signals
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from zope.interface import implementer

from lpa.agent.interfaces import ICommandRun, IJobCommands, IProcessRunner
from lpa.agent.model import CommandResult


@implementer(ICommandRun)
class PipedRun:
    """One runner command seen as an :class:`ICommandRun`; lines wait until ``follow``."""

    times_itself = True

    def __init__(self, runner: IProcessRunner, number: int, argv: Sequence[str]) -> None:
        self._runner = runner
        self.number = number
        self.argv = tuple(argv)
        self.started = time.time()
        self.ended: Deferred[CommandResult] = Deferred()
        self._waiting: list[tuple[int, str]] | None = []
        self._on_line: Callable[[int, str, int], None] | None = None
        self._offsets = {1: 0, 2: 0, 3: 0}
        self._signalled: int | None = None
        self._deferred: Deferred[CommandResult] | None = None

    def start(self, timeout: float, env: Mapping[str, str] | None) -> None:
        self._deferred = self._runner.run(
            self.argv,
            timeout=timeout,
            env=env,
            on_stdout_line=lambda line: self._line(1, line),
            on_stderr_line=lambda line: self._line(2, line),
            extra_fds={3: lambda line: self._line(3, line)},
        )
        self._deferred.addCallbacks(self._done, self._failed)

    # -- ICommandRun -----------------------------------------------------------------------

    def follow(self, starts: Mapping[int, int], on_line: Callable[[int, str, int], None]) -> None:
        self._on_line = on_line
        waiting, self._waiting = self._waiting or [], None
        for fd, line in waiting:
            self._hand_out(fd, line)

    def signal(self, signum: int) -> bool:
        """SIGTERM cancels the runner's command (which escalates to SIGKILL itself)."""
        if self.ended.called or self._deferred is None or self._deferred.called:
            return False
        if signum != signals.SIGKILL:
            self._signalled = signum
            self._deferred.cancel()
        return True

    def mark(self, reason: str) -> None:
        pass

    def stop(self) -> None:
        pass

    # -- internals -------------------------------------------------------------------------

    def _line(self, fd: int, line: str) -> None:
        if self._waiting is not None:
            self._waiting.append((fd, line))
        else:
            self._hand_out(fd, line)

    def _hand_out(self, fd: int, line: str) -> None:
        self._offsets[fd] += len(line.encode("utf-8", "replace")) + 1
        assert self._on_line is not None
        self._on_line(fd, line, self._offsets[fd])

    def _done(self, result: CommandResult) -> None:
        if not self.ended.called:
            self.ended.callback(result)

    def _failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            # the runner errbacks at once; the result comes when the killed child has gone
            when_exited = getattr(self._runner, "when_exited", None)
            exited = when_exited(self._deferred) if when_exited is not None else succeed(None)
            result = CommandResult(
                argv=self.argv, exit_code=None, stdout="", stderr="", signal=self._signalled
            )
            exited.addBoth(lambda _: self._done(result))
            return
        if not self.ended.called:
            self.ended.errback(failure)


@implementer(IJobCommands)
class PipedCommands:
    """:class:`IJobCommands` over an ``IProcessRunner`` (see the module docstring)."""

    outlives_agent = False

    def __init__(self, runner: IProcessRunner) -> None:
        self._runner = runner

    def launch(
        self,
        job_id: str,
        number: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> Deferred[ICommandRun]:
        run = PipedRun(self._runner, number, argv)
        run.start(timeout, env)
        return succeed(run)

    def attach(self, job_id: str, number: int) -> None:
        return None

    def last_run(self, job_id: str) -> None:
        return None

    def discard(self, job_id: str) -> None:
        pass
