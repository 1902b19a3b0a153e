"""The group-commit write path against a real cluster: statements per transaction, the roll-up's
running counts, output refreshed at a bounded cadence, small payloads."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from txpostgres import txpostgres

from lpa.relay import pgadapter
from lpa.relay.interfaces import TRANSPORT_WS
from lpa.relay.notify import PAYLOAD_BUDGET
from lpa.relay.rollup import _NO_OPEN_ROWS_SQL
from lpa.relay.sqlbits import array
from tests.pgutil import event
from tests.test_store import StoreTestBase


class Statements:
    """A connection factory whose cursors record every round trip (its SQL text and parameters),
    per transaction."""

    def __init__(self) -> None:
        self.transactions: list[list[tuple[str, Any]]] = []

    def factory(self) -> Any:
        recorded = self

        current: list[list[tuple[str, Any]]] = [[]]  # this connection's transaction

        class RecordingCursor(txpostgres.Cursor):  # type: ignore[misc]  # txpostgres: no types
            def execute(self, query: str, params: Any = None) -> Any:
                words = " ".join(query.split())
                if words.startswith("BEGIN"):
                    current[0] = []
                    recorded.transactions.append(current[0])
                current[0].append((words, params))
                return super().execute(query, params)

        connection = pgadapter.Connection(reactor=reactor,
                                          detector=pgadapter.Detector(reactor=reactor))
        connection.cursorFactory = RecordingCursor
        return connection

    def writes(self) -> list[list[tuple[str, Any]]]:
        """Transactions that applied something (not reads): (SQL, parameters) per round trip."""
        return [t for t in self.transactions if any("FOR UPDATE" in sql for sql, _ in t)]


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"{what}: not reached in {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class GroupCommitTests(StoreTestBase):
    def rows(self, count: int, job: str | None = None) -> list[Any]:
        job = job or self.seed.job()
        return [self.seed.host_job(
                    job, self.seed.host(f"h{n}.example", f"10.1.{n // 250}.{n % 250}"), f"a{n}")
                for n in range(count)]

    async def test_fifty_rows_one_transaction_a_handful_of_statements(self) -> None:
        """Calls for 50 rows waiting behind a transaction are applied by ONE transaction of two
        round trips (BEGIN + lock; one write + one notify + COMMIT), one notification per row."""
        rows = self.rows(51)
        statements = Statements()
        store = await self.make(pool_size=1, connection_factory=statements.factory)
        first = store.apply_events(rows[0], [event("a0", 1, "running")], TRANSPORT_WS)
        calls = [
            store.apply_events(row, [
                event(row.agent_job_id, 1, "running", progress=10),
                event(row.agent_job_id, 2, "running", kind="output", message=f"line of {n}"),
            ], TRANSPORT_WS)
            for n, row in enumerate(rows[1:], start=1)
        ]
        await first
        results = await defer.gatherResults(calls)
        self.assertEqual({(r.applied, r.last_seq, r.notified) for r in results}, {(2, 2, 1)})
        big = [sql for sql, _ in statements.writes()[-1]]
        self.assertEqual(len(big), 2)
        self.assertTrue(big[0].startswith("BEGIN ISOLATION LEVEL READ COMMITTED; SELECT"))
        self.assertTrue(big[0].endswith("ORDER BY id FOR UPDATE"))
        self.assertTrue(big[1].startswith("WITH u AS"))
        self.assertTrue(big[1].endswith("FROM unnest(%s::text[]) AS p; COMMIT"))
        self.assertEqual(big[1].count("; "), 2)  # the write, the notify, the commit
        notes = self.listener.collect(51)
        self.assertEqual(len(notes), 51)
        by_host = {note["host_id"]: note for note in notes}
        for n, row in enumerate(rows[1:], start=1):
            self.assertEqual((by_host[row.host_id]["output"], by_host[row.host_id]["seq"]),
                             (f"line of {n}", 2))
            self.assertEqual(self.seed.row(row.row_id)["output"], f"line of {n}")

    async def test_transactions_reported_to_observers(self) -> None:
        """observe_transactions hears each committed write: its calls and payload sizes; the
        pool's figures are there for the metrics too."""
        rows = self.rows(3)
        store = await self.make(pool_size=1)
        seen: list[tuple[int, list[Any]]] = []
        store.observe_transactions(lambda calls, payloads: seen.append((calls, payloads)))
        first = store.apply_events(rows[0], [event("a0", 1, "running")], TRANSPORT_WS)
        others = [store.apply_events(row, [event(row.agent_job_id, 1, "completed")],
                                     TRANSPORT_WS) for row in rows[1:]]
        await defer.gatherResults([first, *others])
        self.assertEqual(sum(calls for calls, _ in seen), 3)
        payloads = [payload for _, sent in seen for payload in sent]
        self.assertEqual([kind for kind, _ in payloads], ["host", "host", "host"])
        self.assertTrue(all(0 < size <= PAYLOAD_BUDGET for _, size in payloads))
        self.assertTrue(store.database_up())
        self.assertEqual(store.pool_stats(), {"size": 2, "up": 2, "in_use": 0, "waiting": 0,
                                              "pending_events": 0})

    async def test_each_payload_has_only_the_new_lines(self) -> None:
        """A row's notification carries the lines new since its previous one, never the tail of
        the whole output; payloads stay within 1 KB."""
        [row] = self.rows(1)
        store = await self.make()
        for start in range(1, 61, 10):
            await store.apply_events(row, [
                event("a0", seq, "running", kind="output", message=f"Setting up package{seq:03d}")
                for seq in range(start, start + 10)], TRANSPORT_WS)
        await store.apply_events(row, [event("a0", 61, "completed")], TRANSPORT_WS)
        notes = [n for n in self.listener.collect(7) if n["event_type"] == "host"]
        self.assertEqual(notes[1]["output"],
                         "\n" + "\n".join(f"Setting up package{s:03d}" for s in range(11, 21)))
        self.assertIsNone(notes[-1]["output"])
        self.assertEqual(notes[-1]["status"], "succeeded")
        self.assertTrue(all(len(raw.encode()) <= PAYLOAD_BUDGET for raw in self.listener.raw))
        self.assertEqual(self.seed.row(row.row_id)["output"],
                         "\n".join(f"Setting up package{s:03d}" for s in range(1, 61)))


class RollUpTests(StoreTestBase):
    def host_job(self, job: str, n: int) -> Any:
        return self.seed.host_job(job, self.seed.host(f"h{n}.example", f"192.0.2.{n + 1}"), f"a{n}")

    async def end(self, store: Any, row: Any, status: str = "completed") -> Any:
        return await store.apply_events(row, [event(row.agent_job_id, 1, status)], TRANSPORT_WS)

    def counts(self, job: str) -> tuple[Any, ...]:
        counted: tuple[Any, ...] = self.seed.one(
            "SELECT relay_host_count, relay_succeeded_count, relay_failed_count, "
            "relay_cancelled_count FROM patch_jobs WHERE id = %s", (job,))
        return counted

    async def test_counts_start_with_rows_ended_before_the_relay(self) -> None:
        """The first ending counts the job's rows once, rows the manager ended before included;
        later endings add to the counts without reading the job's rows."""
        job = self.seed.job()
        ended = self.seed.host_job(job, self.seed.host("h0.example", "192.0.2.1"), "a0",
                                   status="failed")
        rows = [self.host_job(job, n) for n in range(1, 4)]
        statements = Statements()
        store = await self.make(pool_size=1, connection_factory=statements.factory)
        await self.end(store, rows[0])
        self.assertEqual(self.counts(job), (4, 1, 1, 0))
        await self.end(store, rows[1], "cancelled")
        self.assertEqual(self.counts(job), (4, 1, 1, 1))
        [check] = [params for sql, params in statements.writes()[-1] if "UNION ALL" in sql]
        self.assertEqual(check, ("{}", f'{{"{job}"}}'))  # none counted again; one probed
        last = await self.end(store, rows[2])
        self.assertEqual((last.notified, self.seed.job_status(job)), (2, "failed"))
        job_note = [n for n in self.listener.collect(4) if n["event_type"] == "job"]
        self.assertEqual([(n["succeeded_count"], n["failed_count"], n["host_count"])
                          for n in job_note], [(2, 1, 4)])
        self.assertEqual(self.seed.row(ended.row_id)["status"], "failed")

    async def test_rows_ended_by_another_writer_after_counting(self) -> None:
        """A row ended by the manager (or lpa dispatch) after the relay started counting is found
        through the open-rows index: the job still ends once, with exact counts."""
        job = self.seed.job()
        rows = [self.host_job(job, n) for n in range(3)]
        store = await self.make()
        await self.end(store, rows[0])
        self.seed.execute("UPDATE patch_job_hosts SET status = 'failed' WHERE id = %s",
                          (rows[1].row_id,))
        last = await self.end(store, rows[2])
        self.assertEqual((last.notified, self.seed.job_status(job)), (2, "failed"))
        [job_note] = [n for n in self.listener.collect(3) if n["event_type"] == "job"]
        self.assertEqual((job_note["succeeded_count"], job_note["failed_count"],
                          job_note["host_count"]), (2, 1, 3))

    async def test_many_rows_of_one_job_ending_in_one_transaction(self) -> None:
        """Endings of several rows of one job in one transaction count once each; one job note."""
        job = self.seed.job()
        rows = [self.host_job(job, n) for n in range(8)]
        store = await self.make(pool_size=1)
        results = await defer.gatherResults([
            store.apply_events(row, [event(row.agent_job_id, 1, "completed")], TRANSPORT_WS)
            for row in rows])
        self.assertEqual(sum(r.notified for r in results), 9)
        self.assertEqual(self.counts(job), (8, 8, 0, 0))
        self.assertEqual(len([n for n in self.listener.collect(9) if n["event_type"] == "job"]), 1)

    async def test_open_rows_probe_uses_the_partial_index(self) -> None:
        """"Does the job still have an open row?" is an index probe, not a scan of its rows."""
        job = self.seed.job()
        self.seed.execute(
            "INSERT INTO hosts (fqdn, ip_address) SELECT 'h' || n || '.example', "
            "'10.0.0.0'::inet + n FROM generate_series(1, 2000) AS n")
        self.seed.execute(
            "INSERT INTO patch_job_hosts (job_id, host_id, status) "
            "SELECT %s, id, 'succeeded' FROM hosts", (job,))
        self.seed.execute("ANALYZE patch_job_hosts")
        plan = "\n".join(row[0] for row in self.seed.all(
            "EXPLAIN " + _NO_OPEN_ROWS_SQL.replace("%s", "ARRAY[%s]"), (job,)))
        self.assertIn("relay_open_host_rows", plan)


class ArrayTests(StoreTestBase):
    async def test_array_literal_round_trips(self) -> None:
        """One literal per array carries any text (quotes, backslashes, braces, NULL, "NULL")."""
        values = ['a"b', "back\\slash", "{,}", "", "NULL", None, "ünï ✓", "line\nbreak"]
        self.assertEqual(self.seed.one("SELECT %s::text[]", (array(values),))[0], values)
        self.assertEqual(self.seed.one("SELECT %s::int[], %s::bool[]",
                                       (array([1, None, -3]), array([True, False])))[:2],
                         ([1, None, -3], [True, False]))


class OutputRefreshTests(StoreTestBase):
    async def test_output_refreshed_at_the_interval_and_on_the_end(self) -> None:
        """A row's output gets its first lines at once, later ones within output_interval (the
        store's clock), and everything with the terminal event; lines wait in
        relay_output_pending meanwhile."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        clock = Clock()
        store = await self.make(clock=clock, output_interval=1.0)

        def line(seq: int) -> Any:
            return event("a1", seq, "running", kind="output", message=f"line {seq}")

        await store.apply_events(row, [line(1)], TRANSPORT_WS)
        await store.apply_events(row, [line(2)], TRANSPORT_WS)
        self.assertEqual(self.seed.row(row.row_id)["output"], "line 1")
        self.assertEqual(self.seed.all("SELECT text FROM relay_output_pending"), [("\nline 2",)])
        clock.advance(0.5)
        await store.apply_events(row, [line(3)], TRANSPORT_WS)
        self.assertEqual(self.seed.row(row.row_id)["output"], "line 1")
        clock.advance(0.5)  # the timer finds the row due and refreshes it
        await until(lambda: self.seed.row(row.row_id)["output"] == "line 1\nline 2\nline 3",
                    "refreshed by the timer")
        await store.apply_events(row, [line(4)], TRANSPORT_WS)
        await store.apply_events(row, [event("a1", 5, "failed", error="E: boom")], TRANSPORT_WS)
        self.assertEqual(self.seed.row(row.row_id)["output"],
                         "\n".join(f"line {n}" for n in range(1, 5)))
        self.assertEqual(self.seed.all("SELECT text FROM relay_output_pending"), [])

    async def test_streaming_row_needs_no_extra_refresh_transaction(self) -> None:
        """A row that keeps streaming small output is refreshed by its own next transaction; the
        timer only steps in for lines that waited the whole interval."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        clock = Clock()
        statements = Statements()
        store = await self.make(clock=clock, connection_factory=statements.factory)
        for seq in range(1, 5):
            await store.apply_events(
                row, [event("a1", seq, "running", kind="output", message=f"l{seq}")], TRANSPORT_WS)
            clock.advance(0.5)  # the timer runs: the waiting line is half an interval old
        self.assertEqual(self.seed.row(row.row_id)["output"], "l1\nl2\nl3")
        writes = statements.writes()
        self.assertEqual(len(writes), 4)
        self.assertTrue(all("pg_notify" in t[-1][0] for t in writes))

    async def test_large_output_refreshed_outside_the_notifying_transactions(self) -> None:
        """Past 8 KiB a row's output is refreshed by a transaction of its own, which notifies
        nobody (so takes no NOTIFY lock); the notifying ones only add its new lines."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        self.seed.execute("UPDATE patch_job_hosts SET output = repeat('x', 20000) WHERE id = %s",
                          (row.row_id,))
        clock = Clock()
        statements = Statements()
        store = await self.make(clock=clock, connection_factory=statements.factory)
        await store.apply_events(row, [event("a1", 1, "running", kind="output", message="new")],
                                 TRANSPORT_WS)
        self.assertEqual(len(self.seed.row(row.row_id)["output"]), 20000)
        [(_, notifying)] = statements.writes()[-1][1:]
        self.assertEqual(array([0]), notifying[12])  # the write's mode column: keep the output
        clock.advance(1.0)  # the line waited output_interval: the timer refreshes the row
        await until(lambda: len(self.seed.row(row.row_id)["output"]) == 20004, "refreshed")
        refresh = [sql for sql, _ in statements.writes()[-1]]
        self.assertFalse([sql for sql in refresh if "pg_notify" in sql])
        self.assertEqual(self.seed.row(row.row_id)["output"], "x" * 20000 + "\nnew")
        lz4 = self.seed.one("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                            "WHERE name = 'default_toast_compression'")
        if lz4 and lz4[0]:  # the relay's sessions write lz4 where the server has it
            self.assertEqual(self.seed.one(
                "SELECT pg_column_compression(output) FROM patch_job_hosts WHERE id = %s",
                (row.row_id,))[0], "lz4")

    async def test_clean_stop_moves_every_waiting_line(self) -> None:
        """stop() refreshes every row with lines waiting, even ones this store did not see
        written (a commit whose answer was lost before the connection died)."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        store = await self.make(clock=Clock())
        self.seed.execute("INSERT INTO relay_output_pending (row_id, text) VALUES (%s, 'lost')",
                          (row.row_id,))
        await store.stop()
        self.assertEqual(self.seed.row(row.row_id)["output"], "lost")
        self.assertEqual(self.seed.all("SELECT text FROM relay_output_pending"), [])

    async def test_lines_left_waiting_are_moved_at_start(self) -> None:
        """Lines a relay left in relay_output_pending (killed before moving them) reach the row's
        output when the next relay starts."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        self.seed.execute("UPDATE patch_job_hosts SET output = 'one' WHERE id = %s", (row.row_id,))
        self.seed.execute("INSERT INTO relay_output_pending (row_id, text) VALUES (%s, %s), "
                          "(%s, %s)", (row.row_id, "\ntwo", row.row_id, "\nthree"))
        await self.make()
        await until(lambda: self.seed.row(row.row_id)["output"] == "one\ntwo\nthree",
                    "moved at start")
        self.assertEqual(self.seed.all("SELECT text FROM relay_output_pending"), [])
