"""The patch-list cache: served while fresh, refreshed without jobs, its state persisted."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.cache import PatchCache
from lpa.agent.eventlog import EventLog
from lpa.agent.model import Patch
from lpa.errors import CommandFailedError, PackageManagerError, PackageNotFoundError
from lpa.events import COMPLETED, EVENT_JOB_COMPLETE, RUNNING
from tests.fakes import FakeBackend

OPENSSL = Patch(name="openssl", current_version="1", available_version="2", security=True)


class _HeldBackend(FakeBackend):
    """A backend whose list_patches answers only when the test fires ``pending``."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred[Any]] = []

    def list_patches(self, security_only: bool = False) -> Deferred[Any]:
        self.calls.append(("list_patches", security_only))
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class PatchCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.backend = FakeBackend(patches=[OPENSSL])
        self.state_path = os.path.join(self.mktemp(), "cache.json")
        os.makedirs(os.path.dirname(self.state_path))
        self.cache = PatchCache(self.clock, self.backend, 600, self.state_path)

    def test_stale_until_filled(self) -> None:
        """A new cache is stale with no update time, and asking for patches asks the backend."""
        self.assertEqual((self.cache.status(), self.cache.last_cache_update), ("stale", None))
        self.assertEqual(self.successResultOf(self.cache.patches()), [OPENSSL])
        self.assertEqual(self.cache.status(), "fresh")
        self.assertEqual(self.cache.last_cache_update, "2027-01-15T08:00:00+00:00")

    def test_cached_while_fresh(self) -> None:
        """While fresh the list comes from the cache; once stale the backend is asked again."""
        self.successResultOf(self.cache.patches())
        self.clock.advance(599)
        self.successResultOf(self.cache.patches())
        self.assertEqual(len(self.backend.calls), 1)
        self.clock.advance(1)
        self.assertEqual(self.cache.status(), "stale")
        self.successResultOf(self.cache.patches())
        self.assertEqual(len(self.backend.calls), 2)

    def test_one_refresh_at_a_time(self) -> None:
        """Concurrent callers share one backend call and all get its answer."""
        backend = _HeldBackend()
        cache = PatchCache(self.clock, backend, 600)
        first, second = cache.patches(), cache.patches()
        self.assertEqual(len(backend.calls), 1)
        self.assertNoResult(first)
        backend.pending[0].callback([OPENSSL])
        self.assertEqual(self.successResultOf(first), [OPENSSL])
        self.assertEqual(self.successResultOf(second), [OPENSSL])

    def test_failure_without_data(self) -> None:
        """With nothing cached a failure is PackageManagerError; the status says failed."""
        self.backend.read_error = CommandFailedError("apt-get update: could not resolve")
        self.failureResultOf(self.cache.patches(), PackageManagerError)
        self.assertEqual(self.cache.status(), "failed")

    def test_api_errors_pass_through(self) -> None:
        """A backend ApiError reaches the caller unchanged."""
        self.backend.read_error = PackageNotFoundError("gone")
        self.failureResultOf(self.cache.patches(), PackageNotFoundError)

    def test_failure_with_data_serves_old_list(self) -> None:
        """A failed refresh serves the older list, keeps its timestamp and says failed."""
        self.successResultOf(self.cache.patches())
        stamp = self.cache.last_cache_update
        self.clock.advance(700)
        self.backend.read_error = CommandFailedError("mirror down")
        self.assertEqual(self.successResultOf(self.cache.patches()), [OPENSSL])
        self.assertEqual((self.cache.status(), self.cache.last_cache_update), ("failed", stamp))
        self.backend.read_error = None
        self.successResultOf(self.cache.patches())
        self.assertEqual(self.cache.status(), "fresh")

    def test_state_persisted_and_reloaded(self) -> None:
        """The state file holds the original's two members and a new cache reads it back."""
        self.successResultOf(self.cache.patches())
        with open(self.state_path) as f:
            state = json.load(f)
        self.assertEqual(
            state,
            {"last_cache_update": "2027-01-15T08:00:00+00:00", "last_update_success": True},
        )
        self.assertEqual(os.listdir(os.path.dirname(self.state_path)), ["cache.json"])
        self.clock.advance(10)
        again = PatchCache(self.clock, self.backend, 600, self.state_path)
        self.assertEqual(
            (again.status(), again.last_cache_update), ("fresh", state["last_cache_update"])
        )
        self.successResultOf(again.patches())
        self.assertEqual(len(self.backend.calls), 2, "the list itself is not persisted")

    def test_failed_state_persisted(self) -> None:
        """A failed refresh is persisted as last_update_success false."""
        self.backend.read_error = CommandFailedError("x")
        self.failureResultOf(self.cache.patches())
        with open(self.state_path) as f:
            self.assertEqual(
                json.load(f), {"last_cache_update": None, "last_update_success": False}
            )

    def test_unreadable_state_ignored(self) -> None:
        """A corrupt state file is ignored with a warning; the cache starts stale."""
        with open(self.state_path, "w") as f:
            f.write("{not json")
        cache = PatchCache(self.clock, self.backend, 600, self.state_path)
        self.assertEqual(cache.status(), "stale")

    def test_follow_invalidates_on_job_complete(self) -> None:
        """A completed job invalidates the list, so the next read asks the backend."""
        events = EventLog(self.clock)
        subscription = self.cache.follow(events)
        self.addCleanup(subscription.cancel)
        self.successResultOf(self.cache.patches())
        events.append("j", status=RUNNING, progress=0, message="started")
        self.successResultOf(self.cache.patches())
        self.assertEqual(len(self.backend.calls), 1)
        events.append("j", status=COMPLETED, progress=100, message="done", event=EVENT_JOB_COMPLETE)
        self.successResultOf(self.cache.patches())
        self.assertEqual(len(self.backend.calls), 2)

    def test_bad_threshold(self) -> None:
        """A non-positive stale threshold is refused."""
        self.assertRaises(ValueError, PatchCache, self.clock, self.backend, 0)
