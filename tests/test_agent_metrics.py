"""The agent's metrics: the seams that move them, on a task.Clock and StubTreq."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.web.test.requesthelper import DummyRequest

from lpa.agent.http.api import AgentApi
from lpa.agent.http.ratelimit import RateLimiter
from lpa.agent.metrics import (
    AgentMetrics,
    MeteredRateLimiter,
    MeteredResource,
    metered_sessions,
    readiness_fields,
    route_matcher,
)
from lpa.agent.model import JobRequest
from lpa.events import COMPLETED, FAILED, KIND_OUTPUT, KIND_WAITING_FOR_LOCK, RUNNING
from lpa.metricsweb import MetricsPage
from tests.api_helpers import BASE, ApiTestCase
from tests.fakes_jobs import RecordingChannel


def scrape(metrics: AgentMetrics) -> dict[str, float]:
    body = MetricsPage(metrics.registry).render_GET(DummyRequest([b"metrics"]))
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


class _Session:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.closed = False
        self.subscription_count = 2


class _Factory:
    def make_session(self, channel: Any) -> _Session:
        return _Session(channel)


class AgentMetricsTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.metrics = AgentMetrics(self.clock)
        self.metrics.follow(self.jobs.events, self.jobs)
        self.not_ready: list[str] = []
        self.metrics.watch(job_timeout_seconds=1800, ready=lambda: self.not_ready,
                           info={"version": "9.9.9", "backend": "fake"})

    def test_jobs_by_operation_and_status_with_duration(self) -> None:
        """A finished job counts under its operation and final status, with its run time."""
        job = self.jobs.submit(JobRequest(operation="patch_apply", dry_run=True))
        self.clock.advance(2)
        self.jobs.emit(job.id, "Job started", status=RUNNING)
        self.clock.advance(12)
        self.assertEqual(scrape(self.metrics)["lpa_agent_oldest_running_job_seconds{}"], 12)
        self.jobs.output(job.id, "Inst a", "Inst b")
        self.jobs.finish(job.id, COMPLETED)
        other = self.jobs.submit(JobRequest(operation="install"))
        self.jobs.finish(other.id, FAILED)
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_agent_jobs_total{operation=patch_apply,status=completed}"],
                         1)
        self.assertEqual(samples["lpa_agent_jobs_total{operation=install,status=failed}"], 1)
        self.assertEqual(
            samples["lpa_agent_job_duration_seconds_sum{operation=patch_apply}"], 12)
        self.assertEqual(samples[f"lpa_agent_events_total{{kind={KIND_OUTPUT}}}"], 2)
        self.assertEqual(samples["lpa_agent_jobs_running{}"], 0)
        self.assertEqual(samples["lpa_agent_oldest_running_job_seconds{}"], 0)
        self.assertEqual(samples["lpa_agent_info{backend=fake,version=9.9.9}"], 1)

    def test_lock_waits(self) -> None:
        """Each waiting_for_lock event counts one wait for the package database lock."""
        job = self.jobs.submit(JobRequest(operation="update"))
        self.jobs.emit(job.id, "dpkg lock held by unattended-upgr", kind=KIND_WAITING_FOR_LOCK)
        self.assertEqual(scrape(self.metrics)["lpa_agent_lock_waits_total{}"], 1)

    def test_ready_gauge_and_health_fields(self) -> None:
        """Readiness shows as a gauge and as health fields naming what is wrong."""
        self.assertEqual(scrape(self.metrics)["lpa_agent_ready{}"], 1)
        self.not_ready.append("the agent is starting or stopping")
        self.assertEqual(scrape(self.metrics)["lpa_agent_ready{}"], 0)
        self.assertEqual(readiness_fields(self.not_ready),
                         {"ready": False,
                          "not_ready_reasons": ["the agent is starting or stopping"]})

    def test_sessions_and_slow_consumer_closes(self) -> None:
        """Sessions, their subscriptions and 1008 closes are counted through the factory."""
        factory = _Factory()
        metered_sessions(factory, self.metrics)
        channel = RecordingChannel()
        session = factory.make_session(channel)
        factory.make_session(RecordingChannel()).closed = True
        samples = scrape(self.metrics)
        self.assertEqual(samples["lpa_agent_ws_sessions{}"], 1)
        self.assertEqual(samples["lpa_agent_ws_subscriptions{}"], 2)
        self.assertEqual(samples["lpa_agent_ws_sessions_opened_total{}"], 2)
        session.channel.close(1008, "slow consumer")
        session.channel.close(1000, "bye")
        self.assertEqual([code for code, _ in channel.closes], [1008, 1000])
        self.assertEqual(scrape(self.metrics)["lpa_agent_ws_slow_consumer_closes_total{}"], 1)

    def test_no_crl_gauges_without_a_crl(self) -> None:
        """Without a CRL reader (TLS off) the scrape carries no CRL gauge at all."""
        self.assertFalse([name for name in scrape(self.metrics) if "_crl_" in name])

    def test_crl_age_and_status(self) -> None:
        """With a CRL reader, each scrape reads it: the CRL's age in seconds and one status
        gauge labelled with the current status; a missing CRL has a status but no age."""
        metrics = AgentMetrics(self.clock)
        crl: dict[str, Any] = {"crl_status": "valid", "crl_age_seconds": 3600}
        metrics.watch(job_timeout_seconds=1800, ready=list, crl=lambda: crl)

        def crl_samples() -> dict[str, float]:
            return {k: v for k, v in scrape(metrics).items() if "_crl_" in k}

        self.assertEqual(crl_samples(), {"lpa_agent_crl_age_seconds{}": 3600,
                                         "lpa_agent_crl_status{status=valid}": 1})
        crl.update(crl_status="expired", crl_age_seconds=90000)
        self.assertEqual(crl_samples(), {"lpa_agent_crl_age_seconds{}": 90000,
                                         "lpa_agent_crl_status{status=expired}": 1})
        crl.update(crl_status="missing", crl_age_seconds=None)
        self.assertEqual(crl_samples(), {"lpa_agent_crl_status{status=missing}": 1})


class RequestMetricsTests(ApiTestCase):
    rate_limiter_enabled = True

    def build(self, **overrides: Any) -> None:
        self.metrics = AgentMetrics(self.clock)
        self.limiter = RateLimiter(self.clock, read_per_minute=1, read_burst=1, enabled=True)
        super().build(rate_limiter=MeteredRateLimiter(self.limiter, self.metrics),
                      metrics_resource=MetricsPage(self.metrics.registry), **overrides)
        self.treq = StubTreq(MeteredResource(self.api.resource(), self.metrics,
                                             route_matcher(AgentApi.app.url_map)))

    def test_requests_by_route_template_and_status(self) -> None:
        """Requests count by route template (not raw path) and status; 429s by bucket."""
        self.call("GET", "/api/v1/jobs/0f0f0f0f-0000-4000-8000-000000000000")
        self.call("GET", "/api/v1/jobs")
        self.call("GET", "/no/such/path")
        samples = scrape(self.metrics)
        self.assertEqual(samples[
            "lpa_agent_http_requests_total{method=GET,route=/api/v1/jobs/<string:job_id>,"
            "status=404}"], 1)
        self.assertEqual(samples[
            "lpa_agent_http_requests_total{method=GET,route=/api/v1/jobs,status=429}"], 1)
        self.assertEqual(samples[
            "lpa_agent_http_requests_total{method=GET,route=other,status=429}"], 1)
        self.assertEqual(samples["lpa_agent_rate_limited_total{tier=read}"], 2)

    def test_metrics_route_behind_the_gate(self) -> None:
        """/metrics on the API's port answers the exposition and is counted like any route."""
        response = self.successResultOf(self.treq.get(BASE + "/metrics"))
        self.assertEqual(response.code, 200)
        body = self.successResultOf(self.treq.content(response)).decode()
        self.assertIn("lpa_agent_http_requests_total", body)
        self.peer_error = __import__("lpa.errors", fromlist=["ForbiddenError"]).ForbiddenError(
            "Client certificate not allowed")
        response = self.successResultOf(self.treq.get(BASE + "/metrics"))
        self.assertEqual(response.code, 403)

    def test_method_not_allowed_keeps_the_template(self) -> None:
        """A wrong method on a known path is labelled with that path's template."""
        self.limiter = RateLimiter(self.clock, enabled=False)
        self.call("DELETE", "/api/v1/patches")
        samples = scrape(self.metrics)
        self.assertIn(
            "lpa_agent_http_requests_total{method=DELETE,route=/api/v1/patches,status=405}",
            samples)
