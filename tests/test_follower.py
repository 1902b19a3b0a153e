"""Tests for lpa.follower: following one job over the stream and by polling, and against the
agent's own session (no sockets)."""

from __future__ import annotations

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa import protocol
from lpa.agent.eventlog import EventLog
from lpa.agent.model import JobRequest
from lpa.agent.ws_session import JobStreamSession
from lpa.events import EVENT_JOB_COMPLETE, KIND_OUTPUT, KIND_SNAPSHOT, JobEvent
from lpa.follower import DETAIL, EVENTS, STREAM, JobFollower, Step
from lpa.protocol import (
    Ack,
    StreamError,
    UnknownFrame,
    parse_answer,
    parse_frame,
)
from tests.fakes_jobs import FakeJobManager, RecordingChannel
from tests.test_protocol import JOB, OTHER, T, answer, detail, event, page, wire


def seqs(step: Step) -> list[int | None]:
    return [e.seq for e in step.events]


class FollowerStreamTests(SynchronousTestCase):
    def opened(self, after: int = 0) -> JobFollower:
        follower = JobFollower(JOB, after)
        step = follower.stream_opened()
        self.assertEqual(step.send, (protocol.subscribe_frame(JOB, after),))
        self.assertEqual(follower.source, STREAM)
        follower.receive(Ack("subscribed", JOB))
        return follower

    def test_in_order_until_job_complete(self) -> None:
        """Events are delivered in order; job_complete ends the job."""
        follower = self.opened()
        for seq in (1, 2):
            self.assertEqual(seqs(follower.receive(event(seq))), [seq])
        self.assertEqual(seqs(follower.receive(event(3, "completed"))), [3])
        self.assertFalse(follower.done)
        self.assertEqual(seqs(follower.receive(event(4, "completed", name="job_complete"))), [4])
        self.assertTrue(follower.done and follower.over)
        assert follower.latest is not None and follower.outcome is not None
        self.assertEqual(follower.latest.event, EVENT_JOB_COMPLETE)
        self.assertEqual((follower.outcome.seq, follower.outcome.status), (3, "completed"))
        self.assertEqual(follower.receive(event(5)), Step())

    def test_duplicates_dropped(self) -> None:
        """A replayed event already delivered is dropped."""
        follower = self.opened(after=2)
        self.assertEqual(follower.receive(event(2)), Step())
        self.assertEqual(seqs(follower.receive(event(3))), [3])
        self.assertEqual(follower.receive(event(3)), Step())
        self.assertEqual(follower.last_seq, 3)

    def test_gap_resubscribes_once(self) -> None:
        """A gap asks for a replay from the last seq once, until the agent acknowledges it."""
        follower = self.opened()
        follower.receive(event(1))
        step = follower.receive(event(5))
        self.assertEqual((step.events, step.send), ((), (protocol.subscribe_frame(JOB, 1),)))
        self.assertEqual(follower.receive(event(6)), Step())  # in flight before the replay
        follower.receive(Ack("subscribed", JOB))
        self.assertEqual([seqs(follower.receive(event(n))) for n in (2, 3, 4, 5, 6)],
                         [[2], [3], [4], [5], [6]])
        self.assertEqual(follower.receive(event(9)).send, (protocol.subscribe_frame(JOB, 6),))

    def test_gap_before_first_ack_waits(self) -> None:
        """Before the subscription is acknowledged a gap is expected (live events of all jobs)."""
        follower = JobFollower(JOB)
        follower.stream_opened()
        self.assertEqual(follower.receive(event(7)), Step())
        self.assertEqual(seqs(follower.receive(event(1))), [1])

    def test_resync_replaces_the_stream(self) -> None:
        """A resync delivers its snapshot and moves last_seq to its seq, even backwards."""
        follower = self.opened(after=50)
        resync = parse_frame(protocol.resync_frame(detail(seq=8), 8, "ahead", T))
        step = follower.receive(resync)
        self.assertEqual((seqs(step), step.events[0].kind), ([8], KIND_SNAPSHOT))
        self.assertEqual((follower.last_seq, follower.done), (8, False))
        self.assertEqual(seqs(follower.receive(event(9))), [9])

    def test_terminal_resync_ends(self) -> None:
        """A terminal job's resync ends the follow (no job_complete follows it)."""
        follower = self.opened(after=3)
        follower.receive(parse_frame(protocol.resync_frame(detail("completed"), 90, "old", T)))
        self.assertTrue(follower.done)
        assert follower.latest is not None
        self.assertEqual(follower.latest.status, "completed")

    def test_job_not_found(self) -> None:
        """JOB_NOT_FOUND for our job: gone."""
        follower = self.opened()
        follower.receive(StreamError("JOB_NOT_FOUND", "no", JOB))
        self.assertIn("JOB_NOT_FOUND", follower.gone)
        self.assertTrue(follower.over)
        self.assertEqual(follower.stream_opened(), Step())

    def test_refused_polls(self) -> None:
        """Another error for our job is a refusal: the follower polls from its last seq."""
        follower = self.opened()
        follower.receive(event(1))
        error = StreamError("TOO_MANY_SUBSCRIPTIONS", "at most 256", JOB)
        self.assertEqual(follower.receive(error), Step(refused=error))
        self.assertEqual((follower.source, follower.poll_path()),
                         (EVENTS, protocol.events_path(JOB, 1)))

    def test_other_frames_ignored(self) -> None:
        """Other jobs' frames, connected, unsubscribed and unknown frames change nothing."""
        follower = self.opened()
        for frame in (event(1, job_id=OTHER), Ack("connected", "", "hi"),
                      Ack("unsubscribed", JOB), UnknownFrame("heartbeat", JOB),
                      StreamError("INVALID_JSON", "bad", ""),
                      StreamError("JOB_NOT_FOUND", "no", OTHER)):
            self.assertEqual(follower.receive(frame), Step())
        self.assertEqual((follower.last_seq, follower.gone), (0, None))

    def test_unnumbered_stream_event_dropped(self) -> None:
        """A stream event without a seq cannot be placed: dropped."""
        follower = self.opened()
        self.assertEqual(follower.receive(attr.evolve(event(1), seq=None)), Step())

    def test_lost_then_reopened(self) -> None:
        """A dropped socket polls from the last seq; a new socket resubscribes from there."""
        follower = self.opened()
        follower.receive(event(1))
        follower.stream_lost()
        self.assertEqual(follower.source, EVENTS)
        follower.receive_answer(page(wire(2), wire(3)))
        self.assertEqual(follower.stream_opened().send, (protocol.subscribe_frame(JOB, 3),))

    def test_rewind(self) -> None:
        """Events lost downstream are asked again: resubscribe from the rewound seq."""
        follower = self.opened()
        for seq in (1, 2, 3):
            follower.receive(event(seq))
        self.assertEqual(follower.rewind(1).send, (protocol.subscribe_frame(JOB, 1),))
        self.assertEqual(follower.receive(event(4)), Step())  # in flight: a gap, ignored
        self.assertEqual(seqs(follower.receive(event(2))), [2])
        self.assertEqual(follower.rewind(5), Step())
        follower.stream_lost()
        self.assertEqual(follower.rewind(0), Step())
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 0))


class FollowerPollTests(SynchronousTestCase):
    def test_events_pages(self) -> None:
        """Pages are delivered in order without duplicates; terminal + read to the end: done."""
        follower = JobFollower(JOB)
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 0))
        self.assertEqual(seqs(follower.receive_answer(page(wire(1), wire(2)))), [1, 2])
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 2))
        step = follower.receive_answer(page(wire(2), wire(3, "failed"), last_seq=3,
                                            terminal=True))
        self.assertEqual(seqs(step), [3])
        self.assertTrue(follower.done)
        self.assertEqual(follower.receive_answer(page(wire(4))), Step())

    def test_job_complete_in_page(self) -> None:
        """job_complete in a page ends the follow."""
        follower = JobFollower(JOB)
        follower.receive_answer(page(wire(1, "completed"),
                                     wire(2, "completed", name="job_complete")))
        self.assertTrue(follower.done)

    def test_hole_in_page(self) -> None:
        """A page with a hole is delivered up to the hole; the next poll asks after it."""
        follower = JobFollower(JOB)
        self.assertEqual(seqs(follower.receive_answer(page(wire(1), wire(3)))), [1])
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 1))

    def test_ended_with_nothing_new(self) -> None:
        """Following from the last seq of an ended job reads its detail as the final word."""
        follower = JobFollower(JOB, after_seq=4)
        step = follower.receive_answer(page(last_seq=4, terminal=True))
        self.assertEqual((step.events, step.again), ((), True))
        self.assertEqual(follower.poll_path(), protocol.job_path(JOB))
        step = follower.receive_answer(answer(200, detail("completed", seq=4)))
        self.assertEqual((seqs(step), follower.done), ([4], True))

    def test_expired(self) -> None:
        """410 EVENTS_EXPIRED: the detail in the error is the snapshot; polling goes on after."""
        follower = JobFollower(JOB)
        expired = answer(410, error={"code": "EVENTS_EXPIRED", "message": "gone",
                                     "details": detail(seq=900)})
        self.assertEqual(seqs(follower.receive_answer(expired)), [900])
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 900))

    def test_conflict_with_detail(self) -> None:
        """409 EVENTS_AHEAD (after beyond the job's last seq) with the job: its seq rules."""
        follower = JobFollower(JOB, after_seq=50)
        conflict = answer(409, error={"code": protocol.EVENTS_AHEAD, "message": "ahead",
                                      "details": {"last_seq": 7, "incarnation": "b:2",
                                                  "job": detail(seq=7)}})
        self.assertEqual(seqs(follower.receive_answer(conflict)), [7])
        self.assertEqual(follower.last_seq, 7)
        bare = JobFollower(JOB, after_seq=50)  # an agent that puts the detail itself there
        bare.receive_answer(answer(409, error={"code": "EVENTS_AHEAD", "message": "ahead",
                                               "details": detail(seq=6)}))
        self.assertEqual(bare.last_seq, 6)

    def test_conflict_without_detail(self) -> None:
        """409 without a detail: one GET /jobs/{id}, then the events from its seq."""
        follower = JobFollower(JOB, after_seq=50)
        conflict = answer(409, error={"code": "EVENTS_AHEAD", "message": "ahead",
                                      "details": {"last_seq": 7}})
        self.assertEqual(follower.receive_answer(conflict), Step(again=True))
        self.assertEqual(follower.poll_path(), protocol.job_path(JOB))
        self.assertEqual(seqs(follower.receive_answer(answer(200, detail(seq=7)))), [7])
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 7))

    def test_original_agent(self) -> None:
        """404/405 on the events path: poll the detail, delivering only changes, until terminal."""
        follower = JobFollower(JOB)
        self.assertEqual(follower.receive_answer(parse_answer(405, b"")), Step(again=True))
        self.assertEqual((follower.source, follower.poll_path()), (DETAIL, protocol.job_path(JOB)))
        first = follower.receive_answer(answer(200, detail(seq=None)))
        self.assertEqual((seqs(first), first.events[0].output), ([None], "a\nb"))
        self.assertEqual(follower.receive_answer(answer(200, detail(seq=None))), Step())
        changed = follower.receive_answer(answer(200, detail("timedout", seq=None,
                                                             error="took too long")))
        self.assertEqual(changed.events[0].status, "timed_out")
        self.assertTrue(follower.done)

    def test_detail_of_a_numbering_agent(self) -> None:
        """Detail polling of an agent with seqs delivers only snapshots ahead of last_seq."""
        follower = JobFollower(JOB, after_seq=5)
        follower.receive_answer(answer(404, error={"code": "NOT_FOUND", "message": "no path"}))
        self.assertEqual(follower.receive_answer(answer(200, detail(seq=5))), Step())
        self.assertEqual(seqs(follower.receive_answer(answer(200, detail(seq=6)))), [6])

    def test_gone(self) -> None:
        """JOB_NOT_FOUND on the events path, or 404 on the detail: gone."""
        follower = JobFollower(JOB)
        follower.receive_answer(answer(404, error={"code": "JOB_NOT_FOUND", "message": "no"}))
        self.assertIn("JOB_NOT_FOUND", follower.gone)
        old = JobFollower(JOB)
        old.receive_answer(parse_answer(405, b""))
        old.receive_answer(parse_answer(404, b""))
        self.assertIn("HTTP 404", old.gone)
        self.assertEqual(old.receive_answer(answer(200, detail())), Step())

    def test_problems(self) -> None:
        """Answers the follower cannot use are problems; nothing changes, retry later."""
        follower = JobFollower(JOB)
        for bad in (answer(429, error={"code": "RATE_LIMITED", "message": "slow down"}),
                    answer(200, {"no": "events"}), parse_answer(502, b"<html>")):
            step = follower.receive_answer(bad)
            self.assertTrue(step.problem, bad)
            self.assertEqual((step.events, follower.last_seq, follower.source), ((), 0, EVENTS))
        self.assertIn("RATE_LIMITED", follower.receive_answer(
            answer(429, error={"code": "RATE_LIMITED", "message": "x"})).problem)
        follower.receive_answer(parse_answer(405, b""))
        self.assertIn("HTTP 500", follower.receive_answer(parse_answer(500, b"")).problem)
        self.assertIn("no status", follower.receive_answer(answer(200, {"x": 1})).problem)
        expired = answer(410, error={"code": "EVENTS_EXPIRED", "message": "gone", "details": 3})
        self.assertIn("unreadable", JobFollower(JOB).receive_answer(expired).problem)


class AgainstTheAgentTests(SynchronousTestCase):
    """The follower reading what the agent's own session writes (no sockets)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = EventLog(self.clock, max_events_per_job=5)
        self.jobs = FakeJobManager(self.clock, events=self.events)
        self.channel = RecordingChannel()
        self.addCleanup(lambda: self.assertIsNone(self.channel.closed_with))
        self.session = JobStreamSession(self.events, self.jobs, self.channel,
                                        now=lambda: T, connection_id="c1")
        self.session.start()
        self.addCleanup(self.session.stop)
        self.job = self.jobs.submit(JobRequest(operation="patch_apply", dry_run=True))

    def pump(self, follower: JobFollower) -> list[JobEvent]:
        delivered: list[JobEvent] = []
        while self.channel.frames:
            step = follower.receive(parse_frame(self.channel.frames.pop(0)))
            delivered.extend(step.events)
            for frame in step.send:
                self.session.receive_text(protocol.dumps(frame))
        return delivered

    def test_replay_then_live(self) -> None:
        """Subscribe with after_seq: replay, live events, job_complete, each once and in order."""
        self.jobs.step(self.job.id, "running", 10, "Reading package lists", kind=KIND_OUTPUT)
        follower = JobFollower(self.job.id)
        for frame in follower.stream_opened().send:
            self.session.receive_text(protocol.dumps(frame))
        self.jobs.step(self.job.id, "running", 20, "Inst curl")
        delivered = self.pump(follower)
        self.jobs.finish(self.job.id)
        delivered += self.pump(follower)
        self.assertEqual([e.seq for e in delivered], [1, 2, 3, 4, 5])
        self.assertTrue(follower.done)

    def test_resync_from_the_agent(self) -> None:
        """After_seq older than what is kept: the agent's resync ends a finished job."""
        for n in range(10):
            self.jobs.step(self.job.id, "running", n, f"line {n}", kind=KIND_OUTPUT)
        self.jobs.finish(self.job.id, "failed")
        self.channel.take()  # what this connection saw live before it subscribed
        follower = JobFollower(self.job.id, after_seq=1)
        for frame in follower.stream_opened().send:
            self.session.receive_text(protocol.dumps(frame))
        delivered = self.pump(follower)
        self.assertEqual([(e.kind, e.seq, e.status) for e in delivered],
                         [(KIND_SNAPSHOT, 13, "failed")])
        self.assertTrue(follower.done)

    def test_unknown_job(self) -> None:
        """The agent's JOB_NOT_FOUND error frame makes the follower give up."""
        follower = JobFollower(OTHER)
        for frame in follower.stream_opened().send:
            self.session.receive_text(protocol.dumps(frame))
        self.pump(follower)
        self.assertIn("JOB_NOT_FOUND", follower.gone)
