"""The agent's identity and renumbering on the wire: incarnation, 409 EVENTS_AHEAD, resync.

The REST API and a WebSocket session over the real JobManager (its write-ahead log volatile),
restarted over the same store so the incarnation moves.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from lpa.agent.incarnation import MemoryIncarnations
from lpa.agent.jobs import JobManager
from lpa.agent.model import JobRequest
from lpa.agent.ws_session import JobStreamSession
from lpa.events import COMPLETED, JobEvent
from tests.api_helpers import ApiTestCase
from tests.fakes import FakeJobStore, FakeProcessRunner
from tests.fakes_jobs import RecordingChannel


class WireTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = FakeJobStore()
        self.incarnations = MemoryIncarnations()
        self.ids = itertools.count(1)
        self.engine = self.start_engine()

    def restart(self) -> None:
        """Stop the engine and start a new one over the same store."""
        self.successResultOf(self.engine.stop())
        self.engine = self.start_engine()

    def start_engine(self) -> JobManager:
        """A started real engine over the store, served by a freshly built API."""
        engine = JobManager(
            backend=self.backend,
            system=self.system,
            runner=FakeProcessRunner(),
            store=self.store,
            clock=self.clock,
            incarnations=self.incarnations,
            uuid_factory=lambda: uuid.UUID(int=next(self.ids)),
        )
        self.successResultOf(engine.start())
        self.build(jobs=engine)
        return engine

    def finished_job(self) -> str:
        job = self.engine.submit(JobRequest(operation="patch_apply", dry_run=True))
        self.clock.advance(0)
        self.assertEqual(job.status, COMPLETED)
        return job.id

    def session(self) -> tuple[JobStreamSession, RecordingChannel]:
        channel = RecordingChannel()
        session = JobStreamSession(
            self.engine.events, self.engine, channel, now=lambda: "t", connection_id="c1"
        )
        session.start()
        channel.take()
        return session, channel

    def test_events_answer_and_events_carry_the_incarnation(self) -> None:
        """The events endpoint names the agent's incarnation; each event the one that
        numbered it, which a restart does not change."""
        job_id = self.finished_job()
        data = self.call("GET", f"/api/v1/jobs/{job_id}/events?after=0").data
        self.assertEqual(data["incarnation"], "boot-1:1")
        self.assertEqual({e["incarnation"] for e in data["events"]}, {"boot-1:1"})
        before = data["events"]
        self.restart()
        data = self.call("GET", f"/api/v1/jobs/{job_id}/events?after=0").data
        self.assertEqual((data["incarnation"], data["events"]), ("boot-1:2", before))
        detail = self.call("GET", f"/api/v1/jobs/{job_id}").data
        self.assertEqual(detail["incarnation"], "boot-1:2")

    def test_after_above_the_last_seq_is_409_events_ahead(self) -> None:
        """after=N past the job's last event is a conflict that carries what to resync from."""
        job_id = self.finished_job()
        last = self.engine.events.last_seq(job_id)
        reply = self.call("GET", f"/api/v1/jobs/{job_id}/events?after={last + 7}")
        self.assertError(reply, 409, "EVENTS_AHEAD")
        self.assertFalse(reply.error["retryable"])
        details = reply.error["details"]
        self.assertEqual(
            (details["last_seq"], details["incarnation"]), (last, "boot-1:1")
        )
        self.assertEqual(details["job"], self.engine.get(job_id).to_detail())
        self.assertEqual(details["job"]["status"], COMPLETED)
        self.assertIn(f"after seq {last + 7}", reply.error["message"])
        self.assertEqual(self.call("GET", f"/api/v1/jobs/{job_id}/events?after={last}").code, 200)

    def test_subscribe_ahead_answers_resync_with_incarnation(self) -> None:
        """A subscribe past the last event gets a resync: job, seq and incarnation."""
        job_id = self.finished_job()
        self.restart()
        _, channel = self.session()
        last = self.engine.events.last_seq(job_id)
        _.receive_text(json.dumps({"action": "subscribe", "job_id": job_id,
                                   "after_seq": last + 1}))
        [ack, resync] = channel.take()
        self.assertEqual(ack["event"], "subscribed")
        self.assertEqual(resync["event"], "resync")
        self.assertEqual((resync["seq"], resync["incarnation"]), (last, "boot-1:2"))
        self.assertEqual(resync["job"], self.engine.get(job_id).to_detail())
        self.assertEqual(resync["status"], COMPLETED)

    def test_live_frames_carry_the_incarnation_and_parse_back(self) -> None:
        """job_status and job_complete frames carry incarnation; JobEvent reads it back."""
        session, channel = self.session()
        job = self.engine.submit(JobRequest(operation="patch_apply", dry_run=True))
        session.receive_text(json.dumps({"action": "subscribe", "job_id": job.id}))
        self.clock.advance(0)
        self.assertEqual(job.status, COMPLETED)
        frames = [f for f in channel.take() if f["event"] in ("job_status", "job_complete")]
        self.assertTrue(frames)
        for frame in frames:
            self.assertEqual(frame["incarnation"], "boot-1:1")
            self.assertEqual(JobEvent.from_wire(frame).to_wire(), frame)
        session.stop()


class OldAgentTests(ApiTestCase):
    def test_events_without_incarnation_are_read(self) -> None:
        """A wire event of an agent that predates incarnations parses with None."""
        wire: dict[str, Any] = {"event": "job_status", "job_id": "j", "seq": 1,
                                "status": "running", "progress": 0, "message": "", "timestamp": ""}
        event = JobEvent.from_wire(wire)
        self.assertIsNone(event.incarnation)
        self.assertNotIn("incarnation", event.to_wire())
        self.assertRaises(ValueError, JobEvent.from_wire, dict(wire, incarnation=7))
