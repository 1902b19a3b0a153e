"""The agent's package and patch endpoints: list, show, install, update, remove, apply patches."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from lpa import validation
from lpa.agent.http import inputs as read
from lpa.agent.http.envelope import Answer
from lpa.agent.http.ownpackage import refuse_own_package
from lpa.agent.http.routing import DRY_RUN, Routes, as_job, route
from lpa.agent.model import JobRequest, PackageSpec, Patch
from lpa.errors import ValidationError
from lpa.events import OP_INSTALL, OP_PATCH_APPLY, OP_REMOVE, OP_UPDATE

_PACKAGE_STATUS_FILTERS = ("installed", "upgradable", "available")
_SORT_KEYS = ("name", "version", "status")



class PackageRoutes(Routes):
    """``/api/v1/packages…`` and ``/api/v1/patches…``."""

    @route("/api/v1/packages", "GET")
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

    @route("/api/v1/packages", "POST")
    async def install(self, request: IRequest) -> Answer:
        body = read.json_object(request)
        read.refuse_unknown(body, ("packages", "options", "dry_run"))
        read.refuse_unknown_query(request, DRY_RUN)
        if "packages" not in body:
            raise ValidationError("packages is required", {"field": "packages"})
        specs = read.package_specs(body["packages"])
        refuse_own_package(OP_INSTALL, [spec.name for spec in specs], self._version)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ValidationError("options must be an object", {"field": "options"})
        read.refuse_unknown(options, ("force", "no_recommends"), "options")
        dry_run = read.dry_run(request, body)
        job = as_job(
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

    @route("/api/v1/packages/<string:name>", "GET")
    async def get_package(self, request: IRequest, name: str) -> Answer:
        validation.package_name(name)
        package = await self._read(self._backend.get_package(name))
        return Answer(package.to_dict())

    @route("/api/v1/packages/<string:name>", "PUT")
    async def update_package(self, request: IRequest, name: str) -> Answer:
        return self._one_package(request, OP_UPDATE, name)

    @route("/api/v1/packages/<string:name>", "DELETE")
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
        read.refuse_unknown(body, DRY_RUN)
        read.refuse_unknown_query(request, DRY_RUN)
        dry_run = read.dry_run(request, body)
        job = as_job(
            self._jobs.submit(
                JobRequest(operation=operation, packages=(PackageSpec(name),), dry_run=dry_run)
            )
        )
        return Answer(self._accepted(job, package=name, dry_run=dry_run), 202)

    # -- patches ---------------------------------------------------------------------------------

    @route("/api/v1/patches", "GET")
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

    @route("/api/v1/patches/apply", "POST")
    async def apply_patches(self, request: IRequest) -> Answer:
        """Apply patches; ``packages`` absent means all, ``[]`` nothing (the manager sends it
        for a host with nothing selected; the job completes with an empty change list)."""
        body = read.json_object(request)
        read.refuse_unknown_query(request, DRY_RUN)
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
        job = as_job(self._jobs.submit(job_request))
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
