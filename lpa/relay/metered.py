"""The seams the relay's metrics are taken at, wrapped around objects the relay already injects.

Nothing here changes what the wrapped object does; each wrapper answers exactly what the inner
one answered, after counting::

    AgentLink ──apply_events / fail_host_job──▶ MeteredStore ──▶ the real IRelayStore
                                                    └ on the answer: events applied (by
                                                      transport), freshness of each applied
                                                      event, notifications, rows ended failed
    WebSocketDialer ──ws_failed(reason, handshake)──▶ MeteredListener ──▶ AgentLink
                                                    └ handshake failures by reason
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lpa.events import JobEvent
from lpa.relay.interfaces import AgentAddress, ApplyResult, HostJob, IRelayStore
from lpa.relay.metrics import RelayMetrics
from lpa.relay.ws_client import IWebSocketListener


def _applied_events(events: Sequence[Any], result: ApplyResult) -> list[Any]:
    """The events of a call that changed the row: the last ``applied`` ones at or below the
    row's seq afterwards (duplicates below the row's old seq were skipped, not applied)."""
    if result.applied <= 0:
        return []
    candidates = [e for e in events if e.seq is None or e.seq <= result.last_seq]
    return candidates[-result.applied:]


@implementer(IRelayStore)
class MeteredStore:
    """An :class:`IRelayStore` that counts what the store it wraps did.

    :param count_transactions: count each answered call as a transaction of one row, with the
        notifications it made; pass False when the store reports its transactions itself
        (``observe_transactions``: rows and payload sizes of each commit).
    """

    def __init__(
        self,
        store: IRelayStore,
        metrics: RelayMetrics,
        *,
        clock: IReactorTime,
        count_transactions: bool = True,
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._clock = clock
        self._count_transactions = count_transactions

    def __getattr__(self, name: str) -> Any:
        # start(), stop(), database_up() … of the real store
        return getattr(self.store, name)

    def running_host_jobs(self) -> Deferred[list[HostJob]]:
        return self.store.running_host_jobs()

    def apply_events(
        self, host_job: HostJob, events: Sequence[JobEvent], transport: str
    ) -> Deferred[ApplyResult]:
        events = tuple(events)

        def count(result: ApplyResult) -> ApplyResult:
            applied = _applied_events(events, result)
            self._metrics.applied(transport, applied, self._clock.seconds())
            self._count(result)
            return result

        return self.store.apply_events(host_job, events, transport).addCallback(count)

    def fail_host_job(
        self, host_job: HostJob, reason: str, transport: str
    ) -> Deferred[ApplyResult]:
        def count(result: ApplyResult) -> ApplyResult:
            if result.applied or result.notified:
                self._metrics.row_failed(reason)
            self._count(result)
            return result

        return self.store.fail_host_job(host_job, reason, transport).addCallback(count)

    def _count(self, result: ApplyResult) -> None:
        if not self._count_transactions:
            return
        notified = getattr(result, "notified", 0)
        if notified:
            self._metrics.notifications.labels("host").inc()
            if notified > 1:
                self._metrics.notifications.labels("job").inc(notified - 1)
        self._metrics.transactions.inc()
        self._metrics.rows_per_transaction.observe(1)


@implementer(IWebSocketListener)
class MeteredListener:
    """The listener a link gives its WebSocket, counting failed handshakes by reason."""

    def __init__(self, listener: Any, metrics: RelayMetrics) -> None:
        self.listener = listener
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.listener, name)

    def ws_opened(self) -> None:
        self.listener.ws_opened()

    def ws_message(self, message: dict[str, Any]) -> None:
        self.listener.ws_message(message)

    def ws_failed(self, reason: str, handshake: bool) -> None:
        if handshake:
            self._metrics.handshake_failed(reason)
        self.listener.ws_failed(reason, handshake)


def metered_dial(
    dial: Callable[[AgentAddress, Any], Any], metrics: RelayMetrics
) -> Callable[[AgentAddress, Any], Any]:
    """``dial`` with every link's listener wrapped in a :class:`MeteredListener`."""

    def dial_metered(address: AgentAddress, listener: Any) -> Any:
        return dial(address, MeteredListener(listener, metrics))

    return dial_metered
