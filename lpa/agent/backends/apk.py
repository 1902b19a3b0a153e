"""apk backend (Alpine).

apk has no notion of security updates, so ``security_only`` is refused and patch severity is
the original's name heuristic.  A dry run adds ``--simulate`` and reads apk's
``(i/n) Upgrading name (old -> new)`` lines.  ``force`` and ``no_recommends`` change nothing
(apk's ``--force*`` options bypass safety checks and ``--allow-untrusted`` is never used).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attr

from lpa.agent import phase
from lpa.agent.backends.base import (
    BackendBase,
    VerbCommandsMixin,
    available,
    change,
    name_severity,
    package_requires_reboot,
)
from lpa.agent.model import JobOutcome, JobRequest, Package, PackageSpec, Patch

_APK_LIST = re.compile(
    r"^(?P<name>\S+)-(?P<version>[^-\s]+-r\d+) (?P<arch>\S+) \{(?P<origin>[^}]*)\} "
    r"\((?P<license>[^)]*)\)(?: \[(?P<flags>[^\]]*)\])?$"
)
_APK_STEP = re.compile(
    r"^\(\d+/\d+\) "
    r"(?P<verb>Installing|Upgrading|Downgrading|Purging|Re-installing|Replacing|Updating pinning) "
    r"(?P<name>\S+) \((?P<versions>[^)]*)\)"
)
_STEP_ACTIONS = {
    "Installing": "install",
    "Upgrading": "upgrade",
    "Downgrading": "downgrade",
    "Purging": "remove",
    "Re-installing": "reinstall",
    "Replacing": "upgrade",
    "Updating pinning": "upgrade",
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ApkEntry:
    name: str
    version: str
    installed: bool
    upgradable_from: str | None


def _split_name_version(text: str) -> tuple[str, str]:
    match = re.match(r"^(?P<name>\S+)-(?P<version>[^-\s]+-r\d+)$", text)
    return (match["name"], match["version"]) if match else (text, "")


def parse_apk_list(text: str) -> list[ApkEntry]:
    """``apk list [--installed|--upgradable]`` lines."""
    entries = []
    for line in text.splitlines():
        match = _APK_LIST.match(line.strip())
        if match is None:
            continue
        flags = match["flags"] or ""
        upgradable_from = None
        if flags.startswith("upgradable from:"):
            upgradable_from = _split_name_version(flags.split(":", 1)[1].strip())[1]
        entries.append(
            ApkEntry(
                name=match["name"],
                version=match["version"],
                installed="installed" in flags or upgradable_from is not None,
                upgradable_from=upgradable_from,
            )
        )
    return entries


def parse_apk_steps(text: str) -> list[dict[str, Any]]:
    """apk's ``(i/n) Verb name (versions)`` lines (real or ``--simulate``) → changes."""
    changes = []
    for line in text.splitlines():
        match = _APK_STEP.match(line.strip())
        if match is None:
            continue
        action = _STEP_ACTIONS[match["verb"]]
        old, arrow, new = match["versions"].partition(" -> ")
        if arrow:
            changes.append(change(match["name"], old, new, action))
        elif action == "remove":
            changes.append(change(match["name"], old, None, action))
        else:
            changes.append(change(match["name"], None, old, action))
    return changes


class ApkBackend(VerbCommandsMixin, BackendBase):
    name = "apk"
    install_verb, update_verb, remove_verb = "add", "upgrade", "del"
    supports_security_only = False

    async def _list(self, *args: str) -> list[ApkEntry]:
        result = await self._read(["apk", "list", *args], timeout=self._timeouts.refresh)
        return parse_apk_list(result.stdout)

    async def _available_packages(self) -> list[Package]:
        return [available(e.name, e.version) for e in await self._list() if not e.installed]

    async def _installed_packages(self) -> list[Package]:
        upgrades = {e.name: e.version for e in await self._list("--upgradable")}
        return [_installed(e, upgrades.get(e.name)) for e in await self._list("--installed")]

    async def _find_package(self, name: str) -> Package | None:
        installed = [e for e in await self._list("--installed", "--", name) if e.name == name]
        if installed:
            upgrades = {e.name: e.version for e in await self._list("--upgradable", "--", name)}
            return _installed(installed[0], upgrades.get(name))
        offered = [e for e in await self._list("--", name) if e.name == name]
        return available(name, offered[0].version) if offered else None

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        if security_only:
            return []  # apk has no security metadata; nothing is known to be a security update
        return [
            Patch(
                name=e.name,
                current_version=e.upgradable_from or "",
                available_version=e.version,
                severity=name_severity(e.name),
                requires_reboot=package_requires_reboot(e.name),
            )
            for e in await self._list("--upgradable")
        ]

    @staticmethod
    def targets(specs: Sequence[PackageSpec]) -> list[str]:
        return [f"{s.name}={s.version}" if s.version else s.name for s in specs]

    def command(self, verb: str, request: JobRequest, *args: str) -> list[str]:
        return ["apk", verb] + (["--simulate"] if request.dry_run else []) + list(args)

    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        if not request.dry_run:
            await ctx.run(["apk", "update"], timeout=self._timeouts.refresh)
        names = [] if specs is None else ["--", *self.targets(specs)]
        return await self._run(ctx, request, self.command("upgrade", request, *names), "Patched")

    async def _run(self, ctx: Any, request: JobRequest, argv: list[str], verb: str) -> JobOutcome:
        watch = None if request.dry_run else phase.APK
        result = await ctx.run(
            argv, timeout=self._timeouts.package, env=self.read_env(), transaction=watch
        )
        return await self.outcome(ctx, request, parse_apk_steps(result.stdout), verb)


def _installed(entry: ApkEntry, newer: str | None) -> Package:
    return Package(
        name=entry.name,
        version=entry.version,
        status="Upgradable" if newer else "Installed",
        upgradable=newer is not None,
        latest_version=newer or entry.version,
    )
