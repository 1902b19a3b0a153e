"""Re-attach: a restarted engine goes on with a job whose command outlived the old process.

Each "process" is a JobManager on a fresh task.Clock over the same state: the write-ahead log's
files (:class:`FakeWalFiles`: a crash keeps only what was synced), a real job store in a
temporary directory, and one :class:`FakeJobCommands` whose runs go on while no engine follows
them.  The backend is the real apt backend, so a resumed job replays a real command sequence
(``dpkg --audit``, ``apt-get -s``, ``apt-get -y … -o APT::Status-Fd=3``, ``dpkg --audit``).
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.backends.apt import AptBackend
from lpa.agent.incarnation import FileIncarnations
from lpa.agent.jobs import JobManager
from lpa.agent.model import Job, JobRequest, PackageSpec
from lpa.agent.store import JobFileStore
from lpa.agent.wal import WriteAheadLog
from lpa.events import (
    COMPLETED,
    FAILED,
    KIND_OUTPUT,
    KIND_PROGRESS,
    KIND_STATUS,
    RUNNING,
    TIMED_OUT,
    JobEvent,
)
from tests.fakes import FakeJobCommands, FakeProcessRunner, FakeRun, FakeSystem
from tests.fakes_wal import FakeWalFiles, StepRunner

JOURNAL = "/state/journal"
SIMULATION = "Inst vim [2:9.0-1] (2:9.0-2 Debian:12/stable [amd64])\n"
MUTATION = ("apt-get", "-o", "Dpkg::Options::=--force-confdef")


def install(*names: str) -> JobRequest:
    return JobRequest(operation="install", packages=tuple(PackageSpec(n) for n in names))


class ResumeCase(SynchronousTestCase):
    """Engine "processes" over shared state (see the module docstring)."""

    job_timeout = 1800.0

    def setUp(self) -> None:
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.files = FakeWalFiles()
        self.commands = FakeJobCommands()
        self.backend = AptBackend(
            FakeProcessRunner(), reboot_marker="/nonexistent", modules_dir="/nonexistent"
        )
        self.ids = itertools.count(1)
        self.now = 1_800_000_000.0
        self.published: list[JobEvent] = []
        self.manager = self.start()

    def start(self) -> JobManager:
        self.clock = task.Clock()
        self.clock.advance(self.now)
        self.commands.clock = self.clock
        self.wal_runner = StepRunner()
        wal = WriteAheadLog(
            JOURNAL, clock=self.clock, files=self.files, run_blocking=self.wal_runner,
            now=lambda: self.now,
        )
        manager = JobManager(
            backend=self.backend,
            system=FakeSystem(),
            runner=FakeProcessRunner(),
            store=JobFileStore(os.path.join(self.state, "jobs"), now=lambda: self.now),
            clock=self.clock,
            journal=wal,
            incarnations=FileIncarnations(os.path.join(self.state, "incarnation")),
            uuid_factory=lambda: uuid.UUID(int=next(self.ids)),
            commands=self.commands,
            job_timeout_seconds=self.job_timeout,
        )
        manager.events.subscribe(self.published.append)
        self.successResultOf(manager.start())
        self.settle()
        return manager

    def settle(self) -> None:
        for _ in range(50):
            self.clock.advance(0)
            if not self.wal_runner.waiting:
                return
            self.wal_runner.run_all()
        self.fail("the event log never settled")

    def crash(self, seconds: float = 5.0) -> JobManager:
        """kill -9: what was synced survives, the commands go on; start again."""
        self.now = self.clock.seconds() + seconds
        self.wal_runner.drop_all()
        self.files = self.files.crash()
        self.commands.restart()
        self.published.clear()
        self.manager = self.start()
        return self.manager

    def until_mutation(self) -> Job:
        """Submit an install and finish its commands up to the running ``apt-get -y``."""
        job = self.manager.submit(install("vim"))
        self.settle()
        self.finish_last(0)  # dpkg --audit
        self.finish_last(0, stdout=SIMULATION)  # apt-get -s
        self.assertEqual(self.commands.last.argv[:3], MUTATION)
        self.assertEqual(job.status, RUNNING)
        return job

    def finish_last(self, code: int = 0, stdout: str = "") -> None:
        run = self.commands.last
        for line in stdout.splitlines():
            run.emit(1, line)
        run.finish(code)
        self.settle()

    def events(self, job_id: str) -> list[JobEvent]:
        return list(self.manager.events.after(job_id, 0))

    def check_contiguous(self, job_id: str) -> list[JobEvent]:
        events = self.events(job_id)
        self.assertEqual([e.seq for e in events], list(range(1, len(events) + 1)))
        return events


class ResumeTests(ResumeCase):
    def test_a_running_command_is_followed_again_without_gap_or_duplicate(self) -> None:
        """Lines evented before the crash are not repeated, lines printed while the agent was
        down are, once; the job completes when the package manager did."""
        job = self.until_mutation()
        run = self.commands.last
        run.emit(1, "Get:1 http://deb.example vim", "Get:2 http://deb.example vim-runtime")
        run.emit(3, "dlstatus:1:50.0000:Retrieving file 1")
        self.settle()
        run.emit(1, "Unpacking vim (2:9.0-2) ...")  # numbered, never synced: lost in the crash
        self.clock.advance(0)
        manager = self.crash()
        run.emit(1, "Setting up vim (2:9.0-2) ...")
        run.emit(3, "pmstatus:vim:80.0000:Installing vim")
        run.finish(0)
        self.settle()
        self.finish_last(0)  # dpkg --audit after the operation
        job = manager.get(job.id)
        self.assertEqual(job.status, COMPLETED)
        events = self.check_contiguous(job.id)
        output = [e.message for e in events if e.kind == KIND_OUTPUT]
        self.assertEqual(
            [line for line in output if line.startswith(("Get:", "Unpacking", "Setting up"))],
            ["Get:1 http://deb.example vim", "Get:2 http://deb.example vim-runtime",
             "Unpacking vim (2:9.0-2) ...", "Setting up vim (2:9.0-2) ..."],
        )
        progress = [e.message for e in events if e.kind == KIND_PROGRESS]
        self.assertEqual(progress.count("Downloading: Retrieving file 1"), 1)
        self.assertIn("Installing vim (package 1 of 1)", progress)
        notes = [e.message for e in events if e.kind == KIND_STATUS]
        self.assertIn(
            "Agent restarted; the job's package manager is still running and the job goes on "
            "from where its events end",
            notes,
        )
        self.assertEqual(len(self.commands.by_job[job.id]), 4)  # nothing started twice
        self.assertEqual(self.commands.discarded, [job.id])

    def test_a_command_that_finished_while_the_agent_was_down(self) -> None:
        """Its status is read at start: the job goes on and completes."""
        job = self.until_mutation()
        self.commands.restart()
        self.commands.last.emit(1, "Setting up vim (2:9.0-2) ...")
        self.commands.last.finish(0)
        manager = self.crash()
        self.finish_last(0)  # dpkg --audit
        job = manager.get(job.id)
        self.assertEqual(job.status, COMPLETED)
        self.assertIn("finished meanwhile", " ".join(e.message for e in self.events(job.id)))
        self.check_contiguous(job.id)

    def test_a_failed_command_fails_the_job_as_it_would_have(self) -> None:
        """Exit 100 recorded while the agent was down: the job fails as a live one would."""
        job = self.until_mutation()
        self.commands.restart()
        self.commands.last.emit(2, "E: Sub-process /usr/bin/dpkg returned an error code (1)")
        self.commands.last.finish(100)
        manager = self.crash()
        self.finish_last(0)  # dpkg --configure -a after the failure
        job = manager.get(job.id)
        self.assertEqual(job.status, FAILED)
        self.assertNotEqual(job.error_code, "AGENT_RESTARTED")

    def test_a_vanished_command_is_finalised(self) -> None:
        """Started, then gone without a status (the host went down): AGENT_RESTARTED."""
        job = self.until_mutation()
        self.commands.last.vanish()
        manager = self.crash()
        job = manager.get(job.id)
        self.assertEqual((job.status, job.error_code), (FAILED, "AGENT_RESTARTED"))
        self.check_contiguous(job.id)

    def test_a_job_whose_command_never_started_is_finalised(self) -> None:
        """No command recorded: finalised as before, never run now."""
        job = self.manager.submit(install("vim"))
        self.settle()
        self.commands.by_job.pop(job.id)  # as if the crash came before its first launch
        manager = self.crash()
        job = manager.get(job.id)
        self.assertEqual((job.status, job.error_code), (FAILED, "AGENT_RESTARTED"))

    def test_a_crash_between_two_commands_goes_on_with_the_next(self) -> None:
        """The last recorded command finished: the backend goes on and starts the next one."""
        job = self.manager.submit(install("vim"))
        self.settle()
        self.finish_last(0)  # dpkg --audit
        manager = self.crash()
        self.assertEqual(self.commands.last.argv[:2], ("apt-get", "-o"))  # the simulation
        self.assertIn("-s", self.commands.last.argv)
        self.finish_last(0, stdout=SIMULATION)
        self.finish_last(0)
        self.finish_last(0)
        self.assertEqual(manager.get(job.id).status, COMPLETED)
        self.assertEqual(len(self.commands.by_job[job.id]), 4)

    def test_another_command_than_recorded_fails_the_job(self) -> None:
        """A backend that would replay something else ends the job, never runs it."""
        job = self.until_mutation()
        self.backend._lock_timeout = 5  # the mutation's argv changes (DPkg::Lock::Timeout=5)
        manager = self.crash()
        job = manager.get(job.id)
        self.assertEqual((job.status, job.error_code), (FAILED, "AGENT_RESTARTED"))
        self.assertIn("cannot follow command 2", job.error or "")
        self.assertEqual(len(self.commands.by_job[job.id]), 3)  # nothing new started

    def test_the_job_timeout_counts_from_the_first_start(self) -> None:
        """Resumed, the job has what is left of its timeout, not a new one."""
        job = self.until_mutation()
        self.clock.advance(self.job_timeout - 100)
        self.settle()
        manager = self.crash(seconds=50)
        self.clock.advance(49)
        self.assertEqual(manager.get(job.id).status, RUNNING)
        self.clock.advance(1)
        self.assertEqual(self.commands.last.marks, ["timed_out"])
        self.commands.last.finish(None, 15)
        self.settle()
        self.assertEqual(manager.get(job.id).status, TIMED_OUT)

    def test_offsets_survive_a_checkpoint(self) -> None:
        """Lines evented before a checkpoint are not repeated after it and a crash."""
        job = self.until_mutation()
        run = self.commands.last
        run.emit(1, *[f"Get:{n} http://deb.example p{n}" for n in range(1, 6)])
        self.settle()
        checkpoint = self.manager._history.checkpoint()  # the log before it retired
        self.settle()
        self.assertTrue(self.successResultOf(checkpoint))
        self.crash()
        run.emit(1, "Get:6 http://deb.example p6")
        run.finish(0)
        self.settle()
        self.finish_last(0)
        output = [e.message for e in self.events(job.id) if e.message.startswith("Get:")]
        self.assertEqual(output, [f"Get:{n} http://deb.example p{n}" for n in range(1, 7)])

    def test_a_graceful_stop_leaves_the_command_at_once(self) -> None:
        """stop() does not wait for a command that outlives the agent; the next start
        resumes the job."""
        job = self.until_mutation()
        stopped = self.manager.stop()
        self.settle()
        self.successResultOf(stopped)
        self.assertTrue(self.commands.last.stopped)
        self.assertEqual(self.commands.last.signals, [])
        self.now = self.clock.seconds() + 1
        self.commands.restart()
        self.manager = self.start()
        self.commands.last.finish(0)
        self.settle()
        self.finish_last(0)
        self.assertEqual(self.manager.get(job.id).status, COMPLETED)


class FakeRunTests(SynchronousTestCase):
    def test_following_again_starts_after_the_offsets(self) -> None:
        """The fake hands out, like the real files, only what lies after the offsets."""
        run = FakeRun(1, ["x"], 0.0)
        run.emit(1, "a", "b")
        seen: list[Any] = []
        run.renew().follow({1: 2}, lambda fd, line, end: seen.append((fd, line, end)))
        self.assertEqual(seen, [(1, "b", 4)])


class RecordTests(SynchronousTestCase):
    def test_an_event_record_keeps_where_its_line_ends(self) -> None:
        """The 13th member of an event record is the line's (command, fd, end); replay moves
        the job's offsets there; a record without it (an older agent) still reads."""
        import json

        from lpa.agent.replay import Replay, event_from_record, event_record, record_source
        from lpa.events import JobEvent

        event = JobEvent(job_id="j", seq=3, kind=KIND_OUTPUT, status=RUNNING, progress=0,
                         message="Get:1", timestamp="2026-11-25T20:00:00+00:00")
        record = json.loads(event_record(event, (2, 1, 117)))
        self.assertEqual((record_source(record), event_from_record(record)), ((2, 1, 117), event))
        old = json.loads(event_record(event))
        self.assertEqual((len(old), record_source(old)), (12, None))
        job = Job(id="j", operation="install", status=RUNNING, created_at="t", updated_at="t",
                  request=install("vim"), seq=2, offsets={"2:1": 40})
        Replay({"j": job}, {"j": []}).run([record])
        self.assertEqual((job.seq, job.offsets), (3, {"2:1": 117}))
        bad = [*record[:12], [2, "1", 5]]
        Replay({"j": job}, {"j": []}).run([bad])  # logged and skipped, never raised
        self.assertEqual(job.offsets, {"2:1": 117})
