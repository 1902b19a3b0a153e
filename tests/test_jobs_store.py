"""JobFileStore: one file per job, exact round trips, atomic 0600 writes, corrupt files aside."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attr
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent import eventlog
from lpa.agent.model import Job, JobRequest, PackageSpec
from lpa.agent.store import LEGACY_FILENAME, JobFileStore, StoredEvents
from lpa.events import EVENT_JOB_COMPLETE, KIND_OUTPUT, JobEvent
from tests.fakes_wal import StepRunner
from tests.logcheck import capture_events


def sample() -> list[tuple[Job, Sequence[JobEvent]]]:
    job = Job(
        id="0b7c1f3e-0000-4000-8000-000000000001",
        operation="patch_apply",
        status="failed",
        created_at="2026-11-25T20:00:00+00:00",
        updated_at="2026-11-25T20:00:05+00:00",
        completed_at="2026-11-25T20:00:05+00:00",
        request=JobRequest(
            operation="patch_apply",
            packages=(PackageSpec("openssl", "3.0.15-1~deb12u1"), PackageSpec("vim")),
            dry_run=True,
            security_only=True,
            allow_reboot=True,
            reboot_delay_seconds=30,
        ),
        boot_id="b-1",
        progress=40,
        message="Command failed",
        logs=["Job started", "ünïcödé line"],
        error="boom\n\nCaused by:\n    0: deeper",
        error_code="PKG_MANAGER_ERROR",
        exit_code=100,
        command_stdout="out",
        command_stderr="err",
        seq=3,
        changes=[{"name": "openssl", "from": "1", "to": "2", "action": "upgrade"}],
        reboot_required=True,
        reboot_packages=["openssl"],
    )
    events = [
        JobEvent(job_id=job.id, seq=1, status="pending", progress=0, message="Job created",
                 timestamp="2026-11-25T20:00:00+00:00", incarnation="b-1:1"),
        JobEvent(job_id=job.id, seq=2, status="running", progress=0, message="line",
                 timestamp="2026-11-25T20:00:01+00:00", kind=KIND_OUTPUT),
        JobEvent(job_id=job.id, seq=3, status="failed", progress=40, message="Command failed",
                 timestamp="2026-11-25T20:00:05+00:00", event=EVENT_JOB_COMPLETE,
                 error="boom", error_code="PKG_MANAGER_ERROR", incarnation="b-1:1"),
    ]
    other = Job(
        id="0b7c1f3e-0000-4000-8000-000000000002",
        operation="reboot",
        status="pending",
        created_at="2026-11-25T20:01:00+00:00",
        updated_at="2026-11-25T20:01:00+00:00",
        request=JobRequest(operation="reboot", force=True,
                           acknowledge_package_database_corruption_risk=True),
    )
    return [(job, events), (other, [])]


def decoded(entries: list[tuple[Job, eventlog.StoredEvents]]) -> list[tuple[Job, Any]]:
    return [(job, events() if callable(events) else events) for job, events in entries]


class JobFileStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        self.directory = self.state / "jobs"
        self.store = JobFileStore(self.directory, now=lambda: 1_800_000_000)

    def test_missing_directory_is_an_empty_history(self) -> None:
        """No directory yet means no jobs."""
        self.assertEqual(self.store.load(), [])

    def test_round_trip_is_exact(self) -> None:
        """Jobs (with request and package specs) and events come back equal, oldest first."""
        entries = sample()
        self.successResultOf(self.store.save(list(reversed(entries))))
        self.assertEqual(decoded(JobFileStore(self.directory).load()), entries)

    def test_events_are_decoded_only_when_asked_for(self) -> None:
        """Loading decodes the job line; a job's events stay bytes until called for."""
        self.successResultOf(self.store.save(sample()))
        [(_, events), _] = JobFileStore(self.directory).load()
        self.assertIsInstance(events, StoredEvents)
        assert isinstance(events, StoredEvents)
        self.assertEqual(events(), sample()[0][1])

    def test_what_lives_in_memory_only_is_not_stored(self) -> None:
        """A job's durable view and incarnation are never written."""
        job, events = sample()[0]
        job.incarnation = "b-1:9"
        job.view = events[0]
        self.successResultOf(self.store.save([(job, events)]))
        text = (self.directory / f"{job.id}.json").read_text()
        self.assertNotIn("view", json.loads(text.splitlines()[0])["job"])
        [(loaded, _)] = self.store.load()
        self.assertEqual((loaded.view, loaded.incarnation), (None, None))

    def test_save_writes_changed_and_removes_forgotten_jobs(self) -> None:
        """save() touches only the jobs it is given, and deletes the removed ones."""
        entries = sample()
        self.successResultOf(self.store.save(entries))
        changed = attr.evolve(entries[1][0], status="cancelled", seq=2)
        self.successResultOf(self.store.save([(changed, [])], removed=[entries[0][0].id]))
        [(loaded, _)] = self.store.load()
        self.assertEqual((loaded.id, loaded.status), (changed.id, "cancelled"))

    def test_files_are_0600_and_nothing_else_is_left(self) -> None:
        """Each job is one 0600 file; no temporary file remains."""
        self.successResultOf(self.store.save(sample()))
        names = sorted(os.listdir(self.directory))
        self.assertEqual(names, sorted(f"{job.id}.json" for job, _ in sample()))
        for name in names:
            mode = stat.S_IMODE(os.stat(self.directory / name).st_mode)
            self.assertEqual(mode, 0o600)

    def test_corrupt_file_is_set_aside_and_the_others_kept(self) -> None:
        """An unparsable job file is moved aside with an error; the other jobs load."""
        observed = capture_events(self)
        self.successResultOf(self.store.save(sample()))
        broken = self.directory / f"{sample()[0][0].id}.json"
        for content in (b"{not json", b'{"v": 2, "job": {"id": 1}}\n[]\n', b'{"v":2,"job":{}}'):
            broken.write_bytes(content)
            [(job, _)] = self.store.load()
            self.assertEqual(job.id, sample()[1][0].id)
            aside = Path(f"{broken}.corrupt-1800000000")
            self.assertEqual(aside.read_bytes(), content)
            aside.unlink()
        errors = [e for e in observed if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 3)
        self.assertIn("is unreadable", errors[0]["log_format"])

    def test_cut_events_line_is_corrupt(self) -> None:
        """A file whose events line was cut short is set aside, not half-read."""
        self.successResultOf(self.store.save(sample()))
        path = self.directory / f"{sample()[0][0].id}.json"
        path.write_bytes(path.read_bytes()[:-20])
        self.assertEqual(len(self.store.load()), 1)

    def test_an_unfinished_write_is_cleaned_up(self) -> None:
        """A temporary file left by a crash mid-write is removed; the job keeps its last file."""
        self.successResultOf(self.store.save(sample()))
        leftover = self.directory / f"{sample()[0][0].id}.json.tmp"
        leftover.write_bytes(b"half")
        self.assertEqual(decoded(self.store.load()), sample())
        self.assertFalse(leftover.exists())

    def test_writes_run_off_the_callers_thread_with_the_state_of_the_call(self) -> None:
        """save() encodes at once and writes through the runner; later changes are not in it."""
        runner = StepRunner()
        store = JobFileStore(self.directory, run_blocking=runner)
        entries = sample()
        saved = store.save(entries)
        entries[0][0].status = "completed"
        self.assertNoResult(saved)
        self.assertFalse(self.directory.exists())
        runner.step()
        self.successResultOf(saved)
        self.assertEqual(decoded(store.load()), sample())

    def test_failed_write_keeps_the_previous_file(self) -> None:
        """A write that fails midway leaves the job's previous file intact."""
        self.successResultOf(self.store.save(sample()))
        path = self.directory / f"{sample()[0][0].id}.json"
        before = path.read_bytes()

        class Unserialisable:
            pass

        broken = sample()
        broken[0][0].changes = [{"x": Unserialisable()}]
        self.assertRaises(TypeError, self.store.save, broken)
        self.assertEqual(path.read_bytes(), before)


class LegacyHistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        self.state.mkdir()
        self.legacy = self.state / LEGACY_FILENAME
        self.store = JobFileStore(self.state / "jobs", legacy_path=self.legacy,
                                  now=lambda: 1_800_000_000)

    def write_v1(self, entries: list[tuple[Job, Sequence[JobEvent]]]) -> None:
        document: dict[str, Any] = {
            "version": 1,
            "jobs": [
                {
                    "job": {k: v for k, v in attr.asdict(job, recurse=True).items()
                            if k not in ("view", "incarnation")},
                    "events": [
                        {k: v for k, v in attr.asdict(e).items() if k != "incarnation"}
                        for e in events
                    ],
                }
                for job, events in entries
            ],
        }
        for item in document["jobs"]:
            packages = item["job"]["request"]["packages"]
            if packages is not None:
                item["job"]["request"]["packages"] = [
                    {"name": p[0], "version": p[1]} if isinstance(p, (list, tuple)) else p
                    for p in packages
                ]
        self.legacy.write_text(json.dumps(document))

    def test_format_1_history_is_migrated_once(self) -> None:
        """The single-document history is rewritten as files and renamed; nothing is lost."""
        entries: list[tuple[Job, Sequence[JobEvent]]] = [
            (job, [attr.evolve(e, incarnation=None) for e in events]) for job, events in sample()
        ]
        self.write_v1(entries)
        self.assertEqual(decoded(self.store.load()), entries)
        self.assertFalse(self.legacy.exists())
        self.assertTrue((self.state / (LEGACY_FILENAME + ".v1-migrated")).exists())
        self.assertEqual(decoded(self.store.load()), entries)

    def test_corrupt_format_1_history_is_set_aside(self) -> None:
        """An unparsable old history is moved aside and the agent starts empty."""
        self.legacy.write_text("{not json")
        self.assertEqual(self.store.load(), [])
        aside = self.state / f"{LEGACY_FILENAME}.corrupt-1800000000"
        self.assertEqual(aside.read_text(), "{not json")
