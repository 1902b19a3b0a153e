"""Package-manager commands that outlive the agent, and finding them again after a restart.

::

    launch(job, n, argv) ── meta.json (synced) ──▶ where systemd is PID 1:
                                                      systemd-run --unit=lpa-job-<job>-<n> …
                                                          └▶ wrapper (main process of a
                                                             transient service, PID 1's child)
                                                   elsewhere:
                                                      python wrapper.py <dir> 1 argv…
                                                          └ fork, setsid, fork ▶ wrapper
                            wrapper ── lock, started, out/err/fd3, status ─▶ state_dir/runs/
    DetachedRun ◀── every poll_interval on the clock: new lines, then status? lock held?
        ended ◀── the status (exit code or signal), after the last line was handed out

The wrapper (:mod:`lpa.agent.rundir`) is never the agent's child (the launcher that starts it
is, and exits at once), writes no byte into a pipe the agent reads, and holds a lock for its
whole life; so a restarted agent tells "still running" (lock held) from "finished while I was
down" (status written) from "gone without a word" (neither: host rebooted, wrapper killed) and
:meth:`DetachedCommands.attach` follows the run again from the offsets the job's durable events
recorded.

A transient *service* unit, not a scope: ``systemd-run --scope`` runs the command as the
caller's own child, which the agent would have to reap and whose end a restarted agent could
not learn; the service's main process is the wrapper, PID 1 reaps it, ``--collect`` unloads
the unit whether it succeeded or not, and ``KillMode=process`` leaves alone what a maintainer
script started directly when the wrapper exits.  The unit is outside the agent's cgroup, so
restarting or stopping ``lpa-agent`` never touches it.  Output goes to the run's files, not to
the journal.

The files are polled on the injected clock (``poll_interval``, 0.1 s: a handful of system calls
per run and tick), not watched with inotify, so the following is the same code in production
and under a ``task.Clock``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.agent import rundir
from lpa.agent.follow import LineReader, bounded_text
from lpa.agent.interfaces import ICommandRun, IJobCommands
from lpa.agent.model import CommandResult
from lpa.agent.process import base_environment, resolve_program
from lpa.errors import CommandError, CommandNotFoundError

_log = Logger()

#: where systemd runs as PID 1 (sd_booted(3))
SYSTEMD_MARKER = "/run/systemd/system"
#: properties of a job's transient unit (see the module docstring)
UNIT_PROPERTIES = ("KillMode=process",)
WRAPPER_FILE = "wrapper.py"


def unit_name(job_id: str, number: int) -> str:
    """``lpa-job-<job id>-<n>.service``: one unit per command, named after its job."""
    return f"lpa-job-{job_id}-{number}.service"


def systemd_run_argv(
    systemd_run: str,
    unit: str,
    command: Sequence[str],
    env: Mapping[str, str],
    description: str,
) -> list[str]:
    """``systemd-run`` starting ``command`` as the main process of a transient service."""
    argv = [systemd_run, f"--unit={unit}", "--collect", "--quiet", f"--description={description}"]
    argv += [f"--property={p}" for p in UNIT_PROPERTIES]
    argv += [f"--setenv={key}={value}" for key, value in sorted(env.items())]
    return [*argv, "--", *command]


class _Launcher(ProcessProtocol):
    """The short-lived process that starts a wrapper: its exit status and what it said."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.done: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < 4096:
            self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(getattr(reason.value, "exitCode", None))


@implementer(IJobCommands)
class DetachedCommands:
    """Runs each command of a job in a wrapper of its own; see the module docstring.

    :param reactor: spawns the launcher (``IReactorProcess``).
    :param directory: ``state_dir/runs``.
    :param clock: drives the following of output files; default: ``reactor``.
    :param systemd: use ``systemd-run``; default: whether systemd is PID 1.
    :param poll_interval: seconds between two looks at a run's files.
    :param start_timeout: how long a launched run may take to show that it started.
    """

    outlives_agent = True

    def __init__(
        self,
        reactor: Any,
        directory: str,
        *,
        clock: IReactorTime | None = None,
        systemd: bool | None = None,
        systemd_run: str = "systemd-run",
        python: str = sys.executable,
        poll_interval: float = 0.1,
        start_timeout: float = 30.0,
        keep_bytes: int = 128 * 1024,
        max_line_chars: int = 8192,
    ) -> None:
        self._reactor = reactor
        self.directory = directory
        self.clock = clock if clock is not None else reactor
        self.systemd = os.path.isdir(SYSTEMD_MARKER) if systemd is None else systemd
        self._systemd_run = systemd_run
        self._python = python
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.keep_bytes = keep_bytes
        self.max_line_chars = max_line_chars

    # -- IJobCommands ----------------------------------------------------------------------

    def launch(
        self,
        job_id: str,
        number: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float,
    ) -> Deferred[ICommandRun]:
        return Deferred.fromCoroutine(self._launch(job_id, number, list(argv), env))

    async def _launch(
        self, job_id: str, number: int, argv: list[str], env: Mapping[str, str] | None
    ) -> ICommandRun:
        environment = base_environment()
        environment.update(env or {})
        program = resolve_program(argv[0], environment["PATH"])
        if isinstance(program, CommandNotFoundError):
            raise program
        directory = rundir.run_directory(self.directory, job_id, number)
        started = self.clock.seconds()
        unit = unit_name(job_id, number) if self.systemd else None
        try:
            os.makedirs(os.path.dirname(directory), mode=0o700, exist_ok=True)
            os.makedirs(directory, mode=0o700)
            rundir.write_file(os.path.join(directory, WRAPPER_FILE), rundir.WRAPPER.encode())
            rundir.write_json(
                os.path.join(directory, rundir.META),
                {"argv": argv, "program": program, "started": started, "unit": unit},
            )
        except OSError as error:
            raise CommandError(
                f"cannot record the command {argv[0]} in {directory} "
                f"({error.strerror or error}): check space and permissions under state_dir"
            ) from None
        wrapper = [self._python, os.path.join(directory, WRAPPER_FILE), directory]
        command = [*wrapper, "0" if self.systemd else "1", program, *argv[1:]]
        if unit is not None:
            description = f"lpa job {job_id} command {number}: {argv[0]}"
            spawn = systemd_run_argv(self._systemd_run, unit, command, environment, description)
        else:
            spawn = command
        launcher = _Launcher()
        try:
            self._reactor.spawnProcess(
                launcher, spawn[0], spawn, env=environment, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError as error:
            raise CommandError(f"cannot start {spawn[0]}: {error}") from None
        code = await launcher.done
        if code != 0:
            said = launcher.output.decode("utf-8", "replace").strip()
            raise CommandError(
                f"could not start {argv[0]} ({'systemd-run' if unit else 'launcher'} exited "
                f"with {code}{': ' + said if said else ''})"
            )
        run = DetachedRun(self, job_id, number, directory)
        files = rundir.read_run(directory, number)
        if files.status is not None and files.status.get("exec_error"):
            raise _not_found(argv[0], files.status)
        _log.info(
            "job {job_id} command {number} runs {where}",
            job_id=job_id,
            number=number,
            where=f"in unit {unit}" if unit else "detached",
        )
        return run

    def attach(self, job_id: str, number: int) -> DetachedRun | None:
        directory = rundir.run_directory(self.directory, job_id, number)
        files = rundir.read_run(directory, number)
        if files.meta is None or files.state == "never-started":
            return None
        return DetachedRun(self, job_id, number, directory)

    def last_run(self, job_id: str) -> tuple[int, str] | None:
        numbers = rundir.recorded_runs(self.directory, job_id)
        if not numbers:
            return None
        directory = rundir.run_directory(self.directory, job_id, numbers[-1])
        return numbers[-1], rundir.read_run(directory, numbers[-1]).state

    def discard(self, job_id: str) -> None:
        try:
            if not rundir.remove_job_runs(self.directory, job_id):
                _log.info("job {job_id}: a command still runs; its files stay", job_id=job_id)
        except OSError as error:
            _log.warn(
                "could not remove the command files of job {job_id} ({reason})",
                job_id=job_id,
                reason=error.strerror or str(error),
            )

    def job_ids(self) -> list[str]:
        """Jobs that have run directories (for clean-up at start)."""
        try:
            return sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []


def _not_found(program: str, status: Mapping[str, Any]) -> CommandNotFoundError:
    return CommandNotFoundError(f"cannot run {program}: {status.get('exec_error')}")


@implementer(ICommandRun)
class DetachedRun:
    """One run's files, followed on the clock (see the module docstring)."""

    times_itself = False

    def __init__(self, owner: DetachedCommands, job_id: str, number: int, directory: str) -> None:
        self._owner = owner
        self.job_id = job_id
        self.number = number
        self.directory = directory
        meta = rundir.read_json(os.path.join(directory, rundir.META)) or {}
        self.argv = tuple(meta.get("argv", ()))
        self.started = float(meta.get("started", owner.clock.seconds()))
        self.ended: Deferred[CommandResult] = Deferred()
        self._readers: dict[int, LineReader] = {}
        self._on_line: Callable[[int, str, int], None] = lambda fd, line, end: None
        self._loop: LoopingCall | None = None
        self._since = owner.clock.seconds()
        self._warned = False

    # -- ICommandRun -----------------------------------------------------------------------

    def follow(self, starts: Mapping[int, int], on_line: Callable[[int, str, int], None]) -> None:
        self._on_line = on_line
        self._readers = {
            fd: LineReader(
                rundir.output_path(self.directory, fd),
                starts.get(fd, 0),
                max_line=self._owner.max_line_chars,
            )
            for fd in rundir.OUTPUTS
        }
        loop = LoopingCall(self._poll)
        loop.clock = self._owner.clock
        self._loop = loop
        loop.start(self._owner.poll_interval, now=True).addErrback(
            lambda failure: _log.failure("following command output failed", failure)
        )

    def signal(self, signum: int) -> bool:
        files = rundir.read_run(self.directory, self.number)
        if files.state != "running" or files.started is None:
            return False
        try:
            os.killpg(int(files.started["pgid"]), signum)
        except ProcessLookupError:
            return False
        except PermissionError:
            _log.warn("no permission to signal the command of job {job_id}", job_id=self.job_id)
            return False
        return True

    def mark(self, reason: str) -> None:
        rundir.write_json(os.path.join(self.directory, rundir.TERMINATED), {"reason": reason})

    def stop(self) -> None:
        self._stop_loop()
        for reader in self._readers.values():
            reader.close()

    # -- following -------------------------------------------------------------------------

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _poll(self) -> None:
        try:
            self._look()
        except OSError as error:
            if not self._warned:
                self._warned = True
                _log.warn(
                    "cannot read the files of command {number} of job {job_id} ({reason}); "
                    "trying again",
                    number=self.number,
                    job_id=self.job_id,
                    reason=error.strerror or str(error),
                )

    def _look(self) -> None:
        if self.ended.called:
            return
        for fd, reader in self._readers.items():
            for line, end in reader.read():
                self._deliver(fd, line, end)
        files = rundir.read_run(self.directory, self.number)
        if files.state == "running" or (
            files.state == "never-started"
            and self._owner.clock.seconds() - self._since < self._owner.start_timeout
        ):
            return
        self._stop_loop()
        for fd, reader in self._readers.items():
            for line, end in reader.finish():
                self._deliver(fd, line, end)
        status = files.status
        if status is None:
            what = "never started" if files.state == "never-started" else "ended"
            self.ended.errback(
                CommandError(
                    f"the command {self.argv[:1]} {what} without a recorded exit status (its "
                    "wrapper was killed or the host went down)"
                )
            )
            return
        if status.get("exec_error"):
            self.ended.errback(_not_found(self.argv[0] if self.argv else "?", status))
            return
        half = self._owner.keep_bytes // 2
        terminated = (files.terminated or {}).get("reason")
        self.ended.callback(
            CommandResult(
                argv=self.argv,
                exit_code=status.get("exit_code"),
                stdout=bounded_text(rundir.output_path(self.directory, 1), half),
                stderr=bounded_text(rundir.output_path(self.directory, 2), half),
                timed_out=terminated == "timed_out",
                signal=status.get("signal"),
            )
        )

    def _deliver(self, fd: int, line: str, end: int) -> None:
        try:
            self._on_line(fd, line, end)
        except Exception:
            _log.failure("an output line callback failed")


__all__ = ["DetachedCommands", "DetachedRun", "systemd_run_argv", "unit_name"]
