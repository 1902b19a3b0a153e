"""Commands that outlive the agent: the wrapper, its files, following them on a task.Clock.

Real wrapper processes run small shell scripts; the files are followed on a ``task.Clock`` the
test advances (``poll_until`` waits for the script to get somewhere, in real time, between two
advances).  The systemd path runs with a fake ``systemd-run`` (this machine's PID 1 is not
systemd): it records its argv and starts the wrapper detached, as systemd would start the
transient service.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lpa.agent import rundir
from lpa.agent.detached import DetachedCommands, DetachedRun, systemd_run_argv, unit_name
from lpa.agent.follow import LineReader, bounded_text
from lpa.agent.interfaces import ICommandRun, IJobCommands
from lpa.agent.piped import PipedCommands, PipedRun
from lpa.errors import CommandError, CommandNotFoundError
from tests.agentproc import kill_runs
from tests.fakes import FakeProcessRunner

JOB = "00000000-0000-4000-8000-00000000000a"


async def launched(commands: DetachedCommands, *args: Any, **kwargs: Any) -> DetachedRun:
    """``commands.launch(...)``'s run, typed as the DetachedRun it is."""
    run = await commands.launch(*args, **kwargs)
    assert isinstance(run, DetachedRun)
    return run


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session …)."""
    with open(f"/proc/{pid}/stat") as stream:
        return stream.read().rsplit(")", 1)[1].split()


class LineReaderTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as stream:
            stream.write(data)
        return path

    def test_whole_lines_with_their_end_offsets(self) -> None:
        """Only complete lines come out, each with the offset just past it."""
        path = self.write(b"one\ntwo\nthr")
        reader = LineReader(path)
        self.assertEqual(list(reader.read()), [("one", 4), ("two", 8)])
        with open(path, "ab") as stream:
            stream.write(b"ee\n")
        self.assertEqual(list(reader.read()), [("three", 14)])
        self.assertEqual(reader.position, 14)
        reader.close()

    def test_a_new_reader_starts_exactly_at_an_offset(self) -> None:
        """Started at a line's end offset, a reader neither repeats nor skips a line."""
        path = self.write(b"one\ntwo\nthree\n")
        self.assertEqual(list(LineReader(path, 4).finish()), [("two", 8), ("three", 14)])

    def test_finish_hands_out_a_last_line_without_newline(self) -> None:
        """The writer is done: the unterminated rest is a line too."""
        path = self.write(b"one\nlast")
        self.assertEqual(list(LineReader(path).finish()), [("one", 4), ("last", 8)])

    def test_long_lines_come_in_pieces_and_bad_bytes_decode(self) -> None:
        """A line past max_line is cut into pieces with their own offsets; any bytes decode."""
        path = self.write(b"abcdefgh\xff\n")
        self.assertEqual(
            list(LineReader(path, max_line=4).finish()),
            [("abcd", 4), ("efgh", 8), ("\ufffd", 10)],
        )

    def test_a_missing_file_reads_as_empty(self) -> None:
        """Before the wrapper created it, a file has no lines."""
        self.assertEqual(list(LineReader(self.mktemp()).read()), [])

    def test_bounded_text_keeps_head_and_tail(self) -> None:
        """The result's stdout is the file's head and tail, as the pipe runner keeps it."""
        path = self.write(b"a" * 10 + b"b" * 10)
        self.assertEqual(bounded_text(path, 4), "aaaa\n... [12 bytes omitted] ...\nbbbb")
        self.assertEqual(bounded_text(path, 10), "a" * 10 + "b" * 10)


class UnitTests(SynchronousTestCase):
    def test_unit_name_and_systemd_run_argv(self) -> None:
        """One transient service per command, named after its job, collected, KillMode=process,
        the environment passed explicitly, the command after --."""
        unit = unit_name(JOB, 3)
        self.assertEqual(unit, f"lpa-job-{JOB}-3.service")
        argv = systemd_run_argv(
            "systemd-run", unit, ["/usr/bin/python3", "w.py", "/d", "0", "/usr/bin/apt-get"],
            {"PATH": "/usr/bin", "LC_ALL": "C"}, "lpa job x command 3: apt-get",
        )
        self.assertEqual(argv, [
            "systemd-run", f"--unit={unit}", "--collect", "--quiet",
            "--description=lpa job x command 3: apt-get", "--property=KillMode=process",
            "--setenv=LC_ALL=C", "--setenv=PATH=/usr/bin",
            "--", "/usr/bin/python3", "w.py", "/d", "0", "/usr/bin/apt-get",
        ])
        self.assertNotIn("--scope", argv)
        self.assertNotIn("--wait", argv)

    def test_interfaces(self) -> None:
        """The detached and the piped commands provide the seams the engine uses."""
        commands = DetachedCommands(reactor, self.mktemp(), clock=task.Clock(), systemd=False)
        verifyObject(IJobCommands, commands)
        directory = self.mktemp()
        os.makedirs(directory)
        verifyObject(ICommandRun, DetachedRun(commands, JOB, 1, directory))
        verifyObject(IJobCommands, PipedCommands(FakeProcessRunner()))
        verifyObject(ICommandRun, PipedRun(FakeProcessRunner(), 1, ["x"]))

    def test_a_live_pid_without_the_lock_is_not_the_wrapper(self) -> None:
        """pid reuse: a started file naming a live process (this one) whose lock nobody
        holds is a vanished run, and nothing is signalled."""
        root = self.mktemp()
        directory = rundir.run_directory(root, JOB, 1)
        os.makedirs(directory)
        rundir.write_json(os.path.join(directory, rundir.META), {"argv": ["x"], "started": 0})
        rundir.write_json(os.path.join(directory, rundir.STARTED),
                          {"pid": os.getpid(), "pgid": os.getpgrp()})
        open(os.path.join(directory, rundir.LOCK), "w").close()
        commands = DetachedCommands(reactor, root, clock=task.Clock(), systemd=False)
        self.assertEqual(commands.last_run(JOB), (1, "vanished"))
        self.assertFalse(DetachedRun(commands, JOB, 1, directory).signal(signal.SIGTERM))


class DetachedTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.state, "runs")
        self.bin = os.path.abspath(self.mktemp())
        os.makedirs(self.bin)
        self.clock = task.Clock()
        self.addCleanup(kill_runs, self.state)

    def commands(self, **options: Any) -> DetachedCommands:
        options.setdefault("systemd", False)
        return DetachedCommands(reactor, self.root, clock=self.clock, poll_interval=0.1,
                                **options)

    def script(self, name: str, body: str) -> str:
        path = os.path.join(self.bin, name)
        with open(path, "w") as stream:
            stream.write("#!/bin/sh\n" + body)
        os.chmod(path, 0o755)
        return path

    async def poll_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Advance the follower's clock until ``predicate`` holds (the script runs meanwhile
        in real time)."""
        deadline = time.monotonic() + 30
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {what}")
            self.clock.advance(0.1)
            await deferLater(reactor, 0.02, lambda: None)

    async def wait_for_file(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {path}")
            await deferLater(reactor, 0.02, lambda: None)

    async def test_lines_offsets_and_result(self) -> None:
        """stdout, stderr and fd 3 lines come with their file offsets; the exit status is the
        command's."""
        program = self.script("pm", "echo one; echo two; echo st >&3; echo err >&2; exit 3\n")
        run = await launched(self.commands(), JOB, 1, [program, "x"], timeout=10)
        lines: list[tuple[int, str, int]] = []
        run.follow({}, lambda fd, line, end: lines.append((fd, line, end)))
        await self.poll_until(lambda: run.ended.called, "the command to end")
        result = self.successResultOf(run.ended)
        self.assertEqual((result.exit_code, result.signal, result.timed_out), (3, None, False))
        self.assertEqual(result.stdout, "one\ntwo\n")
        self.assertEqual(result.stderr, "err\n")
        self.assertEqual(sorted(lines), [(1, "one", 4), (1, "two", 8), (2, "err", 4),
                                         (3, "st", 3)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_the_command_outlives_its_follower_and_is_found_again(self) -> None:
        """The wrapper is no child of ours, in a session of its own, the command writes into
        files (no pipe); a new follower (a restarted agent) goes on from an offset."""
        go = os.path.join(self.bin, "go")
        program = self.script(
            "pm", f"echo first; echo second; while [ ! -e {go} ]; do sleep 0.05; done\n"
                  "echo third; exit 0\n")
        first = self.commands()
        run = await launched(first, JOB, 1, [program], timeout=10)
        lines: list[tuple[int, str, int]] = []
        run.follow({}, lambda fd, line, end: lines.append((fd, line, end)))
        await self.poll_until(lambda: len(lines) == 2, "two lines")
        started = rundir.read_json(os.path.join(run.directory, rundir.STARTED))
        assert started is not None
        wrapper, command = started["pid"], started["pgid"]
        self.assertNotEqual(int(proc_stat(wrapper)[1]), os.getpid())  # ppid
        self.assertNotEqual(int(proc_stat(wrapper)[3]), os.getsid(0))  # session
        self.assertEqual(int(proc_stat(command)[2]), command)  # its own process group
        self.assertEqual(os.readlink(f"/proc/{command}/fd/1"),
                         os.path.join(run.directory, "out"))
        self.assertEqual(os.readlink(f"/proc/{command}/fd/0"), os.devnull)
        run.stop()  # the agent dies
        self.assertEqual(first.last_run(JOB), (1, "running"))
        again = self.commands().attach(JOB, 1)
        assert again is not None
        self.assertEqual(again.argv, (program,))
        more: list[tuple[int, str, int]] = []
        again.follow({1: lines[0][2]}, lambda fd, line, end: more.append((fd, line, end)))
        open(go, "w").close()
        await self.poll_until(lambda: again.ended.called, "the command to end")
        self.assertEqual(more, [(1, "second", 13), (1, "third", 19)])
        self.assertEqual(self.successResultOf(again.ended).exit_code, 0)

    async def test_finished_while_nobody_followed(self) -> None:
        """A command that ended meanwhile is "finished" and its result read from the files."""
        program = self.script("pm", "echo done; exit 7\n")
        run = await launched(self.commands(), JOB, 1, [program], timeout=10)
        await self.wait_for_file(os.path.join(run.directory, rundir.STATUS))
        commands = self.commands()
        self.assertEqual(commands.last_run(JOB), (1, "finished"))
        again = commands.attach(JOB, 1)
        assert again is not None
        lines: list[str] = []
        again.follow({}, lambda fd, line, end: lines.append(line))
        self.clock.advance(0)
        self.assertEqual((self.successResultOf(again.ended).exit_code, lines), (7, ["done"]))

    async def test_a_killed_wrapper_is_a_vanished_run(self) -> None:
        """The wrapper gone without a status (its lock with it): vanished, an error."""
        program = self.script("pm", "echo up; sleep 30\n")
        commands = self.commands()
        run = await launched(commands, JOB, 1, [program], timeout=10)
        started = rundir.read_json(os.path.join(run.directory, rundir.STARTED))
        assert started is not None
        os.kill(started["pid"], signal.SIGKILL)
        await self.poll_until(lambda: commands.last_run(JOB) == (1, "vanished"), "vanished")
        os.killpg(started["pgid"], signal.SIGKILL)
        run.follow({}, lambda fd, line, end: None)
        self.clock.advance(0)
        self.failureResultOf(run.ended, CommandError)

    async def test_signals_reach_the_command_group_and_the_reason_is_kept(self) -> None:
        """SIGTERM goes to the command's group (a grandchild too), not the wrapper, which
        records how it ended; a restarted agent reads the mark as timed out."""
        pidfile = os.path.join(self.bin, "grandchild")
        program = self.script("pm", f"sleep 30 & echo $! > {pidfile}; echo up; wait\n")
        run = await launched(self.commands(), JOB, 1, [program], timeout=10)
        run.follow({}, lambda fd, line, end: None)
        await self.wait_for_file(pidfile)
        run.mark("timed_out")
        self.assertTrue(run.signal(signal.SIGTERM))
        await self.poll_until(lambda: run.ended.called, "the command to end")
        result = self.successResultOf(run.ended)
        self.assertEqual((result.exit_code, result.signal, result.timed_out),
                         (None, signal.SIGTERM, True))
        with open(pidfile) as handle:
            grandchild = int(handle.read())
        self.assertTrue(not os.path.exists(f"/proc/{grandchild}")
                        or proc_stat(grandchild)[0] == "Z")
        self.assertFalse(run.signal(signal.SIGKILL))  # ended: nothing to signal

    async def test_a_program_that_cannot_be_run(self) -> None:
        """Missing, not executable, or failing exec (a bad interpreter): CommandNotFoundError."""
        commands = self.commands()
        bad = self.script("bad", "")
        with open(bad, "w") as stream:
            stream.write("#!/nonexistent/interpreter\n")
        for argv in ([os.path.join(self.bin, "missing")], [bad]):
            with self.assertRaises(CommandNotFoundError):
                await commands.launch(JOB, 1 + len(os.listdir(self.bin)), argv, timeout=5)

    async def test_discard_keeps_the_files_of_a_running_command(self) -> None:
        """A job's files go once its commands have ended, never under a running one."""
        go = os.path.join(self.bin, "go")
        program = self.script("pm", f"while [ ! -e {go} ]; do sleep 0.05; done\n")
        commands = self.commands()
        run = await launched(commands, JOB, 1, [program], timeout=10)
        commands.discard(JOB)
        self.assertTrue(os.path.isdir(run.directory))
        open(go, "w").close()
        await self.wait_for_file(os.path.join(run.directory, rundir.STATUS))
        while commands.last_run(JOB) != (1, "finished"):
            await deferLater(reactor, 0.02, lambda: None)
        commands.discard(JOB)
        self.assertFalse(os.path.exists(rundir.job_directory(self.root, JOB)))

    async def test_an_unreadable_file_is_one_warning_not_the_end(self) -> None:
        """A tick that cannot read the files logs once and the following goes on: the run
        still ends once they can be read."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        program = self.script("pm", "echo done\n")
        run = await launched(self.commands(), JOB, 1, [program], timeout=10)
        await self.wait_for_file(os.path.join(run.directory, rundir.STATUS))
        out = os.path.join(run.directory, "out")
        os.rename(out, out + ".kept")
        os.mkdir(out)  # reading it fails (EISDIR)
        lines: list[str] = []
        run.follow({}, lambda fd, line, end: lines.append(line))
        self.clock.advance(0.1)
        self.clock.advance(0.1)
        self.assertFalse(run.ended.called)
        warnings = [e for e in logged if "cannot read the files" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        os.rmdir(out)
        os.rename(out + ".kept", out)
        self.clock.advance(0.1)
        self.assertEqual((self.successResultOf(run.ended).exit_code, lines), (0, ["done"]))

    async def test_systemd_path_with_a_fake_systemd_run(self) -> None:
        """Where systemd runs, the wrapper is started by systemd-run as a transient service
        (a fake here: it records its argv and starts the command after -- detached)."""
        record = os.path.join(self.bin, "systemd-run.json")
        fake = os.path.join(self.bin, "systemd-run")
        with open(fake, "w") as stream:
            stream.write(
                f"#!{sys.executable}\n"
                "import json, os, sys\n"
                f"json.dump(sys.argv[1:], open({record!r}, 'w'))\n"
                "command = sys.argv[sys.argv.index('--') + 1:]\n"
                "env = dict(a.split('=', 1)[1].split('=', 1) for a in sys.argv\n"
                "           if a.startswith('--setenv='))\n"
                "if os.fork() == 0:\n"
                "    os.setsid()\n"
                "    if os.fork() == 0:\n"
                "        os.execve(command[0], command, env)\n"
                "    os._exit(0)\n"
                "os.wait()\n"
            )
        os.chmod(fake, 0o755)
        program = self.script("pm", "echo from the unit; exit 0\n")
        commands = self.commands(systemd=True, systemd_run=fake)
        run = await launched(commands, JOB, 1, [program], env={"LPA_X": "y"}, timeout=10)
        run.follow({}, lambda fd, line, end: None)
        await self.poll_until(lambda: run.ended.called, "the unit's command to end")
        self.assertEqual(self.successResultOf(run.ended).stdout, "from the unit\n")
        with open(record) as handle:
            argv = json.load(handle)
        command = argv[argv.index("--") + 1:]
        self.assertEqual(argv[0], f"--unit=lpa-job-{JOB}-1.service")
        self.assertIn("--collect", argv)
        self.assertIn("--property=KillMode=process", argv)
        self.assertIn("--setenv=LPA_X=y", argv)
        self.assertEqual(command[2:5], [run.directory, "0", program])  # not detached again
        meta = rundir.read_json(os.path.join(run.directory, rundir.META))
        self.assertEqual(meta["unit"], f"lpa-job-{JOB}-1.service")  # type: ignore[index]
