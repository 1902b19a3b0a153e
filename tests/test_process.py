"""ProcessRunner and the engine against real child processes (fake package-manager scripts)."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from lpa.agent.jobs import JobManager
from lpa.agent.model import JobRequest, PackageSpec
from lpa.agent.process import ProcessRunner
from lpa.errors import CommandNotFoundError
from lpa.events import (
    CANCELLED,
    COMPLETED,
    EVENT_JOB_COMPLETE,
    FAILED,
    KIND_OUTPUT,
    KIND_WAITING_FOR_LOCK,
    TIMED_OUT,
    JobEvent,
)
from tests.fakes import FakeBackend, FakeJobStore, FakeSystem
from tests.procs import pid_alive


def fire_once(deferred: Deferred[None]) -> None:
    """Fire ``deferred`` unless it has fired already."""
    if not deferred.called:
        deferred.callback(None)


#: a script printing 2000 lines of about 50 bytes (100 KB)
BIG_OUTPUT = (
    'i=0\nwhile [ $i -lt 2000 ]; do echo "line $i $(printf %040d 0)"; i=$((i+1)); done\n'
)


class FakePackageManagers:
    """Writes small shell scripts that behave like a package manager."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, body: str, mode: int = 0o755) -> str:
        path = self.directory / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(mode)
        return str(path)


class ProcessRunnerTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pm = FakePackageManagers(Path(self.mktemp()))
        self.runner = ProcessRunner(reactor, kill_grace_seconds=0.5)

    async def test_success_lines_and_result(self) -> None:
        """Output is split into lines for the callbacks and kept in the result."""
        script = self.pm.write("ok", 'echo "Reading package lists"\necho "Done"\necho warn >&2\n')
        out: list[str] = []
        err: list[str] = []
        result = await self.runner.run(
            [script], timeout=10, on_stdout_line=out.append, on_stderr_line=err.append
        )
        self.assertEqual(result.exit_code, 0)
        self.assertFalse(result.timed_out)
        self.assertEqual(out, ["Reading package lists", "Done"])
        self.assertEqual(err, ["warn"])
        self.assertEqual(result.stdout, "Reading package lists\nDone\n")
        self.assertEqual(result.argv, (script,))

    async def test_failure_exit_and_stderr(self) -> None:
        """A non-zero exit is a result, not an error, with its stderr."""
        script = self.pm.write("fail", 'echo "E: Unable to locate package nosuch" >&2\nexit 100\n')
        result = await self.runner.run([script, "--", "nosuch"], timeout=10)
        self.assertEqual(result.exit_code, 100)
        self.assertEqual(result.stderr, "E: Unable to locate package nosuch\n")

    async def test_arguments_are_not_shell_interpreted(self) -> None:
        """argv reaches the program verbatim, metacharacters included."""
        script = self.pm.write("args", 'for a in "$@"; do echo "[$a]"; done\n')
        result = await self.runner.run([script, "a; rm -rf /", "$(id)"], timeout=10)
        self.assertEqual(result.stdout, "[a; rm -rf /]\n[$(id)]\n")

    async def test_minimal_environment(self) -> None:
        """The child gets a safe base environment plus the given mapping only."""
        os.environ["LPA_TEST_SECRET"] = "s3cret"
        self.addCleanup(os.environ.pop, "LPA_TEST_SECRET")
        if "https_proxy" not in os.environ:
            os.environ["https_proxy"] = "http://proxy.invalid:3128"
            self.addCleanup(os.environ.pop, "https_proxy")
        script = self.pm.write(
            "env", 'echo "secret=$LPA_TEST_SECRET extra=$EXTRA lang=$LC_ALL proxy=$https_proxy"\n'
        )
        result = await self.runner.run([script], timeout=10, env={"EXTRA": "yes"})
        self.assertEqual(
            result.stdout,
            f"secret= extra=yes lang=C.UTF-8 proxy={os.environ['https_proxy']}\n",
        )

    async def test_own_process_group_and_session(self) -> None:
        """The child leads its own process group (pgid == pid)."""
        script = self.pm.write("pg", 'echo "$$ $(ps -o pgid= -p $$)"\n')
        result = await self.runner.run([script], timeout=10)
        pid, pgid = result.stdout.split()
        self.assertEqual(pid, pgid)
        self.assertNotEqual(int(pgid), os.getpgrp())

    async def test_timeout_kills_group_including_grandchild(self) -> None:
        """Past the timeout the whole group dies, a backgrounded grandchild too."""
        pidfile = self.pm.directory / "grandchild.pid"
        script = self.pm.write("hang",
                               f"sleep 300 &\necho $! > {pidfile}\necho started\nsleep 300\n")
        started: Deferred[None] = Deferred()
        result = await self.runner.run(
            [script], timeout=1, on_stdout_line=lambda line: fire_once(started)
        )
        self.assertTrue(result.timed_out)
        self.assertIsNone(result.exit_code)
        grandchild = int(pidfile.read_text())
        for _ in range(250):  # SIGKILL is delivered asynchronously: wait for it, up to 5 s
            if not pid_alive(grandchild):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(pid_alive(grandchild))

    async def test_descendant_holding_pipes_does_not_hang(self) -> None:
        """A background descendant keeping stdout open does not keep the command running."""
        runner = ProcessRunner(reactor, pipe_grace_seconds=0.2)
        pidfile = self.pm.directory / "daemon.pid"
        script = self.pm.write("daemon", f"sleep 300 &\necho $! > {pidfile}\necho bye\nexit 0\n")
        result = await runner.run([script], timeout=10)
        os.kill(int(pidfile.read_text()), 9)
        self.assertEqual((result.exit_code, result.timed_out), (0, False))
        self.assertEqual(result.stdout, "bye\n")

    async def test_sigterm_ignored_then_sigkill(self) -> None:
        """A child ignoring SIGTERM is killed with SIGKILL after the grace period."""
        script = self.pm.write("stubborn",
                               "trap '' TERM\necho ready\nwhile true; do sleep 0.1; done\n")
        result = await self.runner.run([script], timeout=0.5)
        self.assertTrue(result.timed_out)
        self.assertEqual(result.signal, 9)

    async def test_cancel_terminates_group(self) -> None:
        """Cancelling the Deferred errbacks CancelledError and the child is gone after."""
        pidfile = self.pm.directory / "cancel.pid"
        script = self.pm.write("cancel", f"echo $$ > {pidfile}\necho started\nsleep 300\n")
        started: Deferred[None] = Deferred()
        d = self.runner.run(
            [script], timeout=60, on_stdout_line=lambda line: fire_once(started)
        )
        await started
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await self.runner.when_exited(d)
        self.assertFalse(pid_alive(int(pidfile.read_text())))

    async def test_missing_and_non_executable(self) -> None:
        """A missing or non-executable program errbacks CommandNotFoundError."""
        with self.assertRaises(CommandNotFoundError) as missing:
            await self.runner.run([str(self.pm.directory / "nope")], timeout=5)
        self.assertIn("No such file", str(missing.exception))
        with self.assertRaises(CommandNotFoundError):
            await self.runner.run(["lpa-no-such-program-anywhere"], timeout=5)
        script = self.pm.write("noexec", "echo hi\n", mode=0o644)
        with self.assertRaises(CommandNotFoundError) as denied:
            await self.runner.run([script], timeout=5)
        self.assertIn("Permission denied", str(denied.exception))

    async def test_large_output_bounded(self) -> None:
        """Every line of a large output reaches the callback; the result keeps head and tail."""
        runner = ProcessRunner(reactor, keep_bytes=4096)
        script = self.pm.write("big", BIG_OUTPUT)
        lines: list[str] = []
        result = await runner.run([script], timeout=20, on_stdout_line=lines.append)
        self.assertEqual(len(lines), 2000)
        self.assertEqual(lines[-1].split()[:2], ["line", "1999"])
        self.assertLess(len(result.stdout), 4096 + 100)
        self.assertIn("bytes omitted", result.stdout)
        self.assertTrue(result.stdout.startswith("line 0 "))
        self.assertTrue(result.stdout.rstrip().endswith("0" * 40))

    async def test_long_line_is_capped(self) -> None:
        """A line longer than max_line_chars is split, never buffered without bound."""
        runner = ProcessRunner(reactor, max_line_chars=100)
        script = self.pm.write("long", "printf '%0250d\\n' 0\n")
        lines: list[str] = []
        await runner.run([script], timeout=10, on_stdout_line=lines.append)
        self.assertEqual([len(x) for x in lines], [100, 100, 50])

    def test_bad_arguments(self) -> None:
        """An empty argv or an extra fd replacing stdio is refused before spawning."""
        self.assertRaises(ValueError, self.runner.run, [], timeout=1)
        script = self.pm.write("x", "true\n")
        self.assertRaises(ValueError, self.runner.run, [script], timeout=1, extra_fds={1: print})

    async def test_status_fd_three(self) -> None:
        """Lines written to fd 3 reach the extra_fds callback (apt's APT::Status-Fd=3)."""
        script = self.pm.write("status", 'echo "pmstatus:vim:50:Installing vim" >&3\necho out\n')
        status: list[str] = []
        result = await self.runner.run([script], timeout=10, extra_fds={3: status.append})
        self.assertEqual(status, ["pmstatus:vim:50:Installing vim"])
        self.assertEqual(result.stdout, "out\n")


class ScriptBackend(FakeBackend):
    """A FakeBackend whose install runs one real script."""

    def __init__(self, script: str, command_timeout: float) -> None:
        super().__init__()
        self.script("install", commands=[[script]], command_timeout=command_timeout)


class EngineWithRealProcessesTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pm = FakePackageManagers(Path(self.mktemp()))
        self.runner = ProcessRunner(reactor, kill_grace_seconds=0.5)
        self.completed: dict[str, Deferred[None]] = {}
        self.events: list[JobEvent] = []

    def manager(
        self, script: str, *, command_timeout: float = 10, job_timeout: float = 30
    ) -> JobManager:
        manager = JobManager(
            backend=ScriptBackend(script, command_timeout),
            system=FakeSystem(),
            runner=self.runner,
            store=FakeJobStore(),
            clock=reactor,
            job_timeout_seconds=job_timeout,
        )
        manager.events.subscribe(self._on_event)
        self.successResultOf(manager.start())
        self.addCleanup(manager.stop)
        return manager

    def _on_event(self, event: JobEvent) -> None:
        self.events.append(event)
        if event.event == EVENT_JOB_COMPLETE:
            self.done(event.job_id).callback(None)

    def done(self, job_id: str) -> Deferred[None]:
        return self.completed.setdefault(job_id, Deferred())

    def submit(self, manager: JobManager) -> str:
        return manager.submit(
            JobRequest(operation="install", packages=(PackageSpec("vim"),))
        ).id

    async def test_success(self) -> None:
        """A real install script's lines become output events and the job completes."""
        manager = self.manager(self.pm.write("ok", "echo Unpacking vim\necho Setting up vim\n"))
        job_id = self.submit(manager)
        await self.done(job_id)
        job = manager.get(job_id)
        self.assertEqual(job.status, COMPLETED)
        output = [e.message for e in self.events if e.kind == KIND_OUTPUT]
        self.assertEqual(output, ["Unpacking vim", "Setting up vim"])

    async def test_failure(self) -> None:
        """A failing script fails the job with its exit code, stderr and a classified code."""
        manager = self.manager(
            self.pm.write("fail",
                          "echo 'E: Failed to fetch http://x/y 404 Not Found' >&2\nexit 100\n")
        )
        job_id = self.submit(manager)
        await self.done(job_id)
        job = manager.get(job_id)
        self.assertEqual((job.status, job.error_code, job.exit_code),
                         (FAILED, "NETWORK_ERROR", 100))
        self.assertIn("Failed to fetch", job.command_stderr)

    async def test_command_timeout(self) -> None:
        """A hanging script hits the per-command timeout: timed_out, TIMEOUT."""
        manager = self.manager(self.pm.write("hang", "sleep 300\n"), command_timeout=0.5)
        job_id = self.submit(manager)
        await self.done(job_id)
        job = manager.get(job_id)
        self.assertEqual((job.status, job.error_code), (TIMED_OUT, "TIMEOUT"))

    async def test_job_timeout(self) -> None:
        """A hanging script hits the job timeout: timed_out, TIMEOUT, child killed."""
        pidfile = self.pm.directory / "job.pid"
        manager = self.manager(
            self.pm.write("hang", f"echo $$ > {pidfile}\nsleep 300\n"), job_timeout=0.5
        )
        job_id = self.submit(manager)
        await self.done(job_id)
        self.assertEqual(manager.get(job_id).status, TIMED_OUT)
        self.assertFalse(pid_alive(int(pidfile.read_text())))
        self.assertFalse(manager.mutation_in_progress())

    async def test_cancel_running(self) -> None:
        """Cancelling a running job kills its script and ends it cancelled."""
        pidfile = self.pm.directory / "run.pid"
        manager = self.manager(
            self.pm.write("hang", f"echo $$ > {pidfile}\necho started\nsleep 300\n")
        )
        job_id = self.submit(manager)
        while not [e for e in self.events if e.kind == KIND_OUTPUT]:
            await deferLater(reactor, 0.05, lambda: None)
        manager.cancel(job_id)
        await self.done(job_id)
        self.assertEqual(manager.get(job_id).status, CANCELLED)
        self.assertFalse(pid_alive(int(pidfile.read_text())))

    async def test_large_output(self) -> None:
        """100 KB of output: every line is an event, job logs stay bounded."""
        manager = self.manager(
            self.pm.write("big", BIG_OUTPUT)
        )
        job_id = self.submit(manager)
        await self.done(job_id)
        job = manager.get(job_id)
        self.assertEqual(job.status, COMPLETED)
        self.assertEqual(len([e for e in self.events if e.kind == KIND_OUTPUT]), 2000)
        self.assertLessEqual(len(job.logs), 500)
        self.assertLessEqual(len(manager.events.kept(job_id)), 1000)

    async def test_lock_wait(self) -> None:
        """apt's "waiting for cache lock" line becomes one waiting_for_lock event."""
        manager = self.manager(
            self.pm.write(
                "lock",
                "for i in 1 2 3; do echo 'Waiting for cache lock: Could not get lock "
                "/var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)... '$i's' >&2; "
                "done\n"
                "echo Setting up vim\n",
            )
        )
        job_id = self.submit(manager)
        await self.done(job_id)
        waits = [e for e in self.events if e.kind == KIND_WAITING_FOR_LOCK]
        self.assertEqual(len(waits), 1)
        self.assertIn("apt-get (pid 4242)", waits[0].message)
        self.assertEqual(manager.get(job_id).status, COMPLETED)

