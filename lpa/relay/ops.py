"""The relay's ops port: probes, metrics and the live status page, read-only.

::

    GET /healthz      200 while the process runs (systemd / Kubernetes liveness)
    GET /readyz       200 when every readiness check passes (database connected; membership
                      current where relays share the fleet), else 503 naming the failed checks
    GET /metrics      Prometheus exposition (lpa.metricsweb)
    GET /             the status page (lpa/relay/static/), which then asks for:
    GET /api/status   JSON: running jobs and those that ended in the last hour, host by host
    GET /events       Server-Sent Events: every job_update notification the ops feed hears,
                      "resync" after the feed reconnected, a "ping" every heartbeat seconds

It listens on ``[ops] bind``/``port`` (loopback by default) and, with ``[ops] tls_cert_path``,
only over TLS with a client certificate of ``[ops] client_ca_path``.  Nothing on it changes
anything; every other method is 405.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from lpa.metricsweb import MetricsPage
from lpa.relay.feed import KIND_RESYNC, FeedUnavailable, IJobUpdateFeed

_log = Logger()

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
#: the page's files: nothing else is served from the directory (no listing, no traversal)
STATIC_FILES = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
#: the page may load from this origin only: it works with no network beyond the relay
CSP = (b"default-src 'self'; connect-src 'self'; img-src 'self' data:; "
       b"style-src 'self'; script-src 'self'; frame-ancestors 'none'")
MAX_STREAM_CLIENTS = 64
HEARTBEAT_SECONDS = 15.0

#: a readiness check: None when fine, else why not (one phrase)
Check = Callable[[], "str | None"]


def _open(request: Any) -> bool:
    """The request can still be answered (not finished, client not gone)."""
    return not request.finished and not getattr(request, "_disconnected", False)


def _json(request: Any, code: int, document: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class HealthPage(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return _json(request, 200, {"status": "alive"})


class Readiness:
    """Named checks; ready when none has a reason."""

    def __init__(self, checks: Sequence[tuple[str, Check]] = ()) -> None:
        self._checks = list(checks)

    def add(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    def failures(self) -> dict[str, str]:
        failed: dict[str, str] = {}
        for name, check in self._checks:
            try:
                reason = check()
            except Exception as error:
                reason = f"check failed: {error}"
            if reason is not None:
                failed[name] = reason
        return failed

    @property
    def ready(self) -> bool:
        return not self.failures()


class ReadyPage(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Any) -> bytes:
        failed = self._readiness.failures()
        if failed:
            return _json(request, 503, {"status": "not ready", "failed": failed})
        return _json(request, 200, {"status": "ready"})


class StatusPage(Resource):
    """``GET /api/status``: the feed's snapshot as JSON (503 while the feed is down)."""

    isLeaf = True

    def __init__(self, feed: IJobUpdateFeed) -> None:
        super().__init__()
        self._feed = feed

    def render_GET(self, request: Any) -> Any:
        def answer(document: dict[str, Any]) -> None:
            if _open(request):
                request.write(_json(request, 200, document))
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(FeedUnavailable):
                reason = str(failure.value)
            else:
                _log.warn("status snapshot failed: {error}", error=failure.getErrorMessage())
                reason = "the status query failed; see the relay's log"
            if _open(request):
                request.write(_json(request, 503, {"error": reason}))
                request.finish()

        self._feed.snapshot().addCallbacks(answer, failed)
        return NOT_DONE_YET


def _sse(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    return f"event: {event}\n{lines}\n".encode()


class EventStream(Resource):
    """``GET /events``: Server-Sent Events fed by the ops feed's LISTEN connection."""

    isLeaf = True

    def __init__(
        self,
        feed: IJobUpdateFeed,
        *,
        clock: IReactorTime,
        heartbeat: float = HEARTBEAT_SECONDS,
        max_clients: int = MAX_STREAM_CLIENTS,
    ) -> None:
        super().__init__()
        self._feed = feed
        self._max_clients = max_clients
        self._clients: dict[Any, Callable[[], None]] = {}
        self._heartbeat = LoopingCall(self._ping)
        self._heartbeat.clock = clock
        self._interval = heartbeat

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def render_GET(self, request: Any) -> Any:
        if len(self._clients) >= self._max_clients:
            request.setHeader(b"retry-after", b"30")
            return _json(request, 503, {"error": "too many status page clients"})
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: 3000\n\n" + self._state())

        def send(kind: str, payload: str) -> None:
            request.write(_sse(kind, payload if kind != KIND_RESYNC else "{}"))

        self._clients[request] = self._feed.subscribe(send)
        request.notifyFinish().addBoth(lambda _: self._gone(request))
        if not self._heartbeat.running:
            self._heartbeat.start(self._interval, now=False)
        return NOT_DONE_YET

    def _state(self) -> bytes:
        return _sse("ping", json.dumps({"listening": self._feed.listening}))

    def _ping(self) -> None:
        state = self._state()
        for request in list(self._clients):
            request.write(state)

    def _gone(self, request: Any) -> None:
        cancel = self._clients.pop(request, None)
        if cancel is not None:
            cancel()
        if not self._clients and self._heartbeat.running:
            self._heartbeat.stop()

    def close_all(self) -> None:
        """End every stream (the relay is stopping)."""
        for request in list(self._clients):
            self._gone(request)
            if _open(request):
                request.finish()


class _StaticFile(Resource):
    """One small file of the page, read when asked (so an upgrade is seen without a restart)."""

    isLeaf = True

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self._path = os.path.join(STATIC_DIR, name)
        self._type = content_type.encode("ascii")

    def render_GET(self, request: Any) -> bytes:
        with open(self._path, "rb") as page:
            body = page.read()
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body


class _Static(Resource):
    def __init__(self) -> None:
        super().__init__()
        for name, content_type in STATIC_FILES.items():
            self.putChild(name.encode("ascii"), _StaticFile(name, content_type))


class OpsRoot(Resource):
    """The ops port's resource tree (see the module docstring)."""

    def __init__(
        self, *, feed: IJobUpdateFeed, readiness: Readiness, registry: Any, clock: IReactorTime
    ) -> None:
        super().__init__()
        self.events = EventStream(feed, clock=clock)
        api = Resource()
        api.putChild(b"status", StatusPage(feed))
        self.putChild(b"", _StaticFile("index.html", "text/html; charset=utf-8"))
        self.putChild(b"healthz", HealthPage())
        self.putChild(b"readyz", ReadyPage(readiness))
        self.putChild(b"metrics", MetricsPage(registry))
        self.putChild(b"static", _Static())
        self.putChild(b"api", api)
        self.putChild(b"events", self.events)


def make_ops_site(root: OpsRoot) -> Site:
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


def ops_endpoint_description(bind: str, port: int) -> str:
    """How the log names where the ops port listens."""
    host = f"[{bind}]" if ":" in bind else bind
    return f"{host}:{port}"

