"""Prometheus exposition for both daemons: a registry per daemon and the resource serving it.

Each daemon builds its own :class:`~prometheus_client.CollectorRegistry` (:func:`new_registry`),
never the module-global one, so a test process can build many agents and relays side by side and
each scrape shows one daemon.  The text itself is ``prometheus_client``'s (``choose_encoder``
picks the classic text format or OpenMetrics from the scraper's ``Accept`` header).

Why not ``prometheus_client.twisted.MetricsResource``: it is a ``WSGIResource`` that renders in
the reactor's thread pool, and our gauges are read at scrape time from state that only the
reactor thread may touch (the relay's links, the store's pool, the agent's sessions).
:class:`MetricsPage` renders on the reactor thread instead; a scrape costs a few hundred
microseconds there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.resource import Resource

_log = Logger()


def new_registry() -> CollectorRegistry:
    """A registry of the daemon's own, with the process's CPU, memory and fd metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """``GET /metrics``: the registry in the exposition format the scraper asked for."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body: bytes = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET


class CallbackCollector(Collector):
    """Gauges read when scraped: ``read()`` yields metric families built from live state.

    A failing read is logged once per scrape and leaves those families out, so one broken
    callback cannot take the whole scrape (and every other metric) down with it.
    """

    def __init__(self, name: str, read: Callable[[], Iterable[Metric]]) -> None:
        self._name = name
        self._read = read

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._read())
        except Exception:
            _log.failure("metrics collector {name} failed", name=self._name)
            return []

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with live state: no registration-time name check

    def register_in(self, registry: CollectorRegistry) -> None:
        registry.register(self)


def gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    """One unlabelled gauge; ``None`` gives the family with no sample (unknown right now)."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


def labelled_gauge(
    name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    """A gauge with one sample per label tuple of ``values``."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), float(value))
    return family
