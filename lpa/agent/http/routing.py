"""The routing of the agent's REST API: one Klein app, the ``route`` decorator its handlers use,
and :class:`Routes`, what every group of handlers may use of the API object.

The handlers live in groups by area (:mod:`~lpa.agent.http.routes_system`,
:mod:`~lpa.agent.http.routes_packages`, :mod:`~lpa.agent.http.routes_jobs`), as classes that
:class:`~lpa.agent.http.api.AgentApi` inherits; Klein binds each handler to the AgentApi it is
reached through, so they read the collaborators :class:`Routes` declares.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from lpa.agent.cache import PatchCache
from lpa.agent.http.envelope import Enveloper
from lpa.agent.interfaces import IJobManager, IPackageBackend, ISystem
from lpa.agent.model import Job
from lpa.errors import ApiError, CommandError, MethodNotAllowedError, PackageManagerError

_log = Logger()

#: the one query argument a mutating endpoint knows
DRY_RUN = ("dry_run",)

app = Klein()


class Routes:
    """What the handlers use of the API object (set by :class:`~lpa.agent.http.api.AgentApi`)."""

    _jobs: IJobManager
    _backend: IPackageBackend
    _system: ISystem
    _clock: IReactorTime
    _version: str
    _cache: PatchCache
    _enveloper: Enveloper
    _started_at: float
    _health_extra: Callable[[], dict[str, Any]] | None

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


def route(path: str, *methods: str) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """Register an ``async`` handler returning an :class:`Answer` (or an ``IResource``)."""
    allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Any:
        @functools.wraps(handler)
        async def endpoint(self: Routes, request: IRequest, **kwargs: Any) -> Any:
            method = request.method.decode("ascii", "replace")
            if method not in allowed:
                # werkzeug lets OPTIONS through to every rule: never run a handler for it
                raise method_not_allowed(sorted(allowed))
            answer = await handler(self, request, **kwargs)
            if IResource.providedBy(answer):
                return answer
            return self._enveloper.write(request, answer)

        return app.route(path, methods=list(methods))(endpoint)

    return decorate


def method_not_allowed(allowed: Sequence[str]) -> MethodNotAllowedError:
    error = MethodNotAllowedError("Method not allowed", {"allowed_methods": list(allowed)})
    error.headers = {"Allow": ", ".join(allowed)}
    return error


def from_werkzeug(exception: HTTPException) -> ApiError:
    """Another routing-level HTTP error (rare) as an ApiError with the same status."""
    error = ApiError(exception.name)
    error.http_status = exception.code or 400
    error.code = exception.name.upper().replace(" ", "_")
    return error


def as_job(job: object) -> Job:
    """IJobManager returns ``object`` (the interface cannot name the attrs class); it is a Job."""
    return cast(Job, job)


def request_path(request: IRequest) -> str:
    path: bytes = request.path
    return path.decode("latin-1")
