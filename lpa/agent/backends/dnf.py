"""dnf backend (Fedora, RHEL 8+) and the rpm helpers yum and zypper share.

Installed packages come from ``rpm -qa`` with our own query format (tab-separated, so parsing
does not depend on the manager's table layout).  Pending updates come from ``dnf check-update``
(exit 100 means "updates exist") joined with ``dnf updateinfo list`` for real security data:
advisory type/severity (``Important/Sec.``) and, with ``--with-cve``, CVE ids.  As in the
original, these queries let dnf refresh expired metadata (no ``--cacheonly``, which fails
outright on a host whose cache was never built).

A dry run is the real command with ``--assumeno`` instead of ``-y``: dnf resolves, prints the
transaction table, answers "no" and exits 1, which is expected.  ``force`` means
``--allowerasing``; GPG checks are never disabled.

**The package transaction** (:mod:`lpa.agent.phase`): from "Running transaction" on, rpm runs
(it blocks most signals itself meanwhile); cancel and timeout let it finish.

**Repair.**  rpm commits each package of a transaction on its own, so an interrupted transaction
leaves a consistent database that may list two versions of a package ("duplicates"); nothing
is left "half configured" as with dpkg.  Before a mutation the job runs ``dnf check
--duplicates`` (read-only; yum: ``yum check duplicates``) and, when it names any, says so in a
progress event and runs the manager's own clean-up, ``dnf remove --duplicates`` (it removes the
older entry and reinstalls the newest package; yum: ``package-cleanup --cleandupes`` from
yum-utils).  ``rpm --rebuilddb`` is not run: it rebuilds the database files' indexes from the
package headers and mends a corrupt database, not an interrupted transaction, and must not run
beside another rpm.  A manager without these commands (dnf 5 has no ``check``) skips the repair
with a log line.

A little over 400 lines: the rpm query and updateinfo parsers live here because yum and zypper
reuse them, so the three rpm backends keep one copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from lpa.agent import phase
from lpa.agent.backends.base import (
    BackendBase,
    VerbCommandsMixin,
    available,
    change,
    name_severity,
    needs_restarting_verdict,
    package_requires_reboot,
)
from lpa.agent.model import JobOutcome, JobRequest, Package, PackageSpec, Patch
from lpa.errors import CommandFailedError, CommandNotFoundError

_log = Logger()

RPM_QUERYFORMAT = (
    "%{NAME}\\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{SIZE}\\t%{INSTALLTIME}"
    "\\t%{SUMMARY}\\n"
)

#: advisory severities as dnf/zypper spell them → ours
SEVERITIES = {
    "critical": "critical",
    "important": "high",
    "high": "high",
    "moderate": "medium",
    "medium": "medium",
    "low": "low",
}


def strip_zero_epoch(evr: str) -> str:
    return evr[2:] if evr.startswith("0:") else evr


def parse_rpm_qa(text: str) -> list[Package]:
    """Lines of :data:`RPM_QUERYFORMAT` → installed ``Package``s."""
    packages = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        name, evr, _arch, size, installed_at, summary = parts[:6]
        packages.append(
            Package(
                name=name,
                version=strip_zero_epoch(evr),
                status="Installed",
                latest_version=strip_zero_epoch(evr),
                description=summary,
                install_date=installed_at if installed_at.isdigit() else None,
                size_installed=int(size) if size.isdigit() else None,
            )
        )
    return packages


def split_name_arch(value: str) -> tuple[str, str]:
    name, dot, arch = value.rpartition(".")
    return (name, arch) if dot else (value, "")


_NOISE = ("Last metadata", "Loaded plugins", "Loading", "Updating", "Repositories loaded")


def parse_check_update(text: str) -> dict[str, tuple[str, str]]:
    """``dnf/yum check-update`` → ``{name: (version, repo)}``; wrapped long names are joined."""
    updates: dict[str, tuple[str, str]] = {}
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Obsoleting Packages", "Security:")):
            break
        if not stripped or stripped.startswith(_NOISE) or stripped.endswith(" Packages"):
            continue
        tokens = pending + stripped.split()
        if len(tokens) < 3:
            pending = tokens
            continue
        pending = []
        name, arch = split_name_arch(tokens[0])
        if not arch or not re.match(r"^[\w.:~+^-]+$", tokens[1]):
            continue
        updates[name] = (strip_zero_epoch(tokens[1]), tokens[2])
    return updates


def split_nevra(nevra: str) -> tuple[str, str]:
    """``openssl-1:3.0.7-25.el9.x86_64`` → (``openssl``, ``1:3.0.7-25.el9``)."""
    base, _arch = split_name_arch(nevra)
    name_version, _, release = base.rpartition("-")
    name, _, version = name_version.rpartition("-")
    return name, strip_zero_epoch(f"{version}-{release}")


def parse_updateinfo(text: str) -> dict[str, dict[str, Any]]:
    """``dnf updateinfo list [--with-cve]`` → per package name: security, severity, ids.

    Rows are ``ID TYPE NEVRA`` where TYPE is ``security``/``bugfix``/``enhancement`` or
    ``<Severity>/Sec.`` (dnf 4, yum 3); ID is an advisory or, with ``--with-cve``, a CVE id.
    dnf 5 spells ``ID security <Severity> NEVRA <issued>``; any row without a NEVRA is skipped.
    """
    info: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 3:
            continue
        ident, kind = tokens[0], tokens[1]
        nevra = next((t for t in tokens[2:] if _NEVRA.match(t)), None)
        if nevra is None:
            continue  # headers, "updateinfo list done", blank lines
        if kind.lower() == "security" and tokens[2].lower() in SEVERITIES:  # dnf 5 columns
            kind = f"{tokens[2]}/Sec."
        name, _ = split_nevra(nevra)
        entry = info.setdefault(name, {"security": False, "severity": None, "ids": []})
        lowered = kind.lower()
        if lowered == "security" or lowered.endswith("/sec."):
            entry["security"] = True
            level = SEVERITIES.get(lowered.split("/", 1)[0]) if "/" in lowered else None
            entry["severity"] = _worse(entry["severity"], level or "high")
        if ident not in entry["ids"]:
            entry["ids"].append(ident)
    return info


_NEVRA = re.compile(r"^[^\s/]+-[^-\s/]+-[^-\s/]+\.[A-Za-z0-9_]+$")


#: what ``dnf check --duplicates`` and ``yum check duplicates`` say of each duplicate
_DUPLICATE = " is a duplicate with "

#: how dnf/yum end a dry run that resolved fine (exit 1 after answering "no")
_DRY_RUN_ENDINGS = ("Operation aborted", "Nothing to do", "Exiting on user command")

_ORDER = ("low", "medium", "high", "critical")


def _worse(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if _ORDER.index(a) >= _ORDER.index(b) else b


_TABLE_SECTIONS = {
    "installing": "install",
    "upgrading": "upgrade",
    "downgrading": "downgrade",
    "reinstalling": "reinstall",
    "removing": "remove",
    "erasing": "remove",
    "updating": "upgrade",
}


def parse_transaction_table(text: str) -> list[dict[str, Any]]:
    """The transaction table dnf/yum print before asking → changes (dnf 5 ``replacing`` rows
    give the old version)."""
    changes: list[dict[str, Any]] = []
    action = None
    for line in text.splitlines():
        stripped = line.strip()
        header = stripped.rstrip(":").lower()
        if stripped.endswith(":") and any(header.startswith(s) for s in _TABLE_SECTIONS):
            action = next(v for k, v in _TABLE_SECTIONS.items() if header.startswith(k))
            continue
        if not stripped or stripped.startswith(("Transaction Summary", "Transaction Summary:")):
            if stripped.startswith("Transaction Summary"):
                action = None
            continue
        if action is None or not line.startswith(" "):
            continue
        tokens = stripped.split()
        if tokens[0] == "replacing" and changes and len(tokens) >= 4:
            changes[-1]["from"] = strip_zero_epoch(tokens[3])
            continue
        if len(tokens) < 4:
            continue
        name, version = tokens[0], strip_zero_epoch(tokens[2])
        if action == "remove":
            changes.append(change(name, version, None, "remove"))
        else:
            changes.append(change(name, None, version, action))
    return changes


class DnfBackend(VerbCommandsMixin, BackendBase):
    """dnf (4 or 5); ``yum`` and ``zypper`` reuse its rpm queries."""

    name = "dnf"
    binary = "dnf"

    # -- read-only -------------------------------------------------------------------------
    async def _installed(self, name: str | None = None) -> list[Package]:
        argv = ["rpm", "-qa", "--qf", RPM_QUERYFORMAT]
        result = await self._read(argv, timeout=self._timeouts.refresh)
        packages = parse_rpm_qa(result.stdout)
        return [p for p in packages if p.name == name] if name else packages

    async def _updates(self, names: Sequence[str] = ()) -> dict[str, tuple[str, str]]:
        argv = [self.binary, "-q", "check-update"]
        if names:
            argv += ["--", *names]
        result = await self._read(argv, timeout=self._timeouts.refresh, ok_codes=(0, 100))
        return parse_check_update(result.stdout)

    async def _available_packages(self) -> list[Package]:
        updates = await self._updates()
        return [available(n, v) for n, (v, _repo) in sorted(updates.items())]

    async def _installed_packages(self) -> list[Package]:
        packages = await self._installed()
        updates = await self._updates()
        return [_with_update(p, updates.get(p.name)) for p in packages]

    async def _find_package(self, name: str) -> Package | None:
        installed = await self._installed(name)
        if installed:
            updates = await self._updates([name])
            return _with_update(installed[0], updates.get(name))
        result = await self._read(self.available_argv(name), ok_codes=(0, 1))
        offered = parse_check_update(result.stdout)
        return available(name, offered[name][0]) if name in offered else None

    async def _advisories(self) -> dict[str, dict[str, Any]]:
        """Security data per package; an empty dict when the repos carry no updateinfo."""
        info: dict[str, dict[str, Any]] = {}
        for argv in self.advisory_argvs():
            try:
                result = await self._read(argv, timeout=self._timeouts.refresh)
            except Exception:
                continue
            for name, entry in parse_updateinfo(result.stdout).items():
                merged = info.setdefault(
                    name, {"security": False, "severity": None, "ids": [], "cves": []}
                )
                if entry["security"]:
                    merged["security"] = True
                    merged["severity"] = _worse(merged["severity"], entry["severity"])
                for ident in entry["ids"]:
                    bucket = "cves" if ident.startswith("CVE-") else "ids"
                    if ident not in merged[bucket]:
                        merged[bucket].append(ident)
        return info

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        updates = await self._updates()
        installed = {p.name: p.version for p in await self._installed()}
        advisories = await self._advisories()
        patches = []
        for name, (version, repo) in sorted(updates.items()):
            advisory = advisories.get(name, {})
            security = bool(advisory.get("security"))
            ids = advisory.get("ids", [])
            patches.append(
                Patch(
                    name=name,
                    current_version=installed.get(name, ""),
                    available_version=version,
                    severity=(advisory.get("severity")
                              or ("low" if advisories else name_severity(name))),
                    description=(f"{'Security update' if security else 'Update'} from {repo}"
                                 + (f" ({', '.join(ids)})" if ids else "")),
                    cve_ids=tuple(advisory.get("cves", ())),
                    requires_reboot=package_requires_reboot(name),
                    security=security,
                    source=repo,
                )
            )
        if security_only:
            patches = [p for p in patches if p.security]
        return patches

    # -- argv ------------------------------------------------------------------------------
    def command(self, verb: str, request: JobRequest, *args: str) -> list[str]:
        """``dnf VERB -y|--assumeno [options] ARGS`` (ARGS start with ``--`` when they name
        packages)."""
        argv = [self.binary, verb, "--assumeno" if request.dry_run else "-y"]
        return argv + self.options(verb, request) + list(args)

    def options(self, verb: str, request: JobRequest) -> list[str]:
        options = []
        if verb == "install" and request.no_recommends:
            options.append("--setopt=install_weak_deps=False")
        if verb in ("install", "upgrade") and request.force:
            options.append("--allowerasing")
        if request.security_only:
            options.append("--security")
        return options

    @staticmethod
    def targets(specs: Sequence[PackageSpec]) -> list[str]:
        return [f"{s.name}-{s.version}" if s.version else s.name for s in specs]

    upgrade_verb = "upgrade"

    @property
    def update_verb(self) -> str:  # type: ignore[override]
        """yum says ``update`` where dnf says ``upgrade``: one attribute drives both."""
        return self.upgrade_verb

    def advisory_argvs(self) -> list[list[str]]:
        base = [self.binary, "-q", "updateinfo", "list", "--updates"]
        return [base, [*base, "--with-cve"]]

    def available_argv(self, name: str) -> list[str]:
        """Lists ``name.arch version repo`` rows, the check-update layout."""
        return [self.binary, "-q", "list", "--available", "--", name]

    # -- operations ------------------------------------------------------------------------
    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        names = [] if specs is None else ["--", *self.targets(specs)]
        argv = self.command(self.upgrade_verb, request, *names)
        return await self._run(ctx, request, argv, "Patched")

    def duplicates_check_argv(self) -> list[str]:
        return [self.binary, "check", "--duplicates"]

    def duplicates_repair_argv(self) -> list[str]:
        return [self.binary, "remove", "--duplicates", "-y"]

    async def repair(self, ctx: Any) -> None:
        """Clean up what an interrupted rpm transaction left (see the module docstring)."""
        try:
            result = await ctx.run(
                self.duplicates_check_argv(),
                timeout=self._timeouts.refresh,
                env=self.read_env(),
                ok_codes=(0, 1),
            )
        except (CommandFailedError, CommandNotFoundError) as error:
            _log.info("{backend}: no duplicate check ({error}); no repair", backend=self.name,
                      error=error)
            return
        duplicates = [line for line in result.stdout.splitlines() if _DUPLICATE in line]
        if not duplicates:
            return
        repair = " ".join(self.duplicates_repair_argv())
        ctx.progress(
            1,
            f"The package database lists {len(duplicates)} duplicate package(s) left by an "
            f"interrupted transaction; repairing it first with {repair}",
        )
        try:
            await ctx.run(
                self.duplicates_repair_argv(),
                timeout=self._timeouts.package,
                env=self.read_env(),
                transaction=phase.DNF,
            )
        except CommandNotFoundError as error:
            _log.warn("{backend}: cannot clean up duplicate packages ({error})",
                      backend=self.name, error=error)

    async def _run(self, ctx: Any, request: JobRequest, argv: list[str], verb: str) -> JobOutcome:
        ok = (0, 1) if request.dry_run else (0,)
        if not request.dry_run:
            await self.repair(ctx)
        result = await ctx.run(
            argv,
            timeout=self._timeouts.package,
            env=self.read_env(),
            ok_codes=ok,
            transaction=None if request.dry_run else phase.DNF,
        )
        changes = parse_transaction_table(result.stdout)
        output = result.stdout + result.stderr
        if result.exit_code == 1 and not changes and not any(w in output for w in _DRY_RUN_ENDINGS):
            lines = output.strip().splitlines() or ["no output"]
            raise CommandFailedError(f"{self.binary} dry run failed: {lines[-1]}", result)
        return await self.outcome(ctx, request, changes, verb)

    def needs_restarting_argv(self) -> list[str]:
        return [self.binary, "needs-restarting", "-r"]

    async def manager_says_reboot(self, ctx: Any) -> bool:
        """``needs-restarting -r`` exits 1 and says "Reboot is required" when one is needed."""
        try:
            result = await ctx.run(self.needs_restarting_argv(), timeout=self._timeouts.quick,
                                   ok_codes=(0, 1))
        except (CommandFailedError, CommandNotFoundError):
            return False
        return bool(needs_restarting_verdict(result))


def _with_update(package: Package, update: tuple[str, str] | None) -> Package:
    if update is None:
        return package
    return Package(
        name=package.name,
        version=package.version,
        status="Upgradable",
        upgradable=True,
        latest_version=update[0],
        description=package.description,
        install_date=package.install_date,
        size_installed=package.size_installed,
    )
