"""The poller: events endpoint, detail fallback, 410, JOB_NOT_FOUND, deadline, backoff."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from lpa.events import KIND_SNAPSHOT, JobEvent
from lpa.relay.interfaces import AgentAddress, HostJob
from lpa.relay.poller import AgentJobsHttp, AgentPoller, PollError, snapshot_event

ADDRESS = AgentAddress("agent1.example", 12443)
JOB = "11111111-1111-4111-8111-111111111111"


def envelope(data: Any = None, error: Any = None) -> bytes:
    return json.dumps({"success": error is None, "data": data, "error": error}).encode()


def wire(seq: int, status: str = "running", job_id: str = JOB, **extra: Any) -> dict[str, Any]:
    return JobEvent(
        job_id=job_id, seq=seq, status=status, progress=0, message=f"e{seq}", timestamp="t", **extra
    ).to_wire()


class FakeAgentResource(Resource):
    """Answers GETs from ``routes``: path (with query) → (code, body) or a callable giving one."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Any] = {}
        self.requests: list[str] = []

    def render_GET(self, request: Any) -> bytes:
        path = request.uri.decode()
        self.requests.append(path)
        answer = self.routes.get(path, (405, b""))
        if callable(answer):
            answer = answer()
        request.setResponseCode(answer[0])
        return answer[1]


class RecordingTarget:
    """A PollTarget recording what the poller found."""

    def __init__(self, *host_jobs: HostJob) -> None:
        self.jobs = [(host_job, host_job.last_seq) for host_job in host_jobs]
        self.events: list[tuple[str, list[JobEvent]]] = []
        self.given_up: list[tuple[str, str]] = []

    def poll_jobs(self) -> list[tuple[HostJob, int]]:
        return list(self.jobs)

    def poll_events(self, host_job: HostJob, events: Any) -> None:
        self.events.append((host_job.row_id, list(events)))

    def poll_give_up(self, host_job: HostJob, reason: str) -> None:
        self.given_up.append((host_job.row_id, reason))
        self.jobs = [(h, s) for h, s in self.jobs if h.row_id != host_job.row_id]


def host_job(row_id: str = "r1", agent_job_id: str = JOB, last_seq: int = 0) -> HostJob:
    return HostJob(
        row_id=row_id,
        job_id="j1",
        host_id="h1",
        agent_job_id=agent_job_id,
        agent=ADDRESS,
        last_seq=last_seq,
    )


class PollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = FakeAgentResource()
        self.stub = StubTreq(self.resource)
        self.http = AgentJobsHttp(self.stub, ADDRESS, clock=self.clock, timeout=30)
        self.target = RecordingTarget(host_job(last_seq=2))
        self.poller = AgentPoller(
            self.http, self.target, clock=self.clock, interval=10, max_interval=80, deadline=100
        )
        self.addCleanup(self.poller.stop)

    def poll(self) -> None:
        done = self.poller._tick()
        self.stub.flush()
        self.successResultOf(done)

    def test_events_endpoint(self) -> None:
        """An lpa agent is asked for events after the cursor; data.events go on in seq order."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            200,
            envelope({"events": [wire(4), wire(3), wire(9, job_id="other")]}),
        )
        self.poll()
        self.assertEqual(self.resource.requests, [f"/api/v1/jobs/{JOB}/events?after=2"])
        [(row_id, events)] = self.target.events
        self.assertEqual((row_id, [e.seq for e in events]), ("r1", [3, 4]))
        self.assertTrue(self.http.has_events_endpoint)

    def test_empty_405_falls_back_to_detail(self) -> None:
        """The original's empty 405 → GET /jobs/{id} → one snapshot; the fallback is remembered."""
        detail = {
            "id": JOB,
            "status": "timedout",
            "progress": 40,
            "message": "m",
            "logs": ["a", "b"],
            "error": "slow",
            "error_code": "TIMEOUT",
        }
        self.resource.routes[f"/api/v1/jobs/{JOB}"] = (200, envelope(detail))
        self.poll()
        [(_, [event])] = self.target.events
        self.assertEqual(
            (event.kind, event.seq, event.status, event.output, event.error, event.progress),
            (KIND_SNAPSHOT, None, "timed_out", "a\nb", "slow", 40),
        )
        self.poll()
        self.assertEqual(
            self.resource.requests,
            [f"/api/v1/jobs/{JOB}/events?after=2", f"/api/v1/jobs/{JOB}", f"/api/v1/jobs/{JOB}"],
        )

    def test_410_is_a_snapshot(self) -> None:
        """410 EVENTS_EXPIRED carries the job detail: a snapshot with the detail's seq."""
        detail = {
            "job_id": JOB,
            "status": "completed",
            "progress": 100,
            "message": "done",
            "logs": [],
            "seq": 40,
        }
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            410,
            envelope(error={"code": "EVENTS_EXPIRED", "message": "gone", "details": detail}),
        )
        self.poll()
        [(_, [event])] = self.target.events
        self.assertEqual((event.kind, event.seq, event.status), (KIND_SNAPSHOT, 40, "completed"))

    def test_job_not_found_gives_up(self) -> None:
        """JOB_NOT_FOUND from the agent ends the host job instead of polling forever."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            404,
            envelope(error={"code": "JOB_NOT_FOUND", "message": "no"}),
        )
        self.poll()
        [(row_id, reason)] = self.target.given_up
        self.assertEqual(row_id, "r1")
        self.assertIn("JOB_NOT_FOUND", reason)

    def test_detail_404_gives_up(self) -> None:
        """On an old agent, a 404 for the job detail ends the host job."""
        self.resource.routes[f"/api/v1/jobs/{JOB}"] = (404, b"")
        self.poll()
        self.assertEqual(len(self.target.given_up), 1)

    def test_errors_back_off_then_deadline(self) -> None:
        """Failed polls double the interval up to the cap; past the deadline the job ends failed."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            500,
            envelope(error={"code": "X"}),
        )
        self.poller.start()
        self.stub.flush()
        intervals = [self.poller.interval]
        for _ in range(2):
            self.clock.advance(self.poller.interval)
            self.stub.flush()
            intervals.append(self.poller.interval)
        self.assertEqual((intervals, self.target.given_up), ([20, 40, 80], []))
        self.clock.advance(80)  # t=140: failing for 140s > deadline
        self.stub.flush()
        self.assertEqual(len(self.target.given_up), 1)
        self.assertIn("deadline 100s", self.target.given_up[0][1])

    def test_success_resets_interval(self) -> None:
        """A good poll after failures returns to the base interval."""
        answers = iter([(500, b""), (200, envelope({"events": []}))])
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = lambda: next(answers)
        self.poller.start()
        self.stub.flush()
        self.assertEqual(self.poller.interval, 20)
        self.clock.advance(20)
        self.stub.flush()
        self.assertEqual(self.poller.interval, 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_unreachable_agent(self) -> None:
        """A transport error marks every job of the agent failing and stops the pass."""

        class Boom:
            def get(self, url: str) -> Any:
                raise ConnectionRefusedError("refused")

        second = host_job("r2", "22222222-2222-4222-8222-222222222222")
        target = RecordingTarget(host_job(), second)
        calls = []
        http = AgentJobsHttp(Boom(), ADDRESS, clock=self.clock, timeout=5)
        original = http.fetch

        async def counting(agent_job_id: str, after: int) -> Any:
            calls.append(agent_job_id)
            return await original(agent_job_id, after)

        http.fetch = counting  # type: ignore[method-assign]
        poller = AgentPoller(
            http, target, clock=self.clock, interval=10, max_interval=10, deadline=0
        )
        self.successResultOf(poller._tick())
        self.assertEqual(calls, [JOB])
        self.assertEqual([r for r, _ in target.given_up], ["r1", "r2"])

    def test_timeout(self) -> None:
        """A request with no answer fails after the timeout as unreachable."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (200, envelope({"events": []}))

        class Never:
            def get(self, url: str) -> Any:
                return Deferred()

        http = AgentJobsHttp(Never(), ADDRESS, clock=self.clock, timeout=5)
        fetching = Deferred.fromCoroutine(http.fetch(JOB, 0))
        self.clock.advance(5)
        error = self.failureResultOf(fetching, PollError)
        self.assertTrue(error.value.transport)

    def test_stop_cancels(self) -> None:
        """Stopping the poller leaves no delayed call behind."""
        self.poller.start()
        self.stub.flush()
        self.poller.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_snapshot_event_rejects_garbage(self) -> None:
        """A detail without a status is a ValueError, not a guess."""
        self.assertRaises(ValueError, snapshot_event, JOB, {"progress": 3})
        self.assertRaises(ValueError, snapshot_event, JOB, {"status": "exploded"})


class RateLimitTests(SynchronousTestCase):
    def test_429_waits_retry_after_without_deadline(self) -> None:
        """A 429 waits at least Retry-After and never counts toward the unreachable deadline."""
        clock = Clock()

        requests: list[str] = []

        class Limited(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                requests.append(request.uri.decode())
                request.setResponseCode(429)
                request.setHeader(b"Retry-After", b"45")
                return b"Rate limit exceeded. Retry after 45 seconds."

        stub = StubTreq(Limited())
        target = RecordingTarget(host_job(), host_job("r2", "22222222-2222-4222-8222-222222222222"))
        poller = AgentPoller(
            AgentJobsHttp(stub, ADDRESS, clock=clock, timeout=5),
            target,
            clock=clock,
            interval=10,
            max_interval=20,
            deadline=0,
        )
        self.addCleanup(poller.stop)
        poller.start()
        stub.flush()
        self.assertEqual((poller.interval, target.given_up), (45, []))
        self.assertEqual(len(requests), 1)  # the rest of the pass waits too
