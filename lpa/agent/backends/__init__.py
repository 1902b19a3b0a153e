"""Package-manager backends and how one is chosen.

``package_manager.backend`` is ``"auto"`` (the first of apt, dnf, yum, zypper, apk, pacman whose
executable is found) or one of those names, which must then be installed: a missing one is a
:class:`~lpa.errors.ConfigError` at start-up, not a failure at the first job.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from lpa.agent.backends.apk import ApkBackend
from lpa.agent.backends.apt import AptBackend
from lpa.agent.backends.base import DEFAULT_TIMEOUTS, BackendBase, Timeouts
from lpa.agent.backends.dnf import DnfBackend
from lpa.agent.backends.pacman import PacmanBackend
from lpa.agent.backends.yum import YumBackend
from lpa.agent.backends.zypper import ZypperBackend
from lpa.errors import ConfigError

#: detection order and the executable that proves each manager is present
DETECTION_ORDER: tuple[tuple[str, str], ...] = (
    ("apt", "apt-get"),
    ("dnf", "dnf"),
    ("yum", "yum"),
    ("zypper", "zypper"),
    ("apk", "apk"),
    ("pacman", "pacman"),
)
BACKENDS: dict[str, type[BackendBase]] = {
    "apt": AptBackend,
    "dnf": DnfBackend,
    "yum": YumBackend,
    "zypper": ZypperBackend,
    "apk": ApkBackend,
    "pacman": PacmanBackend,
}


def detect_backend(name: str = "auto", *, which: Callable[[str], str | None] = shutil.which) -> str:
    """The backend name to use: the configured one if installed, or the first one found."""
    executables = dict(DETECTION_ORDER)
    wanted = (name or "auto").strip().lower()
    if wanted == "auto":
        for candidate, executable in DETECTION_ORDER:
            if which(executable):
                return candidate
        raise ConfigError(
            "package_manager.backend: auto found no supported package manager "
            "(looked for apt-get, dnf, yum, zypper, apk, pacman)"
        )
    if wanted not in executables:
        raise ConfigError(
            f"package_manager.backend: unknown backend {name!r} "
            f"(auto, {', '.join(executables)})"
        )
    if not which(executables[wanted]):
        raise ConfigError(
            f"package_manager.backend: {wanted} was chosen but {executables[wanted]} "
            "is not installed"
        )
    return wanted


def make_backend(
    name: str,
    runner: Any,
    *,
    which: Callable[[str], str | None] = shutil.which,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    lock_timeout: int = 300,
    reboot_marker: str = "/var/run/reboot-required",
    modules_dir: str = "/lib/modules",
) -> BackendBase:
    """Build the backend for ``name`` ("auto" or a manager name) over ``runner``.

    :param timeouts: per-command deadlines (refresh 300 s, package operations 1800 s, quick 60 s)
    :param lock_timeout: apt's ``DPkg::Lock::Timeout`` in seconds (how long a held lock is
        waited for)
    :raises ConfigError: no manager found, an unknown name, or the chosen one is not installed
    """
    chosen = detect_backend(name, which=which)
    options = {"timeouts": timeouts, "reboot_marker": reboot_marker, "modules_dir": modules_dir}
    if chosen == "apt":
        return AptBackend(runner, lock_timeout=lock_timeout, **options)  # type: ignore[arg-type]
    return BACKENDS[chosen](runner, **options)  # type: ignore[arg-type]


__all__ = [
    "BACKENDS",
    "DETECTION_ORDER",
    "ApkBackend",
    "AptBackend",
    "DnfBackend",
    "PacmanBackend",
    "Timeouts",
    "YumBackend",
    "ZypperBackend",
    "detect_backend",
    "make_backend",
]
