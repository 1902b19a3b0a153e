"""apt/dpkg backend (Debian, Ubuntu).

A mutation runs as::

    dpkg --audit (interrupted work: repair, dpkg --configure -a) ─▶ apt-get -s … (n packages)
        ─▶ apt-get -y … -o APT::Status-Fd=3 (pmstatus → progress "package i of n")
        ─▶ [dependency error: apt-get -f install, retry once]
        ─▶ dpkg --audit (problems: dpkg --configure -a, audit again, else fail)

**Repair.**  A package database left half done (an interrupted dpkg: the host lost power, or
dpkg was killed) makes apt refuse to run until ``dpkg --configure -a``.  So before a mutation the
job asks ``dpkg --audit`` (read-only; what ``package_db_clean`` of the system info reports) and,
when it lists anything, says so in a progress event and runs dpkg's own repair
``dpkg --force-confdef --force-confold --configure -a`` first, as the job's own command (its
output becomes the job's events), keeping locally changed configuration files as the mutation
itself does.

**The package transaction** (:mod:`lpa.agent.phase`): ``apt-get -y`` is stopped at once by a
cancel or a timeout while it downloads, and let finish from its first ``pmstatus`` status line
(dpkg has the packages); ``dpkg --configure -a`` is a transaction from its start.

A dry run runs only ``apt-get -s``, which reads the package database and changes nothing; it
does not refresh the package lists either (``apt-get update`` writes ``/var/lib/apt/lists``).

A held lock is waited for by apt itself (``-o DPkg::Lock::Timeout=N``); its "Waiting for cache
lock: … held by process N (name)" stdout line becomes a ``waiting_for_lock`` event in the job
context, which watches every command's output.

``force`` means ``--allow-downgrades`` (a version pin older than the installed one); it never
means ``--allow-unauthenticated`` (bug 30): signatures are always checked.

The module is over 400 lines because apt's repair, its status-fd progress and its stanza and
simulation parsers all serve the one mutation sequence above; the parts every backend shares
already live in :mod:`lpa.agent.backends.base`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.logger import Logger

from lpa.agent import phase
from lpa.agent.backends.base import (
    DEFAULT_TIMEOUTS,
    BackendBase,
    Timeouts,
    available,
    change,
    error_text,
    first_stanza,
    is_dependency_error,
    is_fetch_error,
    package_requires_reboot,
)
from lpa.agent.model import JobOutcome, JobRequest, Package, PackageSpec, Patch
from lpa.errors import CommandFailedError

_log = Logger()

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "APT_LISTCHANGES_FRONTEND": "none",
    "NEEDRESTART_MODE": "l",
    "LC_ALL": "C",
}

#: dpkg's own repair of interrupted work, keeping locally changed configuration files
CONFIGURE_PENDING = ["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"]


# -- parsers -------------------------------------------------------------------------------

@attr.s(frozen=True, slots=True, auto_attribs=True)
class AptListEntry:
    """One line of ``apt list``: ``name/suite[,suite] version arch [flags]``."""

    name: str
    suites: tuple[str, ...]
    version: str
    arch: str
    installed: bool
    upgradable_to: str | None
    upgradable_from: str | None

    @property
    def security(self) -> bool:
        return any(suite.endswith("-security") or "-security" in suite for suite in self.suites)


_APT_LIST_LINE = re.compile(
    r"^(?P<name>[^/\s]+)/(?P<suites>\S*) (?P<version>\S+) (?P<arch>\S+)"
    r"(?: \[(?P<flags>[^\]]*)\])?$"
)


def parse_apt_list(text: str) -> list[AptListEntry]:
    """Parse ``apt list [--installed|--upgradable]``; reads the whole bracket (bug 25)."""
    entries = []
    for line in text.splitlines():
        match = _APT_LIST_LINE.match(line.strip())
        if match is None:
            continue
        flags = [flag.strip() for flag in (match["flags"] or "").split(",")]
        upgradable_to = upgradable_from = None
        for flag in flags:
            if flag.startswith("upgradable to:"):
                upgradable_to = flag.split(":", 1)[1].strip()
            elif flag.startswith("upgradable from:"):
                upgradable_from = flag.split(":", 1)[1].strip()
        entries.append(
            AptListEntry(
                name=match["name"],
                suites=tuple(s for s in match["suites"].split(",") if s and s != "now"),
                version=match["version"],
                arch=match["arch"],
                installed="installed" in flags or upgradable_from is not None,
                upgradable_to=upgradable_to,
                upgradable_from=upgradable_from,
            )
        )
    return entries


_SIM_INST = re.compile(
    r"^Inst (?P<name>\S+)(?: \[(?P<old>[^\]]*)\])? \((?P<new>\S+)(?P<origin>[^)]*)\)"
)
_SIM_REMV = re.compile(r"^(?P<verb>Remv|Purg) (?P<name>\S+)(?: \[(?P<old>[^\]]*)\])?")


def parse_apt_simulation(text: str) -> list[dict[str, Any]]:
    """``apt-get -s`` ``Inst``/``Remv``/``Purg`` lines → ``[{"name","from","to","action"}]``."""
    changes = []
    for line in text.splitlines():
        match = _SIM_INST.match(line)
        if match is not None:
            old = match["old"] or None
            action = "upgrade" if old else "install"
            changes.append(change(match["name"], old, match["new"], action))
            continue
        match = _SIM_REMV.match(line)
        if match is not None:
            action = "remove" if match["verb"] == "Remv" else "purge"
            changes.append(change(match["name"], match["old"] or None, None, action))
    return changes


def parse_dpkg_status(text: str) -> dict[str, str]:
    """``dpkg -s`` control fields of the first stanza (continuation lines folded into the field)."""
    return first_stanza(text, separator=":", joiner="\n")



def dependency_names(value: str) -> tuple[str, ...]:
    """Package names of a ``Depends:`` field (alternatives flattened, versions dropped)."""
    names = []
    for part in re.split(r"[,|]", value):
        name = part.strip().split(" ", 1)[0].split(":", 1)[0]
        if name and name not in names:
            names.append(name)
    return tuple(names)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AptPolicy:
    installed: str | None
    candidate: str | None
    #: origin lines (``500 http://… bookworm-security/main amd64 Packages``) of the candidate
    candidate_origins: tuple[str, ...]

    @property
    def security(self) -> bool:
        return any("-security" in origin for origin in self.candidate_origins)


def parse_apt_policy(text: str) -> dict[str, AptPolicy]:
    """``apt-cache policy NAME…`` → per package installed/candidate version and origins."""
    policies: dict[str, AptPolicy] = {}
    name: str | None = None
    installed: str | None = None
    candidate: str | None = None
    origins: list[str] = []
    current_version: str | None = None
    in_table = False

    def flush() -> None:
        if name is not None:
            policies[name] = AptPolicy(installed, candidate, tuple(origins))

    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            flush()
            name, installed, candidate, origins, current_version, in_table = (
                line.rstrip()[:-1], None, None, [], None, False,
            )
            continue
        stripped = line.strip()
        if stripped.startswith("Installed:"):
            value = stripped.split(":", 1)[1].strip()
            installed = None if value == "(none)" else value
        elif stripped.startswith("Candidate:"):
            value = stripped.split(":", 1)[1].strip()
            candidate = None if value == "(none)" else value
        elif stripped.startswith("Version table:"):
            in_table = True
        elif in_table and stripped:
            parts = stripped.split()
            if parts[0] == "***":
                parts = parts[1:]
            if len(parts) == 2 and not parts[0].isdigit():
                current_version = parts[0]
            elif current_version is not None and current_version == candidate:
                origins.append(stripped)
    flush()
    return policies


def parse_status_fd(line: str) -> tuple[str, str, float, str] | None:
    """One ``APT::Status-Fd`` line → (kind, item, percent, description), or None.

    The item may carry an architecture (``pmstatus:libc6:amd64:20.0000:Preparing libc6:amd64``)
    and the description may hold colons, so the percent is the first numeric field after it.
    """
    parts = line.rstrip("\n").split(":")
    if len(parts) < 4 or parts[0] not in ("pmstatus", "dlstatus", "pmerror", "pmconffile"):
        return None
    for index in range(2, len(parts) - 1):
        try:
            percent = float(parts[index])
        except ValueError:
            continue
        return parts[0], ":".join(parts[1:index]), percent, ":".join(parts[index + 1:])
    return None


# -- backend -------------------------------------------------------------------------------

class AptProgress:
    """Turns status-fd lines into ``ctx.progress``: downloads 0–30 %, dpkg 30–99 %."""

    def __init__(self, ctx: Any, total: int) -> None:
        self._ctx = ctx
        self._total = total
        self._seen: list[str] = []
        self._last = -1

    def __call__(self, line: str) -> None:
        parsed = parse_status_fd(line)
        if parsed is None:
            return
        kind, item, percent, description = parsed
        if kind == "dlstatus":
            overall = int(percent * 0.3)
            message = f"Downloading: {description}"
        elif kind == "pmstatus":
            overall = 30 + int(percent * 0.69)
            if item not in self._seen and not item.startswith("dpkg-exec"):
                self._seen.append(item)
            message = description
            if self._total and self._seen:
                done = min(len(self._seen), self._total)
                message = f"{description} (package {done} of {self._total})"
        else:
            return
        if overall != self._last or kind == "pmstatus":
            self._last = overall
            self._ctx.progress(max(0, min(99, overall)), message)


class AptBackend(BackendBase):
    """apt-get/dpkg; read-only queries through ``runner``, mutations through the job context."""

    name = "apt"

    def __init__(
        self,
        runner: Any,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        lock_timeout: int = 300,
        reboot_marker: str = "/var/run/reboot-required",
        modules_dir: str = "/lib/modules",
        running_kernel: Callable[[], str] = lambda: os.uname().release,
    ) -> None:
        super().__init__(
            runner,
            timeouts=timeouts,
            reboot_marker=reboot_marker,
            modules_dir=modules_dir,
            running_kernel=running_kernel,
        )
        self._lock_timeout = int(lock_timeout)

    # -- read-only -------------------------------------------------------------------------
    def read_env(self) -> dict[str, str]:
        return dict(APT_ENV)

    async def _available_packages(self) -> list[Package]:
        result = await self._read(["apt", "list"], timeout=self._timeouts.refresh)
        return [_package_from_entry(e) for e in parse_apt_list(result.stdout) if not e.installed]

    async def _installed_packages(self) -> list[Package]:
        result = await self._read(["apt", "list", "--installed"], timeout=self._timeouts.refresh)
        return [_package_from_entry(e) for e in parse_apt_list(result.stdout)]

    async def _find_package(self, name: str) -> Package | None:
        policy_result = await self._read(["apt-cache", "policy", "--", name])
        policy = parse_apt_policy(policy_result.stdout).get(name)
        status_result = await self._read(["dpkg", "-s", "--", name], ok_codes=(0, 1))
        fields = parse_dpkg_status(status_result.stdout) if status_result.exit_code == 0 else {}
        installed = fields.get("Status", "").endswith(" installed")
        if not installed and (policy is None or policy.candidate is None):
            return None
        candidate = policy.candidate if policy else None
        if installed:
            version = fields.get("Version", "")
            upgradable = bool(candidate) and candidate != version
            size = fields.get("Installed-Size", "")
            return Package(
                name=name,
                version=version,
                status="Upgradable" if upgradable else "Installed",
                upgradable=upgradable,
                latest_version=candidate if upgradable else version,
                description=fields.get("Description", "").split("\n", 1)[0],
                dependencies=dependency_names(
                    ", ".join(v for v in (fields.get("Pre-Depends"), fields.get("Depends")) if v)
                ),
                size_installed=int(size) * 1024 if size.isdigit() else None,
            )
        return available(name, candidate or "")

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        result = await self._read(["apt", "list", "--upgradable"], timeout=self._timeouts.refresh)
        patches = [_patch_from_entry(e) for e in parse_apt_list(result.stdout) if e.upgradable_from]
        if security_only:
            patches = [p for p in patches if p.security]
        return patches

    # -- argv ------------------------------------------------------------------------------
    def apt_get(self, *args: str, simulate: bool = False) -> list[str]:
        """``apt-get`` with conffile defaults, the lock timeout and status fd 3 (or ``-s``)."""
        argv = [
            "apt-get",
            "-o", "Dpkg::Options::=--force-confdef",
            "-o", "Dpkg::Options::=--force-confold",
            "-o", f"DPkg::Lock::Timeout={self._lock_timeout}",
        ]
        argv += ["-s"] if simulate else ["-y", "-o", "APT::Status-Fd=3"]
        return argv + list(args)

    @staticmethod
    def targets(specs: Sequence[PackageSpec]) -> list[str]:
        return [f"{s.name}={s.version}" if s.version else s.name for s in specs]

    def install_args(self, specs: Sequence[PackageSpec], request: JobRequest) -> list[str]:
        args = ["install"]
        if request.no_recommends:
            args.append("--no-install-recommends")
        if request.force:
            args.append("--allow-downgrades")
        return [*args, "--", *self.targets(specs)]

    # -- operations ------------------------------------------------------------------------
    async def _install(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._apply(ctx, request, self.install_args(specs, request), "Installed")

    async def _update(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        args = ["install", "--only-upgrade"] + (["--allow-downgrades"] if request.force else [])
        return await self._apply(ctx, request, [*args, "--", *self.targets(specs)], "Updated")

    async def _remove(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._apply(ctx, request, ["remove", "--", *self.targets(specs)], "Removed")

    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        if not request.dry_run:
            ctx.progress(2, "Refreshing package lists")
            await self._refresh(ctx)
        if request.security_only:
            names = await self._security_names(ctx, specs)
            if not names:
                return JobOutcome(message="No security updates pending")
            args = ["install", "--only-upgrade", "--", *names]
        elif specs is None:
            args = ["dist-upgrade"]
        else:
            args = ["install", "--only-upgrade", "--", *self.targets(specs)]
        try:
            return await self._apply(ctx, request, args, "Patched")
        except CommandFailedError as error:
            if request.dry_run or not is_fetch_error(error):
                raise
            _log.warn("apt fetch error, refreshing and retrying once: {error}", error=error)
            await self._refresh(ctx)
            return await self._apply(ctx, request, args, "Patched")

    async def _security_names(self, ctx: Any, specs: tuple[PackageSpec, ...] | None) -> list[str]:
        """Upgradable packages whose candidate comes from a ``*-security`` suite."""
        result = await ctx.run(["apt", "list", "--upgradable"], timeout=self._timeouts.refresh,
                               env=self.read_env())
        names = [e.name for e in parse_apt_list(result.stdout) if e.upgradable_from and e.security]
        if specs is not None:
            wanted = {s.name for s in specs}
            names = [n for n in names if n in wanted]
        return names

    async def _refresh(self, ctx: Any) -> None:
        await ctx.run(
            ["apt-get", "-o", f"DPkg::Lock::Timeout={self._lock_timeout}", "update"],
            timeout=self._timeouts.refresh,
            env=dict(APT_ENV),
        )

    async def _simulate(self, ctx: Any, args: list[str]) -> list[dict[str, Any]]:
        result = await ctx.run(self.apt_get(*args, simulate=True), timeout=self._timeouts.package,
                               env=dict(APT_ENV))
        return parse_apt_simulation(result.stdout)

    async def _apply(self, ctx: Any, request: JobRequest, args: list[str], verb: str) -> JobOutcome:
        if not request.dry_run:
            await self._configure_pending(ctx)
        changes = await self._simulate(ctx, args)
        if request.dry_run:
            return await self.outcome(ctx, request, changes, verb)
        progress = AptProgress(ctx, len(changes))
        try:
            await self._run_mutation(ctx, args, progress)
        except CommandFailedError as error:
            if not is_dependency_error(error):
                await self._configure_after_failure(ctx)
                raise
            _log.warn("apt dependency error, running apt-get -f install and retrying once")
            await self._run_mutation(ctx, ["-f", "install"], progress)
            await self._run_mutation(ctx, args, progress)
        await self._audit(ctx)
        return await self.outcome(ctx, request, changes, verb)

    async def _run_mutation(self, ctx: Any, args: list[str], progress: AptProgress) -> None:
        await ctx.run(
            self.apt_get(*args),
            timeout=self._timeouts.package,
            env=dict(APT_ENV),
            status_fd_line=progress,
            transaction=phase.APT,
        )

    async def _configure(self, ctx: Any) -> None:
        await ctx.run(
            CONFIGURE_PENDING,
            timeout=self._timeouts.package,
            env=dict(APT_ENV),
            transaction=phase.ALWAYS,
        )

    async def _configure_pending(self, ctx: Any) -> None:
        """Repair interrupted dpkg work first (see the module docstring); only when
        ``dpkg --audit`` reports some, because ``dpkg --configure -a`` takes the lock without
        waiting for it."""
        if await self._audit_clean(ctx):
            return
        ctx.progress(
            1,
            "The package database was left interrupted; repairing it first with "
            "dpkg --configure -a",
        )
        try:
            await self._configure(ctx)
        except CommandFailedError as error:
            if "locked by another process" in error_text(error):
                raise CommandFailedError(
                    "dpkg --configure -a could not take the dpkg lock: another package manager "
                    "holds it while interrupted work waits to be finished; try again later",
                    error.result,
                ) from error
            raise CommandFailedError(
                "dpkg --configure -a failed before the operation: the package database "
                "requires manual intervention",
                error.result,
            ) from error

    async def _audit_clean(self, ctx: Any) -> bool:
        result = await ctx.run(["dpkg", "--audit"], timeout=self._timeouts.quick,
                               env=dict(APT_ENV), ok_codes=(0, 1))
        return not (result.stdout.strip() or result.exit_code)

    async def _configure_after_failure(self, ctx: Any) -> None:
        try:
            await self._configure(ctx)
        except CommandFailedError as error:
            _log.warn("dpkg --configure -a after a failed apt command also failed: {error}",
                      error=error)

    async def _audit(self, ctx: Any) -> None:
        """``dpkg --audit`` after the operation; problems get one ``dpkg --configure -a``."""
        if await self._audit_clean(ctx):
            return
        await self._configure(ctx)
        if not await self._audit_clean(ctx):
            raise CommandFailedError(
                "dpkg --audit still reports problems after dpkg --configure -a: the package "
                "database requires manual intervention",
            )


def _package_from_entry(entry: AptListEntry) -> Package:
    if entry.installed:
        upgradable = entry.upgradable_to is not None
        return Package(
            name=entry.name,
            version=entry.version,
            status="Upgradable" if upgradable else "Installed",
            upgradable=upgradable,
            latest_version=entry.upgradable_to or entry.version,
        )
    return Package(name=entry.name, version=entry.version, status="Available",
                   latest_version=entry.version)


def _patch_from_entry(entry: AptListEntry) -> Patch:
    reboot = package_requires_reboot(entry.name)
    if entry.security:
        severity = "critical" if reboot else "high"
        description = f"Security update from {','.join(entry.suites)}"
    else:
        severity = "medium"
        description = f"Package update available from {','.join(entry.suites)}"
    return Patch(
        name=entry.name,
        current_version=entry.upgradable_from or "",
        available_version=entry.version,
        severity=severity,
        description=description,
        requires_reboot=reboot,
        security=entry.security,
        source=",".join(entry.suites),
    )


