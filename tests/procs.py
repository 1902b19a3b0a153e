"""What ``/proc`` says about processes a test started: alive (a zombie counts as dead), the live
members of a process group, the processes whose command line names a path."""

from __future__ import annotations

import os


def _state(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[-1].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    fields = _state(pid)
    return fields is not None and fields[0] != "Z"


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies."""
    found = []
    for entry in os.listdir("/proc"):
        fields = _state(entry) if entry.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not this one) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                named = text.encode() in handle.read()
        except OSError:
            continue
        if named and pid_alive(int(entry)):
            found.append(int(entry))
    return found
