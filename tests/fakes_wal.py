"""Fakes for the write-ahead log: files that lose what was not synced, a runner the test steps.

:class:`FakeWalFiles` keeps each file's bytes as written (the page cache) and how many of them
were synced; :meth:`FakeWalFiles.crash` returns what a power loss would leave: synced bytes only,
optionally plus part of the unsynced tail (a torn write), and no file whose directory entry was
never synced.  ``fail_with`` makes the next writes or syncs raise (a full disk).

:class:`StepRunner` is a ``BlockingRunner`` whose calls wait until the test runs them
(``step()``), so a batch can be held "in flight" while more records arrive.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from lpa.agent.walfiles import IWalFiles


@implementer(IWalFiles)
class FakeWalFiles:
    """In-memory files with a page cache; see the module docstring."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.synced: dict[str, int] = {}
        #: names whose directory entry is durable
        self.durable_names: set[str] = set()
        self.syncs = 0
        self.appends = 0
        #: when set, every append and sync raises it (until cleared)
        self.fail_with: OSError | None = None
        self._handles: dict[int, str] = {}
        self._next = 1

    # -- IWalFiles -------------------------------------------------------------------------

    def list_names(self, directory: str) -> list[str]:
        prefix = directory.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.data if p.startswith(prefix))

    def read(self, path: str) -> bytes:
        return bytes(self.data[path])

    def create(self, path: str) -> object:
        if path in self.data:
            raise FileExistsError(errno.EEXIST, "File exists", path)
        self.data[path] = bytearray()
        self.synced[path] = 0
        handle = self._next
        self._next += 1
        self._handles[handle] = path
        return handle

    def append(self, handle: object, data: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.appends += 1
        self.data[self._handles[handle]] += data  # type: ignore[index]

    def sync(self, handle: object) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        path = self._handles[handle]  # type: ignore[index]
        self.synced[path] = len(self.data[path])
        self.syncs += 1

    def close(self, handle: object) -> None:
        self._handles.pop(handle, None)  # type: ignore[call-overload]

    def replace(self, path: str, data: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.data[path] = bytearray(data)
        self.synced[path] = len(data)
        self.durable_names.add(path)

    def truncate(self, path: str, size: int) -> None:
        del self.data[path][size:]
        self.synced[path] = min(self.synced[path], size)

    def remove(self, path: str) -> None:
        self.data.pop(path, None)
        self.synced.pop(path, None)
        self.durable_names.discard(path)

    def sync_directory(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        self.durable_names |= {p for p in self.data if p.startswith(prefix)}

    # -- for tests -------------------------------------------------------------------------

    def crash(self, torn: int = 0) -> FakeWalFiles:
        """What a power loss leaves: synced bytes, plus ``torn`` bytes of each unsynced tail."""
        after = FakeWalFiles()
        for path, data in self.data.items():
            if path not in self.durable_names:
                continue
            keep = self.synced[path]
            if keep < len(data):
                keep = min(len(data), keep + torn)
            after.data[path] = bytearray(data[:keep])
            after.synced[path] = keep
            after.durable_names.add(path)
        return after

    def segments(self, directory: str) -> list[str]:
        return [n for n in self.list_names(directory)
                if n.startswith("wal-") and n.endswith(".log")]

    def disk_full(self) -> None:
        self.fail_with = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class StepRunner:
    """A BlockingRunner that holds each call until ``step()`` runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((call, d))
        return d

    @property
    def waiting(self) -> int:
        return len(self.calls)

    def step(self) -> None:
        """Run the oldest waiting call and fire its Deferred with the outcome."""
        call, d = self.calls.pop(0)
        maybeDeferred(call).chainDeferred(d)

    def run_all(self) -> None:
        while self.calls:
            self.step()

    def drop_all(self) -> None:
        """The process dies: whatever was waiting never runs."""
        self.calls.clear()
