"""The agent's REST API: Klein routes behind one gate, every answer in the JSON envelope.

Flow of one request::

    Site ─▶ gate.Gate ─ peer_check (IP whitelist, client allowlist) ─▶ 403
                │           duplicate Content-Type/Host/Authorization  ─▶ 400
                │           RateLimiter.check (one per process)        ─▶ 429 + Retry-After
                │           body over max_body_bytes                   ─▶ 413
                ▼
           Klein routes ─▶ IJobManager / IPackageBackend / ISystem / PatchCache
                │
                └─ any exception ─▶ Enveloper.write_error (the one error mapping)

Unknown paths are 404 ``NOT_FOUND`` and known paths with an unknown method 405 with ``Allow``,
both in the envelope (the original answered those in plain text or with empty bodies).  What
twisted.web refuses before any of this (framing, limits, time) is an envelope too: see
:mod:`lpa.agent.http.channel`, served by :class:`~lpa.agent.http.site.AgentSite`.

Mutating endpoints never ignore what they were asked: an unknown body field or query argument is
a 400, and ``dry_run`` (body, or ``?dry_run=true``) is honoured by install, update, remove and
patch apply, and refused by reboot, which has no dry run.  The agent never installs, upgrades or
removes its own package, nor installs or upgrades the original agent it replaced: those answer
409 ``UNSUPPORTED_ON_LPA`` naming the migration step (:mod:`lpa.agent.http.ownpackage`).

The handlers are grouped by area (:mod:`~lpa.agent.http.routes_system`,
:mod:`~lpa.agent.http.routes_packages`, :mod:`~lpa.agent.http.routes_jobs`) on the one Klein
app of :mod:`~lpa.agent.http.routing`; this module holds the object that carries them, the
WebSocket and metrics routes and the one error mapping.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from lpa.agent.cache import PatchCache
from lpa.agent.http.envelope import Enveloper
from lpa.agent.http.gate import (
    Admission,
    BoundedRequest,
    Gate,
    PeerCheck,
    bounded_request_factory,
    make_peer_check,
)
from lpa.agent.http.ratelimit import Limiter
from lpa.agent.http.routes_jobs import JobRoutes
from lpa.agent.http.routes_packages import PackageRoutes
from lpa.agent.http.routes_system import SystemRoutes
from lpa.agent.http.routing import app, from_werkzeug, method_not_allowed, request_path, route
from lpa.agent.http.site import AgentSite, Http11Site
from lpa.agent.interfaces import IJobManager, IPackageBackend, ISystem
from lpa.errors import NotFoundError, UpgradeRequiredError
from lpa.throttle import LogThrottle

__all__ = [
    "AgentApi",
    "AgentSite",
    "BoundedRequest",
    "Http11Site",
    "bounded_request_factory",
    "make_peer_check",
]


class AgentApi(SystemRoutes, PackageRoutes, JobRoutes):
    """The REST API of one agent; :meth:`resource` is what the Site serves (the handlers are
    those of the route groups it inherits, and the WebSocket and metrics below)."""

    app = app

    def __init__(
        self,
        *,
        jobs: IJobManager,
        backend: IPackageBackend,
        system: ISystem,
        clock: IReactorTime,
        version: str,
        rate_limiter: Limiter | None,
        peer_check: PeerCheck | None = None,
        ws_resource: IResource | None = None,
        max_body_bytes: int = 1 << 20,
        cache: PatchCache | None = None,
        health_extra: Callable[[], dict[str, Any]] | None = None,
        metrics_resource: IResource | None = None,
        uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        self._jobs = jobs
        self._backend = backend
        self._system = system
        self._clock = clock
        self._version = version
        self._rate_limiter = rate_limiter
        self._peer_check = peer_check
        self._ws_resource = ws_resource
        self._max_body_bytes = max_body_bytes
        self._cache = cache if cache is not None else PatchCache(clock, backend)
        # a finished job may have changed packages: the next GET /patches asks the backend
        self._cache_subscription = self._cache.follow(jobs.events)
        self._health_extra = health_extra
        self._metrics_resource = metrics_resource
        self._enveloper = Enveloper(clock, uuid_factory)
        self._started_at = clock.seconds()

    def resource(self) -> IResource:
        """The whole API as one resource: the gate in front of the Klein routes."""
        admit = Admission(
            peer_check=self._peer_check,
            rate_limiter=self._rate_limiter,
            max_body_bytes=self._max_body_bytes,
        )
        return Gate(self.app.resource(), admit, self._enveloper.write_error)

    def site(
        self, *, timeout_seconds: float | None = 30.0, throttle: LogThrottle | None = None
    ) -> AgentSite:
        """The Site serving :meth:`resource`: bodies bounded, every refusal an envelope, and
        ``timeout_seconds`` (``server.timeout_seconds``) to send each whole request."""
        return AgentSite(
            self.resource(),
            enveloper=self._enveloper,
            max_body_bytes=self._max_body_bytes,
            timeout_seconds=timeout_seconds,
            clock=self._clock,
            throttle=throttle,
        )

    # -- the one error mapping ---------------------------------------------------------------

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            valid = error.valid_methods or []
            return self._enveloper.write_error(request, method_not_allowed(sorted(valid)))
        if isinstance(error, WerkzeugNotFound | RequestRedirect):
            # no redirects (e.g. for doubled slashes): a path that is not ours is not found
            return self._enveloper.write_error(
                request, NotFoundError("Not found", {"path": request_path(request)})
            )
        if isinstance(error, HTTPException):
            return self._enveloper.write_error(request, from_werkzeug(error))
        return self._enveloper.write_error(request, failure)

    # -- websocket -------------------------------------------------------------------------------

    @route("/api/v1/ws/jobs", "GET")
    async def websocket(self, request: IRequest) -> Any:
        if self._ws_resource is None:
            raise NotFoundError(
                "The WebSocket endpoint is disabled", {"path": request_path(request)}
            )
        upgrade = (request.getHeader(b"upgrade") or b"").decode("latin-1").lower()
        if "websocket" not in [part.strip() for part in upgrade.split(",")]:
            error = UpgradeRequiredError("This endpoint needs a WebSocket upgrade")
            error.headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
            raise error
        return self._ws_resource

    # -- metrics ---------------------------------------------------------------------------------

    @route("/metrics", "GET")
    async def metrics(self, request: IRequest) -> Any:
        """Prometheus exposition (lpa.agent.metrics), behind the same gate as every route."""
        if self._metrics_resource is None:
            raise NotFoundError("Not found", {"path": request_path(request)})
        return self._metrics_resource
