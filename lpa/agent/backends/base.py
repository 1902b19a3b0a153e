"""What every package-manager backend shares: request checks, timeouts, reboot hints, dispatch.

A backend has two halves::

    read-only  list_packages / get_package / list_patches ──runner.run──▶ parse ──▶ Package/Patch
    mutating   execute(job, ctx) ─▶ checked specs ─▶ _install/_update/_remove/_patch_apply
                                                        │ ctx.run(argv, timeout=…)
                                                        ▼
                                                     JobOutcome(changes, reboot_required)

Every user-supplied name and version is validated with :mod:`lpa.validation` before an argv is
built, and every argv puts ``--`` before those names.

It is over 400 lines on purpose: the request checks, timeouts, reboot hints and dispatch are
what all six backends share, and moving any of them out would make each backend import two
modules for one contract.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from lpa import validation
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import CommandResult, JobOutcome, JobRequest, Package, PackageSpec, Patch
from lpa.errors import (
    CommandError,
    CommandFailedError,
    CommandNotFoundError,
    CommandTimedOutError,
    PackageManagerError,
    PackageNotFoundError,
    ValidationError,
)
from lpa.events import OP_INSTALL, OP_PATCH_APPLY, OP_REMOVE, OP_UPDATE

_log = Logger()

#: package-name fragments whose update conservatively needs a reboot (as the original's list)
REBOOT_NAME_FRAGMENTS: tuple[str, ...] = (
    "linux-image",
    "linux-signed",
    "linux-firmware",
    "kernel",
    "glibc",
    "libc6",
    "musl",
    "systemd",
    "udev",
    "dbus",
    "openssl",
    "libssl",
    "microcode",
    "grub",
    "shim",
    "bootloader",
    "initramfs",
    "dracut",
)


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Timeouts:
    """Per-command deadlines in seconds (the original's 300/1800/60)."""

    refresh: float = 300.0
    package: float = 1800.0
    quick: float = 60.0


#: the deadlines a backend gets when none are given
DEFAULT_TIMEOUTS = Timeouts()

def package_requires_reboot(name: str) -> bool:
    """Whether updating ``name`` conservatively calls for a reboot (kernel, libc, init …)."""
    lowered = name.lower()
    return any(fragment in lowered for fragment in REBOOT_NAME_FRAGMENTS)


def name_severity(name: str) -> str:
    """The original's name heuristic; used only where the manager gives no security data."""
    lowered = name.lower()
    if "kernel" in lowered or "ssl" in lowered or "security" in lowered:
        return "critical"
    if "lib" in lowered:
        return "high"
    return "medium"


def checked_specs(packages: Sequence[PackageSpec] | None) -> tuple[PackageSpec, ...] | None:
    """Validate every name and version; ``None`` stays None ("all"), ``()`` is refused: no argv
    is ever built from an empty list (the original ran ``apt-get install -y --``).  An empty
    patch_apply ends before this, in :meth:`BackendBase._execute`."""
    if packages is None:
        return None
    specs = tuple(packages)
    if not specs:
        raise ValidationError("packages must not be empty; omit it to mean all packages")
    for spec in specs:
        validation.package_name(spec.name)
        if spec.version is not None:
            validation.package_version(spec.version)
    return specs


def change(name: str, old: str | None, new: str | None, action: str) -> dict[str, Any]:
    """One ``JobOutcome.changes`` entry."""
    return {"name": name, "from": old, "to": new, "action": action}


def read_reboot_marker(marker_path: str) -> tuple[bool, list[str]]:
    """Debian's ``/var/run/reboot-required`` marker and the packages in its ``.pkgs`` file."""
    if not os.path.exists(marker_path):
        return False, []
    names: list[str] = []
    try:
        with open(marker_path + ".pkgs", encoding="utf-8", errors="replace") as pkgs:
            for raw in pkgs:
                line = raw.strip()
                if line and line not in names:
                    names.append(line)
    except OSError:
        pass
    return True, names


def needs_restarting_verdict(result: CommandResult) -> bool | None:
    """Read ``needs-restarting -r``: True (exit 1 and "Reboot is required"), False (exit 0),
    None when inconclusive, e.g. dnf without the plugin ("No such command", also exit 1)."""
    text = (result.stdout + "\n" + result.stderr).lower()
    if result.timed_out:
        return None
    if result.exit_code == 1 and "reboot is required" in text:
        return True
    if result.exit_code == 0:
        return False
    return None


def _version_key(text: str) -> tuple[Any, ...]:
    """A natural sort key: digit runs compare as numbers (``6.10`` > ``6.9``)."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)
    )


def newer_kernel_installed(running_release: str, modules_dir: str = "/lib/modules") -> bool:
    """True when ``modules_dir`` holds a kernel newer than the running one.

    When the running release is not among the installed ones (containers, custom kernels) we
    cannot tell, and say False rather than invent a reboot.
    """
    try:
        installed = [entry for entry in os.listdir(modules_dir) if not entry.startswith(".")]
    except OSError:
        return False
    if running_release not in installed:
        return False
    newest = max(installed, key=_version_key)
    return newest != running_release and _version_key(newest) > _version_key(running_release)


async def run_read(
    runner: Any,
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
) -> CommandResult:
    """Run a read-only query; anything but an allowed exit is a retryable ``PackageManagerError``.

    The error a client may see says what kind of failure it was and nothing of the host: the
    command line and its output ride along as the ``CommandError`` it is raised from (its
    ``__cause__``), which the API logs with the request id and a job keeps in its details.
    """
    try:
        result: CommandResult = await runner.run(list(argv), timeout=timeout, env=env)
    except CommandNotFoundError as error:
        raise PackageManagerError("The package manager could not be started") from error
    command = " ".join(argv)
    if result.timed_out:
        raise PackageManagerError(
            "The package manager query timed out", {"timeout_seconds": timeout}
        ) from CommandTimedOutError(f"{command} timed out after {timeout:g}s", result)
    if result.exit_code not in ok_codes:
        raise PackageManagerError(
            "The package manager query failed", {"exit_code": result.exit_code}
        ) from CommandFailedError(f"{command} exited with status {result.exit_code}", result)
    return result


def error_text(error: BaseException) -> str:
    """Message plus captured output of a command error, lowercased, for keyword checks."""
    parts = [str(error)]
    result = getattr(error, "result", None)
    if isinstance(result, CommandResult):
        parts += [result.stdout, result.stderr]
    return "\n".join(parts).lower()


_DEPENDENCY_WORDS = ("unmet dependencies", "broken packages", "held broken", "dependency problems")
_FETCH_WORDS = ("failed to fetch", "unable to fetch", "404", "not found", "could not resolve")


def is_dependency_error(error: BaseException) -> bool:
    return isinstance(error, CommandFailedError) and any(
        word in error_text(error) for word in _DEPENDENCY_WORDS
    )


def is_fetch_error(error: BaseException) -> bool:
    """A download failure that a cache refresh may cure (the original's one retry)."""
    return isinstance(error, CommandFailedError) and any(
        word in error_text(error) for word in _FETCH_WORDS
    )


@implementer(IPackageBackend)
class BackendBase:
    """Request checking and dispatch shared by every backend; subclasses supply the commands."""

    name = "base"
    #: whether the manager has its own notion of security updates
    supports_security_only = True
    #: whether ``PackageSpec.version`` pins can be honoured
    supports_version_pins = True

    def __init__(
        self,
        runner: Any,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        reboot_marker: str = "/var/run/reboot-required",
        modules_dir: str = "/lib/modules",
        running_kernel: Callable[[], str] = lambda: os.uname().release,
    ) -> None:
        self._runner = runner
        self._timeouts = timeouts
        self._reboot_marker = reboot_marker
        self._modules_dir = modules_dir
        self._running_kernel = running_kernel

    # -- read-only -------------------------------------------------------------------------
    def list_packages(
        self, name_filter: str | None = None, status: str | None = None
    ) -> Deferred[list[Package]]:
        return _deferred(self._list_packages, name_filter, status)

    def get_package(self, name: str) -> Deferred[Package]:
        return _deferred(self._get_package, name)

    def list_patches(self, security_only: bool = False) -> Deferred[list[Patch]]:
        return _deferred(self._list_patches, security_only)

    async def _list_packages(self, name_filter: str | None, status: str | None) -> list[Package]:
        """``status`` ``available`` lists what could be installed, anything else what is
        installed (``upgradable``: only what has an update); ``name_filter`` is a substring."""
        if name_filter:
            validation.package_name(name_filter)
        wanted = (status or "").lower()
        if wanted == "available":
            packages = await self._available_packages()
        else:
            packages = await self._installed_packages()
            if wanted == "upgradable":
                packages = [p for p in packages if p.upgradable]
        if name_filter:
            needle = name_filter.lower()
            packages = [p for p in packages if needle in p.name.lower()]
        return packages

    async def _get_package(self, name: str) -> Package:
        validation.package_name(name)
        package = await self._find_package(name)
        if package is None:
            raise PackageNotFoundError(f"package {name} not found", {"name": name})
        return package

    async def _installed_packages(self) -> list[Package]:
        """Every installed package, with its update when there is one."""
        raise NotImplementedError

    async def _available_packages(self) -> list[Package]:
        """Packages the repositories offer that are not installed (or their updates)."""
        raise NotImplementedError

    async def _find_package(self, name: str) -> Package | None:
        """One package by its exact (validated) name, installed or available; None if unknown."""
        raise NotImplementedError

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        raise NotImplementedError

    async def _read(
        self, argv: Sequence[str], *, timeout: float | None = None, ok_codes: Sequence[int] = (0,)
    ) -> CommandResult:
        return await run_read(
            self._runner,
            argv,
            timeout=self._timeouts.quick if timeout is None else timeout,
            env=self.read_env(),
            ok_codes=ok_codes,
        )

    def read_env(self) -> dict[str, str]:
        """Environment additions for read-only queries: a fixed locale so parsing is stable."""
        return {"LC_ALL": "C"}

    # -- mutations -------------------------------------------------------------------------
    def execute(self, job: Any, context: Any) -> Deferred[JobOutcome]:
        return _deferred(self._execute, job, context)

    def check_request(self, request: JobRequest) -> tuple[PackageSpec, ...] | None:
        """Validate ``request`` for this backend before any command is built; return the specs."""
        specs = checked_specs(request.packages)
        operation = request.operation
        if operation not in (OP_INSTALL, OP_UPDATE, OP_REMOVE, OP_PATCH_APPLY):
            raise ValidationError(f"{self.name} backend cannot run operation {operation!r}")
        if operation != OP_PATCH_APPLY and specs is None:
            raise ValidationError(f"{operation} needs at least one package")
        if request.security_only and operation != OP_PATCH_APPLY:
            raise ValidationError("security_only applies to patch_apply only")
        if request.security_only and not self.supports_security_only:
            raise ValidationError(f"security_only is not supported by {self.name}")
        if specs and not self.supports_version_pins and any(s.version for s in specs):
            raise ValidationError(f"version pins are not supported by {self.name}")
        if specs and operation == OP_REMOVE and any(s.version for s in specs):
            raise ValidationError("remove takes package names without versions")
        return specs

    async def _execute(self, job: Any, context: Any) -> JobOutcome:
        request: JobRequest = job.request
        if request.operation == OP_PATCH_APPLY and request.packages == ():
            # the manager's "nothing selected on this host": no command runs, no reboot
            _log.info(
                "{backend} patch_apply job {job_id}: no packages named, nothing to apply",
                backend=self.name,
                job_id=getattr(job, "id", "?"),
            )
            prefix = "Dry run: n" if request.dry_run else "N"
            return JobOutcome(message=f"{prefix}othing to apply: the request named no packages")
        specs = self.check_request(request)
        _log.info(
            "{backend} {operation} job {job_id} (dry_run={dry_run})",
            backend=self.name,
            operation=request.operation,
            job_id=getattr(job, "id", "?"),
            dry_run=request.dry_run,
        )
        if request.operation == OP_INSTALL:
            assert specs is not None
            return await self._install(specs, request, context)
        if request.operation == OP_UPDATE:
            assert specs is not None
            return await self._update(specs, request, context)
        if request.operation == OP_REMOVE:
            assert specs is not None
            return await self._remove(specs, request, context)
        return await self._patch_apply(specs, request, context)

    async def _install(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        raise NotImplementedError

    async def _update(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        raise NotImplementedError

    async def _remove(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        raise NotImplementedError

    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        raise NotImplementedError

    # -- outcome helpers -------------------------------------------------------------------
    async def manager_says_reboot(self, ctx: Any) -> bool:
        """The manager's own reboot verdict after an apply (e.g. ``dnf needs-restarting -r``)."""
        return False

    async def reboot_verdict(
        self, ctx: Any, changes: Iterable[Mapping[str, Any]]
    ) -> tuple[bool, tuple[str, ...]]:
        """Reboot-required after a real apply: marker file (+ .pkgs), the conservative name list,
        the manager's verdict, then a newer installed kernel than the running one."""
        marked, marker_names = read_reboot_marker(self._reboot_marker)
        names = list(marker_names)
        for entry in changes:
            name = str(entry.get("name", ""))
            if (entry.get("action") != "remove" and package_requires_reboot(name)
                    and name not in names):
                names.append(name)
        needed = marked or bool(names)
        if not needed:
            try:
                needed = await self.manager_says_reboot(ctx)
            except CommandError as error:
                _log.warn("{backend} reboot check failed: {error}", backend=self.name, error=error)
        if not needed and newer_kernel_installed(self._running_kernel(), self._modules_dir):
            needed, names = True, ["kernel"]
        return needed, tuple(names)

    async def outcome(
        self, ctx: Any, request: JobRequest, changes: Sequence[Mapping[str, Any]], verb: str
    ) -> JobOutcome:
        """Build the JobOutcome; a dry run never asks for a reboot (it changed nothing)."""
        rows = tuple(dict(entry) for entry in changes)
        if request.dry_run:
            would = sorted({c["name"] for c in rows if package_requires_reboot(str(c["name"]))})
            message = f"Dry run: {len(rows)} package(s) would change"
            if would:
                message += f"; a reboot would be needed for {', '.join(would)}"
            return JobOutcome(message=message, changes=rows)
        needed, names = await self.reboot_verdict(ctx, rows)
        message = f"{verb}: {len(rows)} package(s) changed"
        if needed:
            message += "; reboot required"
        return JobOutcome(
            message=message, changes=rows, reboot_required=needed, reboot_packages=names
        )


def available(name: str, version: str, **fields: Any) -> Package:
    """A package the repositories offer and the host does not have (yet)."""
    return Package(name=name, version=version, status="Available", latest_version=version, **fields)


def first_stanza(text: str, *, separator: str, joiner: str) -> dict[str, str]:
    """The ``Key<separator>value`` fields of the first blank-line-separated stanza.

    Indented lines continue the previous field (joined with ``joiner``): dpkg's control format
    (``Key: value``) and pacman's ``-Qi``/``-Si`` blocks (``Key : value``) are both this.
    """
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key is not None:
            fields[key] += joiner + line.strip()
            continue
        name, found, value = line.partition(separator)
        if found:
            key = name.strip()
            fields[key] = value.strip()
    return fields


_T = TypeVar("_T")


def _deferred(function: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> Deferred[_T]:
    """Start a coroutine method as a Deferred, turning synchronous raises into errbacks."""
    return Deferred.fromCoroutine(function(*args))


class VerbCommandsMixin:
    """install / update / remove as ``command(verb, request, "--", names…)`` through ``_run``.

    For managers whose three operations differ only by the verb (apk, dnf, yum, zypper); each
    backend provides ``command`` (adds its dry-run and non-interactive flags) and ``_run``.
    """

    install_verb = "install"
    update_verb = "update"
    remove_verb = "remove"

    async def _by_verb(
        self, verb: str, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any, label: str
    ) -> JobOutcome:
        argv = self.command(verb, request, "--", *self.targets(specs))  # type: ignore[attr-defined]
        return await self._run(ctx, request, argv, label)  # type: ignore[attr-defined,no-any-return]

    async def _install(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._by_verb(self.install_verb, specs, request, ctx, "Installed")

    async def _update(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._by_verb(self.update_verb, specs, request, ctx, "Updated")

    async def _remove(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._by_verb(self.remove_verb, specs, request, ctx, "Removed")
