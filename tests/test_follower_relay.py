"""lpa.follower and lpa.jobseq: the rules the relay follows jobs by, beyond the CLI's.

An agent that lost or renumbered events, JOB_NOT_FOUND that is not final, a rewind after the
store dropped events, pages numbered below the cursor, and what another follower polled.  (The
CLI's basics are in ``test_follower``.)
"""

from __future__ import annotations

from typing import Any

import attr
from twisted.trial.unittest import SynchronousTestCase

from lpa import protocol
from lpa.events import KIND_SNAPSHOT, KIND_STATUS
from lpa.follower import DETAIL, JobFollower, PollOutcome, Step
from lpa.jobseq import GAP, NEXT, OLD, JobSequence, Renumbered
from lpa.protocol import Ack, StreamError, parse_frame
from tests.test_protocol import JOB, OTHER, T, answer, detail, event, page, wire


def seqs(step: Step) -> list[int | None]:
    return [e.seq for e in step.events]


def resync(seq: int, status: str = "running", incarnation: str | None = None,
           **job: Any) -> Any:
    return parse_frame(protocol.resync_frame(detail(status, seq=seq, **job), seq, "r", T,
                                             incarnation=incarnation))


def streaming(after: int = 0, **kwargs: Any) -> JobFollower:
    """A follower subscribed over the stream (acknowledged) from ``after``."""
    follower = JobFollower(JOB, after, **kwargs)
    follower.stream_opened()
    follower.receive(Ack("subscribed", JOB))
    return follower


class RenumberedTests(SynchronousTestCase):
    """A snapshot numbered at or below last_seq: the agent lost or renumbered events."""

    def test_terminal_below_wins_and_says_by_how_much(self) -> None:
        """A terminal resync below is delivered, last_seq follows it; the step says by how much."""
        follower = streaming()
        for seq in range(1, 54):
            follower.receive(event(seq, incarnation="i1"))
        step = follower.receive(resync(4, "failed", "i2", error="Agent process restart"))
        self.assertEqual((seqs(step), step.events[0].status), ([4], "failed"))
        self.assertEqual(step.renumbered, Renumbered(JOB, 53, 4, "i1", "i2", "failed"))
        assert step.renumbered is not None
        self.assertEqual(step.renumbered.behind, 49)
        self.assertEqual((follower.last_seq, follower.seq.floor, follower.done), (4, 53, True))

    def test_running_below_continues_from_the_agent(self) -> None:
        """A running snapshot below moves last_seq down; a later end below the floor is a
        snapshot, so that it still wins downstream."""
        follower = streaming(after=53)
        step = follower.receive(resync(4, incarnation="i2"))
        assert step.renumbered is not None
        self.assertEqual((seqs(step), step.renumbered.final_status), ([4], None))
        self.assertEqual((follower.last_seq, follower.seq.floor), (4, 53))
        self.assertEqual(follower.receive(event(5)).events[0].kind, KIND_STATUS)
        end = follower.receive(event(6, "completed")).events[0]
        self.assertEqual((end.seq, end.kind), (6, KIND_SNAPSHOT))

    def test_no_news(self) -> None:
        """At last_seq and running, or after a terminal event was delivered: nothing."""
        follower = streaming(after=10)
        self.assertEqual(follower.receive(resync(10)), Step())
        follower.receive(event(11, "failed"))
        self.assertEqual(follower.receive(resync(11, "completed")), Step())
        self.assertEqual(follower.receive(resync(3, "failed")), Step())

    def test_terminal_at_the_seq_of_a_running_event(self) -> None:
        """The agent says the seq we have as running is its end: delivered, 0 lower."""
        follower = streaming()
        follower.receive(event(1))
        step = follower.receive(resync(1, "failed"))
        assert step.renumbered is not None
        self.assertEqual((seqs(step), step.renumbered.behind), ([1], 0))

    def test_polled_snapshot_judged_the_same(self) -> None:
        """A snapshot another follower polled is judged like a resync, with its incarnation."""
        follower = streaming()
        for seq in (1, 2, 3):
            follower.receive(event(seq, incarnation="a"))
        snapshot = protocol.snapshot_event(JOB, detail("failed"), 1)
        step = follower.receive_polled(PollOutcome(events=(snapshot,), incarnation="b"))
        self.assertEqual(step.renumbered, Renumbered(JOB, 3, 1, "a", "b", "failed"))
        self.assertEqual(follower.seq.incarnation, "b")


class PollAnomalyTests(SynchronousTestCase):
    """What the REST answers of an agent numbering below the cursor lead to."""

    def test_page_below_the_cursor_asks_the_detail_at_its_last_seq(self) -> None:
        """An empty page whose last_seq is below the cursor: one GET /jobs/{id}, at that seq."""
        follower = JobFollower(JOB, after_seq=53)
        step = follower.receive_answer(page(last_seq=4))
        self.assertEqual((step.events, step.again), ((), True))
        self.assertEqual(follower.poll_path(), protocol.job_path(JOB))
        step = follower.receive_answer(answer(200, detail(seq=None)))
        assert step.renumbered is not None
        self.assertEqual((seqs(step), step.renumbered.agent_seq), ([4], 4))
        self.assertEqual(follower.poll_path(), protocol.events_path(JOB, 4))

    def test_409_seq_is_its_last_seq(self) -> None:
        """409 EVENTS_AHEAD: the snapshot is at details.last_seq, with details.incarnation."""
        follower = JobFollower(JOB, after_seq=9)
        conflict = answer(409, error={"code": "EVENTS_AHEAD", "message": "ahead", "details": {
            "last_seq": 2, "incarnation": "b:2", "job": detail("failed", seq=None)}})
        step = follower.receive_answer(conflict)
        assert step.renumbered is not None
        self.assertEqual((seqs(step), step.renumbered.incarnation_now), ([2], "b:2"))

    def test_terminal_page_with_nothing_delivered_reads_the_detail(self) -> None:
        """A terminal page that gives nothing new (not even up to its end) asks the detail."""
        follower = JobFollower(JOB, after_seq=2)
        step = follower.receive_answer(page(wire(5), last_seq=5, terminal=True))
        self.assertEqual((step.events, step.again), ((), True))
        self.assertEqual(follower.poll_path(), protocol.job_path(JOB))

    def test_rejected_events_are_named(self) -> None:
        """An event of a page that cannot be read is skipped and named in the step."""
        step = JobFollower(JOB).receive_answer(page(wire(1), {"event": "job_status"},
                                                    last_seq=1))
        self.assertEqual((seqs(step), len(step.rejected)), ([1], 1))

    def test_known_original_agent_starts_with_the_detail(self) -> None:
        """events_endpoint=False: the first poll is GET /jobs/{id}."""
        follower = JobFollower(JOB, events_endpoint=False)
        self.assertEqual((follower.source, follower.poll_path()), (DETAIL, protocol.job_path(JOB)))
        self.assertFalse(follower.polls_events)


class MissingTests(SynchronousTestCase):
    """gone_is_final=False: JOB_NOT_FOUND is reported, the follow goes on."""

    def test_missing_then_found(self) -> None:
        """Each JOB_NOT_FOUND is a missing step; the next sign of the job is found, once."""
        follower = streaming(gone_is_final=False)
        error = StreamError(protocol.JOB_NOT_FOUND, "no", JOB)
        self.assertIn("JOB_NOT_FOUND", follower.receive(error).missing)
        self.assertIn("JOB_NOT_FOUND", follower.receive(error).missing)
        self.assertFalse(follower.over)
        step = follower.receive(event(1))
        self.assertEqual((seqs(step), step.found), ([1], True))
        self.assertFalse(follower.receive(event(2)).found)
        self.assertIsNone(follower.gone)

    def test_polled_gone_and_empty_answers(self) -> None:
        """A polled "gone" is missing; an empty polled answer shows the job again."""
        follower = JobFollower(JOB, gone_is_final=False)
        self.assertEqual(follower.receive_polled(PollOutcome(gone="not known")),
                         Step(missing="not known"))
        self.assertEqual(follower.receive_polled(PollOutcome()), Step(found=True))

    def test_final_by_default(self) -> None:
        """By default the first JOB_NOT_FOUND ends the follow (the CLI)."""
        follower = JobFollower(JOB)
        follower.receive_polled(PollOutcome(gone="not known"))
        self.assertTrue(follower.over)
        self.assertEqual(follower.receive_polled(PollOutcome()), Step())


class RewindLaterTests(SynchronousTestCase):
    """The store dropped delivered events: fetch them again once it takes events."""

    def test_stream_held_until_resume(self) -> None:
        """rewind(later): stream frames are ignored; resume() unsubscribes and resubscribes."""
        follower = streaming(after=3)
        for seq in range(4, 9):
            follower.receive(event(seq))
        self.assertEqual(follower.rewind(3, later=True), Step())
        self.assertEqual(follower.receive(event(9)), Step())
        self.assertEqual(follower.receive(resync(9)), Step())
        self.assertEqual(follower.resume().send, (protocol.unsubscribe_frame(JOB),
                                                  protocol.subscribe_frame(JOB, 3)))
        self.assertEqual(follower.resume(), Step())
        self.assertEqual(seqs(follower.receive(event(4))), [4])

    def test_a_dropped_end_is_news_again(self) -> None:
        """After a rewind a terminal snapshot that comes again is delivered again."""
        follower = streaming(after=9)
        follower.receive(resync(4, "failed"))
        self.assertTrue(follower.done)
        follower.rewind(9, later=True)
        follower.stream_opened()  # a new socket also ends the hold
        self.assertEqual(seqs(follower.receive(resync(4, "failed"))), [4])

    def test_polling_is_not_held(self) -> None:
        """While held, polled events still arrive; a polling follower resumes with nothing."""
        follower = JobFollower(JOB)
        follower.receive_polled(PollOutcome(events=(event(1), event(2))))
        follower.rewind(1, later=True)
        self.assertEqual(seqs(follower.receive_polled(PollOutcome(events=(event(2),)))), [2])
        self.assertEqual(follower.resume(), Step())


class PolledTests(SynchronousTestCase):
    def test_in_order_without_duplicates(self) -> None:
        """Polled events are delivered in order once; a hole ends the delivery there."""
        follower = streaming()
        follower.receive(event(1))
        step = follower.receive_polled(PollOutcome(events=(
            event(1), event(2), event(3), event(5), event(6), event(1, job_id=OTHER))))
        self.assertEqual(seqs(step), [2, 3])
        self.assertEqual(follower.receive(event(3)), Step())

    def test_unnumbered_snapshots_always_delivered(self) -> None:
        """An original agent's detail (no seq) passes; the store decides if it changed."""
        follower = JobFollower(JOB)
        snapshot = protocol.snapshot_event(JOB, detail(seq=None))
        for _ in range(2):
            self.assertEqual(seqs(follower.receive_polled(PollOutcome(events=(snapshot,)))),
                             [None])


class JobSequenceTests(SynchronousTestCase):
    def test_place(self) -> None:
        """Each event is next, old (at or below, or unnumbered) or past a gap."""
        sequence = JobSequence(JOB, 3)
        self.assertEqual([sequence.place(event(n)) for n in (2, 3, 4, 6)], [OLD, OLD, NEXT, GAP])
        self.assertEqual(sequence.place(attr.evolve(event(4), seq=None)), OLD)

    def test_rewind_forgets_the_end(self) -> None:
        """rewind() moves last_seq down only, and forgets that the job ended."""
        sequence = JobSequence(JOB, 3)
        sequence.deliver(event(4, "completed"))
        sequence.rewind(9)
        self.assertEqual((sequence.last_seq, sequence.ended, sequence.floor), (4, False, 4))
