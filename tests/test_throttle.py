"""LogThrottle: bounded log lines per kind per window, with a count of the left-out ones."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from lpa.throttle import MAX_KINDS, LogThrottle, more_like_this


class LogThrottleTests(SynchronousTestCase):
    def test_per_window_then_count(self) -> None:
        """Up to per_window lines a window; the first line of a later window carries the count."""
        clock = task.Clock()
        throttle = LogThrottle(clock, per_window=3, window=60)
        self.assertEqual([throttle.admit("a") for _ in range(5)], [0, 0, 0, None, None])
        clock.advance(59)
        self.assertIsNone(throttle.admit("a"))
        clock.advance(1)
        self.assertEqual(throttle.admit("a"), 3)
        self.assertEqual(throttle.admit("a"), 0)

    def test_kinds_are_separate(self) -> None:
        """One noisy kind does not silence another."""
        throttle = LogThrottle(task.Clock(), per_window=1)
        self.assertEqual(throttle.admit("noisy"), 0)
        self.assertIsNone(throttle.admit("noisy"))
        self.assertEqual(throttle.admit("rare"), 0)

    def test_memory_bounded(self) -> None:
        """However many kinds appear, at most MAX_KINDS are remembered."""
        clock = task.Clock()
        throttle = LogThrottle(clock, per_window=1)
        for index in range(MAX_KINDS * 2):
            clock.advance(1)
            self.assertEqual(throttle.admit(f"kind {index}"), 0)
        self.assertEqual(len(throttle._kinds), MAX_KINDS)

    def test_suffix(self) -> None:
        """The suffix is empty without left-out lines."""
        self.assertEqual(more_like_this(0), "")
        self.assertEqual(more_like_this(4), " (and 4 more like this, not logged)")

    def test_bad_arguments(self) -> None:
        """A throttle that would log nothing is refused."""
        self.assertRaises(ValueError, LogThrottle, task.Clock(), per_window=0)
