"""The job_update payload: the original's fields plus ours, always under pg_notify's limit."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from lpa.relay.notify import ERROR_BUDGET, PAYLOAD_BUDGET, PG_NOTIFY_LIMIT, build_payload


def size(text: str) -> int:
    return len(text.encode("utf-8"))


class PayloadTests(SynchronousTestCase):
    def test_host_payload_fields(self) -> None:
        """A host payload has every field of the original plus seq, transport, progress, flags."""
        payload = json.loads(build_payload(
            event_type="host", job_id="j", host_id="h", status="running", agent_job_id="a",
            output="out", error_message=None, seq=4, transport="ws", progress=40))
        self.assertEqual(payload, {
            "event_type": "host", "job_id": "j", "host_id": "h", "status": "running",
            "output": "out", "error_message": None, "agent_job_id": "a",
            "succeeded_count": None, "failed_count": None, "host_count": None,
            "seq": 4, "transport": "ws", "progress": 40,
            "output_truncated": False, "error_truncated": False})

    def test_job_payload_fields(self) -> None:
        """A job payload has empty host/agent ids, null output and the counts."""
        payload = json.loads(build_payload(
            event_type="job", job_id="j", status="failed", succeeded_count=9, failed_count=1,
            host_count=10))
        self.assertEqual((payload["host_id"], payload["agent_job_id"], payload["output"]),
                         ("", "", None))
        self.assertEqual(
            (payload["succeeded_count"], payload["failed_count"], payload["host_count"]),
            (9, 1, 10))

    def test_budget_is_one_kilobyte(self) -> None:
        """Host payloads are at most 1024 bytes: the error keeps at most 512 of them."""
        self.assertEqual((PAYLOAD_BUDGET, ERROR_BUDGET), (1024, 512))

    def test_multibyte_output_keeps_tail_under_budget(self) -> None:
        """Multi-byte output is cut to its tail so the UTF-8 JSON stays within the budget."""
        for char in ("é", "€", "😀", "\n", "\x01", '"'):
            output = "start" + char * 50_000 + "END"
            text = build_payload(event_type="host", job_id="j", status="running", output=output)
            self.assertLessEqual(size(text), PAYLOAD_BUDGET, char)
            self.assertGreater(size(text), PAYLOAD_BUDGET - 16, char)  # the budget is used
            payload = json.loads(text)
            self.assertTrue(payload["output_truncated"])
            self.assertTrue(payload["output"].endswith("END"))
            self.assertTrue(output.endswith(payload["output"]))

    def test_error_keeps_head_and_output_gets_the_rest(self) -> None:
        """A long error keeps its head within ERROR_BUDGET; output fills the rest; both flagged."""
        error = "E: Unable to locate package " + "ж" * 20_000
        text = build_payload(event_type="host", job_id="j", status="failed",
                             output="x" * 20_000, error_message=error)
        payload = json.loads(text)
        self.assertLessEqual(size(text), PAYLOAD_BUDGET)
        self.assertTrue(payload["error_message"].startswith("E: Unable to locate package"))
        self.assertTrue(error.startswith(payload["error_message"]))
        self.assertLessEqual(size(json.dumps(payload["error_message"], ensure_ascii=False)),
                             ERROR_BUDGET)
        self.assertTrue(payload["error_truncated"] and payload["output_truncated"])
        self.assertGreater(len(payload["output"]), 200)

    def test_small_payload_untouched(self) -> None:
        """Text that fits is sent whole with both flags false."""
        payload = json.loads(build_payload(event_type="host", job_id="j", status="failed",
                                           output="ok ✓", error_message="boom ✗"))
        self.assertEqual((payload["output"], payload["error_message"]), ("ok ✓", "boom ✗"))
        self.assertFalse(payload["output_truncated"] or payload["error_truncated"])

    def test_always_under_pg_limit(self) -> None:
        """Whatever the sizes, the payload is below PostgreSQL's 8000-byte limit."""
        for out_len in (0, 1, 6_000, 7_000, 8_000, 100_000):
            for err_len in (0, 1_000, 1_600, 9_000):
                text = build_payload(event_type="host", job_id="j" * 36, host_id="h" * 36,
                                     status="running", agent_job_id="a" * 36,
                                     output="ü" * out_len, error_message="ß" * err_len)
                self.assertLess(size(text), PG_NOTIFY_LIMIT)
                self.assertLessEqual(size(text), PAYLOAD_BUDGET)

    def test_oversized_ids_are_an_error_not_a_bad_notify(self) -> None:
        """Ids alone larger than the budget raise instead of making a payload pg_notify refuses."""
        self.assertRaises(ValueError, build_payload, event_type="host", job_id="j" * 9000,
                          status="running")
