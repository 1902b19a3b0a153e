"""The relay-wide cap on WebSocket handshakes in flight, and the link's store-retry delays.

After a relay restart every agent link dials at once: a thundering herd of TLS handshakes that
only jitter and a concurrency cap keep from swamping the relay and the network.  The WebSocket
redial delays are ReconnectingClientFactory's own (:class:`~lpa.relay.ws_client.AgentDialler`);
:class:`HandshakeGate` is the shared semaphore every dial passes first.  :class:`Backoff` paces a
link's retries of a failing store call: Twisted's ``backoffPolicy`` (the exponential sequence
of ``ClientService``) with "equal jitter", half the delay fixed and half random, so retries
spread out yet never come at 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, DeferredSemaphore


class Backoff:
    """Store-retry delays ``initial, initial*factor, …`` capped at ``maximum``, jittered.

    :param jitter: returns a float in ``[0, 1)``; the delay used is ``d * (0.5 + 0.5 * jitter())``.
        Inject ``lambda: 1.0`` for the bare sequence in tests.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial!r}, {maximum!r}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {factor!r}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._jitter = jitter
        self._policy = backoffPolicy(initial, maximum, factor, jitter=lambda: 0.0)
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call moves the sequence on."""
        base = self._policy(self.attempts)
        self.attempts += 1
        return base * (0.5 + 0.5 * self._jitter())

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self.attempts = 0


class HandshakeGate:
    """At most ``limit`` handshakes (TCP + TLS + HTTP upgrade) in flight across all links.

    ``acquire()`` fires with a one-shot release callable once a slot is free; calling it twice
    is harmless, so every exit path of a handshake may release without double counting.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"handshake limit must be at least 1, got {limit!r}")
        self.limit = limit
        self._semaphore = DeferredSemaphore(limit)

    @property
    def in_flight(self) -> int:
        return self.limit - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    def acquire(self) -> Deferred[Callable[[], None]]:
        """Fire with ``release()`` when a slot is free; cancelling the Deferred gives up waiting."""
        acquired = self._semaphore.acquire()

        def granted(_: object) -> Callable[[], None]:
            released: list[bool] = []

            def release() -> None:
                if not released:
                    released.append(True)
                    self._semaphore.release()

            return release

        return acquired.addCallback(granted)
