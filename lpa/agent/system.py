"""Facts about the host and the reboot command: the production ``ISystem``.

Files are read through injectable paths (tests point them at temporary files); commands
(``systemctl show``, ``dpkg --audit``, ``dnf needs-restarting -r``) go through the injected
``IProcessRunner``, never a shell.

Pending reboot, first answer wins::

    /var/run/reboot-required (+ .pkgs)  ─▶  dnf|yum needs-restarting -r (exit 1)  ─▶
    a kernel in /lib/modules newer than the running one

``/api/v1/system/info`` would otherwise fork ``dpkg --audit`` (and ``needs-restarting``) on every
call: :meth:`HostSystem.system_info` keeps those command-backed facts for ``facts_ttl`` seconds
(30 by default) and runs them once for concurrent callers.  ``pending_reboot()``, which the job
engine asks after a job, is never cached.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lpa import validation
from lpa.agent.backends.base import (
    needs_restarting_verdict,
    newer_kernel_installed,
    read_reboot_marker,
)
from lpa.agent.interfaces import ISystem
from lpa.agent.model import CommandResult
from lpa.errors import (
    CommandError,
    CommandFailedError,
    InvalidServiceNameError,
    ServiceNotFoundError,
    ServiceStatusError,
)

_log = Logger()

#: seconds the command-backed facts of system_info (dpkg --audit, pending reboot) are kept
FACTS_TTL_SECONDS = 30.0

SERVICE_PROPERTIES = (
    "Id", "Description", "LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID"
)


def parse_os_release(text: str) -> dict[str, str]:
    """``KEY=value`` lines of os-release(5), quotes and backslash escapes removed."""
    fields = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        fields[key.strip()] = value.replace('\\"', '"').replace("\\$", "$").replace("\\\\", "\\")
    return fields


def parse_systemctl_show(text: str) -> dict[str, str]:
    """``systemctl show --property=…`` ``Key=Value`` lines."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def reboot_argv_for(
    delay_seconds: int, *, which: Callable[[str], str | None] = shutil.which
) -> list[str]:
    """The original's choice: ``shutdown -r +N`` (N = ceil(delay/60), at least 1), else
    ``systemctl reboot``; ``reboot`` where there is no systemctl (Alpine) or no shutdown for a
    delayed reboot."""
    delay = max(0, int(delay_seconds))
    if delay > 0 and which("shutdown"):
        return ["shutdown", "-r", f"+{max(1, math.ceil(delay / 60))}"]
    if delay == 0 and which("systemctl"):
        return ["systemctl", "reboot"]
    return ["reboot"]


@implementer(ISystem)
class HostSystem:
    """The running Linux host."""

    def __init__(
        self,
        runner: Any,
        *,
        boot_id_path: str = "/proc/sys/kernel/random/boot_id",
        uptime_path: str = "/proc/uptime",
        os_release_paths: Sequence[str] = ("/etc/os-release", "/usr/lib/os-release"),
        reboot_marker: str = "/var/run/reboot-required",
        modules_dir: str = "/lib/modules",
        which: Callable[[str], str | None] = shutil.which,
        uname: Callable[[], Any] = os.uname,
        hostname: Callable[[], str] = socket.gethostname,
        quick_timeout: float = 60.0,
        clock: IReactorTime | None = None,
        facts_ttl: float = FACTS_TTL_SECONDS,
    ) -> None:
        self._runner = runner
        self._boot_id_path = boot_id_path
        self._uptime_path = uptime_path
        self._os_release_paths = tuple(os_release_paths)
        self._reboot_marker = reboot_marker
        self._modules_dir = modules_dir
        self._which = which
        self._uname = uname
        self._hostname = hostname
        self._quick_timeout = quick_timeout
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.monotonic
        self._facts_ttl = facts_ttl
        self._facts: tuple[float, Any] | None = None
        self._facts_waiters: list[Deferred[Any]] | None = None

    # -- files -----------------------------------------------------------------------------
    def boot_id(self) -> str:
        try:
            with open(self._boot_id_path, encoding="ascii", errors="replace") as source:
                return source.read().strip()
        except OSError:
            return ""

    def uptime_seconds(self) -> int:
        try:
            with open(self._uptime_path, encoding="ascii") as source:
                return int(float(source.read().split()[0]))
        except (OSError, ValueError, IndexError):
            return 0

    def os_release(self) -> dict[str, str]:
        for path in self._os_release_paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as source:
                    return parse_os_release(source.read())
            except OSError:
                continue
        return {}

    # -- commands --------------------------------------------------------------------------
    async def _run(self, argv: list[str], env: Mapping[str, str] | None = None) -> CommandResult:
        result: CommandResult = await self._runner.run(
            argv, timeout=self._quick_timeout, env=env or {"LC_ALL": "C"}
        )
        return result

    def system_info(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._system_info())

    async def _system_info(self) -> dict[str, Any]:
        release = self.os_release()
        uname = self._uname()
        (needed, packages), db_clean = await self._command_facts()
        return {
            "hostname": self._hostname(),
            "os": release.get("NAME", uname.sysname),
            "os_version": release.get("VERSION_ID", release.get("VERSION", "")),
            "os_pretty_name": release.get("PRETTY_NAME", ""),
            "kernel": uname.release,
            "architecture": uname.machine,
            "last_update_check": None,
            "last_update_apply": None,
            "pending_reboot": needed,
            "reboot_packages": packages,
            "package_db_clean": db_clean,
            "uptime_seconds": self.uptime_seconds(),
            "boot_id": self.boot_id(),
        }

    def _command_facts(self) -> Deferred[Any]:
        """(pending reboot, package_db_clean): kept for ``facts_ttl`` s, one run at a time."""
        if self._facts is not None and self._now() - self._facts[0] < self._facts_ttl:
            return succeed(self._facts[1])
        waiter: Deferred[Any] = Deferred()
        if self._facts_waiters is not None:
            self._facts_waiters.append(waiter)
            return waiter
        self._facts_waiters = [waiter]
        Deferred.fromCoroutine(self._read_command_facts()).addBoth(self._facts_read)
        return waiter

    async def _read_command_facts(self) -> Any:
        return await self._pending_reboot(), await self._package_db_clean()

    def _facts_read(self, result: Any) -> None:
        waiters, self._facts_waiters = self._facts_waiters or [], None
        if not isinstance(result, Failure):
            self._facts = (self._now(), result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _package_db_clean(self) -> bool | None:
        """``dpkg --audit`` (read-only) prints nothing on a clean database; None without dpkg."""
        if not self._which("dpkg"):
            return None
        try:
            result = await self._run(["dpkg", "--audit"])
        except CommandError as error:
            _log.warn("dpkg --audit could not run: {error}", error=error)
            return None
        if result.timed_out:
            return None
        return result.exit_code == 0 and not result.stdout.strip()

    def service_status(self, name: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._service_status(name))

    async def _service_status(self, name: str) -> dict[str, Any]:
        validation.service_name(name)
        if ".." in name:
            raise InvalidServiceNameError("invalid service name", {"name": name})
        properties = "--property=" + ",".join(SERVICE_PROPERTIES)
        argv = ["systemctl", "show", "--no-pager", properties, "--", name]
        try:
            result = await self._run(argv)
        except CommandError as error:
            raise ServiceStatusError("Failed to read the service status") from error
        if result.timed_out or result.exit_code != 0:
            # argv and stderr go to the log (as the cause), never to the client
            cause = CommandFailedError(
                f"{' '.join(argv)} exited with status {result.exit_code}", result
            )
            raise ServiceStatusError("Failed to read the service status") from cause
        fields = parse_systemctl_show(result.stdout)
        if fields.get("LoadState") in (None, "not-found"):
            raise ServiceNotFoundError(f"Service not found: {name}", {"name": name})
        pid = fields.get("MainPID", "0")
        return {
            "name": fields.get("Id", name),
            "display_name": fields.get("Description", name),
            "active_state": fields.get("ActiveState", "unknown"),
            "sub_state": fields.get("SubState", "unknown"),
            "load_state": fields.get("LoadState", "unknown"),
            "enabled_state": fields.get("UnitFileState", "unknown") or "unknown",
            "main_pid": int(pid) if pid.isdigit() and int(pid) > 0 else None,
            "healthy": fields.get("ActiveState") == "active",
        }

    def reboot_argv(self, delay_seconds: int) -> list[str]:
        return reboot_argv_for(delay_seconds, which=self._which)

    def pending_reboot(self) -> Deferred[tuple[bool, list[str]]]:
        return Deferred.fromCoroutine(self._pending_reboot())

    async def _pending_reboot(self) -> tuple[bool, list[str]]:
        marked, packages = read_reboot_marker(self._reboot_marker)
        if marked:
            return True, packages
        for tool in (["dnf", "needs-restarting", "-r"], ["needs-restarting", "-r"]):
            if not self._which(tool[0]):
                continue
            try:
                result = await self._run(tool)
            except CommandError:
                continue
            verdict = needs_restarting_verdict(result)
            if verdict is not None:
                return verdict, []
        if newer_kernel_installed(self._uname().release, self._modules_dir):
            return True, ["kernel"]
        return False, []
