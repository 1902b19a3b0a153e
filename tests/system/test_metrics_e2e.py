"""Both daemons scraped during a real dry-run job: agent → relay → PostgreSQL, counters move.

The exposition is parsed with ``prometheus_client``'s own parser, as a Prometheus server would
read it; the probes and the status JSON are read on the relay's ops port meanwhile.
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from tests.agentclient import mtls_client
from tests.logcheck import assert_no_unhandled, capture_events
from tests.system.pipeline import Pipeline

Samples = dict[str, float]


def parse(text: bytes) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


class ScrapeDuringJobTests(TestCase):
    timeout = 120

    async def scrape_agent(self, pipeline: Pipeline, local: bool = False) -> Samples:
        if local:
            code, body = await pipeline.get(f"http://127.0.0.1:{pipeline.metrics_port}/metrics")
        else:
            code, body = await pipeline.get(f"{pipeline.agent_url}/metrics", mtls=True)
        self.assertEqual(code, 200, body[:200])
        return parse(body)

    async def scrape_relay(self, pipeline: Pipeline) -> Samples:
        code, body = await pipeline.get(pipeline.ops_url + "metrics")
        self.assertEqual(code, 200, body[:200])
        return parse(body)

    async def test_counters_move_as_the_job_runs(self) -> None:
        """Scrapes before, during and after one dry-run job show every counter moving."""
        events = capture_events(self)
        pipeline = await Pipeline.start(self)
        agent_before = await self.scrape_agent(pipeline)
        relay_before = await self.scrape_relay(pipeline)
        self.assertEqual(agent_before["lpa_agent_ready{}"], 1)
        self.assertEqual(relay_before["lpa_relay_events_applied_total{transport=ws}"], 0)

        job = await pipeline.dispatch()
        await pipeline.until(
            lambda: pipeline.seeder.row(job.row_id)["relay_progress"] == 40, "progress 40 applied")
        agent_during = await self.scrape_agent(pipeline, local=True)
        relay_during = await self.scrape_relay(pipeline)
        self.assertEqual(agent_during["lpa_agent_jobs_running{}"], 1)
        self.assertGreater(agent_during["lpa_agent_events_total{kind=progress}"], 0)
        self.assertEqual(agent_during["lpa_agent_lock_waits_total{}"], 1)
        self.assertEqual(agent_during["lpa_agent_ws_sessions{}"], 1)
        self.assertEqual(agent_during["lpa_agent_ws_subscriptions{}"], 1)
        self.assertEqual(agent_during[
            "lpa_agent_http_requests_total{method=POST,route=/api/v1/patches/apply,status=202}"],
            1)
        self.assertEqual(relay_during["lpa_relay_agents{state=streaming,transport=ws}"], 1)
        self.assertEqual(relay_during["lpa_relay_followed_rows{transport=ws}"], 1)
        self.assertGreater(relay_during["lpa_relay_events_applied_total{transport=ws}"], 0)
        self.assertGreater(relay_during["lpa_relay_event_freshness_seconds_count{}"], 0)
        self.assertGreater(relay_during["lpa_relay_transactions_total{}"], 0)
        self.assertGreater(relay_during["lpa_relay_notifications_total{event_type=host}"], 0)
        self.assertEqual(relay_during["lpa_relay_ready{}"], 1)
        await pipeline.until(lambda: pipeline.relay.ops.feed.running_rows == 1, "sampled")
        relay_during = await self.scrape_relay(pipeline)
        self.assertEqual(relay_during["lpa_relay_running_rows{}"], 1)
        self.assertEqual(relay_during["lpa_relay_notification_queue_usage{}"], 0)
        self.assertGreater(relay_during["lpa_relay_listen_notifications_total{}"], 0)

        _code, body = await pipeline.get(pipeline.ops_url + "api/status")
        [running] = json.loads(body)["running"]
        [host] = running["hosts"]
        self.assertEqual((host["host"], host["status"], host["transport"], host["progress"]),
                         ("localhost", "running", "ws", 40))

        pipeline.release(job)
        await pipeline.until(lambda: pipeline.seeder.job_status(job.job_id) == "succeeded",
                             "job succeeded")
        agent_after = await self.scrape_agent(pipeline)
        relay_after = await self.scrape_relay(pipeline)
        self.assertEqual(agent_after.get(
            "lpa_agent_jobs_total{operation=patch_apply,status=failed}", 0), 0)
        self.assertEqual(
            agent_after["lpa_agent_jobs_total{operation=patch_apply,status=completed}"], 1)
        self.assertEqual(
            agent_after["lpa_agent_job_duration_seconds_count{operation=patch_apply}"], 1)
        self.assertGreater(agent_after["lpa_agent_events_total{kind=status}"],
                           agent_during["lpa_agent_events_total{kind=status}"])
        self.assertGreater(relay_after["lpa_relay_events_applied_total{transport=ws}"],
                           relay_during["lpa_relay_events_applied_total{transport=ws}"])
        self.assertEqual(relay_after["lpa_relay_notifications_total{event_type=job}"], 1)
        self.assertGreater(relay_after["lpa_relay_transactions_total{}"],
                           relay_during["lpa_relay_transactions_total{}"])
        assert_no_unhandled(events)

    async def test_refused_handshakes_by_reason(self) -> None:
        """A client of another CA is refused at the handshake and counted under its reason."""
        pipeline = await Pipeline.start(self)
        client, pool = mtls_client(pipeline.pki.client_options("revoked"))
        self.addCleanup(pool.closeCachedConnections)
        with self.assertRaises(ResponseNeverReceived):
            await client.get(f"{pipeline.agent_url}/api/v1/health")
        registry = pipeline.agent.metrics.registry
        await pipeline.until(lambda: registry.get_sample_value(
            "lpa_agent_tls_handshake_failures_total", {"reason": "certificate revoked"}) == 1,
            "the refusal counted")
        samples = await self.scrape_agent(pipeline, local=True)
        self.assertEqual(
            samples["lpa_agent_tls_handshake_failures_total{reason=certificate revoked}"], 1)
        self.flushLoggedErrors()

    async def test_probes_and_health(self) -> None:
        """/healthz and /readyz answer on the ops port; the agent's health says ready."""
        pipeline = await Pipeline.start(self)
        code, body = await pipeline.get(pipeline.ops_url + "healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "alive"}))
        code, body = await pipeline.get(pipeline.ops_url + "readyz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        code, body = await pipeline.get(f"{pipeline.agent_url}/api/v1/health", mtls=True)
        health = json.loads(body)["data"]
        self.assertEqual((health["ready"], health["not_ready_reasons"]), (True, []))
        self.assertIn("crl_status", health)  # the original's fields stay
        self.assertIn("uptime_seconds", health)
