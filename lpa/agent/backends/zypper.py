"""zypper backend (SUSE, openSUSE); the original agent had none.

Queries use ``--xmlout`` (zypper's stable machine format) so we never parse its tables:
``list-updates`` gives package updates, ``list-patches --category security`` gives security
patches with their severity and CVE issues.  Mutations also run with ``--xmlout`` so the
``<install-summary>`` (to-install / to-upgrade / to-remove …) tells what changed; a dry run adds
``--dry-run``.  Exit 102 means "reboot needed", 103 "zypper updated itself, run again".

Security-only apply is ``zypper patch --category security`` (patches as a whole, so it cannot be
combined with named packages).  ``force`` means ``--force-resolution``; GPG checks stay on.

**The package transaction** (:mod:`lpa.agent.phase`): from the first package install or removal
(``install-resolvable``/``remove-resolvable`` progress) on, cancel and timeout let zypper finish.

**No repair step.**  libzypp commits through rpm, which commits each package on its own: an
interrupted run leaves a consistent database whose remaining updates the next ``zypper update``
(or ``patch``) installs, which is what the next job runs anyway.  ``zypper verify`` is not run:
it would install or remove packages to satisfy dependencies, a change nobody asked for.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from typing import Any

import attr

from lpa.agent import phase
from lpa.agent.backends.base import (
    BackendBase,
    VerbCommandsMixin,
    available,
    change,
    package_requires_reboot,
)
from lpa.agent.backends.dnf import RPM_QUERYFORMAT, SEVERITIES, parse_rpm_qa
from lpa.agent.model import CommandResult, JobOutcome, JobRequest, Package, PackageSpec, Patch
from lpa.errors import (
    CommandFailedError,
    CommandNotFoundError,
    PackageManagerError,
    ValidationError,
)

#: zypper's informational exit codes: 100 updates needed, 101 security updates needed,
#: 102 reboot needed, 103 restart zypper, 106 some repositories skipped
ZYPPER_OK = (0, 100, 101, 102, 103, 106)
EXIT_REBOOT_NEEDED = 102
EXIT_RESTART_ZYPPER = 103

_SUMMARY_ACTIONS = {
    "to-install": "install",
    "to-upgrade": "upgrade",
    "to-downgrade": "downgrade",
    "to-reinstall": "reinstall",
    "to-remove": "remove",
    "to-change-arch": "upgrade",
    "to-change-vendor": "upgrade",
}


def _xml_root(text: str) -> ElementTree.Element:
    start = text.find("<")
    if start < 0:
        raise PackageManagerError("The package manager's output could not be parsed") from (
            ValueError("zypper printed no XML")
        )
    try:
        return ElementTree.fromstring(text[start:])
    except ElementTree.ParseError as error:
        raise PackageManagerError("The package manager's output could not be parsed") from error


def parse_list_updates(text: str) -> list[dict[str, str]]:
    """``zypper --xmlout list-updates|list-patches`` → the attributes of every ``<update>``."""
    updates = []
    for element in _xml_root(text).iter("update"):
        entry = dict(element.attrib)
        summary = element.find("summary")
        entry["summary"] = (summary.text or "").strip() if summary is not None else ""
        source = element.find("source")
        entry["repo"] = source.get("alias", "") if source is not None else ""
        entry["cves"] = ",".join(
            issue.get("id", "") for issue in element.iter("issue") if issue.get("type") == "cve"
        )
        updates.append(entry)
    return updates


def parse_install_summary(text: str) -> list[dict[str, Any]]:
    """``<install-summary>`` of a ``--xmlout`` install/update/remove/patch → changes."""
    start = text.find("<")
    if start < 0:
        return []
    try:
        root = ElementTree.fromstring(text[start:])
    except ElementTree.ParseError:
        return []
    changes = []
    for summary in root.iter("install-summary"):
        for section in summary:
            action = _SUMMARY_ACTIONS.get(section.tag)
            if action is None:
                continue
            for solvable in section.iter("solvable"):
                if solvable.get("type", "package") != "package":
                    continue
                name = solvable.get("name", "")
                edition = solvable.get("edition")
                if action == "remove":
                    changes.append(change(name, edition, None, action))
                else:
                    changes.append(change(name, solvable.get("edition-old"), edition, action))
    return changes


class ZypperBackend(VerbCommandsMixin, BackendBase):
    name = "zypper"

    # -- read-only -------------------------------------------------------------------------
    async def _installed(self) -> list[Package]:
        result = await self._read(["rpm", "-qa", "--qf", RPM_QUERYFORMAT],
                                  timeout=self._timeouts.refresh)
        return parse_rpm_qa(result.stdout)

    async def _updates(self) -> list[dict[str, str]]:
        argv = ["zypper", "--non-interactive", "--no-refresh", "--xmlout", "list-updates"]
        result = await self._read(argv, timeout=self._timeouts.refresh, ok_codes=ZYPPER_OK)
        return [u for u in parse_list_updates(result.stdout)
                if u.get("kind", "package") == "package"]

    async def _available_packages(self) -> list[Package]:
        updates = {u["name"]: u for u in await self._updates()}
        return [available(n, u.get("edition", "")) for n, u in sorted(updates.items())]

    async def _installed_packages(self) -> list[Package]:
        updates = {u["name"]: u for u in await self._updates()}
        return [_with_update(p, updates.get(p.name)) for p in await self._installed()]

    async def _find_package(self, name: str) -> Package | None:
        installed = [p for p in await self._installed() if p.name == name]
        updates = {u["name"]: u for u in await self._updates()}
        if installed:
            return _with_update(installed[0], updates.get(name))
        argv = ["zypper", "--non-interactive", "--no-refresh", "--xmlout", "search",
                "--match-exact", "--details", "--", name]
        result = await self._read(argv, ok_codes=(*ZYPPER_OK, 104))
        for element in _xml_root(result.stdout).iter("solvable"):
            if element.get("name") == name and element.get("kind", "package") == "package":
                return available(
                    name, element.get("edition", ""), description=element.get("summary", "")
                )
        return None

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        patches: list[Patch] = []
        if not security_only:
            installed = {p.name: p.version for p in await self._installed()}
            for update in await self._updates():
                name = update["name"]
                patches.append(
                    Patch(
                        name=name,
                        current_version=update.get("edition-old") or installed.get(name, ""),
                        available_version=update.get("edition", ""),
                        severity="medium",
                        description=(update.get("summary")
                                     or f"Package update available from {update['repo']}"),
                        requires_reboot=package_requires_reboot(name),
                        source=update["repo"],
                    )
                )
        argv = ["zypper", "--non-interactive", "--no-refresh", "--xmlout", "list-patches",
                "--category", "security"]
        result = await self._read(argv, timeout=self._timeouts.refresh, ok_codes=ZYPPER_OK)
        for patch in parse_list_updates(result.stdout):
            if patch.get("kind") != "patch":
                continue
            patches.append(
                Patch(
                    name=patch["name"],
                    current_version="",
                    available_version=patch.get("edition", ""),
                    severity=SEVERITIES.get(patch.get("severity", "").lower(), "high"),
                    description=patch.get("summary") or "Security patch",
                    cve_ids=tuple(c for c in patch.get("cves", "").split(",") if c),
                    requires_reboot=patch.get("restart") == "true",
                    security=patch.get("category") == "security",
                    source=patch["repo"],
                )
            )
        return patches

    # -- argv ------------------------------------------------------------------------------
    @staticmethod
    def targets(specs: Sequence[PackageSpec]) -> list[str]:
        return [f"{s.name}={s.version}" if s.version else s.name for s in specs]

    def command(self, verb: str, request: JobRequest, *args: str) -> list[str]:
        argv = ["zypper", "--non-interactive", "--xmlout", verb]
        if request.dry_run:
            argv.append("--dry-run")
        if verb == "install" and request.no_recommends:
            argv.append("--no-recommends")
        if verb in ("install", "update") and request.force:
            argv.append("--force-resolution")
        return argv + list(args)

    def check_request(self, request: JobRequest) -> tuple[PackageSpec, ...] | None:
        specs = super().check_request(request)
        if request.security_only and specs is not None:
            raise ValidationError(
                "zypper applies security patches as a whole: use security_only without packages"
            )
        return specs

    # -- operations ------------------------------------------------------------------------
    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        if not request.dry_run:
            await ctx.run(["zypper", "--non-interactive", "refresh"],
                          timeout=self._timeouts.refresh)
        if request.security_only:
            argv = self.command("patch", request, "--category", "security")
        elif specs is None:
            argv = self.command("update", request)
        else:
            argv = self.command("update", request, "--", *self.targets(specs))
        return await self._run(ctx, request, argv, "Patched")

    async def _run(self, ctx: Any, request: JobRequest, argv: list[str], verb: str) -> JobOutcome:
        watch = None if request.dry_run else phase.ZYPPER
        result = await ctx.run(
            argv, timeout=self._timeouts.package, env=self.read_env(), ok_codes=ZYPPER_OK,
            transaction=watch,
        )
        changes = parse_install_summary(result.stdout)
        if result.exit_code == EXIT_RESTART_ZYPPER and not request.dry_run:
            # zypper updated its own stack first; the rest of the patches need a second run
            again = await ctx.run(
                argv, timeout=self._timeouts.package, env=self.read_env(), ok_codes=ZYPPER_OK,
                transaction=watch,
            )
            changes += parse_install_summary(again.stdout)
            result = again
        outcome = await self.outcome(ctx, request, changes, verb)
        if (result.exit_code == EXIT_REBOOT_NEEDED and not request.dry_run
                and not outcome.reboot_required):
            outcome = attr.evolve(outcome, reboot_required=True,
                                  message=outcome.message + "; reboot required")
        return outcome

    async def manager_says_reboot(self, ctx: Any) -> bool:
        """``zypper needs-rebooting`` (exit 102 = reboot needed; older zypper lacks it)."""
        try:
            result: CommandResult = await ctx.run(["zypper", "needs-rebooting"],
                                                  timeout=self._timeouts.quick,
                                                  ok_codes=(0, EXIT_REBOOT_NEEDED))
        except (CommandFailedError, CommandNotFoundError):
            return False
        return result.exit_code == EXIT_REBOOT_NEEDED


def _with_update(package: Package, update: dict[str, str] | None) -> Package:
    if update is None:
        return package
    return Package(
        name=package.name,
        version=package.version,
        status="Upgradable",
        upgradable=True,
        latest_version=update.get("edition"),
        description=package.description,
        install_date=package.install_date,
        size_installed=package.size_installed,
    )
