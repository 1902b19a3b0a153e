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
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from lpa import validation
from lpa.agent.cache import PatchCache
from lpa.agent.eventlog import EventsExpiredError
from lpa.agent.http import inputs as read
from lpa.agent.http.envelope import Answer, Enveloper
from lpa.agent.http.gate import (
    Admission,
    BoundedRequest,
    Gate,
    PeerCheck,
    bounded_request_factory,
    make_peer_check,
)
from lpa.agent.http.ownpackage import refuse_own_package
from lpa.agent.http.ratelimit import Limiter
from lpa.agent.http.site import AgentSite, Http11Site
from lpa.agent.interfaces import IJobManager, IPackageBackend, ISystem
from lpa.agent.model import Job, JobRequest, PackageSpec, Patch
from lpa.errors import (
    ApiError,
    CommandError,
    EventsAheadError,
    EventsGoneError,
    MethodNotAllowedError,
    NotFoundError,
    PackageManagerError,
    ServiceStatusError,
    SystemInfoError,
    UpgradeRequiredError,
    ValidationError,
)
from lpa.events import (
    OP_INSTALL,
    OP_PATCH_APPLY,
    OP_REBOOT,
    OP_REMOVE,
    OP_UPDATE,
    TERMINAL_STATUSES,
    normalise_status,
    rfc3339_from_epoch,
)
from lpa.throttle import LogThrottle

__all__ = [
    "AgentApi",
    "AgentSite",
    "BoundedRequest",
    "Http11Site",
    "bounded_request_factory",
    "make_peer_check",
]

_log = Logger()

_PACKAGE_STATUS_FILTERS = ("installed", "upgradable", "available")
_SORT_KEYS = ("name", "version", "status")
_HEALTH_DEFAULTS: dict[str, Any] = {
    "crl_status": None,
    "crl_age_seconds": None,
    "crl_next_update": None,
    "gpg_key_status": None,
    "gpg_key_expires_at": None,
    "repo_config_synced": None,
    "repo_config_last_sync": None,
}

#: the one query argument a mutating endpoint knows
_DRY_RUN = ("dry_run",)

_app = Klein()


def _route(path: str, *methods: str) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """Register an ``async`` handler returning an :class:`Answer` (or an ``IResource``)."""
    allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Any:
        @functools.wraps(handler)
        async def endpoint(self: AgentApi, request: IRequest, **kwargs: Any) -> Any:
            method = request.method.decode("ascii", "replace")
            if method not in allowed:
                # werkzeug lets OPTIONS through to every rule: never run a handler for it
                raise _method_not_allowed(sorted(allowed))
            answer = await handler(self, request, **kwargs)
            if IResource.providedBy(answer):
                return answer
            return self._enveloper.write(request, answer)

        return _app.route(path, methods=list(methods))(endpoint)

    return decorate


def _method_not_allowed(allowed: Sequence[str]) -> MethodNotAllowedError:
    error = MethodNotAllowedError("Method not allowed", {"allowed_methods": list(allowed)})
    error.headers = {"Allow": ", ".join(allowed)}  # type: ignore[attr-defined]
    return error


def _from_werkzeug(exception: HTTPException) -> ApiError:
    """Another routing-level HTTP error (rare) as an ApiError with the same status."""
    error = ApiError(exception.name)
    error.http_status = exception.code or 400
    error.code = exception.name.upper().replace(" ", "_")
    return error


def _as_job(job: object) -> Job:
    """IJobManager returns ``object`` (the interface cannot name the attrs class); it is a Job."""
    return cast(Job, job)


def _path(request: IRequest) -> str:
    path: bytes = request.path
    return path.decode("latin-1")


class AgentApi:
    """The REST API of one agent; :meth:`resource` is what the Site serves."""

    app = _app

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
            return self._enveloper.write_error(request, _method_not_allowed(sorted(valid)))
        if isinstance(error, WerkzeugNotFound | RequestRedirect):
            # no redirects (e.g. for doubled slashes): a path that is not ours is not found
            return self._enveloper.write_error(
                request, NotFoundError("Not found", {"path": _path(request)})
            )
        if isinstance(error, HTTPException):
            return self._enveloper.write_error(request, _from_werkzeug(error))
        return self._enveloper.write_error(request, failure)

    # -- health and system ---------------------------------------------------------------------

    @_route("/health", "GET")
    async def health_root(self, request: IRequest) -> Answer:
        return Answer(self.health())

    @_route("/api/v1/health", "GET")
    async def health_v1(self, request: IRequest) -> Answer:
        return Answer(self.health())

    def health(self) -> dict[str, Any]:
        """Health data; reads state only (the original refreshed caches from here, bug 26)."""
        data: dict[str, Any] = {"status": "healthy"}
        try:
            data["uptime_seconds"] = int(self._system.uptime_seconds())
        except Exception:
            _log.failure("could not read host uptime")
            data["uptime_seconds"] = None
        data["agent_uptime_seconds"] = int(self._clock.seconds() - self._started_at)
        data["version"] = self._version
        data["last_cache_update"] = self._cache.last_cache_update
        data["cache_status"] = self._cache.status()
        data.update(_HEALTH_DEFAULTS)
        degraded = False
        if self._health_extra is not None:
            try:
                extra = dict(self._health_extra())
            except Exception:
                _log.failure("health_extra failed")
                extra, degraded = {}, True
            degraded = degraded or extra.pop("degraded", False) is True
            data.update({k: v for k, v in extra.items() if k not in ("status", "version")})
            degraded = degraded or extra.get("status") == "degraded"
        degraded = degraded or (
            data["crl_status"] in ("invalid", "expired")
            or data["gpg_key_status"] in ("missing", "expired", "revoked")
            or data["repo_config_synced"] is False
        )
        data["status"] = "degraded" if degraded else "healthy"
        return data

    @_route("/api/v1/system/info", "GET")
    async def system_info(self, request: IRequest) -> Answer:
        try:
            info = await self._system.system_info()
        except (ApiError, CancelledError):
            raise
        except Exception as error:
            # logged with the request id by the error mapping, never echoed
            raise SystemInfoError("Failed to read system information") from error
        return Answer(info)

    @_route("/api/v1/system/services/<string:name>", "GET")
    async def service_status(self, request: IRequest, name: str) -> Answer:
        validation.service_name(name)
        try:
            status = await self._system.service_status(name)
        except (ApiError, CancelledError):
            raise
        except Exception as error:
            raise ServiceStatusError("Failed to read the service status") from error
        return Answer(status)

    @_route("/api/v1/system/reboot", "POST")
    async def reboot(self, request: IRequest) -> Answer:
        body = read.json_object(request, empty_ok=True)
        if "dry_run" in body or "dry_run" in read.uri_query(request):
            raise ValidationError(
                "A reboot has no dry run; nothing was scheduled", {"field": "dry_run"}
            )
        read.refuse_unknown_query(request)
        read.refuse_unknown(
            body, ("delay_seconds", "force", "acknowledge_package_database_corruption_risk")
        )
        delay = read.seconds(body, "delay_seconds")
        force = read.boolean(body, "force")
        job = _as_job(
            self._jobs.submit(
                JobRequest(
                    operation=OP_REBOOT,
                    reboot_delay_seconds=delay,
                    force=force,
                    acknowledge_package_database_corruption_risk=read.boolean(
                        body, "acknowledge_package_database_corruption_risk"
                    ),
                )
            )
        )
        data = self._accepted(job)
        data.update(
            scheduled_at=rfc3339_from_epoch(self._clock.seconds() + delay),
            delay_seconds=delay,
            force=force,
        )
        return Answer(data, 202)

    # -- packages --------------------------------------------------------------------------------

    @_route("/api/v1/packages", "GET")
    async def list_packages(self, request: IRequest) -> Answer:
        name = read.query(request, "name")
        if name is not None and name != "":
            validation.package_name(name)
        else:
            name = None
        status = (read.query(request, "status") or "").strip().lower()
        status_filter = status if status in _PACKAGE_STATUS_FILTERS else None
        upgradable = read.query_bool(request, "upgradable")
        sort_key = (read.query(request, "sort") or "name").strip().lower()
        if sort_key not in _SORT_KEYS:
            sort_key = "name"
        descending = (read.query(request, "order") or "asc").strip().lower() != "asc"
        packages = await self._read(self._backend.list_packages(name, status_filter))
        if status_filter == "installed":
            packages = [p for p in packages if p.status in ("Installed", "Upgradable")]
        elif status_filter == "upgradable":
            packages = [p for p in packages if p.upgradable or p.status == "Upgradable"]
        elif status_filter == "available":
            packages = [p for p in packages if p.status in ("Available", "NotInstalled")]
        if upgradable is not None:
            packages = [
                p for p in packages if (p.upgradable or p.status == "Upgradable") == upgradable
            ]
        packages = sorted(
            packages, key=lambda p: (getattr(p, sort_key), p.name), reverse=descending
        )
        return Answer({"packages": [p.to_dict() for p in packages], "total": len(packages)})

    @_route("/api/v1/packages", "POST")
    async def install(self, request: IRequest) -> Answer:
        body = read.json_object(request)
        read.refuse_unknown(body, ("packages", "options", "dry_run"))
        read.refuse_unknown_query(request, _DRY_RUN)
        if "packages" not in body:
            raise ValidationError("packages is required", {"field": "packages"})
        specs = read.package_specs(body["packages"])
        refuse_own_package(OP_INSTALL, [spec.name for spec in specs], self._version)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ValidationError("options must be an object", {"field": "options"})
        read.refuse_unknown(options, ("force", "no_recommends"), "options")
        dry_run = read.dry_run(request, body)
        job = _as_job(
            self._jobs.submit(
                JobRequest(
                    operation=OP_INSTALL,
                    packages=specs,
                    dry_run=dry_run,
                    force=read.boolean(options, "force"),
                    no_recommends=read.boolean(options, "no_recommends"),
                )
            )
        )
        return Answer(self._accepted(job, package=None, dry_run=dry_run), 202)

    @_route("/api/v1/packages/<string:name>", "GET")
    async def get_package(self, request: IRequest, name: str) -> Answer:
        validation.package_name(name)
        package = await self._read(self._backend.get_package(name))
        return Answer(package.to_dict())

    @_route("/api/v1/packages/<string:name>", "PUT")
    async def update_package(self, request: IRequest, name: str) -> Answer:
        return self._one_package(request, OP_UPDATE, name)

    @_route("/api/v1/packages/<string:name>", "DELETE")
    async def remove_package(self, request: IRequest, name: str) -> Answer:
        return self._one_package(request, OP_REMOVE, name)

    def _one_package(self, request: IRequest, operation: str, name: str) -> Answer:
        """Update or remove one package; an optional body ``{"dry_run": bool}``.

        The original ignored any body here, so a ``dry_run: true`` started a real update.
        """
        validation.package_name(name)
        # before the body: the manager's self-upgrade gets this answer whatever it sends
        refuse_own_package(operation, [name], self._version)
        body = read.json_object(request, empty_ok=True)
        read.refuse_unknown(body, _DRY_RUN)
        read.refuse_unknown_query(request, _DRY_RUN)
        dry_run = read.dry_run(request, body)
        job = _as_job(
            self._jobs.submit(
                JobRequest(operation=operation, packages=(PackageSpec(name),), dry_run=dry_run)
            )
        )
        return Answer(self._accepted(job, package=name, dry_run=dry_run), 202)

    # -- patches ---------------------------------------------------------------------------------

    @_route("/api/v1/patches", "GET")
    async def list_patches(self, request: IRequest) -> Answer:
        security_only = read.query_bool(request, "security") or False
        patches: list[Patch] = await self._read(self._cache.patches())
        if security_only:
            patches = [p for p in patches if p.security]
        return Answer(
            {
                "patches": [p.to_dict() for p in patches],
                "total": len(patches),
                "security_updates": sum(
                    1 for p in patches if p.security or p.severity in ("critical", "high")
                ),
                "requires_reboot": any(p.requires_reboot for p in patches),
                "last_cache_update": self._cache.last_cache_update,
                "cache_status": self._cache.status(),
            }
        )

    @_route("/api/v1/patches/apply", "POST")
    async def apply_patches(self, request: IRequest) -> Answer:
        """Apply patches; ``packages`` absent means all, ``[]`` nothing (the manager sends it
        for a host with nothing selected; the job completes with an empty change list)."""
        body = read.json_object(request)
        read.refuse_unknown_query(request, _DRY_RUN)
        read.refuse_unknown(
            body,
            (
                "packages",
                "security_only",
                "dry_run",
                "allow_reboot",
                "reboot",
                "reboot_delay_seconds",
            ),
        )
        packages = body.get("packages")
        specs = read.package_specs(packages, empty_ok=True) if packages is not None else None
        allow_reboot = read.boolean(body, "allow_reboot")
        if "reboot" in body:
            alias = read.boolean(body, "reboot")
            if "allow_reboot" in body and alias != allow_reboot:
                raise ValidationError(
                    "allow_reboot and its alias reboot disagree", {"field": "reboot"}
                )
            allow_reboot = alias
        job_request = JobRequest(
            operation=OP_PATCH_APPLY,
            packages=specs,
            dry_run=read.dry_run(request, body),
            security_only=read.boolean(body, "security_only"),
            allow_reboot=allow_reboot,
            reboot_delay_seconds=read.seconds(body, "reboot_delay_seconds"),
        )
        job = _as_job(self._jobs.submit(job_request))
        data = self._accepted(job, package=None)
        data.update(
            packages=job.package_names if specs is not None else None,
            all_packages=specs is None,
            dry_run=job_request.dry_run,
            security_only=job_request.security_only,
            allow_reboot=job_request.allow_reboot,
            reboot_delay_seconds=job_request.reboot_delay_seconds,
        )
        return Answer(data, 202)

    # -- jobs ------------------------------------------------------------------------------------

    @_route("/api/v1/jobs", "GET")
    async def list_jobs(self, request: IRequest) -> Answer:
        status = read.query(request, "status")
        if status is not None:
            try:
                status = normalise_status(status)
            except ValueError:
                raise ValidationError(
                    f"unknown job status {status!r}", {"field": "status"}
                ) from None
        limit = read.query_int(request, "limit", 50, 1, 1000)
        jobs = self._jobs.list_jobs(status=status, limit=limit)
        return Answer({"jobs": [job.to_summary() for job in jobs], "total": len(jobs)})

    @_route("/api/v1/jobs/<string:job_id>", "GET")
    async def get_job(self, request: IRequest, job_id: str) -> Answer:
        return Answer(_as_job(self._jobs.get(validation.job_id(job_id))).to_detail())

    @_route("/api/v1/jobs/<string:job_id>", "DELETE")
    async def delete_job(self, request: IRequest, job_id: str) -> Answer:
        job_id = validation.job_id(job_id)
        self._jobs.delete(job_id)
        return Answer({"deleted": True, "job_id": job_id})

    @_route("/api/v1/jobs/<string:job_id>/cancel", "POST")
    async def cancel_job(self, request: IRequest, job_id: str) -> Answer:
        job = _as_job(self._jobs.cancel(validation.job_id(job_id)))
        return Answer(job.to_detail())

    @_route("/api/v1/jobs/<string:job_id>/events", "GET")
    async def job_events(self, request: IRequest, job_id: str) -> Answer:
        job_id = validation.job_id(job_id)
        after = read.query_int(request, "after", 0, 0, 2**63 - 1)
        job = _as_job(self._jobs.get(job_id))
        last_seq = self._jobs.events.last_seq(job_id)
        incarnation = self._jobs.incarnation
        if after > last_seq:
            raise EventsAheadError(
                f"Job {job_id} has no event after seq {after}: its last is {last_seq} "
                f"(agent incarnation {incarnation}); the agent lost or renumbered events, "
                "take the job from details.job",
                {"last_seq": last_seq, "incarnation": incarnation, "job": job.to_detail()},
            )
        try:
            events = self._jobs.events.after(job_id, after)
        except EventsExpiredError as expired:
            raise EventsGoneError(
                f"Events of job {job_id} after seq {after} are no longer kept (oldest kept: "
                f"{expired.oldest_kept}); details hold the job to resync from",
                job.to_detail(),
            ) from None
        detail = job.to_detail()
        return Answer(
            {
                "job_id": job_id,
                "events": [event.to_wire() for event in events],
                "last_seq": last_seq,
                "status": detail["status"],
                "terminal": detail["status"] in TERMINAL_STATUSES,
                "incarnation": incarnation,
            }
        )

    # -- websocket -------------------------------------------------------------------------------

    @_route("/api/v1/ws/jobs", "GET")
    async def websocket(self, request: IRequest) -> Any:
        if self._ws_resource is None:
            raise NotFoundError("The WebSocket endpoint is disabled", {"path": _path(request)})
        upgrade = (request.getHeader(b"upgrade") or b"").decode("latin-1").lower()
        if "websocket" not in [part.strip() for part in upgrade.split(",")]:
            error = UpgradeRequiredError("This endpoint needs a WebSocket upgrade")
            error.headers = {"Upgrade": "websocket", "Connection": "Upgrade"}  # type: ignore[attr-defined]
            raise error
        return self._ws_resource

    # -- metrics ---------------------------------------------------------------------------------

    @_route("/metrics", "GET")
    async def metrics(self, request: IRequest) -> Any:
        """Prometheus exposition (lpa.agent.metrics), behind the same gate as every route."""
        if self._metrics_resource is None:
            raise NotFoundError("Not found", {"path": _path(request)})
        return self._metrics_resource

    # -- helpers ---------------------------------------------------------------------------------

    def _accepted(self, job: Any, **extra: Any) -> dict[str, Any]:
        data = {
            "job_id": job.id,
            "status": job.status,
            "operation": job.operation,
            "packages": job.package_names,
            "seq": job.seq,
        }
        data.update(extra)
        return data

    async def _read(self, deferred: Any) -> Any:
        """Await a read-only backend call; its unexpected failures are 500 PKG_MANAGER_ERROR."""
        try:
            return await deferred
        except (ApiError, CancelledError):
            raise
        except CommandError as error:
            raise PackageManagerError("Package manager query failed") from error
        except Exception:
            _log.failure("package manager query crashed")
            raise PackageManagerError("Package manager query failed") from None
