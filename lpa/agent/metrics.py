"""The agent's Prometheus metrics and the seams they are taken at.

Nothing here changes what the agent does; every seam wraps or listens to an object the agent
already builds::

    EventLog ──broadcast──▶ AgentMetrics.on_event   events by kind, lock waits, job start;
                                                    job_complete: jobs by operation and final
                                                    status, job duration
    Site ─▶ MeteredResource ─▶ the API's gate        requests by route template, method, status
    AgentSite.on_handshake_refused                  refused TLS handshakes by reason
    AgentSite.on_request_refused                    requests the connection refused before
                                                    routing: route "other", method "other"
    Gate ─▶ MeteredRateLimiter ─▶ RateLimiter        requests refused by the rate limit
    JobStreamFactory.make_session ─▶ metered_sessions  sessions, subscriptions, 1008 closes
    scrape ─▶ collect                               running jobs, oldest one, CRL age, ready

Every name starts ``lpa_agent_``; ``etc/prometheus/`` has the alerts and dashboard on them.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from zope.interface import implementer

from lpa.agent.interfaces import IStreamChannel
from lpa.errors import ApiError, RateLimitedError
from lpa.events import EVENT_JOB_COMPLETE, KIND_WAITING_FOR_LOCK, OPERATIONS, RUNNING, JobEvent
from lpa.metricsweb import CallbackCollector, gauge, labelled_gauge, new_registry

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: the 1008 close code of a consumer that fell send_buffer_events behind (lpa.agent.ws_session)
CLOSE_SLOW_CONSUMER = 1008


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class AgentMetrics:
    """Every metric of one agent, in its own registry (:attr:`registry`)."""

    def __init__(self, clock: IReactorTime, registry: CollectorRegistry | None = None) -> None:
        self._clock = clock
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.jobs = Counter("lpa_agent_jobs", "Jobs that ended, by operation and final status",
                            ["operation", "status"], registry=r)
        self.duration = Histogram(
            "lpa_agent_job_duration_seconds", "Seconds from a job's start to its end",
            ["operation"], buckets=DURATION_BUCKETS, registry=r)
        self.events = Counter("lpa_agent_events", "Job events emitted, by kind", ["kind"],
                              registry=r)
        self.lock_waits = Counter(
            "lpa_agent_lock_waits",
            "Times a job waited for the package database lock (waiting_for_lock events)",
            registry=r)
        self.requests = Counter(
            "lpa_agent_http_requests", "REST requests answered, by route template, method and "
            "status", ["route", "method", "status"], registry=r)
        self.rate_limited = Counter(
            "lpa_agent_rate_limited", "Requests refused by the rate limit, by bucket",
            ["tier"], registry=r)
        self.ws_sessions_opened = Counter(
            "lpa_agent_ws_sessions_opened", "WebSocket job-stream sessions opened", registry=r)
        self.ws_slow_closes = Counter(
            "lpa_agent_ws_slow_consumer_closes",
            "WebSocket sessions closed with 1008: the client fell send_buffer_events behind",
            registry=r)
        self.handshake_failures = Counter(
            "lpa_agent_tls_handshake_failures", "TLS handshakes refused, by reason", ["reason"],
            registry=r)
        for operation in OPERATIONS:
            self.duration.labels(operation)
        for tier in ("read", "destructive"):
            self.rate_limited.labels(tier)
        #: job id -> when it started running (clock seconds), for durations and the oldest one
        self._started: dict[str, float] = {}
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- EventLog subscriber ---------------------------------------------------------------

    def follow(self, events: Any, jobs: Any) -> Any:
        """Count every event the agent's EventLog publishes; returns the subscription."""
        self._jobs = jobs
        return events.subscribe(self.on_event)

    def on_event(self, job_event: JobEvent) -> None:
        self.events.labels(job_event.kind).inc()
        if job_event.kind == KIND_WAITING_FOR_LOCK:
            self.lock_waits.inc()
        if job_event.status == RUNNING and job_event.job_id not in self._started:
            self._started[job_event.job_id] = self._clock.seconds()
        if job_event.event != EVENT_JOB_COMPLETE:
            return
        started = self._started.pop(job_event.job_id, None)
        operation = "unknown"
        try:
            job = self._jobs.get(job_event.job_id)
            operation = job.operation
            if started is None:
                started = _epoch(job.created_at)
        except Exception:  # forgotten already: count it anyway
            pass
        self.jobs.labels(operation, job_event.status).inc()
        if started is not None:
            self.duration.labels(operation).observe(max(0.0, self._clock.seconds() - started))

    def request_refused(self, error: ApiError) -> None:
        """The connection refused a request before any route saw it (414, 431, 408, 413, a
        malformed request line): counted with the requests, by status."""
        self.requests.labels("other", "other", str(error.http_status)).inc()

    def handshake_refused(self, kind: str) -> None:
        """The agent's site refused a TLS handshake (``kind``: lpa.tlsaudit's few reasons)."""
        self.handshake_failures.labels(kind).inc()

    # -- WebSocket sessions ----------------------------------------------------------------

    def session_made(self, session: Any) -> None:
        self.ws_sessions_opened.inc()
        self._sessions.add(session)

    def session_closed(self, code: int) -> None:
        if code == CLOSE_SLOW_CONSUMER:
            self.ws_slow_closes.inc()

    # -- gauges read at scrape time --------------------------------------------------------

    def watch(
        self,
        *,
        job_timeout_seconds: float,
        ready: Callable[[], list[str]],
        crl: Callable[[], dict[str, Any]] | None = None,
        info: dict[str, str] | None = None,
    ) -> None:
        """Gauges of the running agent; ``ready()`` gives the reasons it is not ready."""

        def read() -> Iterable[Metric]:
            now = self._clock.seconds()
            live = [s for s in list(self._sessions) if not getattr(s, "closed", False)]
            yield gauge("lpa_agent_ws_sessions", "WebSocket job-stream sessions open", len(live))
            yield gauge("lpa_agent_ws_subscriptions", "Job subscriptions of the open sessions",
                        sum(int(getattr(s, "subscription_count", 0)) for s in live))
            yield gauge("lpa_agent_jobs_running", "Jobs running now", len(self._started))
            oldest = min(self._started.values(), default=None)
            yield gauge("lpa_agent_oldest_running_job_seconds",
                        "Seconds the longest-running job has run (0 when none runs)",
                        0 if oldest is None else now - oldest)
            yield gauge("lpa_agent_job_timeout_seconds", "jobs.timeout_minutes, in seconds",
                        job_timeout_seconds)
            reasons = ready()
            yield gauge("lpa_agent_ready", "1 when /api/v1/health says ready", int(not reasons))
            if crl is not None:
                fields = crl()
                yield gauge("lpa_agent_crl_age_seconds",
                            "Seconds since the CRL's lastUpdate (absent without a CRL)",
                            fields.get("crl_age_seconds"))
                yield labelled_gauge("lpa_agent_crl_status", "1 for the CRL's current status",
                                     ["status"], {(str(fields.get("crl_status")),): 1})
            if info:
                family = GaugeMetricFamily("lpa_agent_info", "The agent's version and backend",
                                           labels=sorted(info))
                family.add_metric([info[key] for key in sorted(info)], 1)
                yield family

        CallbackCollector("agent", read).register_in(self.registry)


def readiness_fields(reasons: list[str]) -> dict[str, Any]:
    """The fields ``/api/v1/health`` adds: ``ready`` and, when not, why."""
    return {"ready": not reasons, "not_ready_reasons": list(reasons)}


@implementer(IStreamChannel)
class MeteredChannel:
    """A session's channel (the WebSocket protocol) that reports close codes."""

    def __init__(self, channel: Any, on_close: Callable[[int], None]) -> None:
        self._channel = channel
        self._on_close = on_close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def send_text(self, text: str) -> None:
        self._channel.send_text(text)

    def close(self, code: int, reason: str) -> None:
        self._on_close(code)
        self._channel.close(code, reason)


def metered_sessions(factory: Any, metrics: AgentMetrics) -> None:
    """Count the sessions ``factory`` (a JobStreamFactory) makes and their 1008 closes."""
    make_session = factory.make_session

    def make_metered(channel: Any) -> Any:
        session = make_session(MeteredChannel(channel, metrics.session_closed))
        metrics.session_made(session)
        return session

    factory.make_session = make_metered


class MeteredRateLimiter:
    """The agent's RateLimiter, counting what it refuses."""

    def __init__(self, limiter: Any, metrics: AgentMetrics) -> None:
        self._limiter = limiter
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._limiter, name)

    def check(self, client: str, method: str, path: str) -> None:
        try:
            self._limiter.check(client, method, path)
        except RateLimitedError:
            self._metrics.rate_limited.labels(self._limiter.tier_for(method)).inc()
            raise


def route_matcher(url_map: Any) -> Callable[[str, str], str]:
    """``(path, method) -> route template`` from a Klein app's werkzeug map (``other`` when
    no route matches), so request labels stay few whatever clients ask for."""
    adapter = url_map.bind("agent")

    def route_of(path: str, method: str) -> str:
        try:
            rule, _ = adapter.match(path, method=method, return_rule=True)
            return str(rule.rule)
        except MethodNotAllowed as error:
            for allowed in error.valid_methods or ():
                try:
                    rule, _ = adapter.match(path, method=allowed, return_rule=True)
                    return str(rule.rule)
                except HTTPException:
                    continue
            return "other"
        except HTTPException:
            return "other"

    return route_of


class MeteredResource(Resource):
    """The site's resource, counting each answered request by route, method and status."""

    isLeaf = True

    def __init__(
        self, resource: IResource, metrics: AgentMetrics, route_of: Callable[[str, str], str]
    ) -> None:
        super().__init__()
        self._resource = resource
        self._metrics = metrics
        self._route_of = route_of

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace").upper()
        route = self._route_of(request.path.decode("latin-1"), method)
        label = method if method in _METHODS else "other"

        def count(result: object) -> None:
            self._metrics.requests.labels(route, label, str(request.code)).inc()

        request.notifyFinish().addBoth(count)
        return self._resource.render(request)
