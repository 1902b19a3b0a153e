"""Log observers for twistd: human-readable by default, JSON lines for log shippers; at info.

Both daemons log through the observer their config asks for (``[logging] format`` and ``level``,
default ``info``): :func:`observer_for_twistd` writes where twistd would (``--logfile``, else
``twistd.log`` when daemonized or stdout under ``-n``; ``--syslog``), keeping only events at or
above the level, so debug lines (one per frame, per poll) never fill a log file by default.
``twistd -n --logger=lpa.logs.json_observer lpa-agent …`` replaces that observer with one JSON
object per line on stdout, at info; each line carries ``time``, ``level``, ``namespace``, the
formatted ``message``, the structured fields of the event (``job_id``, ``seq`` …) and, for
failures, ``traceback``.
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
                datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
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


#: level names the configs accept (``trace`` and ``warning`` are spellings of debug and warn)
LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")


def at_level(observer: ILogObserver, level: str = "info") -> ILogObserver:
    """``observer`` fed only the events at or above ``level`` (one of :data:`LEVELS`)."""
    from twisted.logger import FilteringLogObserver, LogLevelFilterPredicate

    name = {"trace": "debug", "warning": "warn", "": "info"}.get(level, level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(name))
    return FilteringLogObserver(observer, [predicate])


def json_observer() -> ILogObserver:
    """Factory for ``twistd --logger=lpa.logs.json_observer``: JSON lines on stdout, at info."""
    return at_level(JsonLinesObserver(sys.stdout))


def configured_observer(
    log_format: str, level: str = "info", out: IO[str] | None = None
) -> ILogObserver:
    """The observer a config's ``logging`` section asks for, writing to ``out`` (stdout)."""
    from twisted.logger import textFileLogObserver

    stream = out if out is not None else sys.stdout
    base: ILogObserver = (
        JsonLinesObserver(stream) if log_format == "json" else textFileLogObserver(stream)
    )
    return at_level(base, level)


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


def observer_for_twistd(options: Any, log_format: str, level: str = "info") -> ILogObserver:
    """:func:`configured_observer` writing where twistd's own observer would.

    ``--syslog`` goes to syslog (as text); ``--logfile PATH`` (other than ``-``) to that file,
    rotated as twistd does (and on SIGUSR1); without one, stdout under ``-n``, else
    ``twistd.log``.
    """
    parent = getattr(options, "parent", None)
    get = parent.get if parent is not None else {}.get
    if get("syslog"):
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python.syslog import SyslogObserver

        syslog: Any = SyslogObserver(get("prefix") or "twisted").emit  # a legacy observer
        return at_level(LegacyLogObserverWrapper(syslog), level)
    logfile = get("logfile")
    if logfile == "-" or (not logfile and (get("nodaemon") or parent is None)):
        return configured_observer(log_format, level)
    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_sigusr1(out)
    return configured_observer(log_format, level, out)


def _rotate_on_sigusr1(out: Any) -> None:
    """``kill -USR1`` rotates the log file, as with twistd's own observer."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return  # someone else's handler (SIG_DFL is 0)

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)
