"""Tests for lpa.protocol (frames, envelope, events page) and lpa.follower (following one job)."""

from __future__ import annotations

import json
from typing import Any

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
    Answer,
    ProtocolError,
    Resync,
    StreamError,
    UnknownFrame,
    parse_answer,
    parse_events_page,
    parse_frame,
)
from tests.fakes_jobs import FakeJobManager, RecordingChannel

JOB = "0b0c1f9e-5a43-4a4e-9d51-6f3c1d8e2a10"
OTHER = "5f0e8a4e-1d0c-4c55-9d3a-0f7e8f1f2b3c"
T = "2026-11-25T20:15:18+00:00"


def wire(seq: int, status: str = "running", *, name: str = "job_status", job_id: str = JOB,
         progress: int = 0, message: str = "", **extra: Any) -> dict[str, Any]:
    frame = {"event": name, "job_id": job_id, "seq": seq, "kind": "status", "status": status,
             "progress": progress, "message": message, "timestamp": T}
    frame.update(extra)
    return frame


def event(seq: int, status: str = "running", **kw: Any) -> JobEvent:
    return JobEvent.from_wire(wire(seq, status, **kw))


def detail(status: str = "running", seq: int | None = 5, **extra: Any) -> dict[str, Any]:
    data = {"job_id": JOB, "status": status, "progress": 40, "message": "m", "logs": ["a", "b"],
            "error": None, "error_code": None, "updated_at": T}
    if seq is not None:
        data["seq"] = seq
    data.update(extra)
    return data


def parse_event(frame: Any) -> JobEvent:
    """:func:`parse_frame` of a frame the test expects to be a job event."""
    parsed = parse_frame(frame)
    assert isinstance(parsed, JobEvent), parsed
    return parsed


def parse_resync(frame: Any) -> Resync:
    """:func:`parse_frame` of a frame the test expects to be a resync."""
    parsed = parse_frame(frame)
    assert isinstance(parsed, Resync), parsed
    return parsed


def answer(status: int, data: Any = None, error: dict[str, Any] | None = None) -> Answer:
    body = protocol.envelope(data, error, request_id="r", timestamp=T)
    return parse_answer(status, json.dumps(body).encode())


def page(*events: dict[str, Any], last_seq: int | None = None, terminal: bool = False) -> Answer:
    last = last_seq if last_seq is not None else max([e["seq"] for e in events], default=0)
    return answer(200, {"job_id": JOB, "events": list(events), "last_seq": last,
                        "status": "running", "terminal": terminal})


class ClientFrameTests(SynchronousTestCase):
    def test_subscribe(self) -> None:
        """subscribe names the job and after_seq; without a job it asks for all."""
        self.assertEqual(protocol.subscribe_frame(JOB, 7),
                         {"action": "subscribe", "job_id": JOB, "after_seq": 7})
        self.assertEqual(protocol.subscribe_frame(JOB), {"action": "subscribe", "job_id": JOB})
        self.assertEqual(protocol.subscribe_frame(), {"action": "subscribe", "job_id": "all"})
        self.assertEqual(protocol.subscribe_frame("all"), {"action": "subscribe", "job_id": "all"})

    def test_subscribe_bad(self) -> None:
        """A negative, boolean or non-integer after_seq, or after_seq for all jobs, is refused."""
        for bad in (-1, True, 1.5, "3"):
            self.assertRaises(ValueError, protocol.subscribe_frame, JOB, bad)
        self.assertRaises(ValueError, protocol.subscribe_frame, None, 3)

    def test_unsubscribe(self) -> None:
        """unsubscribe names one job, or all."""
        self.assertEqual(protocol.unsubscribe_frame(JOB), {"action": "unsubscribe", "job_id": JOB})
        self.assertEqual(protocol.unsubscribe_frame(), {"action": "unsubscribe", "job_id": "all"})

    def test_dumps(self) -> None:
        """Frames go out as compact JSON text."""
        self.assertEqual(protocol.dumps({"action": "subscribe", "job_id": "all"}),
                         '{"action":"subscribe","job_id":"all"}')


class ParseFrameTests(SynchronousTestCase):
    def test_job_events(self) -> None:
        """job_status and job_complete become JobEvents, from text, bytes or a dict."""
        status = parse_event(json.dumps(wire(3, "completed", progress=100)))
        self.assertEqual((status.seq, status.status, status.event), (3, "completed", "job_status"))
        complete = parse_event(json.dumps(wire(4, "completed", name="job_complete")).encode())
        self.assertEqual(complete.event, EVENT_JOB_COMPLETE)
        self.assertEqual(parse_frame(wire(1)), event(1))

    def test_unknown_members_ignored(self) -> None:
        """Members a reader does not know change nothing; the incarnation is read where sent."""
        self.assertEqual(parse_frame(wire(2, extra={"x": 1}, future="y")), event(2))
        self.assertEqual(parse_event(wire(2, incarnation="b7e1:3")).incarnation, "b7e1:3")
        resync = protocol.resync_frame(detail(), 5, "resync", T, incarnation="b7e1:4")
        resync["future"] = {"x": 1}
        parsed = parse_resync(resync)
        self.assertEqual((parsed.seq, parsed.incarnation), (5, "b7e1:4"))
        self.assertIsNone(parse_resync(protocol.resync_frame(detail(), 5, "r", T)).incarnation)

    def test_acks(self) -> None:
        """connected/subscribed/unsubscribed are Acks; the original stub's connected too."""
        for name in protocol.ACK_EVENTS:
            frame = parse_frame(protocol.ack_frame(name, JOB, "hello", T))
            self.assertEqual(frame, Ack(name, JOB, "hello"))
        stub = {"event": "connected", "ws_id": "x", "timestamp": T, "message": "ready",
                "polling_alternative": "Use GET /api/v1/jobs/{id}"}
        self.assertEqual(parse_frame(stub), Ack("connected", "", "ready"))
        self.assertRaises(ValueError, protocol.ack_frame, "error", "", "m", T)

    def test_error(self) -> None:
        """An error frame carries its code and message; old agents only had a status."""
        frame = protocol.error_frame(protocol.JOB_NOT_FOUND, "job x not found", T, JOB)
        self.assertEqual(frame["status"], "job_not_found")
        self.assertEqual(parse_frame(frame), StreamError("JOB_NOT_FOUND", "job x not found", JOB))
        old = {"event": "error", "job_id": "", "status": "invalid_message", "message": "bad"}
        self.assertEqual(parse_frame(old), StreamError("INVALID_MESSAGE", "bad", ""))
        bare = {"event": "error", "error": "only error"}
        self.assertEqual(parse_frame(bare), StreamError("UNKNOWN_ERROR", "only error", ""))

    def test_resync_keeps_its_snapshot_in_job(self) -> None:
        """A resync's snapshot is its job detail, at the frame's seq."""
        frame = protocol.resync_frame(detail("failed", seq=9, error="boom",
                                             error_code="PKG_MANAGER_ERROR"), 12, "gone", T)
        self.assertEqual((frame["error"], frame["error_code"]), ("boom", "PKG_MANAGER_ERROR"))
        resync = parse_resync(frame)
        self.assertIsInstance(resync, Resync)
        self.assertEqual((resync.job_id, resync.seq), (JOB, 12))
        self.assertEqual(resync.detail["logs"], ["a", "b"])
        snapshot = resync.snapshot
        self.assertEqual((snapshot.kind, snapshot.seq, snapshot.status, snapshot.error),
                         (KIND_SNAPSHOT, 12, "failed", "boom"))
        self.assertEqual(snapshot.output, "a\nb")

    def test_resync_without_job(self) -> None:
        """A resync without a job object is read from its own members; seq from either."""
        frame = {"event": "resync", "job_id": JOB, "status": "timedout", "progress": 7,
                 "message": "m", "seq": 4}
        resync = parse_resync(frame)
        self.assertEqual((resync.seq, resync.snapshot.status, resync.snapshot.progress),
                         (4, "timed_out", 7))
        nested = {"event": "resync", "job_id": JOB, "job": detail(seq=6)}
        self.assertEqual(parse_resync(nested).seq, 6)

    def test_unknown_frame(self) -> None:
        """A frame kind of a newer agent is UnknownFrame, not an error."""
        self.assertEqual(parse_frame({"event": "heartbeat", "job_id": JOB}),
                         UnknownFrame("heartbeat", JOB))

    def test_bad_frames(self) -> None:
        """Not JSON, not an object, no event, a broken job event or resync: ProtocolError."""
        for bad in ("not json", "[1]", b"\xff", {"job_id": JOB}, {"event": 3},
                    wire(0), wire(1, "exploded"), {"event": "job_status", "status": "running"},
                    {"event": "resync", "job_id": JOB, "job": {"progress": 1}},
                    {"event": "resync", "status": "running"}, "[" * 100000):
            self.assertRaises(ProtocolError, parse_frame, bad)


class SnapshotTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """A detail becomes a snapshot: old spellings read, logs joined, progress clamped."""
        snapshot = protocol.snapshot_event(JOB, detail("timedout", progress=140, seq=3))
        self.assertEqual((snapshot.status, snapshot.progress, snapshot.seq, snapshot.output),
                         ("timed_out", 100, 3, "a\nb"))
        self.assertEqual(snapshot.timestamp, T)

    def test_unnumbered(self) -> None:
        """An original agent's detail has no seq; bad seqs and progress are dropped."""
        snapshot = protocol.snapshot_event(JOB, detail(seq=None, progress="x", logs="no"))
        self.assertEqual((snapshot.seq, snapshot.progress, snapshot.output), (None, 0, None))
        self.assertIsNone(protocol.snapshot_event(JOB, detail(seq=True)).seq)
        self.assertEqual(protocol.snapshot_event(JOB, detail(seq=2), seq=8).seq, 8)

    def test_bad(self) -> None:
        """No detail or no readable status is a ProtocolError."""
        bad: Any
        for bad in (None, [], {"progress": 3}, {"status": "exploded"}):
            self.assertRaises(ProtocolError, protocol.snapshot_event, JOB, bad)


class AnswerTests(SynchronousTestCase):
    def test_success(self) -> None:
        """A success envelope gives its data."""
        parsed = answer(200, {"status": "healthy"})
        self.assertTrue(parsed.ok)
        self.assertEqual((parsed.data, parsed.request_id, parsed.code), ({"status": "healthy"},
                                                                          "r", None))

    def test_error(self) -> None:
        """An error envelope gives code, message, details and retryable."""
        parsed = answer(429, error={"code": "QUEUE_FULL", "message": "full",
                                    "details": {"max": 3}, "retryable": True})
        self.assertFalse(parsed.ok)
        self.assertEqual(parsed.error, protocol.ApiErrorInfo("QUEUE_FULL", "full", {"max": 3},
                                                             True))
        self.assertEqual(parsed.describe(), "QUEUE_FULL: full (HTTP 429)")

    def test_not_an_envelope(self) -> None:
        """An empty body or HTML is not an envelope; the answer says what it was."""
        empty = parse_answer(405, b"")
        self.assertEqual((empty.enveloped, empty.ok, empty.describe()),
                         (False, False, "HTTP 405 with no body"))
        html = parse_answer(502, b"<html>\n  Bad gateway </html>")
        self.assertEqual(html.describe(), "HTTP 502: <html> Bad gateway </html>")
        self.assertFalse(parse_answer(200, b'{"success": "yes"}').enveloped)
        self.assertFalse(parse_answer(200, b"\xff\xfe").enveloped)

    def test_inconsistent(self) -> None:
        """success false without an error, or an error status, is still an error."""
        body = json.dumps({"success": False, "data": None}).encode()
        self.assertEqual(parse_answer(500, body).describe(), "UNKNOWN_ERROR: HTTP 500 (HTTP 500)")
        odd = parse_answer(503, json.dumps({"success": True, "data": 1}).encode())
        self.assertFalse(odd.ok)
        self.assertEqual(odd.code, "UNKNOWN_ERROR")

    def test_paths(self) -> None:
        """The events and detail paths."""
        self.assertEqual(protocol.events_path(JOB, 4), f"/api/v1/jobs/{JOB}/events?after=4")
        self.assertEqual(protocol.job_path(JOB), f"/api/v1/jobs/{JOB}")


class EventsPageTests(SynchronousTestCase):
    def test_page(self) -> None:
        """Events of this job in seq order; another job's are dropped, bad ones listed."""
        data = {"events": [wire(3), wire(2), wire(9, job_id=OTHER), {"event": "job_status"}],
                "last_seq": 3, "status": "timedout", "terminal": True}
        parsed = parse_events_page(data, JOB)
        self.assertEqual([e.seq for e in parsed.events], [2, 3])
        self.assertEqual((parsed.last_seq, parsed.status, parsed.terminal),
                         (3, "timed_out", True))
        self.assertIsNone(parsed.incarnation)
        self.assertEqual(parse_events_page({"events": [], "incarnation": "b:1"}, JOB).incarnation,
                         "b:1")
        self.assertEqual(len(parsed.rejected), 1)

    def test_empty_and_odd(self) -> None:
        """last_seq 0 is kept, odd members are None/False."""
        parsed = parse_events_page({"events": [], "last_seq": 0, "status": "x",
                                    "terminal": "yes"}, JOB)
        self.assertEqual((parsed.last_seq, parsed.status, parsed.terminal), (0, None, False))
        self.assertIsNone(parse_events_page({"events": [], "last_seq": True}, JOB).last_seq)

    def test_bad(self) -> None:
        """No events list is a ProtocolError."""
        bad: Any
        for bad in (None, {}, {"events": {}}):
            self.assertRaises(ProtocolError, parse_events_page, bad, JOB)


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
