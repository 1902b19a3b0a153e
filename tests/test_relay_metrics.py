"""The relay's metrics: the seams that move them and the exposition they make, without I/O."""

from __future__ import annotations

import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lpa.metricsweb import MetricsPage
from lpa.relay.interfaces import TRANSPORT_POLL, TRANSPORT_WS, AgentAddress, IRelayStore
from lpa.relay.metered import MeteredListener, MeteredStore, metered_dial
from lpa.relay.metrics import RelayMetrics, event_age, handshake_kind, row_fail_kind
from lpa.relay.ws_client import IWebSocketListener
from tests.fakes_relay import FakeRelayStore
from tests.pgutil import event

#: tests.pgutil.event's timestamp
EVENT_TIME = datetime.datetime(2026, 11, 25, 20, 0, tzinfo=datetime.UTC).timestamp()


def scrape(metrics: RelayMetrics) -> dict[str, float]:
    """Every sample of the exposition as ``name{label=value,…}`` -> value."""
    request = DummyRequest([b"metrics"])
    body = MetricsPage(metrics.registry).render_GET(request)
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@implementer(IWebSocketListener)
class FakeListener:
    """Records what the link's WebSocket tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def ws_opened(self) -> None:
        self.calls.append(("opened",))

    def ws_message(self, message: dict[str, Any]) -> None:
        self.calls.append(("message", message))

    def ws_failed(self, reason: str, handshake: bool) -> None:
        self.calls.append(("failed", reason, handshake))


class ClassifyTests(SynchronousTestCase):
    def test_handshake_reasons_map_to_few_labels(self) -> None:
        """Failure sentences become one of a few labels, whatever their details."""
        self.assertEqual(handshake_kind("opening handshake timed out after 10s"), "timeout")
        self.assertEqual(
            handshake_kind("connection refused: nothing listens on the agent's port"),
            "connection_refused")
        self.assertEqual(handshake_kind(
            "TLS: the agent's certificate is not valid for 'x' (DNSMismatch)"), "tls_certificate")
        self.assertEqual(handshake_kind(
            "the agent did not select the subprotocol lpa.jobs.v1"), "subprotocol")
        self.assertEqual(handshake_kind("something new"), "other")

    def test_row_fail_reasons(self) -> None:
        """The unreachable deadline and JOB_NOT_FOUND are told apart from other reasons."""
        self.assertEqual(row_fail_kind("agent unreachable for 900s (connection refused)"),
                         "unreachable")
        self.assertEqual(row_fail_kind("the agent does not know job a1 (JOB_NOT_FOUND)"),
                         "job_not_found")
        self.assertEqual(row_fail_kind(
            "the relay got no usable answer from agent a:1 for 900s (deadline 900s): refused"),
            "unreachable")
        self.assertEqual(row_fail_kind(
            "agent a:1 has not known job x for 900s (JOB_NOT_FOUND; deadline 900s)"),
            "job_not_found")
        self.assertEqual(row_fail_kind("bad"), "other")

    def test_event_age(self) -> None:
        """Age from an RFC 3339 timestamp; unreadable is None and the future counts as 0."""
        self.assertEqual(event_age("2026-11-25T20:00:00+00:00", EVENT_TIME + 1.5), 1.5)
        self.assertEqual(event_age("2026-11-25T20:00:00Z", EVENT_TIME - 3), 0.0)
        self.assertIsNone(event_age("yesterday", EVENT_TIME))


class MeteredStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EVENT_TIME + 0.3)
        self.inner = FakeRelayStore()
        self.metrics = RelayMetrics()
        self.store = MeteredStore(self.inner, self.metrics, clock=self.clock)
        self.host_job = self.inner.add_host_job(
            row_id="r1", job_id="j1", host_id="h1", agent_job_id="a1")

    def test_interface(self) -> None:
        """The wrapper provides the store interface it wraps."""
        verifyObject(IRelayStore, self.store)

    def test_applied_events_counted_with_freshness(self) -> None:
        """Applied events count by transport; each one's age at commit lands in the histogram."""
        events = [event("a1", 1, "running"), event("a1", 2, "running", kind="output",
                                                   message="line")]
        result = self.successResultOf(self.store.apply_events(self.host_job, events,
                                                              TRANSPORT_WS))
        self.assertEqual(result.applied, 2)
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_relay_events_applied_total{transport=ws}"], 2)
        self.assertEqual(samples["lpa_relay_events_applied_total{transport=poll}"], 0)
        self.assertEqual(samples["lpa_relay_event_freshness_seconds_count{}"], 2)
        self.assertEqual(samples["lpa_relay_event_freshness_seconds_bucket{le=0.5}"], 2)
        self.assertEqual(samples["lpa_relay_event_freshness_seconds_bucket{le=0.25}"], 0)
        self.assertEqual(samples["lpa_relay_notifications_total{event_type=host}"], 1)
        self.assertEqual(samples["lpa_relay_transactions_total{}"], 1)

    def test_duplicates_are_not_counted(self) -> None:
        """Events at or below the row's seq are skipped by the store and not counted."""
        self.successResultOf(self.store.apply_events(
            self.host_job, [event("a1", 1, "running")], TRANSPORT_WS))
        self.successResultOf(self.store.apply_events(
            self.host_job, [event("a1", 1, "running"), event("a1", 2, "completed")],
            TRANSPORT_POLL))
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_relay_events_applied_total{transport=ws}"], 1)
        self.assertEqual(samples["lpa_relay_events_applied_total{transport=poll}"], 1)
        self.assertEqual(samples["lpa_relay_notifications_total{event_type=job}"], 1)

    def test_rows_failed_by_reason(self) -> None:
        """A row the relay ends for the unreachable deadline counts under that reason."""
        self.successResultOf(self.store.fail_host_job(
            self.host_job, "agent unreachable for 900s: connection refused", TRANSPORT_POLL))
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_relay_rows_failed_total{reason=unreachable}"], 1)
        self.assertEqual(samples["lpa_relay_rows_failed_total{reason=job_not_found}"], 0)

    def test_a_row_ended_twice_counts_once(self) -> None:
        """Ending a row that already ended changes nothing: no second failed row and no
        notification, though the call is still one transaction."""
        for _ in range(2):
            self.successResultOf(self.store.fail_host_job(
                self.host_job, "agent unreachable for 900s: connection refused", TRANSPORT_POLL))
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_relay_rows_failed_total{reason=unreachable}"], 1)
        self.assertEqual(samples["lpa_relay_notifications_total{event_type=host}"], 1)
        self.assertEqual(samples["lpa_relay_transactions_total{}"], 2)

    def test_transactions_left_to_a_store_that_reports_them(self) -> None:
        """With count_transactions off, events and failed rows still count; transactions,
        rows per transaction and notifications are left to the store's own report."""
        store = MeteredStore(self.inner, self.metrics, clock=self.clock,
                             count_transactions=False)
        result = self.successResultOf(store.apply_events(
            self.host_job, [event("a1", 1, "running")], TRANSPORT_WS))
        self.assertEqual(result.notified, 1)
        self.successResultOf(store.fail_host_job(
            self.host_job, "agent unreachable for 900s: connection refused", TRANSPORT_WS))
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_relay_events_applied_total{transport=ws}"], 1)
        self.assertEqual(samples["lpa_relay_rows_failed_total{reason=unreachable}"], 1)
        self.assertEqual(
            (samples["lpa_relay_transactions_total{}"],
             samples["lpa_relay_rows_per_transaction_count{}"],
             samples["lpa_relay_notifications_total{event_type=host}"],
             samples["lpa_relay_notifications_total{event_type=job}"]),
            (0, 0, 0, 0))

    def test_failures_pass_through_uncounted(self) -> None:
        """A store error reaches the caller unchanged and moves no counter."""
        self.inner.error = RuntimeError("database down")
        self.failureResultOf(
            self.store.apply_events(self.host_job, [event("a1", 1, "running")], TRANSPORT_WS),
            RuntimeError)
        self.assertEqual(scrape(self.metrics)["lpa_relay_events_applied_total{transport=ws}"], 0)


class MeteredListenerTests(SynchronousTestCase):
    def test_handshake_failures_counted_then_passed_on(self) -> None:
        """Failed handshakes count by reason; drops of open sockets do not; all reach the link."""
        metrics = RelayMetrics()
        inner = FakeListener()
        dialled: list[Any] = []
        dial = metered_dial(lambda address, listener: dialled.append(listener), metrics)
        dial(AgentAddress("a.example", 12443), inner)
        [listener] = dialled
        verifyObject(IWebSocketListener, listener)
        self.assertIsInstance(listener, MeteredListener)
        listener.ws_failed("connection refused", True)
        listener.ws_failed("opening handshake timed out after 10s", True)
        listener.ws_opened()
        listener.ws_failed("connection lost", False)
        samples = scrape(metrics)
        self.assertEqual(
            samples["lpa_relay_handshake_failures_total{reason=connection_refused}"], 1)
        self.assertEqual(samples["lpa_relay_handshake_failures_total{reason=timeout}"], 1)
        self.assertEqual(samples.get("lpa_relay_handshake_failures_total{reason=closed}", 0), 0)
        self.assertEqual([call[0] for call in inner.calls],
                         ["failed", "failed", "opened", "failed"])


class _Link:
    def __init__(self, state: str, rows: int) -> None:
        self.state = state
        self.host_jobs = [object()] * rows


class GaugeTests(SynchronousTestCase):
    def test_links_by_transport_and_state(self) -> None:
        """Links are counted by transport and state, and their rows by transport."""
        metrics = RelayMetrics()
        links = [_Link("streaming", 2), _Link("streaming", 1), _Link("polling", 3),
                 _Link("connecting", 1)]
        metrics.watch_links(lambda: links)
        samples = scrape(metrics)
        self.assertEqual(samples["lpa_relay_agents{state=streaming,transport=ws}"], 2)
        self.assertEqual(samples["lpa_relay_agents{state=polling,transport=poll}"], 1)
        self.assertEqual(samples["lpa_relay_agents{state=connecting,transport=none}"], 1)
        self.assertEqual(samples["lpa_relay_followed_rows{transport=ws}"], 3)
        self.assertEqual(samples["lpa_relay_followed_rows{transport=poll}"], 3)

    def test_pool_gauges_and_a_failing_callback(self) -> None:
        """Pool figures become gauges; a callback that raises drops its families, not the scrape."""
        metrics = RelayMetrics()
        metrics.watch_pool(lambda: {"size": 4, "up": 4, "in_use": 1, "waiting": 7,
                                    "pending_events": 30})

        def broken() -> Any:
            raise RuntimeError("boom")

        metrics.watch("broken", broken)
        samples = scrape(metrics)
        self.assertEqual(samples["lpa_relay_store_connections_in_use{}"], 1)
        self.assertEqual(samples["lpa_relay_store_waiting_calls{}"], 7)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_registries_are_separate(self) -> None:
        """Two relays in one process count apart (no global registry)."""
        first, second = RelayMetrics(), RelayMetrics()
        first.handshake_failed("refused")
        self.assertEqual(
            scrape(second)["lpa_relay_handshake_failures_total{reason=connection_refused}"], 0)

    def test_openmetrics_on_request(self) -> None:
        """A scraper asking for OpenMetrics gets it."""
        request = DummyRequest([b"metrics"])
        request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
        body = MetricsPage(RelayMetrics().registry).render_GET(request)
        self.assertTrue(body.rstrip().endswith(b"# EOF"))
        [content_type] = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
        self.assertIn(b"openmetrics", content_type)


class _ReportingStore(FakeRelayStore):
    """A store that reports its own commits (as a group-committing store does)."""

    def observe_transactions(self, callback: Any) -> None:
        self.report = callback


class ServiceWiringTests(SynchronousTestCase):
    def build(self, store: Any) -> Any:
        from lpa.relay.config import RelayConfig
        from lpa.relay.service import make_relay_service

        return make_relay_service(
            RelayConfig(database_url="postgresql://relay@127.0.0.1/pm"), reactor=Clock(),
            store=store, tls_options_for=lambda host: None, http_client=object(),
            dial=lambda address, listener: None)

    def test_a_reporting_store_counts_its_own_transactions(self) -> None:
        """A store with observe_transactions reports commits; calls are not counted twice."""
        store = _ReportingStore()
        service = self.build(store)
        store.report(3, [("host", 300), ("host", 280), ("job", 200)])
        samples = scrape(service.metrics)
        self.assertEqual(samples["lpa_relay_transactions_total{}"], 1)
        self.assertEqual(samples["lpa_relay_rows_per_transaction_sum{}"], 3)
        self.assertEqual(samples["lpa_relay_notifications_total{event_type=host}"], 2)
        self.assertEqual(samples["lpa_relay_notification_payload_bytes_sum{}"], 780)
