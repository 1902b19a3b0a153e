"""etc/prometheus: the alert rules, the scrape example and the Grafana dashboard use only
metrics the daemons really export.

Every PromQL expression is read with a small tokenizer that strips strings, label matchers,
range selectors and grouping clauses and keeps the metric names; each must be a name the
agent's or the relay's registry exports (or Prometheus's own ``up``).  Where ``promtool`` is
installed (Debian's ``prometheus`` package) it also checks the rule file and the config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import yaml
from prometheus_client.metrics_core import Metric
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lpa.agent.config import parse_agent_config
from lpa.agent.service import make_agent_service
from lpa.relay.config import RelayConfig
from lpa.relay.service import make_relay_service
from tests.fakes import FakeBackend, FakeSystem

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                    "prometheus")
BUILTIN = {"up"}
#: PromQL words that are not metric names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and",
            "unless", "bool", "offset", "inf", "nan"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("_sum", "_count"), "gauge": (), "info": ("_info",), "unknown": ()}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):  # not 5m, 1e3
        word = match.group(0)
        after = text[match.end():].lstrip()
        if word.lower() in KEYWORDS or after.startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def _names(families: list[Metric]) -> set[str]:
    found = set()
    for family in families:
        found.add(family.name)
        found.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
    return found


def exported_names() -> set[str]:
    """Every name the agent's and the relay's registries export (built, not started)."""
    state = tempfile.mkdtemp(prefix="lpa-etc-prometheus-")
    try:
        agent = make_agent_service(
            parse_agent_config(f"tls:\n  enabled: false\nstate_dir: {state}\n", "agent.yaml"),
            reactor=Clock(), backend=FakeBackend(), system=FakeSystem())
        relay = make_relay_service(
            RelayConfig(database_url="postgresql://relay@127.0.0.1/pm"),
            reactor=Clock(), tls_options_for=lambda host: None, http_client=object(),
            dial=lambda address, listener: None, ops=True,
            ops_connection_factory=lambda: None)
        assert agent.metrics is not None and relay.metrics is not None
        names = _names(list(agent.metrics.registry.collect()))
        names |= _names(list(relay.metrics.registry.collect()))
        # the CRL gauges exist only with TLS on; name them from their definition
        return names | {"lpa_agent_crl_age_seconds", "lpa_agent_crl_status"}
    finally:
        shutil.rmtree(state, True)


class PromqlTokenizerTests(SynchronousTestCase):
    def test_names_only(self) -> None:
        """Functions, keywords, labels, ranges and grouping clauses are not metric names."""
        expr = ('histogram_quantile(0.99, sum by (le, instance) '
                '(rate(a_bucket{job="x", le!~"b"}[5m]))) > 5 or up{job="lpa"} == 0 '
                'unless on (instance) c offset 5m')
        self.assertEqual(metric_names(expr), {"a_bucket", "up", "c"})


class AlertRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(os.path.join(HERE, "alerts.yml")) as handle:
            self.document = yaml.safe_load(handle)
        self.rules = [rule for group in self.document["groups"] for rule in group["rules"]]

    def test_rules_reference_exported_metrics(self) -> None:
        """Every rule's expression selects only metrics the daemons export."""
        known = exported_names() | BUILTIN
        for rule in self.rules:
            unknown = metric_names(rule["expr"]) - known
            self.assertEqual(unknown, set(), f"{rule['alert']}: unknown metrics {unknown}")

    def test_the_alerts_operators_need(self) -> None:
        """Relay not ready, agent unreachable, freshness p99 > 5 s, NOTIFY queue > 50 %, a job
        stuck past its timeout; each with a severity and a summary."""
        by_name = {rule["alert"]: rule for rule in self.rules}
        for name in ("LpaRelayNotReady", "LpaAgentUnreachable", "LpaEventFreshnessSlow",
                     "LpaNotifyQueueFilling", "LpaJobStuckRunning"):
            self.assertIn(name, by_name)
            self.assertIn(by_name[name]["labels"]["severity"], ("warning", "critical"))
            self.assertTrue(by_name[name]["annotations"]["summary"])
        self.assertIn("0.99", by_name["LpaEventFreshnessSlow"]["expr"])
        self.assertIn("> 5", by_name["LpaEventFreshnessSlow"]["expr"])
        self.assertIn("> 0.5", by_name["LpaNotifyQueueFilling"]["expr"])
        self.assertIn("lpa_agent_job_timeout_seconds", by_name["LpaJobStuckRunning"]["expr"])

    def test_promtool_accepts_rules_and_config(self) -> None:
        """promtool check rules / check config --syntax-only pass (when promtool exists)."""
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool not installed (Debian package prometheus); the rules "
                           "are checked by the parser tests above")
        for args in (["check", "rules", "alerts.yml"],
                     ["check", "config", "--syntax-only", "prometheus.yml"]):
            done = subprocess.run([promtool, *args], check=False, cwd=HERE, capture_output=True,
                                  text=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


class ScrapeExampleTests(SynchronousTestCase):
    def test_jobs_and_rules(self) -> None:
        """The example scrapes both daemons (the agents over mTLS) and loads the rules."""
        with open(os.path.join(HERE, "prometheus.yml")) as handle:
            document = yaml.safe_load(handle)
        self.assertEqual(document["rule_files"], ["alerts.yml"])
        jobs = {job["job_name"]: job for job in document["scrape_configs"]}
        self.assertEqual(jobs["lpa-relay"]["static_configs"][0]["targets"], ["127.0.0.1:12480"])
        agent = jobs["lpa-agent"]
        self.assertEqual(agent["scheme"], "https")
        self.assertEqual(sorted(agent["tls_config"]), ["ca_file", "cert_file", "key_file"])


class DashboardTests(SynchronousTestCase):
    def test_panels_reference_exported_metrics(self) -> None:
        """The dashboard parses and every panel queries only exported metrics."""
        with open(os.path.join(HERE, "grafana-dashboard.json")) as handle:
            dashboard = json.load(handle)
        known = exported_names() | BUILTIN
        expressions = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
                       for target in panel.get("targets", [])]
        self.assertGreater(len(expressions), 20)
        used: set[str] = set()
        for title, expr in expressions:
            names = metric_names(expr)
            self.assertEqual(names - known, set(), f"panel {title!r}: {expr}")
            used |= names
        for needed in ("lpa_relay_event_freshness_seconds_bucket",
                       "lpa_relay_notification_queue_usage", "lpa_agent_jobs_total",
                       "lpa_relay_agents", "lpa_relay_store_waiting_calls"):
            self.assertIn(needed, used)
