"""Tests for lpa.agent.ws_session: the job stream's protocol logic, without sockets."""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent import ws_session
from lpa.agent.eventlog import EventLog
from lpa.agent.ws_session import JobStreamSession
from lpa.events import (
    COMPLETED,
    KIND_OUTPUT,
    RUNNING,
    rfc3339_from_epoch,
)
from tests.fakes_jobs import FakeJobManager, RecordingChannel, new_job


def job_frames(frames: list[dict[str, Any]], job_id: str | None = None) -> list[tuple[int, str]]:
    """(seq, event) of the job events among ``frames``."""
    return [
        (f["seq"], f["event"])
        for f in frames
        if f["event"] in ("job_status", "job_complete") and job_id in (None, f["job_id"])
    ]


class SessionTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.events = EventLog(self.clock, max_events_per_job=20)
        self.jobs = FakeJobManager(self.clock, events=self.events)
        self.channel = RecordingChannel()
        self.session = self.make_session(self.channel)

    def make_session(self, channel: RecordingChannel, **kw: Any) -> JobStreamSession:
        session = JobStreamSession(
            self.events,
            self.jobs,
            channel,
            now=lambda: rfc3339_from_epoch(self.clock.seconds()),
            connection_id="c0ffee",
            **kw,
        )
        session.start()
        self.addCleanup(session.stop)
        return session

    def send(self, message: Any, session: JobStreamSession | None = None) -> None:
        (session or self.session).receive_text(
            message if isinstance(message, str) else json.dumps(message)
        )

    def error_of(self, message: Any) -> dict[str, Any]:
        """Send ``message``; assert it got exactly one error event and return it."""
        self.channel.take()
        self.send(message)
        frames = self.channel.take()
        self.assertEqual([f["event"] for f in frames], ["error"], frames)
        return frames[0]


class GreetingAndFilterTests(SessionTestBase):
    def test_connected_first(self) -> None:
        """A new session greets with one ``connected`` event in the original's shape."""
        [frame] = self.channel.take()
        self.assertEqual(
            frame,
            {
                "event": "connected",
                "job_id": "",
                "status": "connected",
                "progress": 0,
                "message": "WebSocket connected: c0ffee",
                "timestamp": rfc3339_from_epoch(1_800_000_000),
            },
        )

    def test_never_subscribed_gets_nothing(self) -> None:
        """A connection that never subscribes receives no job's events (no implicit all-jobs
        mode: the manager's relay, which never subscribes, must not see other jobs)."""
        self.channel.take()
        a, b = new_job(self.jobs), new_job(self.jobs)
        self.jobs.step(a, RUNNING, 5, "a runs")
        self.jobs.finish(b)
        self.assertEqual(self.channel.take(), [])

    def test_rejected_subscribe_subscribes_to_nothing(self) -> None:
        """After a subscribe refused with JOB_NOT_FOUND, INVALID_JOB_ID or
        TOO_MANY_SUBSCRIPTIONS, other jobs' events still do not arrive."""
        for message in (
            {"action": "subscribe", "job_id": str(uuid.uuid4())},
            {"action": "subscribe", "job_id": "not-a-uuid"},
            {"action": "subscribe", "after_seq": 1},
        ):
            self.send(message)
        codes = [f["error_code"] for f in self.channel.take() if f["event"] == "error"]
        self.assertEqual(codes, ["JOB_NOT_FOUND", "INVALID_JOB_ID", "INVALID_MESSAGE"])
        a = new_job(self.jobs)
        self.jobs.finish(a)
        self.assertEqual(self.channel.take(), [])

    def test_explicit_all_gets_every_job(self) -> None:
        """``subscribe`` without job_id, or with ``"all"``, asks for every job explicitly."""
        for message in ({"action": "subscribe"}, {"action": "subscribe", "job_id": "all"}):
            channel = RecordingChannel()
            session = JobStreamSession(
                self.events, self.jobs, channel, now=lambda: "t", connection_id="x"
            )
            session.start()
            self.addCleanup(session.stop)
            session.receive_text(json.dumps(message))
            channel.take()
            a, b = new_job(self.jobs), new_job(self.jobs)
            frames = channel.take()
            self.assertEqual({f["job_id"] for f in frames if f["event"] == "job_status"}, {a, b})

    def test_job_events_are_the_wire_objects(self) -> None:
        """A job event on the socket is exactly ``JobEvent.to_wire()`` from the EventLog."""
        self.send({"action": "subscribe"})
        job = new_job(self.jobs)
        self.jobs.step(job, RUNNING, 10, "apt-get", kind=KIND_OUTPUT)
        frames = [f for f in self.channel.take() if f["event"] == "job_status"]
        self.assertEqual(frames, [e.to_wire() for e in self.events.kept(job)])

    def test_subscription_filters(self) -> None:
        """After subscribing to one job, other jobs' events no longer arrive."""
        a, b = new_job(self.jobs), new_job(self.jobs)
        self.send({"action": "subscribe", "job_id": a})
        self.channel.take()
        self.jobs.step(a, RUNNING, 5, "a runs")
        self.jobs.step(b, RUNNING, 5, "b runs")
        self.jobs.finish(b)
        self.jobs.finish(a)
        frames = self.channel.take()
        self.assertEqual({f["job_id"] for f in frames}, {a})
        self.assertEqual(
            job_frames(frames), [(2, "job_status"), (3, "job_status"), (4, "job_complete")]
        )

    def test_subscribe_ack(self) -> None:
        """``subscribed`` names the job, or ``all`` without a job_id."""
        a = new_job(self.jobs)
        self.channel.take()
        self.send({"action": "subscribe", "job_id": a})
        self.send({"action": "subscribe"})
        acks = self.channel.take()
        self.assertEqual([(f["event"], f["job_id"], f["status"]) for f in acks],
                         [("subscribed", a, "subscribed"), ("subscribed", "all", "subscribed")])
        self.assertEqual(acks[1]["message"], "Subscribed to all job events")

    def test_subscribe_all_after_filter(self) -> None:
        """``subscribe`` without job_id after a job subscription delivers every job again."""
        a = new_job(self.jobs)
        self.send({"action": "subscribe", "job_id": a})
        self.send({"action": "subscribe"})
        self.channel.take()
        b = new_job(self.jobs)
        self.assertEqual(job_frames(self.channel.take(), b), [(1, "job_status")])

    def test_unsubscribe_stops_job(self) -> None:
        """Unsubscribing from the only subscribed job stops its events."""
        a = new_job(self.jobs)
        self.send({"action": "subscribe", "job_id": a})
        self.send({"action": "unsubscribe", "job_id": a})
        self.assertEqual(self.channel.take()[-1]["event"], "unsubscribed")
        self.jobs.step(a, RUNNING, 5, "runs")
        new_job(self.jobs)
        self.assertEqual(self.channel.take(), [])

    def test_unsubscribe_in_all_mode_excludes_job(self) -> None:
        """In the all-jobs mode, unsubscribing one job stops that job only."""
        a, b = new_job(self.jobs), new_job(self.jobs)
        self.send({"action": "subscribe"})
        self.send({"action": "unsubscribe", "job_id": a})
        self.channel.take()
        self.jobs.step(a, RUNNING, 5, "a runs")
        self.jobs.step(b, RUNNING, 5, "b runs")
        self.assertEqual({f["job_id"] for f in self.channel.take()}, {b})

    def test_unsubscribe_all(self) -> None:
        """``unsubscribe`` without job_id stops everything, the all-jobs mode included."""
        a = new_job(self.jobs)
        self.send({"action": "subscribe"})
        self.send({"action": "subscribe", "job_id": a})
        self.send({"action": "unsubscribe"})
        self.assertEqual(self.channel.take()[-1]["job_id"], "all")
        self.jobs.step(a, RUNNING, 5, "runs")
        new_job(self.jobs)
        self.assertEqual(self.channel.take(), [])

    def test_subscription_count(self) -> None:
        """``subscription_count`` (the agent's ws_subscriptions gauge) counts each job subscribed
        once, the all-jobs mode as one, and nothing refused; unsubscribing takes them away."""
        a, b = new_job(self.jobs), new_job(self.jobs)
        counts = [self.session.subscription_count]
        for message in (
            {"action": "subscribe", "job_id": a},
            {"action": "subscribe", "job_id": b},
            {"action": "subscribe", "job_id": a, "after_seq": 0},  # again: still one
            {"action": "subscribe", "job_id": str(uuid.uuid4())},  # JOB_NOT_FOUND
            {"action": "subscribe"},
            {"action": "subscribe", "job_id": "all"},  # already in all-jobs mode
            {"action": "unsubscribe", "job_id": a},
            {"action": "unsubscribe"},
        ):
            self.send(message)
            counts.append(self.session.subscription_count)
        self.assertEqual(counts, [0, 1, 2, 2, 2, 3, 3, 2, 0])


class ReplayTests(SessionTestBase):
    def running_job(self, steps: int = 4) -> str:
        job = new_job(self.jobs)
        for i in range(1, steps):
            self.jobs.step(job, RUNNING, i * 10, f"step {i}")
        return job

    def test_after_seq_zero_replays_then_live(self) -> None:
        """after_seq 0 replays every kept event, then continues live, no gap, no duplicate."""
        job = self.running_job()
        other_channel = RecordingChannel()
        other = self.make_session(other_channel)
        self.send({"action": "subscribe", "job_id": job}, other)
        other_channel.take()
        self.jobs.step(job, RUNNING, 50, "live")
        self.jobs.finish(job)
        self.assertEqual(
            job_frames(other_channel.take()),
            [(5, "job_status"), (6, "job_status"), (7, "job_complete")],
        )
        late = RecordingChannel()
        session = self.make_session(late)
        self.send({"action": "subscribe", "job_id": job, "after_seq": 0}, session)
        frames = late.take()
        self.assertEqual(frames[1]["event"], "subscribed")
        self.assertEqual(
            job_frames(frames), [(n, "job_status") for n in range(1, 7)] + [(7, "job_complete")]
        )

    def test_after_seq_middle_returns_rest(self) -> None:
        """after_seq N returns exactly the events after N."""
        job = self.running_job(6)
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job, "after_seq": 3})
        self.assertEqual(
            job_frames(self.channel.take()),
            [(4, "job_status"), (5, "job_status"), (6, "job_status")],
        )
        self.jobs.step(job, RUNNING, 70, "live")
        self.assertEqual(job_frames(self.channel.take()), [(7, "job_status")])

    def test_replay_racing_live_events(self) -> None:
        """Events the job emits while the replay is being written come once, after it, in order."""
        job = self.running_job(3)
        emitted: list[int] = []

        def emit_during_replay(frame: dict[str, Any]) -> None:
            if frame.get("seq") in (1, 2) and len(emitted) < 2:
                emitted.append(frame["seq"])
                self.jobs.step(job, RUNNING, 60 + len(emitted), "during replay")

        self.channel.take()
        self.channel.on_send = emit_during_replay
        self.send({"action": "subscribe", "job_id": job, "after_seq": 0})
        self.jobs.finish(job)
        self.assertEqual(
            job_frames(self.channel.take()),
            [(n, "job_status") for n in range(1, 7)] + [(7, "job_complete")],
        )

    def test_replay_while_paused_keeps_order(self) -> None:
        """With the transport paused, replay and live events queue and flush in seq order."""
        job = self.running_job(3)
        self.channel.take()
        self.session.pause_sending()
        self.send({"action": "subscribe", "job_id": job, "after_seq": 1})
        self.jobs.step(job, RUNNING, 90, "live while paused")
        self.assertEqual(self.channel.take(), [])
        self.assertEqual(self.session.queued, 4)
        self.session.resume_sending()
        self.assertEqual(
            job_frames(self.channel.take()),
            [(2, "job_status"), (3, "job_status"), (4, "job_status")],
        )

    def test_expired_after_seq_resyncs(self) -> None:
        """after_seq older than what is kept gets a ``resync`` with the snapshot, then live."""
        job = self.running_job(30)  # 20 kept: seq 11..30
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job, "after_seq": 3})
        frames = self.channel.take()
        self.assertEqual([f["event"] for f in frames], ["subscribed", "resync"])
        resync = frames[1]
        self.assertEqual((resync["job_id"], resync["seq"], resync["status"]), (job, 30, RUNNING))
        self.assertEqual(resync["job"], self.jobs.get(job).to_detail())
        self.assertIn("oldest kept: 11", resync["message"])
        self.jobs.step(job, RUNNING, 99, "live")
        self.assertEqual(job_frames(self.channel.take()), [(31, "job_status")])

    def test_after_seq_ahead_resyncs(self) -> None:
        """after_seq beyond the job's last event gets a ``resync`` rather than silence."""
        job = self.running_job(2)
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job, "after_seq": 9})
        self.assertEqual([f["event"] for f in self.channel.take()], ["subscribed", "resync"])

    def test_finished_job_with_after_seq_ends_with_complete(self) -> None:
        """Replaying a finished job ends with its single job_complete."""
        job = self.running_job(2)
        self.jobs.finish(job)
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job, "after_seq": 2})
        self.assertEqual(job_frames(self.channel.take()), [(3, "job_status"), (4, "job_complete")])

    def test_finished_job_without_after_seq(self) -> None:
        """Subscribing to a finished job sends its terminal job_status and job_complete at once."""
        job = self.running_job(2)
        self.jobs.finish(job, "failed")
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job})
        frames = self.channel.take()
        self.assertEqual(job_frames(frames), [(3, "job_status"), (4, "job_complete")])
        self.assertEqual(frames[-1]["status"], "failed")

    def test_finished_job_expired_gives_snapshot(self) -> None:
        """A finished job whose closing events are gone gets a terminal ``resync`` snapshot."""
        job = self.running_job(2)
        self.jobs.finish(job)
        self.events.restore(job, [], last_seq=4)
        self.channel.take()
        self.send({"action": "subscribe", "job_id": job})
        frames = self.channel.take()
        self.assertEqual([f["event"] for f in frames], ["subscribed", "resync"])
        self.assertEqual(frames[1]["status"], COMPLETED)


class BadInputTests(SessionTestBase):
    def test_not_json(self) -> None:
        """Non-JSON gets INVALID_JSON in the original's error shape."""
        error = self.error_of("{nope")
        self.assertEqual(
            (error["job_id"], error["status"], error["error_code"]),
            ("", "invalid_json", "INVALID_JSON"),
        )
        self.assertTrue(error["message"].startswith("Invalid message"))
        self.assertEqual(error["error"], error["message"])

    def test_deeply_nested_json(self) -> None:
        """JSON nested past the parser's depth is bad input, not an internal fault."""
        self.assertEqual(self.error_of("[" * 60000)["error_code"], "INVALID_JSON")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_not_an_object(self) -> None:
        """A JSON value that is not an object gets INVALID_MESSAGE."""
        self.assertEqual(self.error_of("[1, 2]")["error_code"], "INVALID_MESSAGE")

    def test_missing_action(self) -> None:
        """An object without a string action gets INVALID_MESSAGE."""
        self.assertEqual(self.error_of({"job_id": "x"})["error_code"], "INVALID_MESSAGE")

    def test_unknown_action(self) -> None:
        """An unknown action gets UNKNOWN_ACTION."""
        self.assertEqual(self.error_of({"action": "ping"})["error_code"], "UNKNOWN_ACTION")

    def test_job_id_not_uuid(self) -> None:
        """A job id that is not a UUID gets INVALID_JOB_ID naming it, and changes nothing."""
        error = self.error_of({"action": "subscribe", "job_id": "../etc"})
        self.assertEqual((error["error_code"], error["job_id"]), ("INVALID_JOB_ID", "../etc"))
        new_job(self.jobs)  # subscribed to nothing
        self.assertEqual(job_frames(self.channel.take()), [])

    def test_job_id_wrong_type(self) -> None:
        """A job id that is not a string gets INVALID_JOB_ID with an empty job_id."""
        error = self.error_of({"action": "unsubscribe", "job_id": 7})
        self.assertEqual((error["error_code"], error["job_id"]), ("INVALID_JOB_ID", ""))

    def test_unknown_job(self) -> None:
        """A well-formed id of no job gets JOB_NOT_FOUND."""
        missing = str(uuid.uuid4())
        error = self.error_of({"action": "subscribe", "job_id": missing})
        self.assertEqual((error["error_code"], error["job_id"]), ("JOB_NOT_FOUND", missing))

    def test_bad_after_seq(self) -> None:
        """after_seq must be a non-negative integer and needs a job_id."""
        job = new_job(self.jobs)
        for after in (-1, "3", True, 1.5):
            error = self.error_of({"action": "subscribe", "job_id": job, "after_seq": after})
            self.assertEqual(error["error_code"], "INVALID_MESSAGE")
        error = self.error_of({"action": "subscribe", "after_seq": 0})
        self.assertEqual(error["error_code"], "INVALID_MESSAGE")

    def test_internal_fault_gets_error_and_session_survives(self) -> None:
        """A fault of the job manager is logged, answered with INTERNAL_ERROR, and survived."""

        def broken(job_id: str) -> None:
            raise RuntimeError("store on fire")

        self.patch(self.jobs, "get", broken)
        error = self.error_of({"action": "subscribe", "job_id": str(uuid.uuid4())})
        self.assertEqual(error["error_code"], "INTERNAL_ERROR")
        self.assertNotIn("fire", error["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.send({"action": "subscribe"})
        new_job(self.jobs)
        self.assertEqual(len(job_frames(self.channel.take())), 1)

    def test_binary(self) -> None:
        """A binary frame gets BINARY_NOT_SUPPORTED and the session keeps working."""
        self.channel.take()
        self.session.receive_binary()
        [error] = self.channel.take()
        self.assertEqual(error["error_code"], "BINARY_NOT_SUPPORTED")
        self.send({"action": "subscribe"})
        self.channel.take()
        new_job(self.jobs)
        self.assertEqual(len(self.channel.take()), 1)

    def test_too_many_subscriptions(self) -> None:
        """Past max_subscriptions a subscribe gets TOO_MANY_SUBSCRIPTIONS; existing ones stay."""
        channel = RecordingChannel()
        session = self.make_session(channel, max_subscriptions=2)
        a, b, c = (new_job(self.jobs) for _ in range(3))
        for job in (a, b, c):
            self.send({"action": "subscribe", "job_id": job}, session)
        self.send({"action": "subscribe", "job_id": a, "after_seq": 1}, session)  # re-subscribe ok
        frames = [f for f in channel.take() if f["event"] in ("subscribed", "error")]
        self.assertEqual(
            [(f["event"], f["job_id"]) for f in frames],
            [("subscribed", a), ("subscribed", b), ("error", c), ("subscribed", a)],
        )
        self.assertEqual(frames[2]["error_code"], "TOO_MANY_SUBSCRIPTIONS")
        self.jobs.step(c, RUNNING, 1, "c")
        self.jobs.step(b, RUNNING, 1, "b")
        self.assertEqual({f["job_id"] for f in channel.take()}, {b})


class SlowConsumerTests(SessionTestBase):
    def test_paused_queue_is_bounded_and_closes_with_reason(self) -> None:
        """Past send_buffer_events unsent frames the session closes with 1008 and a reason."""
        channel = RecordingChannel()
        session = self.make_session(channel, send_buffer_events=5)
        self.send({"action": "subscribe"}, session)
        channel.take()
        session.pause_sending()
        job = new_job(self.jobs)
        for i in range(4):
            self.jobs.step(job, RUNNING, i, "x")
        self.assertEqual((session.queued, channel.closed_with), (5, None))
        self.jobs.step(job, RUNNING, 9, "one too many")
        assert channel.closed_with is not None
        code, reason = channel.closed_with
        self.assertEqual(code, ws_session.CLOSE_SLOW_CONSUMER)
        self.assertIn("slow consumer", reason)
        self.assertIn("after_seq", reason)
        self.assertEqual(session.queued, 0)
        session.resume_sending()
        self.assertEqual(channel.frames, [])
        self.assertNotIn(session._subscription, self.events._subscriptions)

    def test_slow_consumer_does_not_hold_back_others(self) -> None:
        """A paused, overflowing session neither blocks the EventLog nor other sessions."""
        slow_channel = RecordingChannel()
        slow = self.make_session(slow_channel, send_buffer_events=3)
        for session in (slow, self.session):
            self.send({"action": "subscribe"}, session)
        slow.pause_sending()
        self.channel.take()
        job = new_job(self.jobs)
        for i in range(10):
            self.jobs.step(job, RUNNING, i, "x")
        self.assertEqual(len(job_frames(self.channel.take())), 11)
        self.assertIsNotNone(slow_channel.closed_with)
        self.assertEqual(self.events.last_seq(job), 11)

    def test_resume_flushes_in_order(self) -> None:
        """Frames queued while paused are written in order on resume."""
        self.send({"action": "subscribe"})
        self.channel.take()
        self.session.pause_sending()
        job = new_job(self.jobs)
        self.jobs.step(job, RUNNING, 1, "x")
        self.session.resume_sending()
        self.assertEqual(job_frames(self.channel.take()), [(1, "job_status"), (2, "job_status")])

    def test_stopped_session_ignores_everything(self) -> None:
        """After stop nothing is sent and input is ignored."""
        self.session.stop()
        self.channel.take()
        new_job(self.jobs)
        self.send("{garbage")
        self.session.receive_binary()
        self.assertEqual(self.channel.frames, [])
