"""The poller: events endpoint, detail fallback, 410, JOB_NOT_FOUND, deadline, backoff."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from lpa.events import KIND_SNAPSHOT, JobEvent
from lpa.follower import PollOutcome
from lpa.protocol import snapshot_event
from lpa.relay.interfaces import AgentAddress, HostJob
from lpa.relay.jobs_http import AgentJobsHttp, PollError
from lpa.relay.poller import AgentPoller, IPollTarget

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
        body: bytes = answer[1]
        return body


@implementer(IPollTarget)
class RecordingTarget:
    """A PollTarget recording what the poller found."""

    def __init__(self, *host_jobs: HostJob) -> None:
        self.jobs = [(host_job, host_job.last_seq) for host_job in host_jobs]
        self.events: list[tuple[str, list[JobEvent]]] = []
        self.given_up: list[tuple[str, str]] = []
        self.gone: list[tuple[str, str]] = []
        self.answers: list[tuple[str, PollOutcome]] = []

    def poll_jobs(self) -> list[tuple[HostJob, int]]:
        return list(self.jobs)

    def poll_answer(self, host_job: HostJob, outcome: PollOutcome) -> None:
        self.answers.append((host_job.row_id, outcome))
        if outcome.gone is not None:
            self.gone.append((host_job.row_id, outcome.gone))
        elif outcome.events:
            self.events.append((host_job.row_id, list(outcome.events)))

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


class PollerFixture(SynchronousTestCase):
    """A poller of job JOB (row r1, from seq 2) on a fake agent resource; no tests here."""

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


class PollerTests(PollerFixture):

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

    def test_job_not_found_is_reported_gone(self) -> None:
        """JOB_NOT_FOUND is an answer (the link decides when to give up), not a poll failure."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            404,
            envelope(error={"code": "JOB_NOT_FOUND", "message": "no"}),
        )
        self.poll()
        self.assertEqual(
            (self.target.gone, self.target.given_up, self.poller.interval),
            ([("r1", f"agent agent1.example:12443 does not know job {JOB}")], [], 10),
        )

    def test_detail_404_is_reported_gone(self) -> None:
        """On an old agent, a 404 for the job detail says the agent does not know the job."""
        self.resource.routes[f"/api/v1/jobs/{JOB}"] = (404, b"")
        self.poll()
        self.assertEqual(len(self.target.gone), 1)
        self.assertEqual(self.target.given_up, [])

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

        self.patch(http, "fetch", counting)
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


class AnomalyTests(PollerFixture):
    """Agents that number below the relay's cursor, and what the poller makes of it."""

    def detail(self, seq: int, status: str = "failed") -> dict[str, Any]:
        return {"job_id": JOB, "status": status, "progress": 7, "message": "m", "logs": ["x"],
                "seq": seq, "error": "Agent process restart", "error_code": "AGENT_RESTARTED"}

    def test_409_events_ahead_is_the_snapshot(self) -> None:
        """409 EVENTS_AHEAD: details.job is the snapshot at details.last_seq, with incarnation."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            409,
            envelope(error={"code": "EVENTS_AHEAD", "message": "ahead",
                            "details": {"last_seq": 1, "incarnation": "i2",
                                        "job": self.detail(1)}}),
        )
        self.poll()
        [(_, outcome)] = self.target.answers
        [event] = outcome.events
        self.assertEqual(
            (event.kind, event.seq, event.status, event.error_code, outcome.incarnation),
            (KIND_SNAPSHOT, 1, "failed", "AGENT_RESTARTED", "i2"),
        )
        self.assertEqual(self.resource.requests, [f"/api/v1/jobs/{JOB}/events?after=2"])

    def test_old_agent_numbering_below_the_cursor_gives_its_detail(self) -> None:
        """An agent answering 200 with last_seq below the cursor: its job detail, at that seq."""
        self.target.jobs = [(host_job(last_seq=53), 53)]
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=53"] = (
            200, envelope({"events": [], "last_seq": 4, "status": "failed", "terminal": True}),
        )
        self.resource.routes[f"/api/v1/jobs/{JOB}"] = (200, envelope(self.detail(4)))
        self.poll()
        [(_, [event])] = self.target.events
        self.assertEqual((event.kind, event.seq, event.status), (KIND_SNAPSHOT, 4, "failed"))

    def test_ended_at_the_cursor_gives_its_detail(self) -> None:
        """A terminal job with nothing after the cursor: its detail (the relay may lack the end)."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            200,
            envelope({"events": [], "last_seq": 2, "status": "failed", "terminal": True,
                      "incarnation": "i1"}),
        )
        self.resource.routes[f"/api/v1/jobs/{JOB}"] = (200, envelope(self.detail(2)))
        self.poll()
        [(_, outcome)] = self.target.answers
        self.assertEqual([(e.seq, e.status) for e in outcome.events], [(2, "failed")])
        self.assertEqual(outcome.incarnation, "i1")

    def test_running_job_with_nothing_new_is_an_empty_answer(self) -> None:
        """Nothing new for a running job: an empty answer (the agent knows the job), no detail."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            200, envelope({"events": [], "last_seq": 2, "status": "running", "terminal": False}),
        )
        self.poll()
        self.assertEqual([(r, o.events, o.gone) for r, o in self.target.answers],
                         [("r1", (), None)])
        self.assertEqual(len(self.resource.requests), 1)

    def test_unreadable_ahead_details_are_a_poll_error(self) -> None:
        """A 409 whose details hold no readable job is a failed poll, not a crash."""
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            409,
            envelope(error={"code": "EVENTS_AHEAD", "message": "a", "details": {"job": {}}}),
        )
        self.poll()
        self.assertEqual((self.target.answers, self.poller.interval), ([], 20))

    def test_poll_soon_runs_a_pass_now_once(self) -> None:
        """poll_soon() polls at once and keeps the interval; it never overlaps a running pass."""
        never: Deferred[Any] = Deferred()
        self.resource.routes[f"/api/v1/jobs/{JOB}/events?after=2"] = (
            200, envelope({"events": [wire(3)]}),
        )
        self.poller.start(now=False)
        self.poller.poll_soon()
        self.stub.flush()
        self.assertEqual(len(self.resource.requests), 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [10])
        self.poller._tick_deferred = never  # a pass in flight
        self.poller.poll_soon()
        self.assertEqual(len(self.resource.requests), 1)
        self.poller._tick_deferred = None


class SentenceTests(SynchronousTestCase):
    """Poll errors and give-up reasons are sentences naming the agent, never a Failure repr."""

    def test_wrapped_connection_loss(self) -> None:
        """treq's ResponseNeverReceived([Failure(ConnectionLost)]) reads as a plain sentence."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        from twisted.web._newclient import ResponseNeverReceived

        class Lost:
            def get(self, url: str) -> Any:
                raise ResponseNeverReceived([Failure(ConnectionLost("Connection lost."))])

        clock = Clock()
        http = AgentJobsHttp(Lost(), ADDRESS, clock=clock, timeout=5)
        error = self.failureResultOf(Deferred.fromCoroutine(http.fetch(JOB, 7)), PollError).value
        self.assertEqual(
            str(error),
            f"agent agent1.example:12443 did not answer GET /api/v1/jobs/{JOB}/events?after=7: "
            "the connection was lost before an answer",
        )
        self.assertEqual(error.cause, "the connection was lost before an answer")

    def test_deadline_reason(self) -> None:
        """The give-up reason names the agent, how long, the deadline and the cause."""

        class Refused:
            def get(self, url: str) -> Any:
                raise ConnectionRefusedError(111, "Connection refused")

        clock = Clock()
        target = RecordingTarget(host_job())
        poller = AgentPoller(
            AgentJobsHttp(Refused(), ADDRESS, clock=clock, timeout=5),
            target, clock=clock, interval=10, max_interval=10, deadline=20,
        )
        self.addCleanup(poller.stop)
        poller.start()
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(
            target.given_up,
            [("r1", ("the relay got no usable answer from agent agent1.example:12443 for 20s "
                    "(deadline 20s): connection refused"))],
        )
