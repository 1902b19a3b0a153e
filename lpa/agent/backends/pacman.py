"""pacman backend (Arch).

pacman has no security metadata (``security_only`` is refused) and cannot install a chosen
version from the repositories (version pins are refused).  What will change is asked first with
``--print --print-format "%n %v"`` (no download, no change); a dry run stops there.  A dry-run
patch apply uses ``-Su`` without ``-y`` so the sync databases are not touched either.
``force`` changes nothing: ``--overwrite '*'`` would clobber other packages' files.
Partial upgrades of named packages are unsupported on Arch; ``-S --needed`` is what we run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lpa.agent import phase
from lpa.agent.backends.base import (
    BackendBase,
    available,
    change,
    first_stanza,
    name_severity,
    package_requires_reboot,
)
from lpa.agent.model import JobOutcome, JobRequest, Package, PackageSpec, Patch

PRINT = ["--print", "--print-format", "%n %v"]


def parse_pacman_q(text: str) -> dict[str, str]:
    """``pacman -Q`` / ``--print-format "%n %v"`` lines → ``{name: version}``."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith(("::", " ")):
            found[parts[0]] = parts[1]
    return found


def parse_pacman_qu(text: str) -> dict[str, tuple[str, str]]:
    """``pacman -Qu`` (``name old -> new [ignored]``) → ``{name: (old, new)}``."""
    updates = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "->":
            updates[parts[0]] = (parts[1], parts[3])
    return updates


def parse_pacman_info(text: str) -> dict[str, str]:
    """``pacman -Qi``/``-Si`` ``Key : value`` blocks (first package; continuations joined)."""
    return first_stanza(text, separator=" : ", joiner=" ")



def _names(value: str) -> tuple[str, ...]:
    if not value or value == "None":
        return ()
    return tuple(part.split(">", 1)[0].split("<", 1)[0].split("=", 1)[0] for part in value.split())


def _size(value: str) -> int | None:
    units = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    parts = value.split()
    try:
        return int(float(parts[0]) * units[parts[1]])
    except (IndexError, KeyError, ValueError):
        return None


class PacmanBackend(BackendBase):
    name = "pacman"
    supports_security_only = False
    supports_version_pins = False

    async def _updates(self) -> dict[str, tuple[str, str]]:
        result = await self._read(["pacman", "-Qu"], ok_codes=(0, 1))
        return parse_pacman_qu(result.stdout)

    async def _available_packages(self) -> list[Package]:
        result = await self._read(["pacman", "-Sl"], timeout=self._timeouts.refresh)
        packages = []
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and "[installed" not in line:
                packages.append(available(parts[1], parts[2]))
        return packages

    async def _installed_packages(self) -> list[Package]:
        installed = parse_pacman_q((await self._read(["pacman", "-Q"])).stdout)
        updates = await self._updates()
        return [_installed(n, v, updates.get(n)) for n, v in sorted(installed.items())]

    async def _find_package(self, name: str) -> Package | None:
        local = await self._read(["pacman", "-Qi", "--", name], ok_codes=(0, 1))
        if local.exit_code == 0:
            fields = parse_pacman_info(local.stdout)
            updates = await self._updates()
            base = _installed(name, fields.get("Version", ""), updates.get(name))
            return Package(
                name=name,
                version=base.version,
                status=base.status,
                upgradable=base.upgradable,
                latest_version=base.latest_version,
                description=fields.get("Description", ""),
                dependencies=_names(fields.get("Depends On", "")),
                reverse_dependencies=_names(fields.get("Required By", "")),
                install_date=fields.get("Install Date"),
                size_installed=_size(fields.get("Installed Size", "")),
            )
        remote = await self._read(["pacman", "-Si", "--", name], ok_codes=(0, 1))
        if remote.exit_code != 0:
            return None
        fields = parse_pacman_info(remote.stdout)
        return available(
            name,
            fields.get("Version", ""),
            description=fields.get("Description", ""),
            dependencies=_names(fields.get("Depends On", "")),
        )

    async def _list_patches(self, security_only: bool) -> list[Patch]:
        if security_only:
            return []  # pacman has no security metadata
        return [
            Patch(
                name=name,
                current_version=old,
                available_version=new,
                severity=name_severity(name),
                requires_reboot=package_requires_reboot(name),
            )
            for name, (old, new) in sorted((await self._updates()).items())
        ]

    @staticmethod
    def targets(specs: Sequence[PackageSpec]) -> list[str]:
        return [s.name for s in specs]

    async def _install(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        names = self.targets(specs)
        return await self._run(ctx, request, ["-S", "--needed"], names, "install", "Installed")

    async def _update(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._run(ctx, request, ["-S"], self.targets(specs), "upgrade", "Updated")

    async def _remove(
        self, specs: tuple[PackageSpec, ...], request: JobRequest, ctx: Any
    ) -> JobOutcome:
        return await self._run(ctx, request, ["-R"], self.targets(specs), "remove", "Removed")

    async def _patch_apply(
        self, specs: tuple[PackageSpec, ...] | None, request: JobRequest, ctx: Any
    ) -> JobOutcome:
        if specs is None:
            # a dry run must not sync the databases: -Su --print; the real run is -Syu
            operation = ["-Su"] if request.dry_run else ["-Syu"]
            return await self._run(ctx, request, operation, [], "upgrade", "Patched")
        return await self._run(ctx, request, ["-S", "--needed"], self.targets(specs), "upgrade",
                               "Patched")

    async def _run(
        self,
        ctx: Any,
        request: JobRequest,
        operation: list[str],
        names: list[str],
        action: str,
        verb: str,
    ) -> JobOutcome:
        targets = ["--", *names] if names else []
        listed = await ctx.run(["pacman", "-Q"], timeout=self._timeouts.quick)
        installed = parse_pacman_q(listed.stdout)
        preview_op = ["-Su"] if operation == ["-Syu"] else operation
        preview = await ctx.run(["pacman", *preview_op, *PRINT, *targets],
                                timeout=self._timeouts.package)
        changes = []
        for name, version in parse_pacman_q(preview.stdout).items():
            old = installed.get(name)
            if action == "remove":
                changes.append(change(name, version, None, "remove"))
            else:
                changes.append(change(name, old, version, "upgrade" if old else "install"))
        if not request.dry_run:
            await ctx.run(
                ["pacman", *operation, "--noconfirm", *targets],
                timeout=self._timeouts.package,
                transaction=phase.PACMAN,
            )
        return await self.outcome(ctx, request, changes, verb)


def _installed(name: str, version: str, update: tuple[str, str] | None) -> Package:
    return Package(
        name=name,
        version=version,
        status="Upgradable" if update else "Installed",
        upgradable=update is not None,
        latest_version=update[1] if update else version,
    )
