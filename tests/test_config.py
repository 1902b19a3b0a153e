"""The agent config loader: defaults, the original's file, and one-line errors."""

from __future__ import annotations

import os

import attr
from twisted.trial.unittest import SynchronousTestCase

from lpa.agent.config import (
    AgentConfig,
    CommandTimeouts,
    TlsConfig,
    load_agent_config,
    parse_agent_config,
)
from lpa.errors import ConfigError

#: the original's example config.yaml, key for key (linux-patch-api's config.yaml)
ORIGINAL_EXAMPLE = """\
server:
  bind: "0.0.0.0"
  port: 12443
  timeout_seconds: 30

tls:
  enabled: true
  port: 12443
  ca_cert: "/etc/linux_patch_api/certs/ca.pem"
  server_cert: "/etc/linux_patch_api/certs/server.pem"
  server_key: "/etc/linux_patch_api/certs/server.key"
  min_tls_version: "1.3"
  crl_path: "/etc/linux_patch_api/certs/crl.pem"

jobs:
  max_concurrent: 5
  timeout_minutes: 30
  storage_path: "/var/lib/linux_patch_api/jobs"
  max_queue_depth: 100

logging:
  level: "info"
  journal_enabled: true
  syslog_enabled: false
  syslog_server: null
  file_path: "/var/log/linux_patch_api/audit.log"
  retention_days: 30

whitelist:
  path: "/etc/linux_patch_api/whitelist.yaml"

package_manager:
  backend: "auto"

enrollment:
  manager_url: ""
  polling_token: ""
  polling_interval_seconds: 60
  max_poll_attempts: 1440
  report_interface: null
  report_ip: null
  cert_renewal_threshold_days: 7

rate_limit:
  enabled: true
  destructive_per_minute: 20
  destructive_burst: 10
  read_per_minute: 120
  read_burst: 30

cache:
  stale_threshold_secs: 3600

file_install:
  enabled: false
  staging_dir: "/var/lib/linux_patch_api/staging"
"""


class DefaultsTests(SynchronousTestCase):
    """Every default, from no file, an empty file and an empty mapping."""

    def test_every_default(self) -> None:
        """The embedded defaults match the original's and lpa's own keys."""
        c = load_agent_config(None)
        self.assertEqual(c.source, "embedded defaults")
        self.assertEqual(c.warnings, ())
        self.assertEqual(c.state_dir, "/var/lib/lpa")
        self.assertEqual(
            (c.server.bind, c.server.port, c.server.timeout_seconds), ("0.0.0.0", 12443, 30)
        )
        self.assertEqual(
            c.tls,
            TlsConfig(
                enabled=True,
                ca_cert="/etc/linux_patch_api/certs/ca.pem",
                server_cert="/etc/linux_patch_api/certs/server.pem",
                server_key="/etc/linux_patch_api/certs/server.key.pem",
                crl_path="/etc/linux_patch_api/certs/crl.pem",
                min_tls_version="1.3",
            ),
        )
        j = c.jobs
        self.assertEqual(
            (j.max_concurrent, j.timeout_minutes, j.max_queue_depth, j.history_limit,
             j.max_events_per_job, j.lock_timeout_secs),
            (5, 30, 100, 500, 1000, 300),
        )
        self.assertEqual(
            j.command_timeouts, CommandTimeouts(refresh_secs=300, package_secs=1800, quick_secs=60)
        )
        self.assertIsNone(c.whitelist.path)
        r = c.rate_limit
        self.assertEqual(
            (r.enabled, r.destructive_per_minute, r.destructive_burst, r.read_per_minute,
             r.read_burst),
            (True, 20, 10, 120, 30),
        )
        self.assertEqual(c.cache.stale_threshold_secs, 3600)
        self.assertEqual((c.logging.level, c.logging.format), ("info", "text"))
        self.assertEqual(c.package_manager.backend, "auto")
        w = c.websocket
        self.assertEqual(
            (w.enabled, w.ping_interval_secs, w.ping_timeout_secs, w.max_message_bytes,
             w.max_subscriptions, w.max_connections, w.send_buffer_events),
            (True, 5, 10, 65536, 256, 64, 2000),
        )
        self.assertEqual(c.auth.allowed_clients, ())
        self.assertEqual(c.api.max_body_bytes, 1048576)

    def test_empty_text(self) -> None:
        """An empty file (or only comments) gives all defaults, tagged with its source."""
        for text in ("", "# nothing\n", "---\n"):
            c = parse_agent_config(text, "x.yaml")
            self.assertEqual(attr.evolve(c, source="embedded defaults"), AgentConfig())

    def test_frozen(self) -> None:
        """The config cannot be changed after parsing."""
        c = AgentConfig()
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, c.server, "port", 1)


class OriginalFileTests(SynchronousTestCase):
    """The original's example file loads unchanged."""

    def test_original_example_loads_with_warnings(self) -> None:
        """Every original key is accepted; unused ones are warnings, not errors."""
        c = parse_agent_config(ORIGINAL_EXAMPLE, "config.yaml")
        self.assertEqual(c.tls.server_key, "/etc/linux_patch_api/certs/server.key")
        self.assertEqual(c.whitelist.path, "/etc/linux_patch_api/whitelist.yaml")
        self.assertEqual(c.server.port, 12443)
        text = "\n".join(c.warnings)
        for key in ("jobs.storage_path", "logging.journal_enabled", "logging.syslog_enabled",
                    "logging.syslog_server", "logging.file_path", "logging.retention_days",
                    "enrollment.*", "file_install.*"):
            self.assertIn(key, text)
        self.assertNotIn("tls.port", text)  # same as server.port: nothing to say
        self.assertEqual(text.count("enrollment.*"), 1)  # one line per ignored section

    def test_tls_port_differs(self) -> None:
        """tls.port different from server.port is a warning saying it is unused."""
        c = parse_agent_config("server: {port: 1}\ntls: {port: 2}\n")
        self.assertTrue(any("tls.port" in w and "unused" in w for w in c.warnings))

    def test_no_tls_section_warns(self) -> None:
        """A file without a tls section keeps TLS on and says how that differs from the original."""
        c = parse_agent_config("server: {port: 1}\n")
        self.assertTrue(c.tls.enabled)
        self.assertTrue(any("no tls section" in w for w in c.warnings))

    def test_tls_disabled_warns(self) -> None:
        """tls.enabled false is honoured and flagged INSECURE."""
        c = parse_agent_config("tls: {enabled: false}\n")
        self.assertFalse(c.tls.enabled)
        self.assertTrue(any("INSECURE" in w for w in c.warnings))


class OursTests(SynchronousTestCase):
    """Our own keys parse into the tree."""

    def test_our_keys(self) -> None:
        """state_dir, nested command timeouts, websocket, auth and api keys are read."""
        c = parse_agent_config(
            "state_dir: /srv/lpa\n"
            "tls: {min_tls_version: 1.2, crl_path: null}\n"
            "jobs: {history_limit: 10, command_timeouts: {package_secs: 99}}\n"
            "websocket: {enabled: false, ping_interval_secs: 0.5}\n"
            "auth: {allowed_clients: [lpa-relay, 10.0.0.1]}\n"
            "api: {max_body_bytes: 2048}\n"
            "logging: {level: DEBUG, format: json}\n"
            "package_manager: {backend: dnf}\n"
        )
        self.assertEqual(c.state_dir, "/srv/lpa")
        self.assertEqual(c.tls.min_tls_version, "1.2")
        self.assertIsNone(c.tls.crl_path)
        self.assertEqual(c.jobs.history_limit, 10)
        self.assertEqual(c.jobs.command_timeouts, CommandTimeouts(package_secs=99))
        self.assertEqual((c.websocket.enabled, c.websocket.ping_interval_secs), (False, 0.5))
        self.assertEqual(c.auth.allowed_clients, ("lpa-relay", "10.0.0.1"))
        self.assertEqual(c.api.max_body_bytes, 2048)
        self.assertEqual((c.logging.level, c.logging.format), ("debug", "json"))
        self.assertEqual(c.package_manager.backend, "dnf")

    def test_empty_section(self) -> None:
        """A section with no keys (null) means its defaults."""
        c = parse_agent_config("jobs:\nserver:\n  port: 4\n")
        self.assertEqual(c.jobs, AgentConfig().jobs)


class ErrorTests(SynchronousTestCase):
    """Each error class gives one line naming the source, the key and the problem."""

    def assertError(self, text: str, *fragments: str) -> None:
        e = self.assertRaises(ConfigError, parse_agent_config, text, "agent.yaml")
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("agent.yaml: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_missing_file(self) -> None:
        """A missing file names the path."""
        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(ConfigError, load_agent_config, path)
        self.assertEqual(str(e), f"config file {path}: not found")

    def test_unreadable_file(self) -> None:
        """A directory in place of the file is 'cannot read'."""
        path = self.mktemp()
        os.mkdir(path)
        e = self.assertRaises(ConfigError, load_agent_config, path)
        self.assertIn("cannot read", str(e))

    def test_load_from_file(self) -> None:
        """A file on disk is parsed with its path as the source."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server: {port: 8443}\n")
        c = load_agent_config(path)
        self.assertEqual((c.server.port, c.source), (8443, path))

    def test_typo_with_suggestion(self) -> None:
        """An unknown key is refused with the close match suggested."""
        self.assertError("jobs:\n  max_concurent: 3\n", "unknown key jobs.max_concurent",
                         "did you mean jobs.max_concurrent?")
        self.assertError("sever:\n  port: 3\n", "unknown key sever (did you mean server?)")
        self.assertError("rate_limit: {read_brust: 3}\n", "did you mean rate_limit.read_burst?")

    def test_unknown_without_suggestion(self) -> None:
        """A key far from every known key is refused without a guess."""
        self.assertError("colour: blue\n", "unknown key colour")

    def test_bad_types(self) -> None:
        """Wrong types name the key and the value."""
        self.assertError("server: {port: '12443'}\n", "server.port", "integer", "'12443'")
        self.assertError("tls: {enabled: 'yes'}\n", "tls.enabled", "true or false")
        self.assertError("jobs: {max_concurrent: true}\n", "jobs.max_concurrent", "integer")
        self.assertError("auth: {allowed_clients: relay}\n", "auth.allowed_clients", "list")
        self.assertError("server: 12443\n", "server", "section")
        self.assertError("state_dir: ''\n", "state_dir", "non-empty")
        self.assertError("- a\n- b\n", "top level")

    def test_bad_values(self) -> None:
        """Out-of-range and unknown enumerated values name the key."""
        self.assertError("server: {port: 70000}\n", "server.port", "between 0 and 65535", "70000")
        self.assertError("jobs: {max_concurrent: 0}\n", "jobs.max_concurrent", "between")
        self.assertError("tls: {min_tls_version: '1.1'}\n", "tls.min_tls_version", "1.2")
        self.assertError("package_manager: {backend: brew}\n", "package_manager.backend", "brew")
        self.assertError("logging: {format: xml}\n", "logging.format", "text, json")
        self.assertError("websocket: {ping_interval_secs: .nan}\n", "websocket.ping_interval_secs")

    def test_bad_yaml(self) -> None:
        """Broken YAML names the line."""
        self.assertError("server:\n  port: [1,\n", "invalid YAML", "line")
        self.assertError("server: {port: 1}\nserver: {port: 2}\n", "duplicate key 'server'")
