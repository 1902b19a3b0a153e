"""AgentLink: one WebSocket per agent, routing by job id, resume from seq, polling and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from lpa.events import EVENT_JOB_COMPLETE, JobEvent
from lpa.follower import PollOutcome
from lpa.protocol import snapshot_event
from lpa.relay.backoff import Backoff
from lpa.relay.interfaces import AgentAddress, IRelayStore
from lpa.relay.machine import CONNECTING, POLLING, STOPPED, STREAMING, AgentLink
from lpa.relay.poller import AgentPoller, IAgentPoller, IPollTarget
from lpa.relay.store import PostgresRelayStore
from lpa.relay.ws_client import AgentWebSocket, IAgentWebSocket, IWebSocketListener
from tests.fakes_relay import FakeRelayStore

ADDRESS = AgentAddress("agent1.example", 12443)
A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
OTHER = "cccccccc-cccc-4ccc-8ccc-cccccccccccc"


def wire(
    job_id: str, seq: int, status: str = "running", event: str = "job_status", **extra: Any
) -> dict[str, Any]:
    return JobEvent(
        job_id=job_id,
        seq=seq,
        status=status,
        progress=0,
        message=f"{job_id[:1]}{seq}",
        timestamp="t",
        event=event,
        **extra,
    ).to_wire()


@implementer(IAgentWebSocket)
class FakeWebSocket:
    """The handle a dial returns: records frames; ``open`` says whether sends go through."""

    def __init__(self, address: AgentAddress, listener: Any) -> None:
        self.address = address
        self.listener = listener
        self.sent: list[dict[str, Any]] = []
        self.open = False
        self.stopped = False

    def send_json(self, message: dict[str, Any]) -> bool:
        if self.open:
            self.sent.append(message)
        return self.open

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def opened(self) -> None:
        self.open = True
        self.listener.ws_opened()

    def failed(self, handshake: bool = True) -> None:
        self.open = False
        self.listener.ws_failed("refused", handshake)


@implementer(IAgentPoller)
class FakePoller:
    def __init__(self, address: AgentAddress, target: Any, backstop: bool = False) -> None:
        self.target = target
        self.backstop = backstop
        self.now: bool | None = None
        self.running = False
        self.starts = 0
        self.soon = 0

    def start(self, now: bool = True) -> None:
        self.running = True
        self.now = now
        self.starts += 1

    def stop(self) -> None:
        self.running = False

    def poll_soon(self) -> None:
        self.soon += 1


class LinkFixture(SynchronousTestCase):
    """A link to ADDRESS following rows ra (job A, from seq 3) and rb (job B); no tests here."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeRelayStore()
        self.row_a = self.store.add_host_job(
            row_id="ra", job_id="j1", host_id="h1", agent_job_id=A, agent=ADDRESS, last_seq=3
        )
        self.row_b = self.store.add_host_job(
            row_id="rb", job_id="j2", host_id="h1", agent_job_id=B, agent=ADDRESS
        )
        self.dials: list[FakeWebSocket] = []
        self.pollers: list[FakePoller] = []

        def dial(address: AgentAddress, listener: Any) -> FakeWebSocket:
            ws = FakeWebSocket(address, listener)
            self.dials.append(ws)
            return ws

        def make_poller(address: AgentAddress, target: Any, backstop: bool = False) -> FakePoller:
            poller = FakePoller(address, target, backstop)
            self.pollers.append(poller)
            return poller

        self.link = AgentLink(
            ADDRESS,
            store=self.store,
            clock=self.clock,
            dial=dial,
            make_poller=make_poller,
            make_backoff=lambda: Backoff(1, 8, jitter=lambda: 1.0),
            max_queued_events=5,
            missing_deadline=100,
        )
        self.link.start([self.row_a, self.row_b])
        self.ws = self.dials[0]

    def applied(self) -> list[tuple[str, list[int | None], str | None]]:
        return [
            (c.host_job.row_id, [e.seq for e in c.events], c.transport)
            for c in self.store.calls
            if c.method == "apply_events" and c.host_job is not None
        ]


class LinkTests(LinkFixture):

    def test_fakes_match_interface(self) -> None:
        """Fakes and real classes provide the same interfaces (store, socket, poller, link)."""
        verifyObject(IRelayStore, self.store)
        verifyClass(IRelayStore, PostgresRelayStore)
        verifyObject(IAgentWebSocket, self.ws)
        verifyClass(IAgentWebSocket, AgentWebSocket)
        verifyObject(IAgentPoller, FakePoller(ADDRESS, self.link))
        verifyClass(IAgentPoller, AgentPoller)
        verifyObject(IWebSocketListener, self.link)
        verifyObject(IPollTarget, self.link)

    def test_one_socket_subscribes_each_job_from_last_seq(self) -> None:
        """One dial per agent; on open one subscribe per job, after_seq = the row's last_seq."""
        self.assertEqual((len(self.dials), self.link.state), (1, CONNECTING))
        self.ws.opened()
        self.assertEqual(self.link.state, STREAMING)
        self.assertEqual(
            self.ws.sent,
            [
                {"action": "subscribe", "job_id": A, "after_seq": 3},
                {"action": "subscribe", "job_id": B, "after_seq": 0},
            ],
        )

    def test_routing_by_job_id(self) -> None:
        """Each event reaches only the row of its job; another job's event never touches a row."""
        self.ws.opened()
        self.link.ws_message(wire(A, 4))
        self.link.ws_message(wire(B, 1, "completed"))
        self.link.ws_message(wire(OTHER, 7, "completed"))
        self.assertEqual(self.applied(), [("ra", [4], "ws"), ("rb", [1], "ws")])
        self.assertEqual(self.store.rows["ra"].status, "running")
        self.assertEqual(self.store.rows["ra"].last_seq, 4)

    def test_duplicates_and_old_seqs_skipped(self) -> None:
        """Replayed events at or below the resume point are not sent to the store again."""
        self.ws.opened()
        self.link.ws_message(wire(A, 3))
        self.link.ws_message(wire(A, 4))
        self.link.ws_message(wire(A, 4))
        self.assertEqual(self.applied(), [("ra", [4], "ws")])

    def test_terminal_unsubscribes_and_forgets(self) -> None:
        """job_complete/terminal status ends the job: applied, unsubscribed, no longer followed."""
        self.ws.opened()
        self.link.ws_message(wire(A, 4, "completed"))
        self.link.ws_message(wire(A, 5, "completed", event=EVENT_JOB_COMPLETE))
        self.assertEqual(self.store.rows["ra"].status, "succeeded")
        self.assertIn({"action": "unsubscribe", "job_id": A}, self.ws.sent)
        self.assertEqual([h.row_id for h in self.link.host_jobs], ["rb"])
        self.assertEqual(self.applied(), [("ra", [4], "ws")])

    def test_events_batched_while_store_busy(self) -> None:
        """Per job one store call at a time; events arriving meanwhile go in the next call."""
        self.ws.opened()
        self.store.hold()
        self.link.ws_message(wire(A, 4))
        self.link.ws_message(wire(A, 5))
        self.link.ws_message(wire(A, 6))
        self.assertEqual(self.applied(), [("ra", [4], "ws")])
        self.store.release()
        self.assertEqual(self.applied(), [("ra", [4], "ws"), ("ra", [5, 6], "ws")])
        self.assertEqual(self.store.rows["ra"].last_seq, 6)

    def test_store_failure_pauses_and_retries(self) -> None:
        """A failing store keeps the events and retries them later, in order, with backoff."""
        self.ws.opened()
        self.store.error = RuntimeError("database down")
        self.link.ws_message(wire(A, 4))
        self.link.ws_message(wire(A, 5))
        self.assertEqual(self.store.rows["ra"].last_seq, 3)
        self.clock.advance(1)  # retry fails again; the next waits 2
        self.store.error = None
        self.clock.advance(1)
        self.assertEqual(self.store.rows["ra"].last_seq, 3)
        self.clock.advance(1)
        self.assertEqual(self.store.rows["ra"].last_seq, 5)
        self.assertEqual(self.applied()[-1], ("ra", [4, 5], "ws"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_overflow_resubscribes_from_applied(self) -> None:
        """Past the bound the queue is dropped and resubscribed from the applied seq: no loss."""
        self.ws.opened()
        self.store.error = RuntimeError("database down")
        for seq in range(4, 11):
            self.link.ws_message(wire(A, seq))
        self.link.ws_message(wire(A, 11))  # ignored until resubscribed
        self.store.error = None
        self.ws.sent.clear()
        self.clock.advance(1)
        self.assertEqual(
            self.ws.sent,
            [
                {"action": "unsubscribe", "job_id": A},
                {"action": "subscribe", "job_id": A, "after_seq": 3},
            ],
        )
        for seq in range(4, 12):
            self.link.ws_message(wire(A, seq))
        self.assertEqual(self.store.rows["ra"].last_seq, 11)

    def test_resync_applies_snapshot(self) -> None:
        """A resync frame is applied as a snapshot with the job's detail."""
        self.ws.opened()
        self.link.ws_message(
            {
                "event": "resync",
                "job_id": A,
                "seq": 20,
                "kind": "snapshot",
                "status": "running",
                "job": {
                    "job_id": A,
                    "status": "failed",
                    "progress": 50,
                    "message": "x",
                    "logs": ["l1"],
                    "error": "boom",
                    "seq": 20,
                },
            }
        )
        row = self.store.rows["ra"]
        self.assertEqual(
            (row.status, row.last_seq, row.error_message, row.output), ("failed", 20, "boom", "l1")
        )

    def test_handshake_failure_polls_then_back_to_ws(self) -> None:
        """A failed handshake polls; when the socket opens the poller stops, jobs resubscribe."""
        self.ws.failed(handshake=True)
        self.assertEqual((self.link.state, self.pollers[0].running), (POLLING, True))
        self.assertEqual(self.link.poll_jobs(), [(self.row_a, 3), (self.row_b, 0)])
        self.link.poll_answer(self.row_a, PollOutcome(events=(JobEvent.from_wire(wire(A, 4)),)))
        self.assertEqual(self.applied(), [("ra", [4], "poll")])
        self.ws.failed(handshake=True)  # background retry fails again: same poller
        self.assertEqual(len(self.pollers), 1)
        self.ws.opened()
        self.assertEqual((self.link.state, self.pollers[0].running), (STREAMING, False))
        self.assertEqual(self.ws.sent[0], {"action": "subscribe", "job_id": A, "after_seq": 4})
        backstop = self.pollers[1]
        self.assertEqual((backstop.backstop, backstop.running, backstop.now), (True, True, False))

    def test_backstop_sweep_while_streaming(self) -> None:
        """Streaming runs a slow backstop sweep (not at once); what it finds missing is applied."""
        self.ws.opened()
        [backstop] = self.pollers
        self.assertEqual((backstop.backstop, backstop.now), (True, False))
        self.link.ws_message(wire(A, 4))
        self.assertEqual(self.link.poll_jobs()[0], (self.row_a, 4))
        self.link.poll_answer(self.row_a, PollOutcome(events=(JobEvent.from_wire(wire(A, 5)),)))
        self.link.ws_message(wire(A, 5))  # the stream's copy arrives late: not applied twice
        self.assertEqual(self.applied(), [("ra", [4], "ws"), ("ra", [5], "poll")])
        self.ws.opened()  # a reconnect keeps the one sweep
        self.assertEqual(len(self.pollers), 1)

    def test_open_socket_dropped_reconnects_first(self) -> None:
        """A dropped open socket means reconnecting, not polling; a failed redial then polls."""
        self.ws.opened()
        self.ws.failed(handshake=False)
        self.assertEqual(
            (self.link.state, [p.backstop for p in self.pollers]), (CONNECTING, [True])
        )
        self.ws.failed(handshake=True)
        self.assertEqual(self.link.state, POLLING)
        self.assertEqual(
            [(p.backstop, p.running) for p in self.pollers], [(True, False), (False, True)]
        )

    def test_poll_give_up_fails_row(self) -> None:
        """A job the poller gives up on ends failed with the reason and is forgotten."""
        self.ws.failed()
        self.link.poll_give_up(self.row_b, "agent unreachable for 900s")
        self.assertEqual(self.store.rows["rb"].status, "failed")
        self.assertEqual(self.store.rows["rb"].error_message, "agent unreachable for 900s")
        self.assertEqual([h.row_id for h in self.link.host_jobs], ["ra"])

    def test_ws_job_not_found(self) -> None:
        """The agent's JOB_NOT_FOUND for a subscription ends that job failed after the deadline."""
        self.ws.opened()
        self.link.ws_message(
            {
                "event": "error",
                "job_id": B,
                "status": "job_not_found",
                "error_code": "JOB_NOT_FOUND",
                "message": "nope",
            }
        )
        self.assertEqual(self.store.rows["rb"].status, "running")
        self.clock.advance(100)
        self.assertEqual(self.store.rows["rb"].status, "failed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_frames_ignored(self) -> None:
        """Malformed events are logged and ignored; the link keeps working."""
        self.ws.opened()
        self.link.ws_message({"event": "job_status", "job_id": A, "seq": "x", "status": "running"})
        self.link.ws_message({"event": "subscribed", "job_id": A})
        self.link.ws_message(wire(A, 4))
        self.assertEqual(self.applied(), [("ra", [4], "ws")])

    def test_update_adds_and_removes(self) -> None:
        """The scan's new rows are subscribed; rows no longer running are unsubscribed."""
        self.ws.opened()
        self.ws.sent.clear()
        row_c = self.store.add_host_job(
            row_id="rc", job_id="j3", host_id="h1", agent_job_id=OTHER, agent=ADDRESS, last_seq=9
        )
        self.link.update([self.row_a, row_c])
        self.assertEqual(
            self.ws.sent,
            [
                {"action": "unsubscribe", "job_id": B},
                {"action": "subscribe", "job_id": OTHER, "after_seq": 9},
            ],
        )

    def test_stop_flushes(self) -> None:
        """stop() closes the socket, stops the poller, and hands queued events to the store."""
        self.ws.failed()
        self.store.error = RuntimeError("down")
        self.link.poll_answer(self.row_a, PollOutcome(events=(JobEvent.from_wire(wire(A, 4)),)))
        self.store.error = None
        self.successResultOf(self.link.stop())
        self.assertEqual(
            (self.link.state, self.ws.stopped, self.pollers[0].running), (STOPPED, True, False)
        )
        self.assertEqual(self.store.rows["ra"].last_seq, 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.link.ws_failed("late", True)
        self.assertEqual(len(self.pollers), 1)

    def test_stop_does_not_wait_for_a_hung_store(self) -> None:
        """stop() fires once the socket closed, even while a store call hangs."""
        self.ws.opened()
        self.store.hold()
        self.link.ws_message(wire(A, 4))
        self.successResultOf(self.link.stop())
        self.store.release()
        self.assertEqual(self.store.rows["ra"].last_seq, 4)


def resync(
    job_id: str, seq: int, status: str, incarnation: str | None = None, **job: Any
) -> dict[str, Any]:
    """A ``resync`` frame as an lpa agent sends it (the job detail in ``job``)."""
    frame: dict[str, Any] = {
        "event": "resync",
        "job_id": job_id,
        "seq": seq,
        "kind": "snapshot",
        "status": status,
        "job": {"job_id": job_id, "status": status, "progress": 0, "seq": seq, **job},
    }
    if incarnation is not None:
        frame["incarnation"] = incarnation
    return frame


def warnings(logged: Sequence[LogEvent]) -> list[str]:
    """The text of every warn-level event captured."""
    return [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn]


class RenumberTests(LinkFixture):
    """An agent that lost or renumbered events: its final state still ends the row."""

    def stream_a_to(self, seq: int, incarnation: str = "inc-1") -> None:
        self.ws.opened()
        for n in range(4, seq + 1):
            self.link.ws_message(dict(wire(A, n), incarnation=incarnation))
        self.assertEqual(self.store.rows["ra"].last_seq, seq)

    def test_terminal_resync_below_applied_wins(self) -> None:
        """A terminal resync numbered below the applied seq ends the row, with one warning."""
        self.stream_a_to(53)
        self.ws.failed(handshake=False)
        self.ws.opened()
        with capturedLogs() as logged:
            self.link.ws_message(
                resync(A, 4, "failed", "inc-2", error="Agent process restart",
                       error_code="AGENT_RESTARTED")
            )
        row = self.store.rows["ra"]
        self.assertEqual(
            (row.status, row.last_seq, row.error_message),
            ("failed", 53, "Agent process restart"),
        )
        self.assertEqual(self.store.job_status["j1"], "failed")
        self.assertIn({"action": "unsubscribe", "job_id": A}, self.ws.sent)
        [warning] = [w for w in warnings(logged) if "final state" in w]
        self.assertEqual(
            warning,
            f"agent agent1.example:12443 lost or renumbered events of job {A}: the relay had "
            "seq 53, the agent's last is 4 (49 lower, incarnation inc-1 → inc-2); taking its "
            "final state failed",
        )

    def test_terminal_resync_at_the_received_seq_wins(self) -> None:
        """A terminal resync at the seq of a non-terminal event received is applied too."""
        self.stream_a_to(10)
        with capturedLogs() as logged:
            self.link.ws_message(resync(A, 10, "failed"))
        self.assertEqual(self.store.rows["ra"].status, "failed")
        self.assertEqual(len([w for w in warnings(logged) if "0 lower" in w]), 1)

    def test_resync_after_a_received_end_is_no_news(self) -> None:
        """A resync behind a terminal event already received changes nothing and warns nothing."""
        self.ws.opened()
        self.store.hold()
        self.link.ws_message(wire(A, 4, "completed"))
        with capturedLogs() as logged:
            self.link.ws_message(resync(A, 4, "completed"))
            self.link.ws_message(resync(A, 2, "failed"))
        self.store.release()
        self.assertEqual(self.applied(), [("ra", [4], "ws")])
        self.assertEqual((self.store.rows["ra"].status, warnings(logged)), ("succeeded", []))

    def test_running_resync_below_continues_from_the_agent_seq(self) -> None:
        """A running resync below: warn, follow the agent's numbering, never move the row back."""
        self.stream_a_to(53)
        with capturedLogs() as logged:
            self.link.ws_message(resync(A, 4, "running", "inc-2"))
        self.assertEqual(len([w for w in warnings(logged) if "continuing from its seq 4" in w]), 1)
        self.assertEqual(self.link.poll_jobs()[0], (self.row_a, 4))
        self.link.ws_message(wire(A, 5))  # the agent's next event: at or below the row's 53
        self.assertEqual((self.store.rows["ra"].last_seq, self.store.rows["ra"].status),
                         (53, "running"))
        self.link.ws_message(wire(A, 6, "completed"))  # its end, numbered below the row: wins
        self.link.ws_message(wire(A, 7, "completed", event=EVENT_JOB_COMPLETE))
        row = self.store.rows["ra"]
        self.assertEqual((row.status, row.last_seq), ("succeeded", 53))
        host_seqs = [n["seq"] for n in self.store.notifications if n["event_type"] == "host"]
        host_seqs = [seq for seq in host_seqs if seq is not None]  # the fake: None when no new seq
        self.assertEqual(host_seqs, sorted(host_seqs))

    def test_polled_ahead_snapshot_wins(self) -> None:
        """A terminal snapshot from the REST backstop (409 EVENTS_AHEAD) below the seq wins."""
        self.stream_a_to(20)
        snapshot = snapshot_event(A, {"status": "failed", "error": "lost"}, 3)
        with capturedLogs() as logged:
            self.link.poll_answer(self.row_a, PollOutcome(events=(snapshot,), incarnation="inc-2"))
        row = self.store.rows["ra"]
        self.assertEqual((row.status, row.last_seq, row.error_message), ("failed", 20, "lost"))
        self.assertEqual(self.applied()[-1], ("ra", [3], "poll"))
        self.assertEqual(len([w for w in warnings(logged) if "17 lower" in w]), 1)

    def test_duplicate_events_still_skipped(self) -> None:
        """A plain event at or below the received seq stays a duplicate, terminal or not."""
        self.stream_a_to(6)
        self.link.ws_message(wire(A, 5, "failed"))
        self.assertEqual(self.store.rows["ra"].status, "running")

    def test_incarnation_change_logged_once(self) -> None:
        """Each new incarnation is logged once; a late answer of an older one is no news."""
        self.ws.opened()
        with capturedLogs() as logged:
            for seq, incarnation in ((4, "a"), (5, "a"), (6, "b"), (7, "b")):
                self.link.ws_message(dict(wire(A, seq), incarnation=incarnation))
            self.link.poll_answer(self.row_b, PollOutcome(incarnation="a"))
            self.link.poll_answer(self.row_b, PollOutcome(incarnation="c"))
            self.link.ws_message(wire(A, 8))  # an old agent's frame: no incarnation at all
        changes = [formatEvent(e) for e in logged if "incarnation" in e.get("log_format", "")]
        self.assertEqual(
            changes,
            [
                "agent agent1.example:12443 runs incarnation a",
                (
                    "agent agent1.example:12443 restarted (incarnation a → b); its jobs are "
                    "checked for lost or renumbered events"
                ),
                (
                    "agent agent1.example:12443 restarted (incarnation b → c); its jobs are "
                    "checked for lost or renumbered events"
                ),
            ],
        )
        self.assertEqual(self.link.incarnations.current, "c")

    def test_reopened_socket_sweeps_at_once(self) -> None:
        """The first open waits for the sweep's interval; a reopened socket sweeps at once."""
        self.ws.opened()
        self.assertEqual(self.pollers[0].soon, 0)
        self.ws.failed(handshake=False)
        self.ws.failed(handshake=True)  # agent down: the fallback poller runs
        self.ws.opened()
        self.assertEqual([(p.backstop, p.soon) for p in self.pollers], [(True, 0), (False, 0),
                                                                        (True, 1)])


class MissingJobTests(LinkFixture):
    """A reachable agent that does not know a job: failed after the deadline, never at once."""

    not_found: ClassVar[dict[str, str]] = {
        "event": "error",
        "job_id": B,
        "status": "job_not_found",
        "error_code": "JOB_NOT_FOUND",
        "message": "Job not found",
    }

    def test_ws_not_found_fails_after_the_deadline_with_a_sentence(self) -> None:
        """JOB_NOT_FOUND: one warning at once; at the deadline the row fails with a sentence."""
        self.ws.opened()
        with capturedLogs() as logged:
            self.link.ws_message(self.not_found)
        self.assertEqual(len([w for w in warnings(logged) if "does not know job" in w]), 1)
        self.clock.advance(99)
        self.assertEqual(self.store.rows["rb"].status, "running")
        self.clock.advance(1)
        row = self.store.rows["rb"]
        self.assertEqual(
            (row.status, row.error_message),
            (
                "failed",
                (
                    f"agent agent1.example:12443 has not known job {B} for 100s (JOB_NOT_FOUND; "
                    "deadline 100s): its job history was lost or it was reinstalled"
                ),
            ),
        )
        self.assertEqual([h.row_id for h in self.link.host_jobs], ["ra"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_known_again_cancels_the_deadline(self) -> None:
        """Any answer for the job after JOB_NOT_FOUND (here an event) cancels the deadline."""
        self.ws.opened()
        self.link.ws_message(self.not_found)
        self.clock.advance(50)
        self.link.ws_message(wire(B, 1))
        self.clock.advance(100)
        self.assertEqual(self.store.rows["rb"].status, "running")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_polled_not_found_counts_from_the_first_answer(self) -> None:
        """Repeated polled JOB_NOT_FOUND answers keep the first time; an empty page clears it."""
        self.ws.failed()
        gone = PollOutcome(gone="agent agent1.example:12443 does not know job")
        self.link.poll_answer(self.row_b, gone)
        self.clock.advance(60)
        with capturedLogs() as logged:
            self.link.poll_answer(self.row_b, gone)
        self.assertEqual(warnings(logged), [])
        self.link.poll_answer(self.row_a, PollOutcome())  # another job's answer changes nothing
        self.clock.advance(40)
        self.assertEqual(self.store.rows["rb"].status, "failed")
        self.assertEqual(self.store.calls[-1].transport, "poll")

    def test_failed_write_retried_at_the_next_answer(self) -> None:
        """If the store cannot end the row at the deadline, the next JOB_NOT_FOUND ends it."""
        self.ws.opened()
        self.link.ws_message(self.not_found)
        self.store.error = RuntimeError("database down")
        self.clock.advance(100)
        self.assertEqual(self.store.rows["rb"].status, "running")
        self.store.error = None
        self.link.poll_answer(self.row_b, PollOutcome(gone="not known"))
        self.assertEqual(self.store.rows["rb"].status, "failed")

    def test_stop_cancels_deadlines(self) -> None:
        """stop() leaves no deadline timer behind."""
        self.ws.opened()
        self.link.ws_message(self.not_found)
        self.successResultOf(self.link.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
