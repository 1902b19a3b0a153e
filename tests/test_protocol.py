"""Tests for lpa.protocol: frames, the envelope and the events page (followers: test_follower)."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lpa import protocol
from lpa.events import EVENT_JOB_COMPLETE, KIND_SNAPSHOT, JobEvent
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
