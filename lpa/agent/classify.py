"""Job error codes: the original agent's keyword rules (error_utils.rs), in the original's order.

The text searched is the error's message chain (``__cause__``/``__context__``) plus, for a
:class:`~lpa.errors.CommandError`, the command's stderr and stdout, lower-cased.  Order matters:
a timed-out command is ``TIMEOUT`` whatever it printed, a missing package wins over the
"not found" that would otherwise read as a network error, and so on.
"""

from __future__ import annotations

from lpa.errors import (
    CommandError,
    CommandNotFoundError,
    CommandTimedOutError,
)

TIMEOUT = "TIMEOUT"
COMMAND_NOT_FOUND = "COMMAND_NOT_FOUND"
PERMISSION_DENIED = "PERMISSION_DENIED"
GPG_ERROR = "GPG_ERROR"
NETWORK_ERROR = "NETWORK_ERROR"
PKG_NOT_FOUND = "PKG_NOT_FOUND"
DEPENDENCY_CONFLICT = "DEPENDENCY_CONFLICT"
REBOOT_ERROR = "REBOOT_ERROR"
CACHE_REFRESH_ERROR = "CACHE_REFRESH_ERROR"
PKG_MANAGER_ERROR = "PKG_MANAGER_ERROR"
UNKNOWN_ERROR = "UNKNOWN_ERROR"
AGENT_RESTARTED = "AGENT_RESTARTED"
AGENT_REBOOTED = "AGENT_REBOOTED"

_GPG = ("gpg", "signature", "untrusted", "no_pubkey", "not signed")
_PKG_NOT_FOUND = (
    "unable to locate package",
    "no package available",
    "no match for argument",
    "target not found",
    "no such package",
    "package not found",
)
_NETWORK = (
    "404",
    "not found",
    "failed to fetch",
    "unable to fetch",
    "could not resolve",
    "temporary failure resolving",
    "network is unreachable",
    "connection timed out",
    "connection refused",
    "cannot download",
    "curl error",
)
_DEPENDENCY = ("dependenc", "conflict", "broken count", "held broken package", "unmet")
_PERMISSION = ("permission denied", "lock file", "are you root", "operation not permitted")
_REBOOT = ("reboot", "shutdown")
_CACHE = ("cache refresh", "check-update")


def error_text(error: BaseException) -> str:
    """The message chain of ``error`` plus any command output, lower-cased."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        result = getattr(current, "result", None) if isinstance(current, CommandError) else None
        if result is not None:
            parts.append(getattr(result, "stderr", "") or "")
            parts.append(getattr(result, "stdout", "") or "")
        current = current.__cause__ or current.__context__
    return "\n".join(parts).lower()


def _any(text: str, needles: tuple[str, ...]) -> bool:
    return any(needle in text for needle in needles)


def classify(error: BaseException) -> str:
    """The job ``error_code`` for an exception that ended a job."""
    result = getattr(error, "result", None)
    if isinstance(error, CommandTimedOutError) or getattr(result, "timed_out", False):
        return TIMEOUT
    text = error_text(error)
    if isinstance(error, CommandNotFoundError):
        return PERMISSION_DENIED if _any(text, _PERMISSION) else COMMAND_NOT_FOUND
    if _any(text, _GPG):
        return GPG_ERROR
    if _any(text, _PKG_NOT_FOUND):
        return PKG_NOT_FOUND
    if _any(text, _NETWORK):
        return NETWORK_ERROR
    if _any(text, _DEPENDENCY):
        return DEPENDENCY_CONFLICT
    if _any(text, _PERMISSION):
        return PERMISSION_DENIED
    if _any(text, _REBOOT):
        return REBOOT_ERROR
    if _any(text, _CACHE):
        return CACHE_REFRESH_ERROR
    if isinstance(error, CommandError):
        return PKG_MANAGER_ERROR
    return UNKNOWN_ERROR


def error_chain(error: BaseException) -> str:
    """The error as the original reported it: the message, then "Caused by:" for each cause."""
    lines = [str(error) or type(error).__name__]
    seen = {id(error)}
    cause = error.__cause__
    causes: list[str] = []
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        causes.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    if causes:
        lines.append("")
        lines.append("Caused by:")
        lines.extend(f"    {index}: {text}" for index, text in enumerate(causes))
    return "\n".join(lines)
