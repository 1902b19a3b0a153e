"""The relay's Prometheus metrics: what they are, and the few calls that move them.

Counters and histograms move where things happen (through the seams in
:mod:`lpa.relay.metered`: the store the links write through, the listener each WebSocket
reports to); gauges are read when scraped from the live objects they describe (the scanner's
links, the store's pool, the ops feed's last sample)::

    links (machine.py) ─ dial(address, listener) ─▶ MeteredListener ─ ws_failed ─▶ handshake
    links ─ apply_events / fail_host_job ─▶ MeteredStore ─▶ events applied, freshness,
                                                           notifications, rows ended
    store.on_transaction(rows, payload sizes) ─────────▶ transactions, rows per transaction,
                                                           notifications, payload bytes
    scrape ─▶ collect: scanner.links states, store.pool_stats(), feed.queue_usage, readiness

Every name starts ``lpa_relay_``; ``etc/prometheus/`` has the alerts and the dashboard on them.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric

from lpa.metricsweb import CallbackCollector, gauge, labelled_gauge, new_registry

#: seconds from an agent's event to the commit that applied it
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
PAYLOAD_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 7000)

#: link state -> the transport it carries events on
_TRANSPORT_OF_STATE = {"streaming": "ws", "polling": "poll"}

#: a handshake failure's sentence -> a label of few values (first match wins)
_HANDSHAKE_KINDS = (
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("refused", "connection_refused"),
    ("resolve", "dns"),
    ("not found", "dns"),
    ("subprotocol", "subprotocol"),
    ("certificate", "tls_certificate"),
    ("tls", "tls"),
    ("alpn", "tls"),
    ("http", "http_status"),
    ("status", "http_status"),
    ("closed", "closed"),
    ("lost", "closed"),
    ("dropped", "closed"),
)

#: a row-ending reason -> label (the poller's unreachable deadline, the agent's JOB_NOT_FOUND)
_ROW_FAIL_KINDS = (
    ("job_not_found", "job_not_found"),
    ("does not know job", "job_not_found"),
    ("has not known job", "job_not_found"),
    ("unreachable", "unreachable"),
    ("no usable answer", "unreachable"),
)


def handshake_kind(reason: str) -> str:
    """A low-cardinality label for why a WebSocket to an agent failed."""
    lowered = reason.lower()
    for needle, kind in _HANDSHAKE_KINDS:
        if needle in lowered:
            return kind
    return "other"


def row_fail_kind(reason: str) -> str:
    """``unreachable`` (the agent stayed unreachable past the deadline), ``job_not_found``, or
    ``other``."""
    lowered = reason.lower()
    for needle, kind in _ROW_FAIL_KINDS:
        if needle in lowered:
            return kind
    return "other"


def event_age(timestamp: str, now: float) -> float | None:
    """Seconds from an agent event's RFC 3339 ``timestamp`` to ``now`` (None if unreadable).

    The two clocks are different hosts' (NTP keeps them within milliseconds); a negative age
    (the agent's clock ahead) counts as zero.
    """
    try:
        when = datetime.datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, now - when.timestamp())


class RelayMetrics:
    """Every metric of one relay, in its own registry (:attr:`registry`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.handshake_failures = Counter(
            "lpa_relay_handshake_failures",
            "WebSocket connections to agents that failed, by reason",
            ["reason"], registry=r)
        self.events_applied = Counter(
            "lpa_relay_events_applied",
            "Agent events that changed a patch_job_hosts row, by transport",
            ["transport"], registry=r)
        self.freshness = Histogram(
            "lpa_relay_event_freshness_seconds",
            "Seconds from an agent's event timestamp to the commit that applied it",
            buckets=FRESHNESS_BUCKETS, registry=r)
        self.transactions = Counter(
            "lpa_relay_transactions", "Write transactions the relay committed", registry=r)
        self.rows_per_transaction = Histogram(
            "lpa_relay_rows_per_transaction", "Row calls one committed transaction carried",
            buckets=ROWS_BUCKETS, registry=r)
        self.notifications = Counter(
            "lpa_relay_notifications",
            "pg_notify('job_update') calls committed, by event_type (host or job)",
            ["event_type"], registry=r)
        self.payload_bytes = Histogram(
            "lpa_relay_notification_payload_bytes",
            "Size of each committed job_update payload (UTF-8 bytes)",
            buckets=PAYLOAD_BUCKETS, registry=r)
        self.rows_failed = Counter(
            "lpa_relay_rows_failed",
            "Rows the relay ended failed itself, by reason (unreachable: past "
            "ws_relay_unreachable_deadline_secs)",
            ["reason"], registry=r)
        self.listen_notifications = Counter(
            "lpa_relay_listen_notifications",
            "job_update notifications the ops feed received (from every relay)", registry=r)
        self.listen_reconnects = Counter(
            "lpa_relay_listen_reconnects",
            "Times the ops feed's LISTEN connection was re-established", registry=r)
        for label in ("connection_refused", "timeout", "tls", "tls_certificate", "other"):
            self.handshake_failures.labels(label)
        for transport in ("ws", "poll"):
            self.events_applied.labels(transport)
        for event_type in ("host", "job"):
            self.notifications.labels(event_type)
        for kind in ("unreachable", "job_not_found", "other"):
            self.rows_failed.labels(kind)

    # -- what the seams call ---------------------------------------------------------------

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures.labels(handshake_kind(reason)).inc()

    def applied(self, transport: str, events: Iterable[Any], now: float) -> None:
        """``events`` (``JobEvent`` s) changed a row in a transaction committed at ``now``."""
        count = 0
        for job_event in events:
            count += 1
            age = event_age(getattr(job_event, "timestamp", ""), now)
            if age is not None:
                self.freshness.observe(age)
        if count:
            self.events_applied.labels(transport).inc(count)

    def committed(self, rows: int, payloads: Iterable[tuple[str, int]] = ()) -> None:
        """A write transaction of ``rows`` row calls committed with ``payloads``
        (``(event_type, bytes)`` of each notification it sent)."""
        self.transactions.inc()
        self.rows_per_transaction.observe(rows)
        for event_type, size in payloads:
            self.notified(event_type, size)

    def notified(self, event_type: str, size: int | None = None) -> None:
        self.notifications.labels(event_type).inc()
        if size is not None:
            self.payload_bytes.observe(size)

    def row_failed(self, reason: str) -> None:
        self.rows_failed.labels(row_fail_kind(reason)).inc()

    # -- gauges read at scrape time --------------------------------------------------------

    def watch_links(self, links: Callable[[], Iterable[Any]]) -> None:
        """``links()`` gives the scanner's current links (each with ``state``)."""

        def read() -> Iterable[Metric]:
            counts: dict[tuple[str, ...], float] = {
                ("ws", "streaming"): 0, ("poll", "polling"): 0, ("none", "connecting"): 0}
            rows: dict[tuple[str, ...], float] = {("ws",): 0, ("poll",): 0, ("none",): 0}
            for link in list(links()):
                state = str(getattr(link, "state", "unknown"))
                transport = _TRANSPORT_OF_STATE.get(state, "none")
                counts[(transport, state)] = counts.get((transport, state), 0) + 1
                rows[(transport,)] += len(getattr(link, "host_jobs", ()))
            yield labelled_gauge(
                "lpa_relay_agents", "Agents the relay follows, by transport and link state",
                ["transport", "state"], counts)
            yield labelled_gauge(
                "lpa_relay_followed_rows", "Running rows the relay follows, by transport",
                ["transport"], rows)

        CallbackCollector("links", read).register_in(self.registry)

    def watch_pool(self, stats: Callable[[], dict[str, int] | None]) -> None:
        """``stats()`` gives ``{size, up, in_use, waiting, pending_events}`` of the store's
        connection pool, or None when the store cannot say (the gauges have no sample then)."""

        def read() -> Iterable[Metric]:
            found = stats() or {}  # {}: the store cannot say; the families stay, empty
            yield gauge("lpa_relay_store_connections", "Store connections configured",
                        found.get("size"))
            yield gauge("lpa_relay_store_connections_up", "Store connections that are up",
                        found.get("up"))
            yield gauge("lpa_relay_store_connections_in_use",
                        "Store connections running a transaction now", found.get("in_use"))
            yield gauge("lpa_relay_store_waiting_calls",
                        "Store calls queued for a free connection", found.get("waiting"))
            yield gauge("lpa_relay_store_pending_events",
                        "Agent events queued or in flight in the store",
                        found.get("pending_events"))

        CallbackCollector("store pool", read).register_in(self.registry)

    def watch(self, name: str, read: Callable[[], Iterable[Metric]]) -> None:
        """Any other families read at scrape time (the ops feed's samples, readiness)."""
        CallbackCollector(name, read).register_in(self.registry)
