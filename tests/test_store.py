"""PostgresRelayStore against a real throwaway PostgreSQL cluster."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lpa.relay.interfaces import TRANSPORT_POLL, TRANSPORT_WS, AgentAddress, IRelayStore
from lpa.relay.notify import PAYLOAD_BUDGET
from lpa.relay.store import PostgresRelayStore
from tests import pg
from tests.fakes_relay import FakeRelayStore
from tests.pgutil import Listener, Seeder, event


class InterfaceTests(SynchronousTestCase):
    def test_real_and_fake_provide_the_interface(self) -> None:
        """The PostgreSQL store and the fake both provide IRelayStore."""
        store = PostgresRelayStore("postgresql:///x", clock=reactor, reactor=reactor)
        self.assertTrue(verifyObject(IRelayStore, store))
        self.assertTrue(verifyObject(IRelayStore, FakeRelayStore()))


class StoreTestBase(TestCase):
    timeout = 60

    async def make(self, **kwargs: Any) -> PostgresRelayStore:
        kwargs.setdefault("clock", reactor)
        store = PostgresRelayStore(self.dsn, reactor=reactor, **kwargs)
        await store.start()
        self.addCleanup(store.stop)
        return store

    def setUp(self) -> None:
        self.dsn = pg.database(self, migrated=True)
        self.seed = Seeder(self.dsn)
        self.addCleanup(self.seed.close)
        self.listener = Listener(self.dsn)
        self.addCleanup(self.listener.close)


class RunningHostJobsTests(StoreTestBase):
    async def test_lists_running_rows_with_address_and_port(self) -> None:
        """Running rows with an agent job come back with fqdn (else IP), agent_port and last seq."""
        job = self.seed.job()
        named = self.seed.host("agent1.example", "192.0.2.1", 12443)
        unnamed = self.seed.host("", "192.0.2.2", 14443)
        queued = self.seed.host("agent3.example", "192.0.2.3")
        row1 = self.seed.host_job(job, named, "a1")
        row2 = self.seed.host_job(job, unnamed, "a2")
        self.seed.host_job(job, queued, "a3", status="queued")
        self.seed.host_job(self.seed.job(), named, None)  # running, not dispatched yet
        self.seed.execute(
            "UPDATE patch_job_hosts SET relay_last_seq = 7, relay_agent_job_id = 'a1' "
            "WHERE id = %s",
            (row1.row_id,),
        )
        self.seed.execute(
            "UPDATE patch_job_hosts SET relay_missing_since = now(), "
            "relay_missing_agent_job_id = 'a2' WHERE id = %s",
            (row2.row_id,),
        )
        store = await self.make()
        found = {host_job.row_id: host_job for host_job in await store.running_host_jobs()}
        self.assertEqual(set(found), {row1.row_id, row2.row_id})
        self.assertEqual(found[row1.row_id].agent, AgentAddress("agent1.example", 12443))
        self.assertEqual(found[row1.row_id].last_seq, 7)
        self.assertEqual((found[row1.row_id].missing_recorded, found[row2.row_id].missing_recorded),
                         (False, True))
        self.assertEqual(found[row2.row_id].agent, AgentAddress("192.0.2.2", 14443))
        self.assertEqual(found[row2.row_id].agent_job_id, "a2")
        self.assertEqual(found[row2.row_id].job_id, job)

    async def test_seq_of_a_previous_agent_job_does_not_count(self) -> None:
        """A row re-dispatched to a new agent job reports last_seq 0, not the old job's seq."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "new-agent-job")
        self.seed.execute(
            "UPDATE patch_job_hosts SET relay_last_seq = 40, relay_agent_job_id = 'old' "
            "WHERE id = %s",
            (row.row_id,),
        )
        store = await self.make()
        [found] = await store.running_host_jobs()
        self.assertEqual(found.last_seq, 0)


class ApplyTests(StoreTestBase):
    async def one_row(self) -> Any:
        job = self.seed.job()
        host = self.seed.host("agent1.example")
        return job, self.seed.host_job(job, host, "a1")

    async def test_apply_updates_row_and_notifies_once(self) -> None:
        """Events update the row in one transaction; one host notification has the last state."""
        job, row = await self.one_row()
        store = await self.make()
        result = await store.apply_events(
            row,
            [
                event("a1", 1, "running", progress=5, message="started"),
                event("a1", 2, "running", kind="output", message="Unpacking curl"),
                event("a1", 3, "running", kind="output", message="Setting up curl"),
                event("a1", 4, "running", kind="progress", progress=60, message="installing"),
            ],
            TRANSPORT_WS,
        )
        self.assertEqual((result.applied, result.last_seq, result.row_status), (4, 4, "running"))
        self.assertFalse(result.terminal)
        self.assertEqual(result.notified, 1)
        saved = self.seed.row(row.row_id)
        self.assertEqual(saved["status"], "running")
        self.assertEqual(saved["output"], "Unpacking curl\nSetting up curl")
        self.assertEqual(saved["relay_last_seq"], 4)
        self.assertEqual(saved["relay_agent_job_id"], "a1")
        self.assertEqual(saved["relay_transport"], "ws")
        self.assertEqual(saved["relay_progress"], 60)
        self.assertEqual(saved["relay_message"], "installing")
        self.assertIsNotNone(saved["relay_last_event_at"])
        self.assertIsNone(saved["completed_at"])
        [payload] = self.listener.collect(1)
        self.assertEqual(payload["event_type"], "host")
        self.assertEqual(payload["job_id"], job)
        self.assertEqual(payload["host_id"], row.host_id)
        self.assertEqual(payload["agent_job_id"], "a1")
        self.assertEqual(payload["status"], "running")
        self.assertEqual(payload["seq"], 4)
        self.assertEqual(payload["progress"], 60)
        self.assertEqual(payload["transport"], "ws")
        self.assertEqual(payload["output"], "Unpacking curl\nSetting up curl")
        self.assertIsNone(payload["succeeded_count"])
        self.assertFalse(payload["output_truncated"])

    async def test_completion_ends_row_and_job(self) -> None:
        """completed → succeeded with completed_at; the one-host job ends succeeded with counts."""
        job, row = await self.one_row()
        store = await self.make()
        result = await store.apply_events(
            row, [event("a1", 1, "running"), event("a1", 2, "completed", progress=100)],
            TRANSPORT_POLL,
        )
        self.assertEqual((result.row_status, result.terminal, result.notified),
                         ("succeeded", True, 2))
        saved = self.seed.row(row.row_id)
        self.assertEqual(saved["status"], "succeeded")
        self.assertIsNotNone(saved["completed_at"])
        self.assertEqual(self.seed.job_status(job), "succeeded")
        host_note, job_note = self.listener.collect(2)
        self.assertEqual((host_note["event_type"], host_note["status"]), ("host", "succeeded"))
        self.assertEqual(job_note["event_type"], "job")
        self.assertEqual(job_note["status"], "succeeded")
        self.assertEqual(job_note["host_id"], "")
        self.assertEqual(
            (job_note["succeeded_count"], job_note["failed_count"], job_note["host_count"]),
            (1, 0, 1),
        )

    async def test_duplicates_are_skipped(self) -> None:
        """Events at or below relay_last_seq change nothing and notify nothing."""
        _, row = await self.one_row()
        store = await self.make()
        first = [event("a1", 1, "running"), event("a1", 2, "running", kind="output", message="x")]
        await store.apply_events(row, first, TRANSPORT_WS)
        again = await store.apply_events(row, first, TRANSPORT_POLL)
        self.assertEqual((again.applied, again.last_seq, again.notified), (0, 2, 0))
        saved = self.seed.row(row.row_id)
        self.assertEqual((saved["output"], saved["relay_transport"]), ("x", "ws"))
        self.assertEqual(len(self.listener.collect(1)), 1)

    async def test_other_agent_jobs_events_never_touch_the_row(self) -> None:
        """Events of another agent job are refused: no change, no notify."""
        job, row = await self.one_row()
        store = await self.make()
        with capturedLogs() as logged:
            result = await store.apply_events(
                row, [event("__health_refresh__", 1, "completed")], TRANSPORT_WS
            )
        [warning] = [e for e in logged if "refused" in e.get("log_format", "")]
        self.assertEqual((warning["log_level"], warning["count"], warning["ours"]),
                         (LogLevel.warn, 1, "a1"))
        self.assertEqual((result.applied, result.row_status, result.terminal),
                         (0, "running", False))
        saved = self.seed.row(row.row_id)
        self.assertEqual((saved["status"], saved["relay_last_seq"]), ("running", 0))
        self.assertIsNone(saved["relay_last_event_at"])
        self.assertEqual(self.seed.job_status(job), "running")
        self.assertEqual(self.listener.collect(0), [])

    async def test_terminal_rows_never_change(self) -> None:
        """A row that is succeeded/failed/cancelled ignores later events and fail_host_job."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1", status="cancelled")
        store = await self.make()
        result = await store.apply_events(row, [event("a1", 5, "failed", error="boom")],
                                          TRANSPORT_WS)
        self.assertEqual((result.applied, result.row_status, result.terminal),
                         (0, "cancelled", True))
        failed = await store.fail_host_job(row, "agent unreachable", TRANSPORT_POLL)
        self.assertEqual((failed.applied, failed.row_status), (0, "cancelled"))
        saved = self.seed.row(row.row_id)
        self.assertEqual((saved["status"], saved["error_message"], saved["relay_last_seq"]),
                         ("cancelled", None, 0))
        self.assertEqual(self.listener.collect(0), [])

    async def test_timed_out_fails_with_reason(self) -> None:
        """timed_out on the agent ends the row failed with an explanatory error."""
        _, row = await self.one_row()
        store = await self.make()
        result = await store.apply_events(
            row, [event("a1", 1, "timed_out", error="apt-get ran for 3600 s")], TRANSPORT_WS
        )
        self.assertEqual(result.row_status, "failed")
        saved = self.seed.row(row.row_id)
        self.assertEqual(saved["error_message"], "timed out on the agent (apt-get ran for 3600 s)")

    async def test_fail_host_job(self) -> None:
        """fail_host_job ends the row failed with the reason and rolls the job up failed."""
        job, row = await self.one_row()
        store = await self.make()
        result = await store.fail_host_job(row, "agent unreachable for 900 s", TRANSPORT_POLL)
        self.assertEqual((result.row_status, result.terminal, result.notified), ("failed", True, 2))
        self.assertEqual(self.seed.row(row.row_id)["error_message"], "agent unreachable for 900 s")
        self.assertEqual(self.seed.job_status(job), "failed")
        notes = self.listener.collect(2)
        self.assertEqual([n["event_type"] for n in notes], ["host", "job"])
        self.assertEqual(notes[1]["failed_count"], 1)

    async def test_stop_applies_what_is_queued(self) -> None:
        """stop() with the database up first applies every queued call, in order, then closes."""
        _, row = await self.one_row()
        store = await self.make(pool_size=2)
        calls = [
            store.apply_events(
                row, [event("a1", seq, "running", kind="output", message=str(seq))], TRANSPORT_WS)
            for seq in range(1, 21)
        ]
        await store.stop()
        self.assertEqual([(await call).last_seq for call in calls], list(range(1, 21)))
        self.assertEqual(self.seed.row(row.row_id)["output"], "\n".join(map(str, range(1, 21))))

    async def test_missing_row_says_stop_following(self) -> None:
        """A deleted row answers terminal with status 'missing' instead of an error."""
        job, row = await self.one_row()
        self.seed.execute("DELETE FROM patch_jobs WHERE id = %s", (job,))
        store = await self.make()
        result = await store.apply_events(row, [event("a1", 1, "running")], TRANSPORT_WS)
        self.assertEqual((result.row_status, result.terminal, result.applied), ("missing", True, 0))

    async def test_seqless_snapshot_applies_only_changes(self) -> None:
        """A seq-less snapshot (old agent, poller) is applied only when status or output changes."""
        _, row = await self.one_row()
        store = await self.make()
        snap = event("a1", None, "running", kind="snapshot", output="line 1")
        first = await store.apply_events(row, [snap], TRANSPORT_POLL)
        same = await store.apply_events(row, [snap], TRANSPORT_POLL)
        done = await store.apply_events(
            row, [event("a1", None, "completed", kind="snapshot", output="line 1\nline 2")],
            TRANSPORT_POLL,
        )
        self.assertEqual([first.applied, same.applied, done.applied], [1, 0, 1])
        self.assertEqual(self.seed.row(row.row_id)["output"], "line 1\nline 2")
        self.assertEqual(done.row_status, "succeeded")


class LargeOutputTests(StoreTestBase):
    async def test_100kb_output_kept_in_row_payloads_small(self) -> None:
        """100 KB of multi-byte output: the row keeps all of it, every payload stays within 1 KB
        and carries only the lines new since the row's previous notification."""
        job = self.seed.job()
        row = self.seed.host_job(job, self.seed.host("h.example"), "a1")
        store = await self.make()
        lines = [f"Paket {n:05d} wird eingerichtet … ✓ ünïcødé" for n in range(2400)]
        seq = 0
        for start in range(0, len(lines), 250):
            batch = []
            for line in lines[start : start + 250]:
                seq += 1
                batch.append(event("a1", seq, "running", kind="output", message=line))
            await store.apply_events(row, batch, TRANSPORT_WS)
        await store.apply_events(
            row, [event("a1", seq + 1, "failed", error="E: " + "ошибка " * 3000)], TRANSPORT_WS
        )
        saved = self.seed.row(row.row_id)
        self.assertEqual(saved["output"], "\n".join(lines))
        self.assertGreater(len(saved["output"].encode("utf-8")), 100_000)
        self.assertTrue(saved["error_message"].endswith("ошибка "))
        notes = self.listener.collect(12)
        self.assertEqual(len(notes), 12)  # 10 output batches, the failure, the job
        for raw in self.listener.raw:
            self.assertLessEqual(len(raw.encode("utf-8")), PAYLOAD_BUDGET)
        self.assertTrue(notes[0]["output_truncated"])
        self.assertTrue(notes[9]["output"].endswith(lines[-1]))  # the newest lines, cut in front
        self.assertTrue(notes[10]["error_truncated"])
        self.assertIsNone(notes[10]["output"])  # the failure brought no new line


class ConcurrencyTests(StoreTestBase):
    async def test_many_hosts_finishing_together_notify_job_once(self) -> None:
        """10 hosts of one job ending at once through concurrent calls: one job notification."""
        job = self.seed.job()
        rows = [
            self.seed.host_job(job, self.seed.host(f"h{n}.example", f"192.0.2.{n + 1}"), f"a{n}")
            for n in range(10)
        ]
        store = await self.make(pool_size=5)
        results = await defer.gatherResults(
            [
                store.apply_events(
                    row,
                    [event(row.agent_job_id, 1, "failed" if n == 3 else "completed", error="E")],
                    TRANSPORT_WS,
                )
                for n, row in enumerate(rows)
            ]
        )
        self.assertEqual(sum(result.notified for result in results), 11)
        notes = self.listener.collect(11)
        job_notes = [note for note in notes if note["event_type"] == "job"]
        self.assertEqual(len(job_notes), 1)
        self.assertEqual(job_notes[0]["status"], "failed")
        self.assertEqual(
            (job_notes[0]["succeeded_count"], job_notes[0]["failed_count"],
             job_notes[0]["host_count"]),
            (9, 1, 10),
        )
        self.assertEqual(self.seed.job_status(job), "failed")
