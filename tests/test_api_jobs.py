"""The REST API over the real JobManager (with H1's fakes): jobs run, end, and are followed."""

from __future__ import annotations

import itertools
import uuid

from lpa.agent.jobs import JobManager
from lpa.agent.model import JobOutcome
from tests.api_helpers import ApiTestCase
from tests.fakes import FakeJobStore, FakeProcessRunner


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
