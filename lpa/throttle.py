"""Log lines that a peer can cause, bounded so that a scanner cannot flood the log.

A refused TLS handshake or a malformed request is worth one line to an operator; ten thousand of
them a minute are worth a count.  :class:`LogThrottle` lets through at most ``per_window`` lines
per kind (a refusal reason, an error code) in each ``window`` seconds and counts the others; the
next line of that kind that gets through carries the count::

    refused … (no client certificate)                       ← lines 1 … per_window of a minute
    (… the rest of that minute: counted, not logged)
    refused … (no client certificate) (and 37 more like this, not logged)   ← a later minute
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

#: distinct kinds remembered at once; past this the oldest window is forgotten
MAX_KINDS = 256


class _Window:
    __slots__ = ("logged", "started", "suppressed")

    def __init__(self, started: float) -> None:
        self.started = started
        self.logged = 0
        self.suppressed = 0


class LogThrottle:
    """At most ``per_window`` lines per kind per ``window`` seconds, on an injected clock."""

    def __init__(self, clock: IReactorTime, *, per_window: int = 10, window: float = 60.0) -> None:
        if per_window < 1 or window <= 0:
            raise ValueError("a log throttle needs per_window >= 1 and window > 0")
        self._clock = clock
        self._per_window = per_window
        self._window = window
        self._kinds: dict[str, _Window] = {}

    def admit(self, kind: str) -> int | None:
        """None: leave this line out.  Otherwise log it, noting the returned count of left-out
        lines of this kind since the last one logged (0 when none were)."""
        now = self._clock.seconds()
        window = self._kinds.get(kind)
        if window is None:
            if len(self._kinds) >= MAX_KINDS:
                oldest = min(self._kinds, key=lambda k: self._kinds[k].started)
                del self._kinds[oldest]
            window = self._kinds[kind] = _Window(now)
        elif now - window.started >= self._window:
            window.started, window.logged = now, 0
        if window.logged >= self._per_window:
            window.suppressed += 1
            return None
        window.logged += 1
        suppressed, window.suppressed = window.suppressed, 0
        return suppressed


def more_like_this(suppressed: int) -> str:
    """The suffix of a throttled line: empty, or `` (and N more like this, not logged)``."""
    return f" (and {suppressed} more like this, not logged)" if suppressed else ""
