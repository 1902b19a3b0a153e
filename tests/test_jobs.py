"""JobManager on a task.Clock with the fakes: queue, slot, events, cancel, timeouts, history."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from twisted.internet import task
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from lpa.agent.backends.apt import AptBackend
from lpa.agent.context import JobContext
from lpa.agent.eventlog import StoredEvents
from lpa.agent.incarnation import MemoryIncarnations
from lpa.agent.interfaces import (
    IJobContext,
    IJobManager,
    IJobStore,
    IPackageBackend,
    IProcessRunner,
    ISystem,
)
from lpa.agent.jobs import ABORT_GRACE_SECONDS, MAX_LOG_LINES, JobManager
from lpa.agent.model import Job, JobOutcome, JobRequest, PackageSpec
from lpa.agent.process import ProcessRunner
from lpa.agent.store import JobFileStore
from lpa.agent.system import HostSystem
from lpa.errors import (
    AdmissionFrozenError,
    CancelNotAllowedError,
    CommandFailedError,
    DeleteNotAllowedError,
    JobNotFoundError,
    MutationInProgressError,
    QueueFullError,
    RebootBlockedError,
    ValidationError,
)
from lpa.events import (
    CANCELLED,
    COMPLETED,
    EVENT_JOB_COMPLETE,
    FAILED,
    KIND_OUTPUT,
    KIND_WAITING_FOR_LOCK,
    PENDING,
    REBOOTING,
    RUNNING,
    TIMED_OUT,
    JobEvent,
)
from tests.fakes import (
    FakeBackend,
    FakeJobStore,
    FakeProcessRunner,
    FakeSystem,
)
from tests.logcheck import capture_events


def install(*names: str) -> JobRequest:
    return JobRequest(operation="install", packages=tuple(PackageSpec(n) for n in names))


def patch_all(**kwargs: object) -> JobRequest:
    return JobRequest(operation="patch_apply", **kwargs)  # type: ignore[arg-type]


def reboot(**kwargs: object) -> JobRequest:
    return JobRequest(operation="reboot", **kwargs)  # type: ignore[arg-type]


class EngineTestCase(SynchronousTestCase):
    """Builds a JobManager over fakes and records every published event."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.backend = FakeBackend()
        self.system = FakeSystem()
        self.runner = FakeProcessRunner()
        self.store = FakeJobStore()
        self.published: list[JobEvent] = []
        self.incarnations = MemoryIncarnations()
        self.manager = self.make_manager()

    def make_manager(self, **kwargs: object) -> JobManager:
        counter = itertools.count(1)
        options: dict[str, Any] = {
            "backend": self.backend,
            "system": self.system,
            "runner": self.runner,
            "store": self.store,
            "clock": self.clock,
            "incarnations": self.incarnations,
            "uuid_factory": lambda: uuid.UUID(int=next(counter)),
        }
        options.update(kwargs)
        manager = JobManager(**options)
        manager.events.subscribe(self.published.append)
        self.successResultOf(manager.start())
        return manager

    def events_of(self, job_id: str) -> list[JobEvent]:
        return [e for e in self.published if e.job_id == job_id]

    def assertClean(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])


class InterfaceTests(SynchronousTestCase):
    def test_real_and_fake_classes_provide_their_interfaces(self) -> None:
        """Fakes and real classes implement the same seams, so fakes cannot drift."""
        clock = task.Clock()
        verifyObject(IProcessRunner, FakeProcessRunner())
        verifyClass(IProcessRunner, ProcessRunner)
        verifyObject(IProcessRunner, ProcessRunner(clock))
        verifyObject(IPackageBackend, FakeBackend())
        verifyClass(IPackageBackend, AptBackend)
        verifyObject(ISystem, FakeSystem())
        verifyClass(ISystem, HostSystem)
        verifyObject(IJobStore, FakeJobStore())
        verifyObject(IJobStore, JobFileStore(self.mktemp()))
        manager = JobManager(
            backend=FakeBackend(),
            system=FakeSystem(),
            runner=FakeProcessRunner(),
            store=FakeJobStore(),
            clock=clock,
        )
        verifyObject(IJobManager, manager)
        job = manager.submit(install("vim"))
        verifyObject(IJobContext, JobContext(job, runner=FakeProcessRunner(), sink=manager))


class LifecycleTests(EngineTestCase):
    def test_submit_returns_pending_job_with_created_event(self) -> None:
        """submit answers a pending job whose first event is seq 1 "Job created"."""
        job = self.manager.submit(install("vim"))
        self.assertEqual(job.status, PENDING)
        self.assertEqual(job.seq, 1)
        [event] = self.events_of(job.id)
        self.assertEqual((event.seq, event.status, event.message), (1, PENDING, "Job created"))
        self.assertEqual(job.boot_id, "boot-1")
        self.assertEqual((event.incarnation, job.incarnation), ("boot-1:1", "boot-1:1"))

    def test_job_completes_with_numbered_events_and_one_job_complete(self) -> None:
        """A successful job: seq rises by one, terminal status then exactly one job_complete."""
        self.backend.script(
            "install",
            commands=[["fake-pm", "install", "vim"]],
            progress=[(30, "Installing")],
            outcome=JobOutcome(message="Installed vim", changes=({"name": "vim"},)),
        )
        self.runner.respond(lambda c: (c.emit_stdout("Setting up vim"), c.finish(0)))
        job = self.manager.submit(install("vim"))
        self.clock.advance(0)
        self.assertEqual(job.status, COMPLETED)
        self.assertEqual(job.progress, 100)
        self.assertEqual(job.message, "Installed vim")
        self.assertEqual(job.changes, [{"name": "vim"}])
        events = self.events_of(job.id)
        self.assertEqual([e.seq for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(job.seq, events[-1].seq)
        self.assertEqual(events[-1].event, EVENT_JOB_COMPLETE)
        self.assertEqual(events[-2].status, COMPLETED)
        self.assertEqual([e.event for e in events].count(EVENT_JOB_COMPLETE), 1)
        self.assertIn("Setting up vim", [e.message for e in events if e.kind == KIND_OUTPUT])
        self.assertIn("Setting up vim", job.logs)
        self.successResultOf(self.manager.stop())
        saved = self.store.job(job.id)
        self.assertEqual(saved.status, COMPLETED)
        self.assertEqual(len(self.store.events(job.id)), len(events))
        self.assertClean()

    def test_job_complete_observer_sees_engine_idle(self) -> None:
        """On job_complete the job no longer counts as active, so a reboot is admitted."""
        answers: list[object] = []

        def on_event(event: JobEvent) -> None:
            if event.event == EVENT_JOB_COMPLETE and event.job_id == first.id:
                answers.append((self.manager.active_count(), self.manager.mutation_in_progress()))
                answers.append(self.manager.submit(reboot()).status)

        self.manager.events.subscribe(on_event)
        first = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.assertEqual(answers, [(0, False), PENDING])

    def test_dispatch_waits_for_next_reactor_turn(self) -> None:
        """A job runs only after the clock turns, so the API can answer 202 pending."""
        job = self.manager.submit(install("vim"))
        self.assertEqual(self.backend.executed, [])
        self.clock.advance(0)
        self.assertEqual(self.backend.executed, [job])

    def test_fifo_and_one_mutation_at_a_time(self) -> None:
        """Mutations run one at a time in submission order."""
        self.backend.script("install", commands=[["fake-pm", "install"]])
        first = self.manager.submit(install("a"))
        second = self.manager.submit(install("b"))
        third = self.manager.submit(install("c"))
        self.clock.advance(0)
        self.assertEqual((first.status, second.status, third.status), (RUNNING, PENDING, PENDING))
        self.assertTrue(self.manager.mutation_in_progress())
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.last.finish(0)
        self.assertEqual(first.status, COMPLETED)
        self.clock.advance(0)
        self.assertEqual((second.status, third.status), (RUNNING, PENDING))
        self.runner.last.finish(0)
        self.clock.advance(0)
        self.runner.last.finish(0)
        self.assertEqual(
            [j.id for j in self.backend.executed], [first.id, second.id, third.id]
        )
        self.assertFalse(self.manager.mutation_in_progress())
        self.assertClean()

    def test_queue_full(self) -> None:
        """pending + running at the cap refuses with QueueFullError and adds nothing."""
        manager = self.make_manager(max_queue_depth=2)
        self.backend.script("install", gate=True)
        manager.submit(install("a"))
        manager.submit(install("b"))
        error = self.assertRaises(QueueFullError, manager.submit, install("c"))
        self.assertEqual(error.retry_after, 60)
        self.assertEqual(len(manager.list_jobs()), 2)
        self.assertEqual(manager.active_count(), 2)

    def test_bad_input_is_refused_and_changes_nothing(self) -> None:
        """Broken requests raise ValidationError and create no job."""
        for bad in (
            JobRequest(operation="install", packages=()),
            JobRequest(operation="install"),
            JobRequest(operation="explode"),
            JobRequest(operation="reboot", reboot_delay_seconds=-1),
            {"operation": "install"},
        ):
            self.assertRaises(ValidationError, self.manager.submit, bad)
        self.assertEqual(self.manager.list_jobs(), [])
        self.assertEqual(self.published, [])
        self.assertRaises(ValidationError, self.manager.list_jobs, "bogus")
        self.assertRaises(ValidationError, self.manager.list_jobs, None, -1)
        self.assertRaises(JobNotFoundError, self.manager.get, "nope")
        self.assertRaises(JobNotFoundError, self.manager.cancel, "nope")
        self.assertRaises(JobNotFoundError, self.manager.delete, "nope")
        for bad_option in ({"max_concurrent": 0}, {"max_queue_depth": 0},
                           {"history_limit": 0}, {"job_timeout_seconds": 0}):
            self.assertRaises(ValueError, self.make_manager, **bad_option)

    def test_list_jobs_newest_first_filtered_and_limited(self) -> None:
        """list_jobs is newest first, filters by status (old spellings too) and limits."""
        self.backend.script("install", gate=True)
        a = self.manager.submit(install("a"))
        b = self.manager.submit(install("b"))
        self.clock.advance(0)
        self.assertEqual(self.manager.list_jobs(), [b, a])
        self.assertEqual(self.manager.list_jobs(status="running"), [a])
        self.assertEqual(self.manager.list_jobs(limit=1), [b])
        self.assertEqual(self.manager.list_jobs(status="timedout"), [])

    def test_failure_is_classified_and_output_captured(self) -> None:
        """A failed command ends failed with error chain, error_code, exit code and output."""
        self.backend.script("install", commands=[["apt-get", "install", "--", "nosuch"]])
        self.runner.respond(
            lambda c: (c.emit_stderr("E: Unable to locate package nosuch"), c.finish(100))
        )
        job = self.manager.submit(install("nosuch"))
        self.clock.advance(0)
        self.assertEqual(job.status, FAILED)
        self.assertEqual(job.error_code, "PKG_NOT_FOUND")
        self.assertEqual(job.exit_code, 100)
        self.assertEqual(job.command_stderr, "E: Unable to locate package nosuch")
        self.assertIn("Command failed (exit 100)", job.error)
        self.assertIn("E: Unable to locate package nosuch", job.logs)
        self.assertEqual(job.logs[-1], "Command failed (exit 100): apt-get install -- nosuch")
        terminal = self.events_of(job.id)[-2]
        self.assertEqual((terminal.status, terminal.error_code), (FAILED, "PKG_NOT_FOUND"))
        self.assertEqual(self.events_of(job.id)[-1].error_code, "PKG_NOT_FOUND")

    def test_backend_bug_fails_job_and_frees_slot(self) -> None:
        """An unexpected exception fails the job with UNKNOWN_ERROR and the next job runs."""
        self.backend.script("install", error=RuntimeError("boom"))
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.assertEqual((job.status, job.error_code), (FAILED, "UNKNOWN_ERROR"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.manager.mutation_in_progress())

    def test_waiting_for_lock_event(self) -> None:
        """ctx.waiting_for_lock emits a waiting_for_lock event naming the holder."""
        self.backend.script("install", lock_holder="apt-get (pid 42)")
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        [event] = [e for e in self.events_of(job.id) if e.kind == KIND_WAITING_FOR_LOCK]
        self.assertIn("apt-get (pid 42)", event.message)
        self.assertEqual(event.status, RUNNING)
        self.assertEqual(job.status, COMPLETED)


class CancelAndTimeoutTests(EngineTestCase):
    def test_cancel_pending(self) -> None:
        """Cancelling a pending job ends it cancelled at once and it never runs."""
        self.backend.script("install", gate=True)
        first = self.manager.submit(install("a"))
        second = self.manager.submit(install("b"))
        self.clock.advance(0)
        self.manager.cancel(second.id)
        self.assertEqual(second.status, CANCELLED)
        self.assertEqual(self.events_of(second.id)[-1].event, EVENT_JOB_COMPLETE)
        self.backend.gates[first.id].callback(None)
        self.clock.advance(0)
        self.assertEqual(self.backend.executed, [first])
        self.assertEqual(self.manager.active_count(), 0)

    def test_cancel_running_terminates_command(self) -> None:
        """Cancelling a running job cancels its command and ends it cancelled."""
        self.backend.script("install", commands=[["fake-pm", "install"], ["fake-pm", "more"]])
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.manager.cancel(job.id)
        self.assertTrue(self.runner.last.cancelled)
        self.assertEqual(job.status, CANCELLED)
        self.assertEqual(len(self.runner.calls), 1)
        events = self.events_of(job.id)
        self.assertEqual([e.event for e in events].count(EVENT_JOB_COMPLETE), 1)
        self.assertFalse(self.manager.mutation_in_progress())
        self.assertClean()

    def test_cancelled_job_keeps_slot_until_child_gone(self) -> None:
        """The mutation slot is freed only once the killed child has exited."""
        self.runner.exit_on_cancel = False
        self.backend.script("install", commands=[["fake-pm", "install"]])
        job = self.manager.submit(install("a"))
        self.manager.submit(install("b"))
        self.clock.advance(0)
        self.manager.cancel(job.id)
        self.clock.advance(0)
        self.assertEqual(job.status, RUNNING)
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.calls[0].mark_exited()
        self.assertEqual(job.status, CANCELLED)
        self.clock.advance(0)
        self.assertEqual(len(self.runner.calls), 2)

    def test_backend_ignoring_abort_is_cancelled_after_grace(self) -> None:
        """A backend that waits on something else is cancelled ABORT_GRACE_SECONDS later."""
        self.backend.script("install", gate=True)
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.manager.cancel(job.id)
        self.assertEqual(job.status, RUNNING)
        self.clock.advance(ABORT_GRACE_SECONDS)
        self.assertEqual(job.status, CANCELLED)
        self.assertFalse(self.manager.mutation_in_progress())
        self.assertClean()

    def test_cancel_terminal_refused(self) -> None:
        """Cancelling an ended job raises CancelNotAllowedError and changes nothing."""
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        seq = job.seq
        error = self.assertRaises(CancelNotAllowedError, self.manager.cancel, job.id)
        self.assertEqual(error.http_status, 409)
        self.assertEqual((job.status, job.seq), (COMPLETED, seq))

    def test_job_timeout(self) -> None:
        """Past job_timeout_seconds the command is terminated and the job ends timed_out."""
        manager = self.make_manager(job_timeout_seconds=60)
        self.backend.script("install", commands=[["fake-pm", "hang"]])
        job = manager.submit(install("a"))
        self.clock.advance(0)
        self.clock.advance(59)
        self.assertEqual(job.status, RUNNING)
        self.clock.advance(1)
        self.assertTrue(self.runner.last.cancelled)
        self.assertEqual((job.status, job.error_code), (TIMED_OUT, "TIMEOUT"))
        self.assertEqual(self.events_of(job.id)[-1].status, TIMED_OUT)
        self.assertClean()

    def test_command_timeout(self) -> None:
        """A command the runner timed out ends the job timed_out with TIMEOUT."""
        self.backend.script("install", commands=[["fake-pm", "hang"]], command_timeout=5)
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.assertEqual(self.runner.last.timeout, 5)
        self.runner.last.time_out()
        self.assertEqual((job.status, job.error_code), (TIMED_OUT, "TIMEOUT"))
        self.assertIn("timed out after 5s", job.error)


class HistoryTests(EngineTestCase):
    """What the engine keeps in memory; durability and recovery are in test_jobs_history."""

    def test_logs_are_bounded(self) -> None:
        """job.logs keeps the newest lines and counts the dropped ones."""
        self.backend.script("install", commands=[["fake-pm", "install"]])
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.runner.last.emit_stdout(*[f"line {i}" for i in range(MAX_LOG_LINES + 100)])
        self.runner.last.finish(0)
        self.assertEqual(len(job.logs), MAX_LOG_LINES)
        self.assertRegex(job.logs[0], r"^\.\.\. \d+ earlier lines dropped$")
        self.assertEqual(job.logs[-1], "Job completed successfully")

    def test_checkpoint_failure_is_logged_not_fatal(self) -> None:
        """A store that cannot be written is an error line; the engine goes on and retries."""
        observed = capture_events(self)
        self.store.fail_next_save = OSError("disk full")
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.successResultOf(self.manager._history.checkpoint())
        self.assertEqual(job.status, COMPLETED)
        self.assertIsNone(self.store.job(job.id))
        [error] = [e for e in observed if e["log_level"] == LogLevel.error]
        self.assertIn("could not write the job history checkpoint", error["log_format"])
        self.assertEqual(error["reason"], "disk full")
        self.successResultOf(self.manager.stop())
        self.assertEqual(self.store.job(job.id).status, COMPLETED)

    def test_retention_drops_oldest_terminal_jobs(self) -> None:
        """Past history_limit the oldest ended jobs and their events are forgotten."""
        manager = self.make_manager(history_limit=3)
        jobs = []
        for name in "abcde":
            jobs.append(manager.submit(install(name)))
            self.clock.advance(0)
        self.assertEqual(manager.list_jobs(), jobs[:1:-1])
        self.assertEqual(manager.events.kept(jobs[0].id), [])
        self.successResultOf(manager.stop())
        self.assertEqual(len(self.store.load()), 3)

    def test_delete(self) -> None:
        """Only ended jobs can be deleted; deletion forgets events, and the store forgets it."""
        self.backend.script("install", gate=True)
        job = self.manager.submit(install("a"))
        error = self.assertRaises(DeleteNotAllowedError, self.manager.delete, job.id)
        self.assertEqual(error.details, {"status": PENDING})
        self.clock.advance(0)
        self.backend.gates[job.id].callback(None)
        self.successResultOf(self.manager._history.checkpoint())
        self.assertIsNotNone(self.store.job(job.id))
        self.manager.delete(job.id)
        self.assertRaises(JobNotFoundError, self.manager.get, job.id)
        self.assertEqual(self.manager.events.kept(job.id), [])
        self.successResultOf(self.manager.stop())
        self.assertIsNone(self.store.job(job.id))

    def test_unreadable_history_fails_start(self) -> None:
        """A store that cannot be read fails start() (a Deferred), it does not raise."""

        class BrokenStore(FakeJobStore):
            def load(self) -> list[tuple[Job, StoredEvents]]:
                raise PermissionError("no")

        manager = JobManager(
            backend=self.backend, system=self.system, runner=self.runner,
            store=BrokenStore(), clock=self.clock,
        )
        self.failureResultOf(manager.start(), PermissionError)

    def test_history_reloaded_from_the_store(self) -> None:
        """A new engine over the same store has the jobs and their events; seq continues."""
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        events = self.manager.events.kept(job.id)
        self.successResultOf(self.manager.stop())
        again = self.make_manager()
        self.assertEqual(again.get(job.id).status, COMPLETED)
        self.assertEqual(again.events.kept(job.id), events)
        self.assertEqual(again.events.last_seq(job.id), job.seq)
        self.assertEqual(again.incarnation, "boot-1:2")


class RebootTests(EngineTestCase):
    def test_unforced_reboot_blocked_by_active_jobs(self) -> None:
        """force=False with an active job: RebootBlockedError with active_jobs."""
        self.backend.script("install", gate=True)
        self.manager.submit(install("a"))
        error = self.assertRaises(RebootBlockedError, self.manager.submit, reboot())
        self.assertEqual(error.details, {"active_jobs": 1})

    def test_forced_reboot_refused_during_mutation_without_ack(self) -> None:
        """force=True without the acknowledgement refuses while a mutation runs."""
        self.backend.script("install", gate=True)
        self.manager.submit(install("a"))
        self.clock.advance(0)
        self.assertRaises(MutationInProgressError, self.manager.submit, reboot(force=True))

    def test_forced_acknowledged_reboot_runs_and_freezes_admission(self) -> None:
        """force+ack bypasses the guards, cancels pending jobs, runs the reboot command."""
        self.backend.script("install", gate=True)
        running = self.manager.submit(install("a"))
        self.clock.advance(0)
        pending = self.manager.submit(install("b"))
        job = self.manager.submit(
            reboot(force=True, acknowledge_package_database_corruption_risk=True,
                   reboot_delay_seconds=120)
        )
        self.assertEqual(pending.status, CANCELLED)
        self.assertRaises(AdmissionFrozenError, self.manager.submit, install("c"))
        self.clock.advance(0)
        self.assertEqual(self.runner.last.argv, ("fake-reboot", "120"))
        self.runner.last.finish(0)
        self.assertEqual(job.status, REBOOTING)
        self.assertEqual(running.status, RUNNING)

    def test_failed_reboot_command_reopens_admission(self) -> None:
        """A failing reboot command fails the job with REBOOT_ERROR and admission reopens."""
        job = self.manager.submit(reboot())
        self.clock.advance(0)
        self.runner.last.finish(1)
        self.assertEqual((job.status, job.error_code), (FAILED, "REBOOT_ERROR"))
        self.manager.submit(install("a"))

    def test_patch_with_allow_reboot_goes_rebooting(self) -> None:
        """allow_reboot + reboot_required: the patch job goes rebooting and runs the reboot."""
        self.backend.script(
            "patch_apply",
            outcome=JobOutcome(message="3 upgraded", reboot_required=True,
                               reboot_packages=("linux-image",)),
        )
        job = self.manager.submit(patch_all(allow_reboot=True, reboot_delay_seconds=60))
        self.clock.advance(0)
        self.assertEqual(job.status, REBOOTING)
        self.assertEqual(self.runner.last.argv, ("fake-reboot", "60"))
        self.runner.last.finish(0)
        self.assertEqual(job.status, REBOOTING)
        self.assertEqual(job.reboot_packages, ["linux-image"])
        self.assertNotIn(EVENT_JOB_COMPLETE, [e.event for e in self.events_of(job.id)])
        self.assertRaises(AdmissionFrozenError, self.manager.submit, install("a"))
        self.assertRaises(CancelNotAllowedError, self.manager.cancel, job.id)
        self.clock.advance(60 + 900)
        self.assertEqual(job.status, COMPLETED)
        self.manager.submit(install("a"))

    def test_dry_run_never_reboots(self) -> None:
        """A dry run completes without rebooting even when a reboot would be needed."""
        self.backend.script("patch_apply",
                            outcome=JobOutcome(message="would", reboot_required=True))
        job = self.manager.submit(patch_all(allow_reboot=True, dry_run=True))
        self.clock.advance(0)
        self.assertEqual(job.status, COMPLETED)
        self.assertEqual(self.runner.calls, [])


class StopTests(EngineTestCase):
    def test_stop_freezes_admission_and_cancels_pending(self) -> None:
        """stop() refuses new jobs, cancels pending ones and waits for the running one."""
        self.backend.script("install", gate=True)
        running = self.manager.submit(install("a"))
        self.clock.advance(0)
        pending = self.manager.submit(install("b"))
        stopped = self.manager.stop()
        self.assertNoResult(stopped)
        self.assertEqual(pending.status, CANCELLED)
        self.assertRaises(AdmissionFrozenError, self.manager.submit, install("c"))
        self.backend.gates[running.id].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.store.job(running.id).status, COMPLETED)
        self.assertClean()

    def test_stop_leaves_long_job_running(self) -> None:
        """A job still running after the grace is left running (not killed), saved running."""
        self.backend.script("install", commands=[["fake-pm", "hang"]])
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        stopped = self.manager.stop()
        self.clock.advance(30)
        self.successResultOf(stopped)
        self.assertFalse(self.runner.last.cancelled)
        self.assertEqual(self.store.job(job.id).status, RUNNING)
        self.assertTrue(self.store.closed)
        self.assertClean()


class ObserverTests(EngineTestCase):
    def test_failing_subscriber_does_not_stop_others(self) -> None:
        """A subscriber that raises is logged; others and the engine get every event."""
        seen: list[JobEvent] = []

        def broken(event: object) -> None:
            raise RuntimeError("observer bug")

        self.manager.events.subscribe(broken)
        self.manager.events.subscribe(seen.append)
        job = self.manager.submit(install("a"))
        self.clock.advance(0)
        self.assertEqual(job.status, COMPLETED)
        self.assertEqual([e.seq for e in seen], list(range(1, job.seq + 1)))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), job.seq)


class ContextTests(EngineTestCase):
    def test_ok_codes_and_status_fd(self) -> None:
        """ok_codes accepts listed exits; status fd lines reach the callback, not events."""
        job = self.manager.submit(install("a"))
        context = JobContext(job, runner=self.runner, sink=self.manager)
        status_lines: list[str] = []
        d = context.run(["dnf", "check-update"], timeout=5, ok_codes=(0, 100),
                        status_fd_line=status_lines.append)
        self.runner.last.emit_fd(3, "pmstatus:vim:50:Installing")
        self.runner.last.finish(100)
        self.assertEqual(self.successResultOf(d).exit_code, 100)
        self.assertEqual(status_lines, ["pmstatus:vim:50:Installing"])
        d = context.run(["dnf", "x"], timeout=5)
        self.runner.last.finish(1)
        self.failureResultOf(d, CommandFailedError)

    def test_aborted_context_refuses_commands(self) -> None:
        """After abort nothing more is reported and no further command starts."""
        from lpa.errors import JobCancelledError

        job = self.manager.submit(install("a"))
        context = JobContext(job, runner=self.runner, sink=self.manager)
        status_lines: list[str] = []
        d = context.run(["x"], timeout=1, status_fd_line=status_lines.append)
        command = self.runner.last
        context.abort("cancelled")
        self.failureResultOf(d, JobCancelledError)
        seq = job.seq
        context.progress(50, "late")
        context.waiting_for_lock("late")
        command.emit_fd(3, "late status")
        command.emit_stdout("late output")
        self.assertEqual((job.seq, status_lines), (seq, []))
        self.failureResultOf(context.run(["x"], timeout=1), JobCancelledError)
        self.assertEqual(len(self.runner.calls), 1)
