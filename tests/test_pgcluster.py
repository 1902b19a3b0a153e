"""lpa.tools.pgcluster: restarting a throwaway cluster (on a cluster of its own, not the run's)."""

from __future__ import annotations

import psycopg2
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lpa.tools.pgcluster import PostgresCluster, PostgresNotFound


class RestartTests(SynchronousTestCase):
    def test_restart_drops_sessions_and_answers_again(self) -> None:
        """restart() ends every client's session; the cluster answers at once afterwards, as a
        new server process, with its databases kept."""
        try:
            cluster = PostgresCluster()  # the run's cluster serves other tests' databases
        except PostgresNotFound as error:
            raise SkipTest(f"PostgreSQL tests need initdb/pg_ctl: {error}") from None
        self.addCleanup(cluster.destroy)
        cluster.start()
        dsn = cluster.create_database("kept")
        before = psycopg2.connect(dsn)
        self.addCleanup(before.close)
        with before.cursor() as cursor:
            cursor.execute("SELECT pg_postmaster_start_time()")
            [(started,)] = cursor.fetchall()

        cluster.restart()

        self.assertTrue(cluster.running)
        with self.assertRaises(psycopg2.OperationalError), before.cursor() as cursor:
            cursor.execute("SELECT 1")
        after = psycopg2.connect(dsn)
        self.addCleanup(after.close)
        with after.cursor() as cursor:
            cursor.execute("SELECT pg_postmaster_start_time(), current_database()")
            [(restarted, database)] = cursor.fetchall()
        self.assertGreater(restarted, started)
        self.assertEqual(database, "kept")
