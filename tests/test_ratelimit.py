"""The per-client, two-tier token-bucket rate limiter."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.http.ratelimit import RateLimiter
from lpa.errors import RateLimitedError


class RateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.limiter = RateLimiter(
            self.clock,
            destructive_per_minute=6,
            destructive_burst=2,
            read_per_minute=60,
            read_burst=3,
        )

    def spend(
        self, n: int, client: str = "10.0.0.1", method: str = "GET", path: str = "/api/v1/jobs"
    ) -> None:
        for _ in range(n):
            self.limiter.check(client, method, path)

    def test_burst_then_refused(self) -> None:
        """The burst passes, the next request is refused with Retry-After from the refill rate."""
        self.spend(3)
        error = self.assertRaises(RateLimitedError, self.spend, 1)
        self.assertEqual(
            (error.retry_after, error.code, error.http_status), (1, "RATE_LIMITED", 429)
        )
        self.assertEqual(error.details, {"tier": "read"})

    def test_refill(self) -> None:
        """Tokens come back at the per-minute rate on the injected clock."""
        self.spend(3)
        self.clock.advance(1)
        self.spend(1)
        self.assertRaises(RateLimitedError, self.spend, 1)
        self.clock.advance(3)
        self.spend(3)

    def test_destructive_tier(self) -> None:
        """POST, PUT and DELETE share the destructive tier; its Retry-After follows its rate."""
        self.spend(1, method="POST")
        self.spend(1, method="DELETE")
        error = self.assertRaises(RateLimitedError, self.spend, 1, method="PUT")
        self.assertEqual((error.retry_after, error.details), (10, {"tier": "destructive"}))
        self.spend(3, method="GET")

    def test_per_client(self) -> None:
        """One client's exhausted bucket does not limit another client."""
        self.spend(3, client="10.0.0.1")
        self.assertRaises(RateLimitedError, self.spend, 1, client="10.0.0.1")
        self.spend(3, client="10.0.0.2")

    def test_exempt_paths(self) -> None:
        """Health is never limited nor counted."""
        for path in ("/health", "/api/v1/health"):
            self.spend(50, path=path)
        self.assertEqual(self.limiter.bucket_count(), 0)
        self.spend(3)

    def test_system_info_limited(self) -> None:
        """System info runs host commands: it is in the read tier, not exempt."""
        self.spend(3, path="/api/v1/system/info")
        self.assertRaises(RateLimitedError, self.spend, 1, path="/api/v1/system/info")

    def test_disabled(self) -> None:
        """A disabled limiter lets everything through."""
        limiter = RateLimiter(self.clock, enabled=False)
        for _ in range(500):
            limiter.check("10.0.0.1", "POST", "/api/v1/packages")
        self.assertEqual(limiter.bucket_count(), 0)

    def test_idle_buckets_expire(self) -> None:
        """Buckets idle long enough to be full again are dropped, so memory stays bounded."""
        for n in range(100):
            self.spend(1, client=f"10.1.0.{n}")
        self.assertEqual(self.limiter.bucket_count(), 100)
        self.clock.advance(RateLimiter.sweep_interval)
        self.spend(1, client="10.2.0.1")
        self.assertEqual(self.limiter.bucket_count(), 1)

    def test_active_bucket_survives_sweep(self) -> None:
        """A bucket still refilling is kept by the sweep, so a sweep cannot reset a limit."""
        self.clock.advance(RateLimiter.sweep_interval - 10)
        self.spend(2, method="POST")
        self.clock.advance(10)
        # the sweep runs now; 10 s at 6/min gave back one token, not the full burst of 2
        self.spend(1, method="POST")
        self.assertRaises(RateLimitedError, self.spend, 1, method="POST")

    def test_bad_configuration(self) -> None:
        """A zero rate or burst is refused at construction."""
        self.assertRaises(ValueError, RateLimiter, self.clock, read_per_minute=0)
        self.assertRaises(ValueError, RateLimiter, self.clock, destructive_burst=0)
