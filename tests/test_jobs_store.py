"""JsonJobStore: exact round trips, atomic 0600 writes, corrupt files set aside."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.model import Job, JobRequest, PackageSpec
from lpa.agent.store import JsonJobStore
from lpa.events import EVENT_JOB_COMPLETE, KIND_OUTPUT, JobEvent


def sample() -> list:
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
                 timestamp="2026-11-25T20:00:00+00:00"),
        JobEvent(job_id=job.id, seq=2, status="running", progress=0, message="line",
                 timestamp="2026-11-25T20:00:01+00:00", kind=KIND_OUTPUT),
        JobEvent(job_id=job.id, seq=3, status="failed", progress=40, message="Command failed",
                 timestamp="2026-11-25T20:00:05+00:00", event=EVENT_JOB_COMPLETE,
                 error="boom", error_code="PKG_MANAGER_ERROR"),
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


class JsonJobStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "state"
        self.path = self.directory / "jobs_history.json"
        self.store = JsonJobStore(self.path, now=lambda: 1_800_000_000)

    def test_missing_file_is_empty_history(self) -> None:
        """No file yet means no jobs, and nothing is created by loading."""
        self.assertEqual(self.store.load(), [])
        self.assertFalse(self.directory.exists())

    def test_round_trip_is_exact(self) -> None:
        """Jobs (with request and package specs) and events come back equal."""
        entries = sample()
        self.store.save(entries)
        self.assertEqual(self.store.load(), entries)
        self.assertEqual(JsonJobStore(self.path).load(), entries)

    def test_loaded_jobs_saved_again_after_change(self) -> None:
        """Jobs read back and then changed are written with their change."""
        self.store.save(sample())
        store = JsonJobStore(self.path)
        entries = store.load()
        store.save(entries)
        self.assertEqual(JsonJobStore(self.path).load(), sample())
        entries[1][0].status = "cancelled"
        entries[1][0].seq = 2
        store.save(entries)
        self.assertEqual(JsonJobStore(self.path).load()[1][0].status, "cancelled")

    def test_file_mode_and_directory(self) -> None:
        """The directory is created; the file is 0600; no temporary file is left."""
        self.store.save(sample())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["jobs_history.json"])

    def test_save_replaces(self) -> None:
        """A later save replaces the whole history."""
        self.store.save(sample())
        self.store.save(sample()[1:])
        self.assertEqual([job.id for job, _ in self.store.load()], [sample()[1][0].id])

    def test_corrupt_file_is_set_aside(self) -> None:
        """An unparsable file is moved aside, logged, and the history starts empty."""
        self.directory.mkdir(parents=True)
        for content in (b"{not json", b'{"jobs": [{"job": {"id": 1}}]}', b"[]"):
            self.path.write_bytes(content)
            self.assertEqual(self.store.load(), [])
            aside = self.directory / "jobs_history.json.corrupt-1800000000"
            self.assertEqual(aside.read_bytes(), content)
            self.assertFalse(self.path.exists())
            aside.unlink()

    def test_failed_write_keeps_previous_file(self) -> None:
        """A write that fails midway leaves the previous history intact."""
        # Keep the first job alive: the store's fragment cache is keyed by the job object's id,
        # and a freed object's id may be reused by the next sample() (a flaky cache hit).
        first = sample()
        self.store.save(first)
        before = self.path.read_bytes()

        class Unserialisable:
            pass

        broken = sample()
        broken[0][0].changes = [{"x": Unserialisable()}]
        self.assertRaises(TypeError, self.store.save, broken)
        self.assertEqual(self.path.read_bytes(), before)
        self.assertEqual(os.listdir(self.directory), ["jobs_history.json"])

    def test_document_shape(self) -> None:
        """The file is a versioned document listing jobs with their events."""
        self.store.save(sample())
        document = json.loads(self.path.read_text())
        self.assertEqual(document["version"], 1)
        self.assertEqual(document["jobs"][0]["job"]["request"]["packages"][0],
                         {"name": "openssl", "version": "3.0.15-1~deb12u1"})
        self.assertEqual(document["jobs"][0]["events"][2]["event"], EVENT_JOB_COMPLETE)


class BackgroundWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "jobs_history.json"
        self.store = JsonJobStore(self.path, background=True)
        self.addCleanup(self.store.close)

    def test_flush_puts_newest_history_on_disk(self) -> None:
        """save returns at once; flush waits until the newest history is written."""
        entries = sample()
        self.store.save(entries[1:])
        self.store.save(entries)
        self.store.flush()
        self.assertEqual(JsonJobStore(self.path).load(), entries)

    def test_write_error_is_raised_on_reactor_thread(self) -> None:
        """A failed background write is raised by the next flush, once."""
        self.path.parent.write_text("a file where the directory should be")
        self.store.save(sample())
        self.assertRaises(OSError, self.store.flush)
        self.store.flush()

    def test_unchanged_jobs_are_not_reencoded(self) -> None:
        """Only jobs whose change key moved are serialised again."""
        entries = sample()
        self.store.save(entries)
        entries[0][0].changes.append({"name": "sneaky"})  # no event, no key change
        entries[1][0].seq += 1
        self.store.save(entries)
        self.store.flush()
        loaded = JsonJobStore(self.path).load()
        self.assertEqual(loaded[0][0].changes, sample()[0][0].changes)
        self.assertEqual(loaded[1][0].seq, 1)
