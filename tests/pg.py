"""A throwaway PostgreSQL cluster for the test run: one cluster, one database per test.

The cluster starts on first use (so test modules that never touch PostgreSQL pay nothing) and
stops at interpreter exit.  Without PostgreSQL server binaries the calling test is skipped with
the reason; any other start-up failure is an error, not a skip.

Usage in an async ``TestCase``::

    dsn = pg.database(self)            # a fresh empty database, dropped at cleanup
    dsn = pg.database(self, migrated=True)   # with the relay schema applied
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os

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


def database(test: SynchronousTestCase, *, migrated: bool = False) -> str:
    """Create a fresh database for ``test`` (dropped at its cleanup) and return its DSN."""
    server = cluster()
    name = f"lpa_test_{os.getpid()}_{next(_counter)}"
    dsn = server.create_database(name)
    # registered first, so it runs last: after the test closed its own connections
    test.addCleanup(lambda: server.drop_database(name) if server.running else None)
    if migrated:
        from lpa.relay.schema import migrate

        migrate(dsn)
    return dsn
