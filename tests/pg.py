"""A throwaway PostgreSQL cluster for the test run: one cluster, one database per test.

The cluster starts on first use (so test modules that never touch PostgreSQL pay nothing) and
stops at interpreter exit.  Without PostgreSQL server binaries the calling test is skipped with
the reason; any other start-up failure is an error, not a skip.

``CREATE DATABASE`` takes about 0.15 s, most of it waiting on the server; a test run makes close
to a hundred.  So a thread keeps a few databases of each kind made ahead (:class:`_Stock`), and
a test takes one without waiting; when the stock is empty (or the cluster was stopped by a test)
the database is made then and there, as before.

Usage in an async ``TestCase``::

    dsn = pg.database(self)            # a fresh empty database, dropped at cleanup
    dsn = pg.database(self, migrated=True)   # with the relay schema applied
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import queue
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lpa.tools.pgcluster import PostgresCluster, PostgresNotFound

_counter = itertools.count(1)


@functools.cache
def _created() -> PostgresCluster:
    """The run's one cluster, made and started once (a SkipTest is not cached: it recurs)."""
    try:
        created = PostgresCluster()
    except PostgresNotFound as error:
        raise SkipTest(f"PostgreSQL tests need initdb/pg_ctl: {error}") from None
    atexit.register(created.destroy)
    created.start()
    return created


def cluster() -> PostgresCluster:
    """The run's cluster, started on first call; raises SkipTest without PostgreSQL binaries."""
    server = _created()
    if not server.running:  # a test stopped it and failed before starting it again
        server.start()
    return server


def _make(server: PostgresCluster, migrated: bool) -> tuple[str, str]:
    """Create a database of the kind asked for; its name and DSN."""
    name = f"lpa_test_{os.getpid()}_{next(_counter)}"
    dsn = server.create_database(name)
    if migrated:
        from lpa.relay.schema import migrate

        migrate(dsn)
    return name, dsn


class _Stock:
    """Databases made ahead by a daemon thread, ``depth`` of each kind (empty, migrated)."""

    def __init__(self, server: PostgresCluster, depth: int = 4) -> None:
        self._server = server
        self._ready = {kind: queue.Queue[tuple[str, str]](maxsize=depth) for kind in (False, True)}
        self._wanted = threading.Event()
        self._wanted.set()
        threading.Thread(target=self._fill, name="pg-stock", daemon=True).start()

    def take(self, migrated: bool) -> tuple[str, str] | None:
        """A database made ahead, or None when there is none ready (the caller makes one)."""
        try:
            made = self._ready[migrated].get_nowait()
        except queue.Empty:
            made = None
        self._wanted.set()
        return made

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            for migrated, ready in self._ready.items():
                while not ready.full():
                    if not self._server.running:
                        break  # a test stopped the cluster: nothing is made until it is back
                    try:
                        ready.put(_make(self._server, migrated))
                    except Exception:  # the cluster is restarting: tests make their own
                        break


@functools.cache
def _stock() -> _Stock:
    return _Stock(cluster())


def database(test: SynchronousTestCase, *, migrated: bool = False) -> str:
    """Create a fresh database for ``test`` (dropped at its cleanup) and return its DSN."""
    server = cluster()
    made = _stock().take(migrated)
    name, dsn = made if made is not None else _make(server, migrated)
    # registered first, so it runs last: after the test closed its own connections
    test.addCleanup(lambda: server.drop_database(name) if server.running else None)
    return dsn
