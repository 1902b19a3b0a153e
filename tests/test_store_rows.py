"""The pure row rules (lpa.relay.rows) and the FakeRelayStore built on them."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpa.relay.interfaces import TRANSPORT_WS
from lpa.relay.rows import (
    JobCounts,
    RowState,
    apply_output,
    fail_state,
    output_digest,
    reduce_events,
    rollup_counts,
    rollup_status,
)
from tests.fakes_relay import FakeRelayStore
from tests.pgutil import event

RUNNING = RowState(status="running", agent_job_id="a1")


class ReduceTests(SynchronousTestCase):
    def test_status_mapping(self) -> None:
        """Agent statuses map to the manager's job_status (none dropped)."""
        expected = {"pending": "running", "running": "running", "rebooting": "running",
                    "completed": "succeeded", "failed": "failed", "timed_out": "failed",
                    "cancelled": "cancelled"}
        for agent, db in expected.items():
            self.assertEqual(reduce_events(RUNNING, "a1", [event("a1", 1, agent)]).state.status, db)

    def test_order_duplicates_and_refusals(self) -> None:
        """Events apply in order; seq at or below last_seq and other jobs' events do not apply."""
        result = reduce_events(
            RowState(status="running", last_seq=2, output_end="d"), "a1",
            [event("a1", 2, "running", kind="output", message="dup"),
             event("a1", 3, "running", kind="output", message="new"),
             event("zz", 4, "completed"),
             event("a1", 3, "running", kind="output", message="dup again")])
        self.assertEqual((result.applied, result.duplicates, result.refused), (1, 2, 1))
        self.assertEqual((result.output_added, result.state.last_seq), ("\nnew", 3))
        self.assertEqual(apply_output("old", result), "old\nnew")
        self.assertFalse(result.became_terminal)

    def test_terminal_is_final(self) -> None:
        """Once terminal (already, or within the batch) later events are ignored."""
        result = reduce_events(RUNNING, "a1", [event("a1", 1, "completed"),
                                               event("a1", 2, "failed")])
        self.assertEqual((result.state.status, result.applied, result.ignored), ("succeeded", 1, 1))
        self.assertTrue(result.became_terminal)
        again = reduce_events(result.state, "a1", [event("a1", 3, "running")])
        self.assertEqual((again.applied, again.state), (0, result.state))
        self.assertEqual(fail_state(result.state, "x").state, result.state)

    def test_final_snapshot_wins_behind_the_row(self) -> None:
        """A terminal snapshot at or below relay_last_seq (an agent that renumbered) still ends
        the row; a non-terminal one there is a duplicate, and last_seq never goes backwards."""
        ahead = RowState(status="running", last_seq=53, agent_job_id="a1")
        stale = reduce_events(ahead, "a1", [event("a1", 4, "running", kind="snapshot")])
        self.assertEqual((stale.applied, stale.duplicates, stale.state), (0, 1, ahead))
        final = reduce_events(ahead, "a1", [
            event("a1", 4, "failed", kind="snapshot", error="agent restarted")])
        self.assertEqual((final.state.status, final.state.last_seq), ("failed", 53))
        self.assertEqual((final.applied, final.state.error_message), (1, "agent restarted"))
        self.assertTrue(final.became_terminal)
        output_line = reduce_events(ahead, "a1", [event("a1", 4, "completed", kind="output")])
        self.assertEqual((output_line.applied, output_line.duplicates), (0, 1))

    def test_errors(self) -> None:
        """failed keeps the agent's error; timed_out explains itself."""
        failed = reduce_events(RUNNING, "a1", [event("a1", 1, "failed", error="dpkg broke")])
        self.assertEqual(failed.state.error_message, "dpkg broke")
        timed = reduce_events(RUNNING, "a1", [event("a1", 1, "timed_out", message="after 3600 s")])
        self.assertEqual(timed.state.error_message, "timed out on the agent (after 3600 s)")

    def test_text_cleaned_for_postgres(self) -> None:
        """NUL characters and lone surrogates never reach a TEXT column."""
        result = reduce_events(RUNNING, "a1", [
            event("a1", 1, "running", kind="output", message="a\x00b\ud800c")])
        self.assertEqual(result.output_added, "ab?c")

    def test_output_is_a_delta_joined_by_the_last_character(self) -> None:
        """Lines join with a newline after the row's last character; an empty line after a
        newline adds nothing; the state keeps only the last character, never the text."""
        lines = [event("a1", n, "running", kind="output", message=text)
                 for n, text in enumerate(["one", "", "", "two"], start=1)]
        first = reduce_events(RUNNING, "a1", lines[:2])
        self.assertEqual((first.output_added, first.state.output_end), ("one\n", "\n"))
        rest = reduce_events(first.state, "a1", lines[2:])
        self.assertEqual((rest.output_added, rest.state.output_end), ("\ntwo", "o"))
        self.assertEqual(apply_output(apply_output("", first), rest), "one\n\ntwo")
        self.assertFalse(rest.output_reset)

    def test_snapshot_replaces_output_then_lines_append(self) -> None:
        """A snapshot with output replaces the text; lines after it in the batch append to it."""
        result = reduce_events(RowState(status="running", output_end="x"), "a1", [
            event("a1", 1, "running", kind="snapshot", output="whole\ntext"),
            event("a1", 2, "running", kind="output", message="more")])
        self.assertTrue(result.output_reset)
        self.assertEqual(apply_output("ignored", result), "whole\ntext\nmore")
        self.assertIsNone(result.state.snapshot_digest)  # a line was appended since

    def test_seqless_snapshot_is_news_only_when_it_changes_something(self) -> None:
        """An identical seq-less snapshot (same status, same output digest) changes nothing."""
        snap = event("a1", None, "running", kind="snapshot", output="l1\nl2")
        first = reduce_events(RUNNING, "a1", [snap])
        self.assertEqual((first.applied, first.state.snapshot_digest), (1, output_digest("l1\nl2")))
        again = reduce_events(first.state, "a1", [snap])
        self.assertEqual((again.applied, again.ignored, again.output_added), (0, 1, ""))
        grown = reduce_events(first.state, "a1", [
            event("a1", None, "running", kind="snapshot", output="l1\nl2\nl3")])
        self.assertEqual((grown.applied, grown.output_added), (1, "l1\nl2\nl3"))
        done = reduce_events(first.state, "a1", [event("a1", None, "completed", kind="snapshot")])
        self.assertEqual((done.applied, done.state.status, done.output_added), (1, "succeeded", ""))

    def test_counts_roll_up_like_the_statuses(self) -> None:
        """Incremental counts decide the parent exactly as the list of statuses does."""
        for statuses in (["succeeded"] * 3, ["succeeded", "failed", "cancelled"],
                         ["cancelled", "cancelled"], ["succeeded", "running"], []):
            counts = JobCounts(hosts=len(statuses))
            for status in statuses:
                counts = counts.plus(status)
            self.assertEqual(rollup_counts(counts), rollup_status(statuses), statuses)
        self.assertEqual(JobCounts.of(["failed", "running"]), JobCounts(hosts=2, failed=1))

    def test_rollup(self) -> None:
        """Parent status once all hosts are terminal; mixed cancelled+succeeded is cancelled."""
        self.assertIsNone(rollup_status(["succeeded", "running"]))
        self.assertIsNone(rollup_status([]))
        self.assertEqual(rollup_status(["succeeded", "succeeded"]), "succeeded")
        self.assertEqual(rollup_status(["succeeded", "failed", "cancelled"]), "failed")
        self.assertEqual(rollup_status(["cancelled", "cancelled"]), "cancelled")
        self.assertEqual(rollup_status(["cancelled", "succeeded"]), "cancelled")


class FakeStoreTests(SynchronousTestCase):
    def test_fake_follows_the_rules_and_records(self) -> None:
        """The fake applies the same rules, records calls and what a real store would notify."""
        store = FakeRelayStore()
        one = store.add_host_job(row_id="r1", job_id="j", host_id="h1", agent_job_id="a1")
        two = store.add_host_job(row_id="r2", job_id="j", host_id="h2", agent_job_id="a2")
        self.assertEqual(len(self.successResultOf(store.running_host_jobs())), 2)
        result = self.successResultOf(
            store.apply_events(one, [event("a1", 1, "completed")], TRANSPORT_WS))
        self.assertEqual((result.row_status, result.terminal, result.notified),
                         ("succeeded", True, 1))
        result = self.successResultOf(store.fail_host_job(two, "unreachable", TRANSPORT_WS))
        self.assertEqual(result.notified, 2)
        self.assertEqual([n["event_type"] for n in store.notifications], ["host", "host", "job"])
        self.assertEqual(store.notifications[-1]["status"], "failed")
        self.assertEqual([c.method for c in store.calls],
                         ["running_host_jobs", "apply_events", "fail_host_job"])
        self.assertEqual(self.successResultOf(store.running_host_jobs()), [])

    def test_fake_faults(self) -> None:
        """error makes calls errback; hold() keeps them pending until release()."""
        store = FakeRelayStore()
        row = store.add_host_job(row_id="r1", job_id="j", host_id="h", agent_job_id="a1")
        store.error = RuntimeError("database down")
        self.failureResultOf(store.apply_events(row, [], TRANSPORT_WS), RuntimeError)
        store.error = None
        store.hold()
        pending = store.apply_events(row, [event("a1", 1, "running")], TRANSPORT_WS)
        self.assertNoResult(pending)
        store.release()
        self.assertEqual(self.successResultOf(pending).last_seq, 1)
