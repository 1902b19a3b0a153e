"""Cancel and timeouts around the package transaction, on a task.Clock with FakeJobCommands.

While a command resolves or downloads, cancel and timeouts terminate it at once (SIGTERM, then
SIGKILL after the grace).  Once its transaction has begun (apt's ``pmstatus`` on fd 3, or a
command that is a transaction from its start), nothing signals it: a cancel is recorded and the
job ends ``cancelled`` after the transaction; a timeout gets one bounded extension with an
event, and the job ends ``timed_out``.
"""

from __future__ import annotations

import itertools
import signal
import uuid

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lpa.agent import phase
from lpa.agent.incarnation import MemoryIncarnations
from lpa.agent.interfaces import ICommandRun, IJobCommands
from lpa.agent.jobs import ABORT_GRACE_SECONDS, JobManager
from lpa.agent.model import JobRequest, PackageSpec
from lpa.events import (
    CANCELLED,
    COMPLETED,
    KIND_OUTPUT,
    KIND_STATUS,
    RUNNING,
    TIMED_OUT,
    JobEvent,
)
from tests.fakes import (
    FakeBackend,
    FakeJobCommands,
    FakeJobStore,
    FakeProcessRunner,
    FakeRun,
    FakeSystem,
)

KILL_GRACE = 5.0
EXTENSION = 600.0
PMSTATUS = "pmstatus:vim:20.0000:Preparing vim"


def install(*names: str) -> JobRequest:
    return JobRequest(operation="install", packages=tuple(PackageSpec(n) for n in names))


class PhaseTestCase(SynchronousTestCase):
    """A JobManager over FakeJobCommands; an install runs two apt-like commands."""

    job_timeout = 1800.0

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.commands = FakeJobCommands(self.clock)
        self.backend = FakeBackend()
        self.status_lines: list[str] = []
        self.backend.script(
            "install",
            commands=[["apt-get", "-y", "install", "vim"], ["dpkg", "--audit"]],
            command_timeout=300.0,
            transaction=phase.APT,
            status_lines=self.status_lines,
        )
        ids = itertools.count(1)
        self.manager = JobManager(
            backend=self.backend,
            system=FakeSystem(),
            runner=FakeProcessRunner(),
            store=FakeJobStore(),
            clock=self.clock,
            incarnations=MemoryIncarnations(),
            uuid_factory=lambda: uuid.UUID(int=next(ids)),
            commands=self.commands,
            job_timeout_seconds=self.job_timeout,
            kill_grace_seconds=KILL_GRACE,
            transaction_extension_seconds=EXTENSION,
        )
        self.published: list[JobEvent] = []
        self.manager.events.subscribe(self.published.append)
        self.successResultOf(self.manager.start())

    def start_job(self) -> tuple[str, FakeRun]:
        job = self.manager.submit(install("vim"))
        self.clock.advance(0)
        self.assertEqual(job.status, RUNNING)
        return job.id, self.commands.last

    def messages(self, job_id: str, kind: str = KIND_STATUS) -> list[str]:
        return [e.message for e in self.published if e.job_id == job_id and e.kind == kind]

    def assertClean(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class InterfaceTests(SynchronousTestCase):
    def test_fakes_provide_the_interfaces(self) -> None:
        """FakeJobCommands and FakeRun provide what the real ones do (see test_detached)."""
        commands = FakeJobCommands()
        verifyObject(IJobCommands, commands)
        verifyObject(ICommandRun, FakeRun(1, ["x"], 0.0))


class CancelTests(PhaseTestCase):
    def test_cancel_while_downloading_terminates_at_once(self) -> None:
        """Before the transaction: SIGTERM now, SIGKILL after the grace, job cancelled."""
        job_id, run = self.start_job()
        run.emit(1, "Get:1 http://deb.example stable/main vim [12 kB]")
        self.manager.cancel(job_id)
        self.assertEqual((run.signals, run.marks), ([signal.SIGTERM], ["cancelled"]))
        self.clock.advance(KILL_GRACE)
        self.assertEqual(run.signals, [signal.SIGTERM, signal.SIGKILL])
        run.finish(None, signal.SIGKILL)
        self.assertEqual(self.manager.get(job_id).status, CANCELLED)
        self.assertEqual(len(self.commands.runs), 1)  # no further command
        self.assertClean()

    def test_cancel_during_the_transaction_lets_it_finish(self) -> None:
        """After pmstatus: no signal ever, an event says so, the output goes on, then
        cancelled; no later command runs."""
        job_id, run = self.start_job()
        run.emit(3, PMSTATUS)
        self.manager.cancel(job_id)
        self.manager.cancel(job_id)  # asked twice: said once
        self.assertEqual(
            [m for m in self.messages(job_id) if m.startswith("Cancel requested")],
            ["Cancel requested; finishing the current dpkg transaction"],
        )
        self.clock.advance(3 * ABORT_GRACE_SECONDS + KILL_GRACE)
        self.assertEqual(run.signals, [])
        self.assertEqual(self.manager.get(job_id).status, RUNNING)
        self.assertTrue(self.manager.mutation_in_progress())
        run.emit(1, "Setting up vim (2:9.0-1) ...")
        self.assertIn("Setting up vim (2:9.0-1) ...", self.messages(job_id, KIND_OUTPUT))
        run.finish(0)
        self.assertEqual(self.manager.get(job_id).status, CANCELLED)
        self.assertEqual(len(self.commands.runs), 1)
        self.assertFalse(self.manager.mutation_in_progress())
        self.assertClean()

    def test_kill_dropped_when_the_transaction_begins_meanwhile(self) -> None:
        """SIGTERM went out while downloading; dpkg started before the grace: no SIGKILL."""
        job_id, run = self.start_job()
        self.manager.cancel(job_id)
        run.emit(3, PMSTATUS)
        self.clock.advance(KILL_GRACE * 2)
        self.assertEqual(run.signals, [signal.SIGTERM])
        self.assertTrue(any("no longer killed" in m for m in self.messages(job_id)))
        run.finish(0)
        self.assertEqual(self.manager.get(job_id).status, CANCELLED)

    def test_command_that_is_a_transaction_from_its_start(self) -> None:
        """dpkg --configure -a (phase.ALWAYS) is never signalled by a cancel."""
        self.backend.script("install", commands=[["dpkg", "--configure", "-a"]],
                            transaction=phase.ALWAYS)
        job_id, run = self.start_job()
        self.manager.cancel(job_id)
        self.assertEqual(run.signals, [])
        run.finish(0)
        self.assertEqual(self.manager.get(job_id).status, CANCELLED)


class TimeoutTests(PhaseTestCase):
    job_timeout = 60.0

    def test_job_timeout_while_downloading_terminates(self) -> None:
        """The job timeout before the transaction: terminated, timed_out."""
        job_id, run = self.start_job()
        self.clock.advance(self.job_timeout)
        self.assertEqual((run.signals, run.marks), ([signal.SIGTERM], ["timed_out"]))
        run.finish(None, signal.SIGTERM)
        self.assertEqual(self.manager.get(job_id).status, TIMED_OUT)
        self.assertClean()

    def test_job_timeout_during_the_transaction_is_extended(self) -> None:
        """In the transaction: an event, no signal, the job ends timed_out once it is done."""
        job_id, run = self.start_job()
        run.emit(3, PMSTATUS)
        self.clock.advance(self.job_timeout)
        notes = [m for m in self.messages(job_id) if "during the dpkg transaction" in m]
        self.assertEqual(len(notes), 1, self.messages(job_id))
        self.assertIn(f"up to {EXTENSION:g}s more", notes[0])
        self.clock.advance(EXTENSION - 1)
        self.assertEqual((run.signals, self.manager.get(job_id).status), ([], RUNNING))
        run.finish(0)
        job = self.manager.get(job_id)
        self.assertEqual((job.status, job.error_code), (TIMED_OUT, "TIMEOUT"))
        self.assertEqual(len(self.commands.runs), 1)
        self.assertClean()

    def test_extension_runs_out_the_command_is_left_running(self) -> None:
        """Past the extension the job ends timed_out at once; the command is never signalled
        and keeps the package-database slot until it exits; its late lines make no event."""
        job_id, run = self.start_job()
        waiting = self.manager.submit(install("curl"))
        run.emit(3, PMSTATUS)
        self.clock.advance(self.job_timeout)
        self.clock.advance(EXTENSION)
        job = self.manager.get(job_id)
        self.assertEqual(job.status, TIMED_OUT)
        self.assertIn("left to finish", job.error or "")
        self.assertEqual(run.signals, [])
        self.assertTrue(self.manager.mutation_in_progress())
        self.clock.advance(0)
        self.assertEqual(waiting.status, "pending")
        seq = job.seq
        run.emit(1, "Setting up vim (2:9.0-1) ...")
        self.assertEqual(job.seq, seq)
        run.finish(0)
        self.clock.advance(0)
        self.assertEqual(waiting.status, RUNNING)

    def test_command_timeout_while_downloading_terminates(self) -> None:
        """A command's own deadline before the transaction: terminated, timed_out."""
        self.backend.scripts["install"].command_timeout = 10.0
        job_id, run = self.start_job()
        self.clock.advance(10)
        self.assertEqual((run.signals, run.marks), ([signal.SIGTERM], ["timed_out"]))
        run.finish(None, signal.SIGTERM)
        self.assertEqual(self.manager.get(job_id).status, TIMED_OUT)

    def test_command_timeout_during_the_transaction_is_extended(self) -> None:
        """A command's deadline in the transaction: extension event, no signal, timed_out."""
        self.backend.scripts["install"].command_timeout = 10.0
        job_id, run = self.start_job()
        run.emit(3, PMSTATUS)
        self.clock.advance(10)
        self.assertTrue(any("command's timeout of 10s" in m for m in self.messages(job_id)))
        self.assertEqual(run.signals, [])
        run.finish(0)
        self.assertEqual(self.manager.get(job_id).status, TIMED_OUT)
        self.assertClean()

    def test_without_a_timeout_the_transaction_changes_nothing(self) -> None:
        """A run that ends in time completes, whatever its phase; status lines reach the
        backend."""
        job_id, run = self.start_job()
        run.emit(3, PMSTATUS)
        run.finish(0)
        self.commands.last.finish(0)
        self.assertEqual(self.manager.get(job_id).status, COMPLETED)
        self.assertEqual(self.status_lines, [PMSTATUS])
        self.assertClean()
