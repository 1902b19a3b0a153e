"""Value objects of the agent: jobs, packages, patches, command results.

:class:`Job` is the one mutable record here; only the job engine changes it.  Its REST shapes
(:meth:`Job.to_summary`, :meth:`Job.to_detail`) keep the original agent's fields
and add ``seq``, the last event number, the request options and the agent's ``incarnation``.

The engine changes a job at once but publishes its events only once they are durable (the
write-ahead log).  The REST shapes therefore show ``status``, ``progress``, ``seq``,
``updated_at``, ``completed_at`` and ``error``/``error_code`` as of the job's last *durable*
event (:attr:`Job.view`), never a state a crash could still take back; ``message`` and ``logs``
are the live ones.
"""

from __future__ import annotations

from typing import Any

import attr

from lpa.events import TERMINAL_STATUSES, JobEvent

#: attribute metadata: kept in memory only, never written to the job store
VOLATILE = {"persist": False}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PackageSpec:
    """A package named by a client, optionally pinned to a version (validated upstream)."""

    name: str
    version: str | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class JobRequest:
    """What a client asked for; validated by the API before it reaches the engine."""

    operation: str
    #: None means "all" and () "nothing" (both patch_apply only)
    packages: tuple[PackageSpec, ...] | None = None
    dry_run: bool = False
    security_only: bool = False
    allow_reboot: bool = False
    reboot_delay_seconds: int = 0
    force: bool = False
    no_recommends: bool = False
    #: reboot only: with ``force``, reboot even while a package-database mutation runs
    acknowledge_package_database_corruption_risk: bool = False


@attr.s(slots=True, auto_attribs=True, kw_only=True)
class Job:
    """A job's current state; ``seq`` is the number of its last event."""

    id: str
    operation: str
    status: str
    created_at: str
    updated_at: str
    request: JobRequest
    boot_id: str = ""
    completed_at: str | None = None
    progress: int = 0
    message: str = "Job created"
    logs: list[str] = attr.ib(factory=list)
    error: str | None = None
    error_code: str | None = None
    exit_code: int | None = None
    command_stdout: str | None = None
    command_stderr: str | None = None
    rollback_job_id: str | None = None
    exclusive_mode: bool = False
    seq: int = 0
    #: what the job changed or, on a dry run, would change: [{"name", "from", "to", "action"}]
    changes: list[dict[str, Any]] = attr.ib(factory=list)
    reboot_required: bool = False
    reboot_packages: list[str] = attr.ib(factory=list)
    #: wall-clock seconds the job started running (its timeout counts from there, restarts too)
    started_epoch: float | None = None
    #: per "<command number>:<fd>", the offset in the command's output file up to which lines
    #: are events (a restarted agent follows the command again from there)
    offsets: dict[str, int] = attr.ib(factory=dict)
    #: the job's last durable event, set as it is published (None: every field is durable)
    view: JobEvent | None = attr.ib(default=None, eq=False, repr=False, metadata=VOLATILE)
    #: the incarnation of the agent serving the job (set by the engine, not stored)
    incarnation: str | None = attr.ib(default=None, eq=False, repr=False, metadata=VOLATILE)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def shown(self) -> tuple[str, int, int, str, str | None, str | None, str | None]:
        """(status, progress, seq, updated_at, completed_at, error, error_code) as clients
        may see them: as of the last durable event (see the module docstring)."""
        view = self.view
        if view is None:
            return (
                self.status,
                self.progress,
                self.seq,
                self.updated_at,
                self.completed_at,
                self.error,
                self.error_code,
            )
        terminal = view.status in TERMINAL_STATUSES
        return (
            view.status,
            view.progress,
            view.seq or 0,
            view.timestamp,
            (self.completed_at or view.timestamp) if terminal else None,
            view.error if terminal else None,
            view.error_code if terminal else None,
        )

    @property
    def shown_status(self) -> str:
        return self.view.status if self.view is not None else self.status

    @property
    def package_names(self) -> list[str]:
        if self.request.packages is None:
            return []
        return [spec.name for spec in self.request.packages]

    def to_summary(self) -> dict[str, Any]:
        """One row of ``GET /api/v1/jobs``."""
        status, _, seq, _, completed_at, _, error_code = self.shown()
        summary: dict[str, Any] = {
            "job_id": self.id,
            "operation": self.operation,
            "status": status,
            "created_at": self.created_at,
            "completed_at": completed_at,
            "packages": self.package_names,
            "seq": seq,
            "dry_run": self.request.dry_run,
        }
        if error_code is not None:
            summary["error_code"] = error_code
        return summary

    def to_detail(self) -> dict[str, Any]:
        """``GET /api/v1/jobs/{id}``: the original's JobDetail plus seq, options and result."""
        status, progress, seq, updated_at, completed_at, error, error_code = self.shown()
        return {
            "job_id": self.id,
            "operation": self.operation,
            "status": status,
            "progress": progress,
            "message": self.message,
            "created_at": self.created_at,
            "updated_at": updated_at,
            "completed_at": completed_at,
            "packages": self.package_names,
            "logs": list(self.logs),
            "error": error,
            "error_code": error_code,
            "exit_code": self.exit_code,
            "command_stdout": self.command_stdout,
            "command_stderr": self.command_stderr,
            "rollback_job_id": self.rollback_job_id,
            "exclusive_mode": self.exclusive_mode,
            "boot_id": self.boot_id,
            "incarnation": self.incarnation,
            "seq": seq,
            "dry_run": self.request.dry_run,
            "security_only": self.request.security_only,
            "allow_reboot": self.request.allow_reboot,
            "reboot_delay_seconds": self.request.reboot_delay_seconds,
            "changes": list(self.changes),
            "reboot_required": self.reboot_required,
            "reboot_packages": list(self.reboot_packages),
        }


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Package:
    """A package as ``/api/v1/packages`` shows it (the original's fields)."""

    name: str
    version: str
    #: "Installed" | "Available" | "Upgradable" | "NotInstalled" (the original's spelling)
    status: str
    upgradable: bool = False
    latest_version: str | None = None
    description: str = ""
    dependencies: tuple[str, ...] = ()
    reverse_dependencies: tuple[str, ...] = ()
    install_date: str | None = None
    size_installed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "upgradable": self.upgradable,
            "latest_version": self.latest_version,
            "description": self.description,
            "dependencies": list(self.dependencies),
            "reverse_dependencies": list(self.reverse_dependencies),
            "install_date": self.install_date,
            "size_installed": self.size_installed,
        }


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Patch:
    """A pending update as ``/api/v1/patches`` shows it (the original's fields + ``security``)."""

    name: str
    current_version: str
    available_version: str
    #: "critical" | "high" | "medium" | "low"
    severity: str = "medium"
    description: str = "Package update available"
    cve_ids: tuple[str, ...] = ()
    requires_reboot: bool = False
    #: True when the package manager itself says this update is a security update
    security: bool = False
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "current_version": self.current_version,
            "available_version": self.available_version,
            "severity": self.severity,
            "description": self.description,
            "cve_ids": list(self.cve_ids),
            "requires_reboot": self.requires_reboot,
            "security": self.security,
            "source": self.source,
        }


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class CommandResult:
    """How one child process ended.  Output is kept bounded (head and tail) by the runner."""

    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    signal: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class JobOutcome:
    """What a backend reports when a job's work ends without an exception."""

    message: str
    changes: tuple[dict[str, Any], ...] = ()
    reboot_required: bool = False
    reboot_packages: tuple[str, ...] = ()
