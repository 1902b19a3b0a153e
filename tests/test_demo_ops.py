"""``lpa demo`` and what operators watch: the ops port and the metrics port in its configs, and
the URLs it prints (the README's commands reach them on a kept demo, see
tests/system/test_docs.py)."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from lpa.tools import demo, demo_config


class DemoOpsTests(SynchronousTestCase):
    def test_configs_open_the_ops_and_metrics_ports(self) -> None:
        """The relay's ops port and the agent's plain /metrics port are on loopback."""
        from lpa.agent.config import parse_agent_config
        from lpa.relay.config import parse_relay_config

        relay = parse_relay_config(
            demo_config.relay_toml(dsn="postgresql://postgres@/lpa_demo", pki_dir="/s/pki",
                            ops_port=4480), "relay.toml", environ={})
        self.assertEqual((relay.ops_enabled, relay.ops_bind, relay.ops_port),
                         (True, "127.0.0.1", 4480))
        agent = parse_agent_config(demo_config.agent_yaml(port=4443, pki_dir="/s/pki",
                                                   state_dir="/s/a", metrics_port=4481))
        self.assertEqual((agent.metrics.local_bind, agent.metrics.local_port),
                         ("127.0.0.1", 4481))

    def test_urls_printed(self) -> None:
        """The demo names the status page, the probes and both daemons' metrics."""
        run = demo.Demo(self.mktemp(), keep=True, timeout=1, out=io.StringIO())
        run.ops_port, run.metrics_port = 4480, 4481
        text = "\n".join(run.urls(4443))
        for url in ("http://127.0.0.1:4480/", "http://127.0.0.1:4480/metrics",
                    "http://127.0.0.1:4480/readyz", "http://127.0.0.1:4481/metrics",
                    "https://localhost:4443/metrics"):
            self.assertIn(url, text)
