"""ApplyQueue: one row's store calls, batched by transport, retried, dropped past its bound,
handed over on stop.  (How the link uses it is in ``test_relay_machine``.)"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpa.events import JobEvent
from lpa.relay.applying import ApplyQueue
from lpa.relay.backoff import Backoff
from lpa.relay.interfaces import AgentAddress, ApplyResult
from tests.fakes_relay import FakeRelayStore

A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"


def event(seq: int) -> JobEvent:
    return JobEvent(job_id=A, seq=seq, status="running", progress=0, message=f"m{seq}",
                    timestamp="t")


class ApplyQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeRelayStore()
        host_job = self.store.add_host_job(row_id="r1", job_id="j1", host_id="h1",
                                           agent_job_id=A, agent=AgentAddress("a", 1), last_seq=2)
        self.results: list[ApplyResult] = []
        self.ready: list[bool] = []
        self.dropped: list[int] = []
        self.queue = ApplyQueue(
            host_job, store=self.store, clock=self.clock,
            make_backoff=lambda: Backoff(1, 8, jitter=lambda: 1.0), max_queued=3,
            on_applied=self.results.append, on_ready=lambda: self.ready.append(True),
            on_dropped=self.dropped.append,
        )

    def batches(self) -> list[tuple[list[int | None], str | None]]:
        return [([e.seq for e in c.events], c.transport) for c in self.store.calls
                if c.method == "apply_events"]

    def test_batches_never_mix_transports(self) -> None:
        """While a call is in flight, what arrives is the next batch, one per transport."""
        self.store.hold()
        self.queue.add([event(3)], "ws")
        self.queue.add([event(4)], "ws")
        self.queue.add([event(5)], "poll")
        self.store.release()
        self.store.release()
        self.assertEqual(self.batches(), [([3], "ws"), ([4], "ws"), ([5], "poll")])
        self.assertEqual((self.queue.applied_seq, len(self.results)), (5, 3))

    def test_dropped_past_the_bound_from_the_applied_seq(self) -> None:
        """A store that stays down: past the bound the queue is dropped, from the applied seq."""
        self.store.error = RuntimeError("database down")
        self.queue.add([event(3)], "ws")
        self.assertTrue(self.queue.retrying)
        self.queue.add([event(4), event(5), event(6)], "ws")
        self.assertEqual((self.dropped, self.queue.waiting), ([2], 0))
        self.store.error = None
        self.clock.advance(1)
        self.assertEqual((self.ready, self.queue.retrying), ([True], False))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_hands_every_batch_to_the_store(self) -> None:
        """flush(): the whole queue goes to the store, batch after batch; no retry afterwards."""
        self.store.hold()
        self.queue.add([event(3)], "ws")
        self.queue.add([event(4)], "poll")
        self.queue.flush()
        self.store.release()
        self.store.release()
        self.assertEqual(self.batches(), [([3], "ws"), ([4], "poll")])
        self.assertEqual((self.results, self.ready), ([], []))  # the link is gone

    def test_stop_with_the_store_down_retries_nothing(self) -> None:
        """flush() while the store refuses: one last try now, no retry timer left behind."""
        self.store.error = RuntimeError("database down")
        self.queue.add([event(3)], "ws")
        self.assertTrue(self.queue.retrying)
        self.queue.flush()
        self.assertEqual((len(self.batches()), self.clock.getDelayedCalls()), (2, []))

    def test_closed_ignores_late_answers(self) -> None:
        """close(): the queue is forgotten, a late answer calls nothing back."""
        self.store.hold()
        self.queue.add([event(3)], "ws")
        self.queue.add([event(4)], "ws")
        self.queue.close()
        self.store.release()
        self.assertEqual((self.batches(), self.results, self.ready), ([([3], "ws")], [], []))
        self.queue.add([event(5)], "ws")
        self.assertEqual(len(self.batches()), 1)
