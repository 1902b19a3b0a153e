"""Assert that a daemon logged no unhandled error, critical event or traceback.

For a daemon's log file (twistd's text lines or ``lpa.logs`` JSON lines, plus a captured stdout)::

    assert_no_unhandled(os.path.join(state_dir, "lpa-relay.log"))

For events captured in-process (a real-reactor test)::

    events = capture_events(self)            # removed again at the test's cleanup
    ...
    assert_no_unhandled(events)

A problem is: a line or event with "Unhandled Error" / "Unhandled error in Deferred", a
``critical`` event, a traceback (``log.failure`` events carry one), or a legacy ``isError``
event.  ``allow`` takes substrings of problems a test provokes on purpose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

_UNHANDLED = ("Unhandled Error", "Unhandled error in Deferred", "Unhandled error")
_TRACEBACK = "Traceback (most recent call last)"


def _line_problem(line: str) -> str | None:
    stripped = line.strip()
    if stripped.startswith("{"):
        try:
            record = json.loads(stripped)
        except ValueError:
            record = None
        if isinstance(record, dict):
            message = str(record.get("message", ""))
            if record.get("level") == "critical":
                return f"critical event: {message}"
            if record.get("traceback"):
                return f"traceback after: {message}"
            if any(word in message for word in _UNHANDLED):
                return message
            return None
    if any(word in line for word in _UNHANDLED):
        return stripped
    if _TRACEBACK in line:
        return stripped
    if "#critical]" in line:
        return stripped
    return None


def problems_in_text(text: str, where: str = "log") -> list[str]:
    """Each problem line of ``text`` (twistd text or JSON lines), prefixed with ``where``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        problem = _line_problem(line)
        if problem is not None:
            found.append(f"{where}:{number}: {problem[:300]}")
    return found


def problems_in_file(path: str | os.PathLike[str]) -> list[str]:
    """Problems in a log file; a missing file has none (the daemon never got to log)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    return problems_in_text(text, os.fspath(path))


def problems_in_events(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Problems among captured ``twisted.logger`` events."""
    found = []
    for event in events:
        try:
            text = formatEvent(dict(event))
        except Exception as error:  # a broken format is itself worth reporting
            text = f"<unformattable event: {error!r}>"
        if event.get("log_failure") is not None:
            failure = event["log_failure"]
            found.append(f"traceback ({failure.type.__name__}: {failure.value}) after: {text}")
        elif event.get("log_level") == LogLevel.critical:
            found.append(f"critical event: {text}")
        elif event.get("isError"):
            found.append(f"error event: {text}")
        elif any(word in text for word in _UNHANDLED):
            found.append(text)
    return found


def problems(source: Any) -> list[str]:
    """Problems in a path (str / PathLike) or in an iterable of events."""
    if isinstance(source, (str, os.PathLike)):
        return problems_in_file(source)
    return problems_in_events(source)


def assert_no_unhandled(*sources: Any, allow: Sequence[str] = ()) -> None:
    """Fail with every problem found in ``sources`` except those containing an ``allow`` text.

    :param sources: log file paths and/or lists of captured events.
    """
    found = [problem for source in sources for problem in problems(source)
             if not any(text in problem for text in allow)]
    if found:
        raise AssertionError(f"{len(found)} unhandled error(s), critical event(s) or "
                             "traceback(s) in the log:\n" + "\n".join(found[:20]))


def capture_events(test: Any) -> list[dict[str, Any]]:
    """Collect every event published while ``test`` runs (removed at its cleanup)."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events
