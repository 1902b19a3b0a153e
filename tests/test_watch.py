"""Tests for lpa.tools.watch: following a job over a stream then REST, and how it is shown."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa import protocol
from lpa.events import JobEvent
from lpa.follower import JobFollower
from lpa.tools.client import ClientError
from lpa.tools.stream import HandshakeFailed, StreamClosed
from lpa.tools.watch import ProgressPrinter, final_lines, follow_job, relevant_output
from tests.test_client import JOB, envelope, scripted

CLOSE = object()


def wire(seq: int, status: str = "running", progress: int = 0, message: str = "", *,
         name: str = "job_status", kind: str = "status", **extra: Any) -> dict[str, Any]:
    frame = {"event": name, "job_id": JOB, "seq": seq, "kind": kind, "status": status,
             "progress": progress, "message": message, "timestamp": "t"}
    frame.update(extra)
    return frame


def event(*args: Any, **kw: Any) -> JobEvent:
    return JobEvent.from_wire(wire(*args, **kw))


class FakeStream:
    """A JobStream reading ``frames`` (dicts, raw text, or CLOSE), recording what is sent."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = list(frames)
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def next_text(self) -> str:
        if not self.frames or self.frames[0] is CLOSE:
            raise StreamClosed("the agent closed the WebSocket (1008: slow consumer)")
        frame = self.frames.pop(0)
        return frame if isinstance(frame, str) else json.dumps(frame)

    def send(self, frame: dict[str, Any]) -> bool:
        self.sent.append(frame)
        return True

    def close(self) -> Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def completed(seq: int) -> list[dict[str, Any]]:
    return [wire(seq, "completed", 100, "Job finished"),
            wire(seq + 1, "completed", 100, "Job complete", name="job_complete")]


class FollowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.shown: list[JobEvent] = []
        self.notes: list[str] = []

    def follow(
        self, answers: dict[Any, Any], stream: Any = None, **kw: Any
    ) -> Deferred[JobFollower]:
        self.client, self.agent = scripted(answers, self.clock)

        async def open_stream() -> Any:
            if isinstance(stream, Exception):
                raise stream
            return stream

        return Deferred.fromCoroutine(follow_job(
            JOB, client=self.client, clock=self.clock,
            open_stream=None if stream is None else open_stream,
            show=self.shown.append, note=self.notes.append, interval=2, **kw))

    def test_stream_to_job_complete(self) -> None:
        """Over the WebSocket: subscribe from 0, each event once, stop at job_complete."""
        fake = FakeStream([protocol.ack_frame("connected", "", "hi", "t"),
                           protocol.ack_frame("subscribed", JOB, "ok", "t"),
                           wire(1, "pending"), wire(2, progress=50), wire(2, progress=50),
                           "not json", *completed(3), wire(5)])
        follower = self.successResultOf(self.follow({}, fake))
        self.assertEqual(fake.sent, [protocol.subscribe_frame(JOB, 0)])
        self.assertEqual([e.seq for e in self.shown], [1, 2, 3, 4])
        self.assertTrue(follower.done and fake.closed)
        self.assertEqual(self.notes, ["ignored a frame from the agent: frame is not JSON"])
        self.assertEqual(self.agent.requests, [])

    def test_handshake_failed_polls_events(self) -> None:
        """A failed handshake falls back to the events endpoint, from the last seq."""
        base = f"/api/v1/jobs/{JOB}/events?after="
        running = self.follow({
            ("GET", base + "0"): [(200, envelope({"events": [wire(1)], "last_seq": 1}))],
            ("GET", base + "1"): [(200, envelope({"events": completed(2), "last_seq": 3,
                                                  "terminal": True}))],
        }, HandshakeFailed("HTTP 404"))
        self.assertNoResult(running)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(running).done)
        self.assertEqual([e.seq for e in self.shown], [1, 2, 3])
        self.assertEqual(self.notes, ["WebSocket handshake failed (HTTP 404); polling instead"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stream_closed_resumes_by_polling(self) -> None:
        """A WebSocket closed mid-job is followed up by polling from the last seq seen."""
        fake = FakeStream([wire(1), wire(2), CLOSE])
        follower = self.successResultOf(self.follow({
            ("GET", f"/api/v1/jobs/{JOB}/events?after=2"): [
                (200, envelope({"events": completed(3), "last_seq": 4, "terminal": True}))]},
            fake))
        self.assertEqual(follower.last_seq, 4)
        self.assertIn("polling from seq 2", self.notes[0])

    def test_refused_subscription_polls(self) -> None:
        """An agent refusing the subscription (too many) is polled instead."""
        fake = FakeStream([protocol.error_frame("TOO_MANY_SUBSCRIPTIONS", "at most 1", "t", JOB)])
        self.successResultOf(self.follow({
            ("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [
                (200, envelope({"events": completed(1), "last_seq": 2, "terminal": True}))]},
            fake))
        self.assertIn("refused the subscription (TOO_MANY_SUBSCRIPTIONS: at most 1)",
                      self.notes[0])

    def test_original_agent(self) -> None:
        """No events endpoint (empty 405): the job detail is polled until it is terminal."""
        running = self.follow({
            ("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(405, b"")],
            ("GET", f"/api/v1/jobs/{JOB}"): [
                (200, envelope({"job_id": JOB, "status": "running", "progress": 10})),
                (200, envelope({"job_id": JOB, "status": "timedout", "error": "too long"}))],
        }, HandshakeFailed("no accept key"))
        self.assertEqual([e.status for e in self.shown], ["running"])
        self.clock.advance(2)
        self.assertEqual([e.status for e in self.shown], ["running", "timed_out"])
        self.assertTrue(self.successResultOf(running).done)

    def test_unknown_job(self) -> None:
        """JOB_NOT_FOUND ends the watch with an error, not a switch to snapshots."""
        running = self.follow({("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(404, envelope(
            error={"code": "JOB_NOT_FOUND", "message": "no such job"}))]})
        error = self.failureResultOf(running, ClientError).value
        self.assertEqual((error.code, str(error)),
                         ("JOB_NOT_FOUND", f"the agent does not know job {JOB} (JOB_NOT_FOUND)"))
        self.assertEqual(self.notes, ["polling over REST (--poll)"])

    def test_bad_request_is_fatal(self) -> None:
        """A 4xx the follower cannot use (an invalid id) is an error at once."""
        running = self.follow({("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [(400, envelope(
            error={"code": "INVALID_JOB_ID", "message": "job_id must be a UUID"}))]})
        self.assertIn("INVALID_JOB_ID", str(self.failureResultOf(running, ClientError).value))

    def test_busy_agent_retried(self) -> None:
        """429 and 5xx are retried after the interval."""
        running = self.follow({("GET", f"/api/v1/jobs/{JOB}/events?after=0"): [
            (429, envelope(error={"code": "RATE_LIMITED", "message": "slow down"})),
            (503, b"<html>busy</html>"),
            (200, envelope({"events": completed(1), "last_seq": 2, "terminal": True}))]})
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(running).done)
        self.assertEqual(len(self.notes), 3)

    def test_unreachable_gives_up(self) -> None:
        """Polling errors are retried until they last longer than the limit."""
        client, _ = scripted({}, self.clock)
        calls = []

        async def broken(method: str, path: str, body: Any = None) -> Any:
            calls.append(path)
            raise ClientError("cannot reach the agent at h:1: connection refused")

        self.patch(client, "answer", broken)
        running = Deferred.fromCoroutine(follow_job(
            JOB, client=client, clock=self.clock, open_stream=None, show=self.shown.append,
            note=self.notes.append, interval=2, unreachable_after=5))
        for _ in range(3):
            self.clock.advance(2)
        self.assertIn("connection refused", str(self.failureResultOf(running, ClientError).value))
        self.assertEqual(len(calls), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PrinterTests(SynchronousTestCase):
    def test_plain_lines(self) -> None:
        """Without a terminal each event is one line; terminal events are left to the end line."""
        out = io.StringIO()
        printer = ProgressPrinter(out, tty=False)
        for job_event in (event(1, progress=40, message="Unpacking curl"), event(2, "completed"),
                          event(3, "completed", name="job_complete")):
            printer.show(job_event)
        printer.finish([f"job {JOB} completed"])
        self.assertEqual(out.getvalue().splitlines(),
                         ["seq=1 running 40% [status] Unpacking curl", f"job {JOB} completed"])

    def test_bar(self) -> None:
        """On a terminal the line is a redrawn bar cut to the width; the end clears it."""
        out = io.StringIO()
        printer = ProgressPrinter(out, tty=True, columns=60, bar_width=10)
        printer.show(event(1, progress=50, message="x" * 100))
        self.assertTrue(out.getvalue().startswith("\r[#####-----]  50% running   x"))
        self.assertLessEqual(len(out.getvalue().split("\x1b")[0]) - 1, 60)
        printer.finish(["done"])
        self.assertTrue(out.getvalue().endswith("\r\x1b[Kdone\n"))

    def test_no_percentage(self) -> None:
        """A job that reports no percentage (a dry run) shows a moving marker and the line count,
        never a bar stuck at 0 %."""
        out = io.StringIO()
        printer = ProgressPrinter(out, tty=True, columns=80, bar_width=10)
        printer.show(event(1, kind="output", message="Inst a"))
        first = out.getvalue()
        printer.show(event(2, kind="output", message="Inst b"))
        second = out.getvalue()[len(first):]
        self.assertNotIn("0%", first + second)
        self.assertIn("1 lines", first)
        self.assertIn("2 lines", second)
        self.assertNotEqual(first.split("]")[0], second.split("]")[0])

    def test_json_lines(self) -> None:
        """With --json every event is one JSON object per line, and no final prose."""
        out = io.StringIO()
        printer = ProgressPrinter(out, json_lines=True)
        printer.show(event(1))
        printer.show(event(2, "completed", name="job_complete"))
        printer.finish(["job x completed"])
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["event"] for line in lines], ["job_status", "job_complete"])


class FinalLinesTests(SynchronousTestCase):
    def test_completed_dry_run_in_full(self) -> None:
        """A dry run's summary is printed whole, with DRY-RUN."""
        message = "Dry run: 37 package(s) would change; a reboot would be needed for " + "l" * 80
        lines = final_lines(JOB, event(9, "completed", 100, message), {"dry_run": True})
        self.assertEqual(lines, [f"job {JOB} completed (DRY-RUN): {message}"])

    def test_failure_reason(self) -> None:
        """A failure shows its error code, error and the package manager's explaining lines."""
        failed = event(7, "failed", 100, "Command failed", error="apt-get failed (exit 100)",
                       error_code="PKG_NOT_FOUND")
        detail = {"command_stderr": "WARNING: apt does not have a stable CLI\n"
                                    "E: Unable to locate package nosuchpkg\n",
                  "logs": ["Reading package lists...", "E: Unable to locate package nosuchpkg",
                           "Job failed: apt-get failed (exit 100)"]}
        self.assertEqual(final_lines(JOB, failed, detail), [
            f"job {JOB} failed: PKG_NOT_FOUND: apt-get failed (exit 100)",
            "  E: Unable to locate package nosuchpkg"])

    def test_relevant_output_fallbacks(self) -> None:
        """Without stderr the log is used, minus our own lines; without matches, the last ones."""
        detail = {"logs": ["one", "two", "Job failed: x", "Command failed (exit 1): y"]}
        self.assertEqual(relevant_output(detail), ["one", "two"])
        self.assertEqual(relevant_output({"command_stderr": "Error: no space\nok\n"}),
                         ["Error: no space"])
        self.assertEqual(relevant_output({}), [])

    def test_from_detail_only(self) -> None:
        """Without any event the detail says it all."""
        detail = {"status": "cancelled", "message": "Job cancelled"}
        self.assertEqual(final_lines(JOB, None, detail), [f"job {JOB} cancelled: Job cancelled"])
        self.assertEqual(final_lines(JOB, None, None), [f"job {JOB} unknown"])
