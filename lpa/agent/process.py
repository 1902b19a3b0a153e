"""ProcessRunner: one child process, argv only (never a shell), in its own process group.

::

    run(argv) ─▶ spawnProcess(python -c TRAMPOLINE argv…)   trampoline: setsid(); execvp(argv)
                   │ stdout/stderr/fd 3 ─▶ line splitter ─▶ callbacks, bounded head+tail buffers
                   │ timeout or cancel ─▶ SIGTERM to the group ─(grace)─▶ SIGKILL to the group
                   ▼ leader exits after a termination ─▶ SIGKILL to what is left of the group
                 CommandResult (exit code, signal, timed_out, bounded stdout/stderr)

The trampoline keeps the child's pid (it execs), so the group id is the pid we know; the child
gets a new session, hence no controlling terminal for a package manager to prompt on.  A missing
or non-executable program is found before spawning (and, should it race, reported by the
trampoline with exit 127/126), and errbacks with :class:`CommandNotFoundError`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.agent.interfaces import IProcessRunner
from lpa.agent.model import CommandResult
from lpa.errors import CommandNotFoundError

_log = Logger()

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NOT_FOUND_MARK = "lpa-exec-failed:"

TRAMPOLINE = (
    "import os, sys\n"
    "os.setsid()\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as e:\n"
    f"    sys.stderr.write('{_NOT_FOUND_MARK}%d:%s\\n' % (e.errno, e.strerror))\n"
    "    os._exit(126 if e.errno == 13 else 127)\n"
)


#: inherited from the agent's environment when set: proxies (package downloads) and the zone
PASSED_THROUGH = (
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TZ",
)


def base_environment(inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal safe environment: a fixed PATH, a UTF-8 C locale (stable output to parse),
    the proxy settings, and nothing else of the agent's environment."""
    inherited = os.environ if inherited is None else inherited
    environment = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    environment.update({k: inherited[k] for k in PASSED_THROUGH if k in inherited})
    return environment


class _BoundedText:
    """Keeps the first and last ``half`` bytes of a stream and counts what was dropped."""

    def __init__(self, half: int) -> None:
        self._half = half
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def add(self, data: bytes) -> None:
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        excess = len(self._tail) - self._half
        if excess > 0:
            self._dropped += excess
            del self._tail[:excess]

    def text(self) -> str:
        head = self._head.decode("utf-8", "replace")
        tail = self._tail.decode("utf-8", "replace")
        if self._dropped:
            return f"{head}\n... [{self._dropped} bytes omitted] ...\n{tail}"
        return head + tail


class _LineSplitter:
    """Bytes in, whole lines out (to a callback), with a cap on line length."""

    def __init__(self, callback: Callable[[str], None] | None, max_line: int) -> None:
        self._callback = callback
        self._max = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        if self._callback is None:
            return
        self._buffer += data
        while True:
            index = self._buffer.find(b"\n", 0, self._max + 1)
            if index < 0:
                if len(self._buffer) > self._max:
                    self._emit(bytes(self._buffer[: self._max]))
                    del self._buffer[: self._max]
                    continue
                return
            self._emit(bytes(self._buffer[:index]))
            del self._buffer[: index + 1]

    def close(self) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if len(line) > self._max:
            line = line[: self._max]
        try:
            self._callback(line)  # type: ignore[misc]
        except Exception:
            _log.failure("an output line callback failed")


class _ChildProtocol(ProcessProtocol):
    def __init__(
        self,
        runner: ProcessRunner,
        argv: Sequence[str],
        timeout: float,
        lines: dict[int, _LineSplitter],
    ) -> None:
        self._runner = runner
        self._argv = tuple(argv)
        self._lines = lines
        self._out = {1: _BoundedText(runner.keep_bytes // 2),
                     2: _BoundedText(runner.keep_bytes // 2)}
        self._clock = runner.clock
        self.deferred: Deferred[CommandResult] = Deferred(self._cancel)
        self.exited: Deferred[None] = Deferred()
        self.timed_out = False
        self._terminating = False
        self._ended = False
        self._timeout_call = self._clock.callLater(timeout, self._on_timeout)
        self._kill_call: Any = None
        self._pipes_call: Any = None
        self.pid: int | None = None

    # -- termination ---------------------------------------------------------------------------

    def _signal_group(self, signum: int) -> bool:
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            _log.warn("no permission to signal process group {pgid}", pgid=self.pid)
            return False

    def terminate(self) -> None:
        """SIGTERM to the group now, SIGKILL after the grace period."""
        if self._terminating or self._ended:
            return
        self._terminating = True
        self._signal_group(signal.SIGTERM)
        self._kill_call = self._clock.callLater(self._runner.kill_grace_seconds, self._kill)

    def _kill(self) -> None:
        self._kill_call = None
        self._signal_group(signal.SIGKILL)

    def spawn_failed(self) -> None:
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        self.exited.callback(None)

    def _on_timeout(self) -> None:
        self._timeout_call = None
        _log.warn("command {argv} timed out; terminating its process group", argv=self._argv)
        self.timed_out = True
        self.terminate()

    def _cancel(self, _: Deferred[CommandResult]) -> None:
        _log.info("command {argv} cancelled; terminating its process group", argv=self._argv)
        self.terminate()

    # -- ProcessProtocol -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        bounded = self._out.get(childFD)
        if bounded is not None:
            bounded.add(data)
        splitter = self._lines.get(childFD)
        if splitter is not None:
            splitter.feed(data)

    def processExited(self, reason: Failure) -> None:
        if self._terminating:
            # the leader is gone: anything left in its group goes now, so pipes close
            self._signal_group(signal.SIGKILL)
        else:
            # a descendant holding our pipes open must not keep the command "running"
            self._pipes_call = self._clock.callLater(
                self._runner.pipe_grace_seconds, self._close_pipes
            )

    def _close_pipes(self) -> None:
        self._pipes_call = None
        _log.warn(
            "command {argv} exited but a descendant still holds its output open; "
            "no longer reading it",
            argv=self._argv,
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        for call in (self._timeout_call, self._kill_call, self._pipes_call):
            if call is not None and call.active():
                call.cancel()
        self._timeout_call = self._kill_call = self._pipes_call = None
        for splitter in self._lines.values():
            splitter.close()
        exit_code: int | None = None
        signum: int | None = None
        value = reason.value
        if isinstance(value, ierror.ProcessTerminated):
            exit_code, signum = value.exitCode, value.signal
        elif isinstance(value, ierror.ProcessDone):
            exit_code = 0
        stderr = self._out[2].text()
        if not self.exited.called:
            self.exited.callback(None)
        if self.deferred.called:
            return  # cancelled: the caller already has its CancelledError
        if exit_code in (126, 127) and _NOT_FOUND_MARK in stderr:
            detail = stderr.split(_NOT_FOUND_MARK, 1)[1].strip()
            self.deferred.errback(CommandNotFoundError(f"cannot run {self._argv[0]}: {detail}"))
            return
        self.deferred.callback(
            CommandResult(
                argv=self._argv,
                exit_code=exit_code,
                stdout=self._out[1].text(),
                stderr=stderr,
                timed_out=self.timed_out,
                signal=signum,
            )
        )


@implementer(IProcessRunner)
class ProcessRunner:
    """Runs commands through ``reactor.spawnProcess`` (see the module docstring).

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param kill_grace_seconds: time between SIGTERM and SIGKILL.
    :param max_line_chars: longest line handed to a line callback (longer ones are split).
    :param keep_bytes: output kept per stream in the result (half head, half tail).
    :param pipe_grace_seconds: after the child exits, how long a descendant may keep its
        output pipes open before we stop reading them and report the exit.
    :param python: interpreter running the process-group trampoline.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        kill_grace_seconds: float = 5.0,
        max_line_chars: int = 8192,
        keep_bytes: int = 128 * 1024,
        pipe_grace_seconds: float = 2.0,
        python: str = sys.executable,
    ) -> None:
        self._reactor = reactor
        self.clock = reactor
        self.kill_grace_seconds = kill_grace_seconds
        self.max_line_chars = max_line_chars
        self.keep_bytes = keep_bytes
        self.pipe_grace_seconds = pipe_grace_seconds
        self._python = python
        self._children: dict[int, _ChildProtocol] = {}

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
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("argv must not be empty")
        environment = base_environment()
        environment.update(env or {})
        executable = resolve_program(argv[0], environment["PATH"])
        if isinstance(executable, CommandNotFoundError):
            return _failed(executable)
        lines = {
            1: _LineSplitter(on_stdout_line, self.max_line_chars),
            2: _LineSplitter(on_stderr_line, self.max_line_chars),
        }
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for fd, callback in (extra_fds or {}).items():
            if fd in (0, 1, 2):
                raise ValueError(f"extra fd {fd} would replace stdio")
            child_fds[fd] = "r"
            lines[fd] = _LineSplitter(callback, self.max_line_chars)
        protocol = _ChildProtocol(self, argv, timeout, lines)
        try:
            self._reactor.spawnProcess(
                protocol,
                self._python,
                [self._python, "-c", TRAMPOLINE, executable, *argv[1:]],
                env=environment,
                childFDs=child_fds,
            )
        except OSError as error:
            protocol.spawn_failed()
            return _failed(CommandNotFoundError(f"cannot run {argv[0]}: {error}"))
        if protocol.pid is not None:
            self._children[id(protocol.deferred)] = protocol
            protocol.exited.addBoth(self._forget, id(protocol.deferred))
        return protocol.deferred

    def when_exited(self, deferred: Deferred[Any]) -> Deferred[None]:
        """Fire once the child behind ``deferred`` (a ``run`` result) has really ended.

        After a cancel, ``deferred`` fails at once; this waits for the killed group.
        """
        protocol = self._children.get(id(deferred))
        if protocol is None:
            return succeed(None)
        return _chain(protocol.exited)

    def _forget(self, result: object, key: int) -> object:
        self._children.pop(key, None)
        return result


def resolve_program(program: str, path: str) -> str | CommandNotFoundError:
    """The executable ``program`` names on ``path``, or the error saying why there is none."""
    if os.sep in program:
        if not os.path.exists(program):
            return CommandNotFoundError(f"cannot run {program}: No such file or directory")
        if not os.access(program, os.X_OK) or os.path.isdir(program):
            return CommandNotFoundError(f"cannot run {program}: Permission denied")
        return program
    found = shutil.which(program, path=path)
    if found is None:
        return CommandNotFoundError(f"cannot run {program}: command not found")
    return found


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _chain(source: Deferred[None]) -> Deferred[None]:
    """A new Deferred firing when ``source`` does, without touching ``source``'s result."""
    d: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        if not d.called:
            d.callback(None)
        return result

    source.addBoth(relay)
    return d
