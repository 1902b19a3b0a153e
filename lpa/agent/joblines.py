"""Output lines of a job as its events and logs show them: bounded, and read for lock waits.

A package-manager line saying the database lock is held (apt, dpkg, dnf, yum, zypper wording)
names who holds it (:func:`lock_holder`); ``job.logs`` keeps the newest lines and counts what
it dropped (:func:`append_log`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from lpa.agent.model import Job

#: longest output line kept in an event or a log line (longer lines are cut, marked "…")
MAX_LINE_CHARS = 4096

#: package-manager lines saying the database lock is held; group 1 = pid, group 2 = program
_LOCK_WAIT_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"[Ii]t is held by process (\d+)(?: \(([^)]+)\))?"),  # apt, dpkg
    re.compile(r"locked by the application with pid (\d+)(?: \(([^)]+)\))?"),  # zypper
    re.compile(r"Waiting for process with pid (\d+)()"),  # dnf
    re.compile(r"Another app is currently holding the yum lock()()"),  # yum
    re.compile(r"Waiting for (?:cache |repository )?lock()()", re.IGNORECASE),
)


def lock_holder(line: str) -> str | None:
    """Who holds the package database lock, if ``line`` says a manager waits for it."""
    for pattern in _LOCK_WAIT_PATTERNS:
        match = pattern.search(line)
        if match is not None:
            pid, program = match.group(1), match.group(2)
            if pid and program:
                return f"{program} (pid {pid})"
            if pid:
                return f"pid {pid}"
            return "another process"
    return None


_DROPPED = re.compile(r"\.\.\. (\d+) earlier lines dropped")


def append_log(job: Job, line: str, limit: int) -> None:
    """Append to ``job.logs`` keeping the newest ``limit`` lines; the first then counts drops."""
    logs = job.logs
    logs.append(line)
    if len(logs) <= limit:
        return
    marker = _DROPPED.fullmatch(logs[0])
    if marker is not None:
        del logs[1]
        logs[0] = f"... {int(marker.group(1)) + 1} earlier lines dropped"
    else:
        del logs[0:2]
        logs.insert(0, "... 2 earlier lines dropped")


def bounded_line(line: str) -> str:
    if len(line) > MAX_LINE_CHARS:
        return line[: MAX_LINE_CHARS - 1] + "…"
    return line


def command_text(argv: Sequence[str]) -> str:
    return shlex.join(argv)
