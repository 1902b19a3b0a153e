"""The REST API's job routes: over the fake engine (answers, errors, the events pages) and over the
real JobManager with the test fakes (jobs run, end, and are followed)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from lpa.agent.jobs import JobManager
from lpa.agent.model import JobOutcome
from lpa.events import COMPLETED, RUNNING, TIMED_OUT
from tests.api_helpers import ApiTestCase
from tests.fakes import FakeJobStore, FakeProcessRunner
from tests.fakes_jobs import FakeJobManager

JOB_ID_UNKNOWN = "0b7d5c1e-9a7f-4a53-9a43-7f1c1e0c2a11"


class JobTests(ApiTestCase):
    def submit(self, name: str = "vim") -> str:
        job_id: str = self.call("PUT", f"/api/v1/packages/{name}").data["job_id"]
        return job_id

    def test_list_jobs(self) -> None:
        """Jobs newest first with total; status filter accepts ours and the original's timedout."""
        first, second = self.submit("a"), self.submit("b")
        self.jobs.finish(first, TIMED_OUT)
        data = self.call("GET", "/api/v1/jobs").data
        self.assertEqual([j["job_id"] for j in data["jobs"]], [second, first])
        self.assertEqual(data["total"], 2)
        for spelling in ("timed_out", "timedout"):
            data = self.call("GET", f"/api/v1/jobs?status={spelling}").data
            self.assertEqual([j["job_id"] for j in data["jobs"]], [first])
            self.assertEqual(data["jobs"][0]["status"], "timed_out")

    def test_list_limit(self) -> None:
        """limit defaults to 50 and caps the list; total counts after the limit."""
        for _ in range(52):
            self.submit()
        self.assertEqual(self.call("GET", "/api/v1/jobs").data["total"], 50)
        self.assertEqual(self.call("GET", "/api/v1/jobs?limit=3").data["total"], 3)

    def test_list_bad_query(self) -> None:
        """An unknown status or a limit outside 1..1000 is 400."""
        for query in ("status=queuedish", "limit=0", "limit=1001", "limit=ten"):
            self.assertError(self.call("GET", f"/api/v1/jobs?{query}"), 400, "VALIDATION_ERROR")

    def test_get_job(self) -> None:
        """A job's detail by id; a non-UUID is 400 INVALID_JOB_ID, an unknown one 404."""
        job_id = self.submit()
        reply = self.call("GET", f"/api/v1/jobs/{job_id}")
        self.assertEqual(reply.data, self.jobs.get(job_id).to_detail())
        self.assertError(self.call("GET", "/api/v1/jobs/not-a-uuid"), 400, "INVALID_JOB_ID")
        self.assertError(self.call("GET", f"/api/v1/jobs/{JOB_ID_UNKNOWN}"), 404, "JOB_NOT_FOUND")

    def test_delete_job(self) -> None:
        """Only an ended job can be deleted (409 DELETE_NOT_ALLOWED before), then it is gone."""
        job_id = self.submit()
        reply = self.call("DELETE", f"/api/v1/jobs/{job_id}")
        self.assertError(reply, 409, "DELETE_NOT_ALLOWED")
        self.assertEqual(reply.error["details"], {"status": "pending"})
        self.jobs.finish(job_id, COMPLETED)
        reply = self.call("DELETE", f"/api/v1/jobs/{job_id}")
        self.assertEqual((reply.code, reply.data), (200, {"deleted": True, "job_id": job_id}))
        self.assertError(self.call("GET", f"/api/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
        self.assertError(self.call("DELETE", "/api/v1/jobs/x"), 400, "INVALID_JOB_ID")

    def test_cancel_job(self) -> None:
        """Cancel answers 200 with the cancelled job; cancelling it again is 409."""
        job_id = self.submit()
        reply = self.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        self.assertEqual((reply.code, reply.data["status"]), (200, "cancelled"))
        self.assertError(
            self.call("POST", f"/api/v1/jobs/{job_id}/cancel"), 409, "CANCEL_NOT_ALLOWED"
        )
        self.assertError(
            self.call("POST", f"/api/v1/jobs/{JOB_ID_UNKNOWN}/cancel"), 404, "JOB_NOT_FOUND"
        )

    def test_job_id_canonicalised(self) -> None:
        """An upper-case job id finds the job."""
        job_id = self.submit()
        self.assertEqual(self.call("GET", f"/api/v1/jobs/{job_id.upper()}").code, 200)


class EventsTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.jobs = FakeJobManager(self.clock, max_events_per_job=5)
        self.build()
        self.job_id = self.call("PUT", "/api/v1/packages/vim").data["job_id"]
        self.jobs.emit(self.job_id, "Job started", status=RUNNING)
        self.jobs.output(self.job_id, "Reading package lists...")

    def events(self, after: str = "") -> dict[str, Any]:
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events{after}")
        self.assertEqual(reply.code, 200, reply.body)
        data: dict[str, Any] = reply.data
        return data

    def test_all_events(self) -> None:
        """Without after, every kept event: the same wire objects and seq as the EventLog's."""
        data = self.events()
        self.assertEqual(data["events"], [e.to_wire() for e in self.jobs.events.kept(self.job_id)])
        self.assertEqual([e["seq"] for e in data["events"]], [1, 2, 3])
        self.assertEqual(
            (data["job_id"], data["last_seq"], data["status"], data["terminal"]),
            (self.job_id, 3, "running", False),
        )

    def test_after(self) -> None:
        """after=N gives only later events; after at the end gives none (past it: a 409)."""
        self.assertEqual([e["seq"] for e in self.events("?after=1")["events"]], [2, 3])
        self.assertEqual(self.events("?after=3")["events"], [])
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after=99")
        self.assertError(reply, 409, "EVENTS_AHEAD")

    def test_terminal(self) -> None:
        """A finished job's events end with job_complete and say terminal."""
        self.jobs.finish(self.job_id, COMPLETED)
        data = self.events("?after=3")
        self.assertEqual([e["event"] for e in data["events"]], ["job_status", "job_complete"])
        self.assertEqual((data["status"], data["terminal"]), ("completed", True))

    def test_expired_resync(self) -> None:
        """Asking for events no longer kept is 410 EVENTS_EXPIRED with the job to resync from."""
        self.jobs.output(self.job_id, "a", "b", "c", "d")
        reply = self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after=1")
        self.assertError(reply, 410, "EVENTS_EXPIRED")
        # details is the job detail itself, as GET /jobs/{id} answers it (what pollers apply)
        self.assertEqual(reply.error["details"], self.jobs.get(self.job_id).to_detail())
        self.assertIn("oldest kept: 3", reply.error["message"])
        self.assertEqual([e["seq"] for e in self.events("?after=2")["events"]], [3, 4, 5, 6, 7])

    def test_bad_after_and_ids(self) -> None:
        """A bad after is 400, a bad id 400 INVALID_JOB_ID, an unknown job 404."""
        for after in ("-1", "x", "1.5"):
            self.assertError(
                self.call("GET", f"/api/v1/jobs/{self.job_id}/events?after={after}"),
                400,
                "VALIDATION_ERROR",
            )
        self.assertError(self.call("GET", "/api/v1/jobs/nope/events"), 400, "INVALID_JOB_ID")
        self.assertError(
            self.call("GET", f"/api/v1/jobs/{JOB_ID_UNKNOWN}/events"), 404, "JOB_NOT_FOUND"
        )


class RealEngineTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        counter = itertools.count(1)
        self.runner = FakeProcessRunner()
        self.engine = JobManager(
            backend=self.backend,
            system=self.system,
            runner=self.runner,
            store=FakeJobStore(),
            clock=self.clock,
            max_queue_depth=2,
            max_events_per_job=50,
            uuid_factory=lambda: uuid.UUID(int=next(counter)),
        )
        self.successResultOf(self.engine.start())
        self.addCleanup(self.stop_engine)
        self.build(jobs=self.engine)

    def stop_engine(self) -> None:
        for gate in self.backend.gates.values():
            if not gate.called:
                gate.callback(None)
        stopped = self.engine.stop()
        self.clock.advance(60)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dry_run_apply_followed_to_the_end(self) -> None:
        """A dry-run apply is 202 pending, runs, completes, and its events end with job_complete."""
        self.backend.script(
            "patch_apply",
            commands=[["apt-get", "-s", "dist-upgrade"]],
            outcome=JobOutcome(
                message="2 packages would change",
                changes=({"name": "bash", "from": "1", "to": "2", "action": "upgrade"},),
            ),
        )
        reply = self.call("POST", "/api/v1/patches/apply", {"dry_run": True})
        self.assertEqual((reply.code, reply.data["status"]), (202, "pending"))
        job_id = reply.data["job_id"]
        self.clock.advance(0)
        self.assertEqual(self.call("GET", f"/api/v1/jobs/{job_id}").data["status"], "running")
        self.runner.last.emit_stdout("Inst bash [1] (2 Debian:12)")
        self.runner.last.finish(0)
        self.clock.advance(1)
        detail = self.call("GET", f"/api/v1/jobs/{job_id}").data
        self.assertEqual((detail["status"], detail["dry_run"]), ("completed", True))
        self.assertEqual(detail["changes"][0]["name"], "bash")
        events = self.call("GET", f"/api/v1/jobs/{job_id}/events?after=0").data
        seqs = [e["seq"] for e in events["events"]]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(events["events"][-1]["event"], "job_complete")
        self.assertEqual((events["last_seq"], events["terminal"]), (seqs[-1], True))
        self.assertEqual(events["events"], [e.to_wire() for e in self.engine.events.kept(job_id)])
        self.assertEqual(self.call("GET", "/api/v1/jobs?status=completed").data["total"], 1)

    def test_queue_full_and_reboot_blocked(self) -> None:
        """Engine refusals reach the client: 409 REBOOT_BLOCKED, 429 QUEUE_FULL + Retry-After."""
        self.backend.script("update", gate=True)
        first = self.call("PUT", "/api/v1/packages/vim").data["job_id"]
        self.clock.advance(0)
        reply = self.call("POST", "/api/v1/system/reboot", {})
        self.assertError(reply, 409, "REBOOT_BLOCKED")
        self.call("PUT", "/api/v1/packages/nano")
        reply = self.call("PUT", "/api/v1/packages/less")
        self.assertError(reply, 429, "QUEUE_FULL")
        self.assertEqual(reply.header("Retry-After"), "60")
        self.assertError(self.call("DELETE", f"/api/v1/jobs/{first}"), 409, "DELETE_NOT_ALLOWED")

    def test_cancel_running_job(self) -> None:
        """Cancel of a running job answers with the job and it ends cancelled."""
        self.backend.script("install", commands=[["apt-get", "install", "--", "vim"]])
        job_id = self.call("POST", "/api/v1/packages", {"packages": ["vim"]}).data["job_id"]
        self.clock.advance(0)
        reply = self.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        self.assertEqual(reply.code, 200)
        self.clock.advance(60)
        self.assertEqual(self.call("GET", f"/api/v1/jobs/{job_id}").data["status"], "cancelled")
        self.assertError(
            self.call("POST", f"/api/v1/jobs/{job_id}/cancel"), 409, "CANCEL_NOT_ALLOWED"
        )
        self.assertEqual(self.call("DELETE", f"/api/v1/jobs/{job_id}").code, 200)
