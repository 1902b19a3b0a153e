"""Backoff with jitter and the relay-wide handshake gate."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpa.relay.backoff import Backoff, HandshakeGate


class BackoffTests(SynchronousTestCase):
    def test_sequence_doubles_to_cap(self) -> None:
        """Without jitter the delays double from initial up to the cap and stay there."""
        backoff = Backoff(1.0, 10.0, jitter=lambda: 1.0)
        self.assertEqual([backoff.next_delay() for _ in range(6)], [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])

    def test_jitter_scales_between_half_and_full(self) -> None:
        """Jitter 0 gives half the delay, jitter values in between scale linearly."""
        values = iter([0.0, 0.5, 0.0])
        backoff = Backoff(2.0, 60.0, jitter=lambda: next(values))
        self.assertEqual([backoff.next_delay() for _ in range(3)], [1.0, 3.0, 4.0])

    def test_reset(self) -> None:
        """After reset the next delay is the initial one again."""
        backoff = Backoff(1.0, 10.0, jitter=lambda: 1.0)
        backoff.next_delay(), backoff.next_delay()
        backoff.reset()
        self.assertEqual((backoff.next_delay(), backoff.attempts), (1.0, 1))

    def test_bad_bounds(self) -> None:
        """Nonsense bounds are refused with a clear error."""
        self.assertRaises(ValueError, Backoff, 0, 1)
        self.assertRaises(ValueError, Backoff, 5, 1)
        self.assertRaises(ValueError, Backoff, 1, 5, factor=0.5)


class HandshakeGateTests(SynchronousTestCase):
    def test_cap_and_release(self) -> None:
        """Only ``limit`` hold a slot; a release lets the next in; a double release is harmless."""
        gate = HandshakeGate(2)
        first, second, third = gate.acquire(), gate.acquire(), gate.acquire()
        release1 = self.successResultOf(first)
        self.successResultOf(second)
        self.assertNoResult(third)
        self.assertEqual((gate.in_flight, gate.waiting), (2, 1))
        release1()
        release1()
        self.successResultOf(third)
        self.assertEqual((gate.in_flight, gate.waiting), (2, 0))

    def test_cancel_waiting(self) -> None:
        """A cancelled waiter leaves the queue without taking a slot."""
        gate = HandshakeGate(1)
        release = self.successResultOf(gate.acquire())
        waiting = gate.acquire()
        waiting.cancel()
        self.failureResultOf(waiting)
        release()
        self.assertEqual(gate.in_flight, 0)

    def test_bad_limit(self) -> None:
        """A limit below one is refused."""
        self.assertRaises(ValueError, HandshakeGate, 0)
