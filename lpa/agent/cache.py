"""The pending-patch list, cached, and the cache state that ``/health`` reports.

The original refreshed a stale cache from ``/health`` and ``/patches`` by submitting internal
"tracking" jobs (``__health_refresh__``), which filled the queue and the WebSocket with noise
(bug 26).  Here ``GET /patches`` asks :meth:`PatchCache.patches`, which serves the cached list
while it is fresh and otherwise asks the backend (read-only, no job), one refresh at a time;
``/health`` only reads :meth:`PatchCache.status`.

State persisted to ``state_path`` (atomically, temp file + rename) as the original's
``cache.json``: ``{"last_cache_update": RFC3339 | null, "last_update_success": bool}``.  A failed
refresh keeps the old timestamp, as the original did.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lpa.agent.eventlog import EventLog, Subscription
from lpa.agent.interfaces import IPackageBackend
from lpa.agent.model import Patch
from lpa.errors import ApiError, PackageManagerError
from lpa.events import (
    EVENT_JOB_COMPLETE,
    JobEvent,
    rfc3339_from_epoch,
)

_log = Logger()

FRESH, STALE, FAILED = "fresh", "stale", "failed"


class PatchCache:
    """Cached ``list_patches()`` with a fresh/stale/failed status and a persisted timestamp."""

    def __init__(
        self,
        clock: IReactorTime,
        backend: IPackageBackend,
        stale_threshold_secs: float = 3600,
        state_path: str | None = None,
    ) -> None:
        if stale_threshold_secs <= 0:
            raise ValueError("stale_threshold_secs must be positive")
        self._clock = clock
        self._backend = backend
        self._threshold = stale_threshold_secs
        self._state_path = state_path
        self._patches: list[Patch] | None = None
        #: epoch seconds of the last successful refresh (None: never)
        self._updated_at: float | None = None
        self._last_success = True
        self._waiters: list[Deferred[list[Patch]]] | None = None
        self._load_state()

    # -- reading ---------------------------------------------------------------------------

    @property
    def last_cache_update(self) -> str | None:
        return rfc3339_from_epoch(self._updated_at) if self._updated_at is not None else None

    def status(self) -> str:
        """``failed`` after a failed refresh, ``stale`` when old or never filled, else ``fresh``."""
        if not self._last_success:
            return FAILED
        if self._updated_at is None or self._age() >= self._threshold:
            return STALE
        return FRESH

    def patches(self) -> Deferred[list[Patch]]:
        """The pending patches: cached while fresh, else refreshed from the backend.

        When the refresh fails and an older list is held, that list is served (``status()`` then
        says ``failed``); with nothing held the failure reaches the caller as
        ``PackageManagerError`` (or the backend's own ``ApiError``).
        """
        if (
            self._patches is not None
            and self._last_success
            and self._updated_at is not None
            and self._age() < self._threshold
        ):
            return succeed(list(self._patches))
        return self.refresh()

    def refresh(self) -> Deferred[list[Patch]]:
        """Ask the backend now; concurrent callers share one backend call."""
        waiter: Deferred[list[Patch]] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        d = Deferred.fromCoroutine(self._refresh())
        d.addErrback(lambda f: _log.failure("patch cache refresh crashed", f))
        return waiter

    def invalidate(self) -> None:
        """Forget the cached list (a package operation changed the host) without a refresh."""
        self._patches = None

    def follow(self, events: EventLog) -> Subscription:
        """Invalidate when any job completes (it may have changed packages)."""

        def on_event(event: JobEvent) -> None:
            if event.event == EVENT_JOB_COMPLETE:
                self.invalidate()

        return events.subscribe(on_event)

    # -- internals -------------------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            patches = list(await self._backend.list_patches())
        except Exception as error:
            _log.warn("patch list refresh failed: {error}", error=str(error))
            self._last_success = False
            self._save_state()
            outcome: Any = error
        else:
            self._patches = patches
            self._updated_at = self._clock.seconds()
            self._last_success = True
            self._save_state()
            outcome = patches
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if not isinstance(outcome, Exception):
                waiter.callback(list(outcome))
            elif self._patches is not None:
                waiter.callback(list(self._patches))
            elif isinstance(outcome, ApiError):
                waiter.errback(outcome)
            else:
                # the reason may quote the host's command output: it is the cause, for the log
                failed = PackageManagerError("Failed to list pending patches")
                failed.__cause__ = outcome
                waiter.errback(failed)

    def _age(self) -> float:
        assert self._updated_at is not None
        return self._clock.seconds() - self._updated_at

    def _load_state(self) -> None:
        if self._state_path is None or not os.path.exists(self._state_path):
            return
        try:
            with open(self._state_path, encoding="utf-8") as f:
                state = json.load(f)
            stamp = state.get("last_cache_update")
            if stamp is not None:
                self._updated_at = datetime.datetime.fromisoformat(stamp).timestamp()
            self._last_success = bool(state.get("last_update_success", True))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            _log.warn(
                "ignoring unreadable cache state {path}: {error}",
                path=self._state_path,
                error=str(error),
            )

    def _save_state(self) -> None:
        if self._state_path is None:
            return
        state = {
            "last_cache_update": self.last_cache_update,
            "last_update_success": self._last_success,
        }
        directory = os.path.dirname(os.path.abspath(self._state_path))
        try:
            fd, temp = tempfile.mkstemp(prefix=".cache-", suffix=".json", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, self._state_path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as error:
            _log.warn(
                "could not write cache state {path}: {error}",
                path=self._state_path,
                error=str(error),
            )
