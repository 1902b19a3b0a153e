"""Log observers for twistd: human-readable by default, JSON lines for log shippers.

``twistd -n lpa-agent …`` logs as text through twistd's own observer.  For one JSON object per
line on stdout (journald, Vector, Fluent Bit …) run ``twistd -n --logger=lpa.logs.json_observer
lpa-agent …``: each line carries ``time``, ``level``, ``namespace``, the formatted ``message``,
the structured fields of the event (``job_id``, ``seq`` …) and, for failures, ``traceback``.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_SKIPPED_FIELDS = frozenset(
    {
        "log_format",
        "log_level",
        "log_namespace",
        "log_time",
        "log_source",
        "log_logger",
        "log_failure",
        "log_io",
        "log_system",
        "log_trace",
        "log_flattened",
        "log_text",
        "log_legacy",
        "format",
        "message",
        "isError",
        "time",
        "system",
        "failure",
        "why",
    }
)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return repr(value)


@implementer(ILogObserver)
class JsonLinesObserver:
    """Write each log event as one JSON object on one line."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": (
                datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat()
                if isinstance(when, (int, float))
                else None
            ),
            "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key not in _SKIPPED_FIELDS and not key.startswith("log_"):
                record[key] = _jsonable(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, sort_keys=False) + "\n")
        self._out.flush()


def json_observer() -> JsonLinesObserver:
    """Factory for ``twistd --logger=lpa.logs.json_observer``."""
    return JsonLinesObserver(sys.stdout)


def configured_observer(
    log_format: str, level: str = "info", out: IO[str] | None = None
) -> ILogObserver | None:
    """The observer a config's ``logging`` section asks for, or None for twistd's default.

    ``text`` at ``info`` keeps twistd's own observer (so ``--logfile`` and ``--syslog`` work as
    usual); ``json`` or another level writes to stdout (run ``twistd -n``, as systemd does).
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    if log_format == "text" and level in ("info", ""):
        return None
    stream = out if out is not None else sys.stdout
    base: ILogObserver = (
        JsonLinesObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    )
    name = {"trace": "debug", "warning": "warn"}.get(level, level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(name))
    return FilteringLogObserver(base, [predicate])


class LogConfiguredService(MultiService):
    """Wraps a daemon's root service so the config's log observer becomes twistd's.

    twistd asks the application for an ``ILogObserver`` component after ``makeService`` (unless
    ``--logger`` was given, which still wins); setting it when we are attached to the
    application is the only hook a plugin has.
    """

    def __init__(self, child: Service, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer
        self.child = child
        child.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def observer_for_twistd(options: Any, log_format: str, level: str = "info") -> ILogObserver | None:
    """:func:`configured_observer` writing where twistd was told to log.

    ``--logfile PATH`` (other than ``-``) keeps its file, with rotation; otherwise stdout.
    """
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    out: Any = None
    if logfile and logfile != "-":
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(logfile)
    return configured_observer(log_format, level, out)
