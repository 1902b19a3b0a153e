"""The agent's health and system endpoints: health, host information, a service's status, reboot."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from lpa import validation
from lpa.agent.http import inputs as read
from lpa.agent.http.envelope import Answer
from lpa.agent.http.routing import Routes, as_job, route
from lpa.agent.model import JobRequest
from lpa.errors import ApiError, ServiceStatusError, SystemInfoError, ValidationError
from lpa.events import OP_REBOOT, rfc3339_from_epoch

_log = Logger()

_HEALTH_DEFAULTS: dict[str, Any] = {
    "crl_status": None,
    "crl_age_seconds": None,
    "crl_next_update": None,
    "gpg_key_status": None,
    "gpg_key_expires_at": None,
    "repo_config_synced": None,
    "repo_config_last_sync": None,
}



class SystemRoutes(Routes):
    """``/health``, ``/api/v1/health`` and ``/api/v1/system/…``."""

    @route("/health", "GET")
    async def health_root(self, request: IRequest) -> Answer:
        return Answer(self.health())

    @route("/api/v1/health", "GET")
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

    @route("/api/v1/system/info", "GET")
    async def system_info(self, request: IRequest) -> Answer:
        try:
            info = await self._system.system_info()
        except (ApiError, CancelledError):
            raise
        except Exception as error:
            # logged with the request id by the error mapping, never echoed
            raise SystemInfoError("Failed to read system information") from error
        return Answer(info)

    @route("/api/v1/system/services/<string:name>", "GET")
    async def service_status(self, request: IRequest, name: str) -> Answer:
        validation.service_name(name)
        try:
            status = await self._system.service_status(name)
        except (ApiError, CancelledError):
            raise
        except Exception as error:
            raise ServiceStatusError("Failed to read the service status") from error
        return Answer(status)

    @route("/api/v1/system/reboot", "POST")
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
        job = as_job(
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
