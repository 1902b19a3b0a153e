"""Backpressure from the store to the agents' WebSockets: stop reading while writes pile up.

When agents send events faster than PostgreSQL takes them, a relay without backpressure spends
every reactor turn reading and parsing frames, and each database round trip waits for a turn:
writes slow down further while the backlog grows, until the store refuses events.  So the
events handed to the store and not yet written are counted here; above ``high`` every agent
WebSocket stops being read (TCP pushes back, the agents keep their events), below ``low`` they
are read again::

    link ──apply_events──▶ StoreGauge ──▶ IRelayStore
                             │ in flight > high: pause_reading()   (WebSocketDialer)
                             │ in flight < low:  resume_reading()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa.events import JobEvent
from lpa.relay.interfaces import ApplyResult, HostJob, IRelayStore

_log = Logger()
_T = TypeVar("_T")


@implementer(IRelayStore)
class StoreGauge:
    """An :class:`IRelayStore` that counts the events in flight through it (see module doc).

    Any other attribute (``start``, ``stop`` …) is the wrapped store's.
    """

    def __init__(
        self,
        store: Any,
        *,
        high: int,
        low: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        if not 0 <= low < high:
            raise ValueError(f"backpressure needs 0 <= low < high, got {low!r}, {high!r}")
        self._store: IRelayStore = store
        self.high = high
        self.low = low
        self._pause = pause
        self._resume = resume
        self.in_flight = 0
        self.paused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def running_host_jobs(self) -> Deferred[list[HostJob]]:
        return self._store.running_host_jobs()

    def apply_events(
        self, host_job: HostJob, events: Sequence[JobEvent], transport: str
    ) -> Deferred[ApplyResult]:
        events = tuple(events)
        return self._counted(len(events), self._store.apply_events(host_job, events, transport))

    def fail_host_job(
        self, host_job: HostJob, reason: str, transport: str
    ) -> Deferred[ApplyResult]:
        return self._counted(1, self._store.fail_host_job(host_job, reason, transport))

    def _counted(self, count: int, call: Deferred[_T]) -> Deferred[_T]:
        self.in_flight += count
        if not self.paused and self.in_flight > self.high:
            self.paused = True
            _log.warn(
                "{count} events wait for the database: reading from agents paused until "
                "fewer than {low} wait",
                count=self.in_flight,
                low=self.low,
            )
            self._pause()

        def done(result: _T | Failure) -> _T | Failure:
            self.in_flight -= count
            if self.paused and self.in_flight < self.low:
                self.paused = False
                _log.info("the database caught up: reading from agents again")
                self._resume()
            return result

        return call.addBoth(done)
