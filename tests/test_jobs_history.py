"""The engine over its write-ahead log and job store: durable before published, and recovery.

Each "process" is a JobManager on a fresh task.Clock over the same state: the WAL's files (a
:class:`FakeWalFiles`, so a crash keeps only what was synced) and a real :class:`JobFileStore`
in a temporary directory.  A crash is: drop the engine without stopping it, keep
``files.crash()``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.incarnation import FileIncarnations
from lpa.agent.jobs import JobManager
from lpa.agent.model import JobRequest, PackageSpec
from lpa.agent.store import JobFileStore, StoredEvents
from lpa.agent.wal import WriteAheadLog
from lpa.events import (
    COMPLETED,
    EVENT_JOB_COMPLETE,
    FAILED,
    PENDING,
    REBOOTING,
    RUNNING,
    JobEvent,
)
from tests.fakes import FakeBackend, FakeProcessRunner, FakeSystem
from tests.fakes_wal import FakeWalFiles, StepRunner
from tests.logcheck import capture_events

JOURNAL = "/state/journal"


def install(*names: str) -> JobRequest:
    return JobRequest(operation="install", packages=tuple(PackageSpec(n) for n in names))


class DurableEngineCase(SynchronousTestCase):
    """Starts engine "processes" over shared state; see the module docstring."""

    def setUp(self) -> None:
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.files = FakeWalFiles()
        self.backend = FakeBackend()
        self.system = FakeSystem()
        self.runner = FakeProcessRunner()
        self.ids = itertools.count(1)
        self.now = 1_800_000_000.0
        self.published: list[JobEvent] = []
        self.log_events = capture_events(self)
        self.manager = self.start()

    def start(self, **options: Any) -> JobManager:
        """A new process: fresh clock (time goes on), the same files and store."""
        self.clock = task.Clock()
        self.clock.advance(self.now)
        self.wal_runner = StepRunner()
        self.wal = WriteAheadLog(
            JOURNAL, clock=self.clock, files=self.files, run_blocking=self.wal_runner,
            now=lambda: self.now,
        )
        self.store = JobFileStore(os.path.join(self.state, "jobs"), now=lambda: self.now)
        manager = JobManager(
            backend=self.backend,
            system=self.system,
            runner=self.runner,
            store=self.store,
            clock=self.clock,
            journal=self.wal,
            incarnations=FileIncarnations(os.path.join(self.state, "incarnation")),
            uuid_factory=lambda: uuid.UUID(int=next(self.ids)),
            **options,
        )
        manager.events.subscribe(self.published.append)
        self.successResultOf(manager.start())
        self.settle()
        return manager

    def settle(self) -> None:
        """Let the reactor turn and the writer thread run until nothing is left to write."""
        for _ in range(50):
            self.clock.advance(0)
            if not self.wal_runner.waiting:
                return
            self.wal_runner.run_all()
        self.fail("the event log never settled")

    def crash(self, torn: int = 0) -> JobManager:
        """kill -9 (or power loss): only what was synced survives; start again."""
        self.now = self.clock.seconds() + 5
        self.wal_runner.drop_all()
        self.files = self.files.crash(torn)
        self.published.clear()
        self.manager = self.start()
        return self.manager

    def seqs(self, job_id: str) -> list[int | None]:
        return [e.seq for e in self.published if e.job_id == job_id]

    def wire_after(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return [e.to_wire() for e in self.manager.events.after(job_id, after)]

    def running_job(self, lines: int = 0) -> Any:
        self.backend.script("install", commands=[["fake-pm", "install"]])
        job = self.manager.submit(install("a"))
        self.settle()
        self.runner.last.emit_stdout(*[f"line {n}" for n in range(lines)])
        self.settle()
        self.assertEqual(job.status, RUNNING)
        return job


class DurableBeforePublishedTests(DurableEngineCase):
    def test_nothing_is_published_before_its_sync(self) -> None:
        """An event reaches subscribers, the events twin and the detail only once synced."""
        job = self.running_job()
        before = (len(self.published), self.manager.events.last_seq(job.id), job.seq)
        self.runner.last.emit_stdout("Unpacking curl")
        self.assertEqual(job.seq, before[2] + 1)  # numbered at once ...
        self.clock.advance(0)
        self.assertEqual(self.wal_runner.waiting, 1)  # ... written, not yet synced
        self.assertEqual(len(self.published), before[0])
        self.assertEqual(self.manager.events.last_seq(job.id), before[1])
        self.assertEqual(self.manager.get(job.id).to_detail()["seq"], before[1])
        self.wal_runner.step()
        self.assertEqual(self.published[-1].message, "Unpacking curl")
        self.assertEqual(self.manager.events.last_seq(job.id), job.seq)
        self.assertEqual(self.manager.get(job.id).to_detail()["seq"], job.seq)

    def test_a_new_job_shows_seq_zero_until_its_first_event_is_durable(self) -> None:
        """Right after submit the job is pending at seq 0: nothing can be asked for yet."""
        job = self.manager.submit(install("a"))
        detail = job.to_detail()
        self.assertEqual((detail["status"], detail["seq"]), (PENDING, 0))
        self.assertEqual(self.manager.events.last_seq(job.id), 0)

    def test_a_chatty_run_costs_one_sync_per_batch(self) -> None:
        """500 output lines in one turn are one batch: one fdatasync for all of them."""
        job = self.running_job()
        syncs = self.files.syncs
        self.runner.last.emit_stdout(*[f"Get:{n} http://deb.example stable" for n in range(500)])
        self.settle()
        self.assertEqual(self.files.syncs, syncs + 1)
        self.assertEqual(self.seqs(job.id)[-1], job.seq)

    def test_terminal_detail_waits_for_the_terminal_event(self) -> None:
        """A finished job reads completed (with completed_at) only once that event is durable."""
        job = self.running_job()
        self.runner.last.finish(0)
        self.assertEqual(job.status, COMPLETED)
        detail = job.to_detail()
        self.assertEqual((detail["status"], detail["completed_at"]), (RUNNING, None))
        self.settle()
        detail = job.to_detail()
        self.assertEqual((detail["status"], detail["seq"]), (COMPLETED, job.seq))
        self.assertIsNotNone(detail["completed_at"])
        self.assertEqual(self.manager.list_jobs(status="completed"), [job])


class RecoveryTests(DurableEngineCase):
    def test_seq_continues_above_the_last_durable_event(self) -> None:
        """kill -9 mid-run: every event a client saw is kept as it was; the job ends failed
        AGENT_RESTARTED numbered right after them, then job_complete."""
        job = self.running_job(lines=30)
        seen = self.wire_after(job.id)
        self.runner.last.emit_stdout("never synced")
        self.clock.advance(0)  # written, the process dies before the sync returns
        self.crash()
        recovered = self.manager.get(job.id)
        self.assertEqual((recovered.status, recovered.error_code), (FAILED, "AGENT_RESTARTED"))
        after = self.wire_after(job.id)
        self.assertEqual(after[: len(seen)], seen)
        self.assertEqual([e["seq"] for e in after[len(seen):]],
                         [seen[-1]["seq"] + 1, seen[-1]["seq"] + 2])
        self.assertEqual(after[-1]["event"], EVENT_JOB_COMPLETE)
        self.assertEqual(after[-2]["error_code"], "AGENT_RESTARTED")
        self.assertEqual(self.seqs(job.id), [after[-2]["seq"], after[-1]["seq"]])
        self.assertIn("line 29", recovered.logs)

    def test_torn_tail_is_cut_and_the_numbering_continues(self) -> None:
        """Power lost mid-write: the torn record is dropped with a warning, seq goes on."""
        job = self.running_job(lines=5)
        last = self.manager.events.last_seq(job.id)
        self.runner.last.emit_stdout("x" * 200)
        self.clock.advance(0)
        self.wal._writer.sync_enabled = False
        self.wal_runner.step()
        self.crash(torn=60)
        after = self.wire_after(job.id)
        self.assertEqual(after[-2]["seq"], last + 1)
        warnings = [e["log_format"] for e in self.log_events if e["log_level"].name == "warn"]
        self.assertTrue(any("torn" in w for w in warnings), warnings)

    def test_same_boot_is_restarted_other_boot_is_rebooted(self) -> None:
        """The boot id decides AGENT_RESTARTED (process) against AGENT_REBOOTED (host)."""
        job = self.running_job()
        self.crash()
        self.assertEqual(self.manager.get(job.id).error_code, "AGENT_RESTARTED")
        self.backend.script("install", gate=True)
        pending = self.manager.submit(install("b"))
        self.manager.submit(install("c"))
        self.settle()
        self.system.current_boot_id = "boot-2"
        self.crash()
        self.assertEqual(self.manager.get(pending.id).error_code, "AGENT_REBOOTED")

    def test_rebooting_job_completes_after_the_reboot(self) -> None:
        """A job left rebooting is completed at the next start, after its kept events."""
        job = self.running_job()
        job.status = REBOOTING
        self.manager._history.save(job)
        self.manager._history.emit(job, "rebooting")
        self.settle()
        self.system.current_boot_id = "boot-2"
        self.crash()
        self.assertEqual(self.manager.get(job.id).status, COMPLETED)
        self.assertEqual(self.wire_after(job.id)[-1]["event"], EVENT_JOB_COMPLETE)

    def test_a_crash_between_terminal_status_and_job_complete(self) -> None:
        """Only the terminal job_status made it: the next start sends the job_complete."""
        job = self.running_job()
        self.runner.last.finish(0)
        self.clock.advance(0)
        call, _ = self.wal_runner.calls[0]
        batch = self.files
        self.wal._writer.sync_enabled = False
        call()
        # keep the batch up to the end of the terminal job_status record only
        [segment] = list(batch.segments(JOURNAL))[-1:]
        path = f"{JOURNAL}/{segment}"
        data = batch.data[path]
        cut = data.index(b'"job_complete"')
        batch.synced[path] = data.rindex(b"\n", 0, cut) + 1
        self.crash()
        after = self.wire_after(job.id)
        self.assertEqual([e["event"] for e in after[-2:]], ["job_status", EVENT_JOB_COMPLETE])
        self.assertEqual(after[-2]["status"], COMPLETED)
        self.assertEqual(self.manager.get(job.id).status, COMPLETED)

    def test_events_keep_the_incarnation_that_numbered_them(self) -> None:
        """Each start is a new incarnation; old events keep theirs, the detail shows the new."""
        job = self.running_job(lines=2)
        first = self.manager.incarnation
        self.assertEqual(first, "boot-1:1")
        self.crash()
        self.assertEqual(self.manager.incarnation, "boot-1:2")
        after = self.wire_after(job.id)
        self.assertEqual({e["incarnation"] for e in after[:-2]}, {first})
        self.assertEqual({e["incarnation"] for e in after[-2:]}, {"boot-1:2"})
        self.assertEqual(self.manager.get(job.id).to_detail()["incarnation"], "boot-1:2")

    def test_deleted_job_stays_deleted_after_a_crash(self) -> None:
        """A delete is a logged record: it is not undone by replaying the log."""
        job = self.running_job()
        self.runner.last.finish(0)
        self.settle()
        self.manager.delete(job.id)
        self.settle()
        self.crash()
        self.assertEqual(self.manager.list_jobs(), [])

    def test_corrupt_record_in_the_middle_becomes_a_snapshot_not_a_gap(self) -> None:
        """A lost event inside the log: readers before it are told to resync, never misled."""
        job = self.running_job(lines=10)
        [segment] = self.files.segments(JOURNAL)[-1:]
        data = self.files.data[f"{JOURNAL}/{segment}"]
        at = data.index(b"line 4")
        data[at] = ord("L")  # the checksum of that record fails
        self.crash()
        from lpa.agent.eventlog import EventsExpiredError

        self.assertRaises(EventsExpiredError, self.manager.events.after, job.id, 3)
        after = self.manager.events.after(job.id, self.manager.events.last_seq(job.id) - 3)
        self.assertEqual(len(after), 3)
        errors = [e["log_format"] for e in self.log_events if e["log_level"].name == "error"]
        self.assertTrue(any("events are missing" in e for e in errors), errors)


class CheckpointTests(DurableEngineCase):
    def test_the_log_is_checkpointed_into_the_store_and_retired(self) -> None:
        """Past checkpoint_bytes the changed jobs are written to the store and old segments go."""
        self.manager = self.start(checkpoint_bytes=4096)
        job = self.running_job()
        for n in range(20):
            self.runner.last.emit_stdout(*[f"output line {n}.{i} " * 3 for i in range(10)])
            self.settle()
        self.assertLessEqual(len(self.files.segments(JOURNAL)), 2)
        saved = JobFileStore(os.path.join(self.state, "jobs")).load()
        [(stored, events)] = [(j, e) for j, e in saved if j.id == job.id]
        self.assertEqual(stored.status, RUNNING)
        assert isinstance(events, StoredEvents)
        self.assertGreater(len(events()), 100)
        seen = self.wire_after(job.id)
        self.crash()
        self.assertEqual(self.wire_after(job.id)[: len(seen)], seen)

    def test_graceful_stop_leaves_an_empty_log(self) -> None:
        """stop() checkpoints everything; the next start replays nothing and keeps it all."""
        job = self.running_job(lines=3)
        self.runner.last.finish(0)
        self.settle()
        seen = self.wire_after(job.id)
        stopped = self.manager.stop()
        self.settle()
        self.successResultOf(stopped)
        self.manager = self.start()
        self.assertEqual(self.wire_after(job.id), seen)
        infos = [e for e in self.log_events if "records replayed" in e["log_format"]]
        self.assertEqual(infos[-1]["records"], 0)

    def test_stop_leaves_a_long_job_for_recovery(self) -> None:
        """A job still running after the grace is saved running, then recovered honestly."""
        job = self.running_job()
        stopped = self.manager.stop()
        self.clock.advance(30)
        self.settle()
        self.successResultOf(stopped)
        self.assertFalse(self.runner.last.cancelled)
        self.assertIn("Agent stopped while this job ran; outcome unknown", job.logs)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.manager = self.start()
        self.assertEqual(self.manager.get(job.id).error_code, "AGENT_RESTARTED")

    def test_retention_survives_restarts(self) -> None:
        """Past history_limit the oldest ended jobs are forgotten, on disk too."""
        self.manager = self.start(history_limit=3)
        jobs = []
        for name in "abcde":
            jobs.append(self.manager.submit(install(name)))
            self.settle()
        self.assertEqual(self.manager.list_jobs(), jobs[:1:-1])
        self.manager.stop()
        self.settle()
        self.manager = self.start(history_limit=3)
        self.assertEqual([j.id for j in self.manager.list_jobs()], [j.id for j in jobs[:1:-1]])
        self.assertEqual(len(os.listdir(os.path.join(self.state, "jobs"))), 3)


class DiskFaultTests(DurableEngineCase):
    def errors(self) -> list[str]:
        return [e["log_format"] for e in self.log_events if e["log_level"].name == "error"]

    def test_a_full_disk_holds_events_then_publishes_them_in_order(self) -> None:
        """While the log cannot be written nothing is shown (one error line); the job runs on,
        and once the disk takes writes again every held event is published, in order."""
        job = self.running_job(lines=2)
        shown = self.manager.events.last_seq(job.id)
        self.files.disk_full()
        self.runner.last.emit_stdout("Unpacking a", "Unpacking b")
        self.runner.last.finish(0)
        self.settle()
        self.assertEqual(job.status, COMPLETED)
        self.assertEqual(self.manager.events.last_seq(job.id), shown)
        self.assertEqual(job.to_detail()["status"], RUNNING)
        self.assertEqual(len(self.errors()), 1)
        self.files.fail_with = None
        self.clock.advance(0.5)
        self.settle()
        self.assertEqual(self.seqs(job.id), list(range(1, job.seq + 1)))
        self.assertGreater(job.seq, shown + 3)
        self.assertEqual(job.to_detail()["status"], COMPLETED)
        self.crash()
        self.assertEqual(self.manager.get(job.id).status, COMPLETED)

    def test_stop_on_a_dead_log_keeps_held_events_in_the_checkpoint(self) -> None:
        """At stop, events the log could not write are in the last checkpoint: not lost."""
        job = self.running_job(lines=1)
        self.files.disk_full()
        self.runner.last.emit_stdout("held line")
        self.runner.last.finish(0)
        stopped = self.manager.stop()
        self.settle()
        self.clock.advance(10)
        self.settle()
        self.successResultOf(stopped)
        warnings = [e for e in self.log_events if "nothing is lost" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.files.fail_with = None
        self.crash()
        after = self.wire_after(job.id)
        self.assertIn("held line", [e["message"] for e in after])
        self.assertEqual(after[-1]["event"], EVENT_JOB_COMPLETE)
        self.assertEqual(self.manager.get(job.id).status, COMPLETED)
