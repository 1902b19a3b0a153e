"""Per-client token buckets in two tiers, one limiter per process.

The original built its limiter per actix worker (4 of them), so a client got up to four times the
configured rate (bug 27).  Here the daemon makes ONE :class:`RateLimiter` and hands it to the API.

* destructive tier (POST, PUT, DELETE): ``destructive_per_minute`` with ``destructive_burst``;
* read tier (everything else): ``read_per_minute`` with ``read_burst``;
* exempt: ``/health`` and ``/api/v1/health`` (they read state only).  ``/api/v1/system/info``
  is in the read tier: it runs host commands (``dpkg --audit``), so it must not be a way to fork
  processes at will (the system also keeps those results for 30 s).

A bucket refills continuously; a bucket that has been idle long enough to be full again holds no
information, so a periodic sweep drops it and memory stays bounded by the clients seen recently.
"""

from __future__ import annotations

import math
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from lpa.errors import RateLimitedError

EXEMPT_PATHS = frozenset({"/health", "/api/v1/health"})
DESTRUCTIVE_METHODS = frozenset({"POST", "PUT", "DELETE"})
DESTRUCTIVE, READ = "destructive", "read"


class Limiter(Protocol):
    """What the gate asks before each request: a :class:`RateLimiter`, or one that counts."""

    def check(self, client: str, method: str, path: str) -> None:
        """Return, or raise :class:`~lpa.errors.RateLimitedError` past the client's rate."""


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class _Tier:
    def __init__(self, per_minute: int, burst: int) -> None:
        if per_minute < 1 or burst < 1:
            raise ValueError("rate limits need per_minute >= 1 and burst >= 1")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        #: seconds after which an idle bucket is full again and can be forgotten
        self.refill_seconds = self.burst / self.rate


class RateLimiter:
    """Token buckets per (tier, client IP) on an injected clock."""

    #: seconds between sweeps of idle buckets
    sweep_interval = 60.0

    def __init__(
        self,
        clock: IReactorTime,
        *,
        destructive_per_minute: int = 20,
        destructive_burst: int = 10,
        read_per_minute: int = 120,
        read_burst: int = 30,
        enabled: bool = True,
    ) -> None:
        self._clock = clock
        self.enabled = enabled
        self._tiers = {
            DESTRUCTIVE: _Tier(destructive_per_minute, destructive_burst),
            READ: _Tier(read_per_minute, read_burst),
        }
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._last_sweep = clock.seconds()

    @staticmethod
    def tier_for(method: str) -> str:
        return DESTRUCTIVE if method.upper() in DESTRUCTIVE_METHODS else READ

    def check(self, client: str, method: str, path: str) -> None:
        """Take one token for this request or raise :class:`RateLimitedError` with Retry-After."""
        if not self.enabled or path in EXEMPT_PATHS:
            return
        now = self._clock.seconds()
        self._maybe_sweep(now)
        tier_name = self.tier_for(method)
        tier = self._tiers[tier_name]
        key = (tier_name, client)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tier.burst, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(tier.burst, bucket.tokens + elapsed * tier.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait = math.ceil((1.0 - bucket.tokens) / tier.rate)
        raise RateLimitedError(
            f"Rate limit exceeded. Retry after {max(1, wait)} seconds.",
            retry_after=wait,
            details={"tier": tier_name},
        )

    def bucket_count(self) -> int:
        """How many buckets are held (for tests and health)."""
        return len(self._buckets)

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = now
        for key, bucket in list(self._buckets.items()):
            if now - bucket.updated >= self._tiers[key[0]].refill_seconds:
                del self._buckets[key]
