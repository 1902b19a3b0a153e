"""The relay reads the manager's config.toml; bad values are one-line ConfigErrors."""

from __future__ import annotations

import os

import attr
from twisted.trial.unittest import SynchronousTestCase

from lpa.errors import ConfigError
from lpa.relay.config import (
    DEFAULT_CONFIG_PATH,
    RelayConfig,
    default_config_path,
    load_relay_config,
    parse_relay_config,
)

MANAGER_FILE = """
[server]
host = "0.0.0.0"
port = 443

[database]
url = "postgres://pm:secret@db.internal:5432/patch_manager"
max_connections = 20

[worker]
health_poll_interval_secs = 300
ws_relay_poll_interval_secs = 10
max_concurrent_agent_calls = 64

[security]
ip_whitelist = []
jwt_signing_key_path = "/etc/patch-manager/jwt/signing.pem"
agent_client_cert_path = "/etc/patch-manager/certs/client.crt"
agent_client_key_path = "/etc/patch-manager/certs/client.key"
ca_cert_path = "/etc/patch-manager/ca/ca.crt"

[logging]
level = "info"
format = "json"

[rate_limit]
api_rpm = 120
"""


def parse(text: str, environ: dict[str, str] | None = None) -> RelayConfig:
    return parse_relay_config(text, "config.toml", environ if environ is not None else {})


class ParseTests(SynchronousTestCase):
    def test_manager_file_works_unchanged(self) -> None:
        """A manager config.toml parses: our keys read, other sections and keys ignored."""
        config = parse(MANAGER_FILE)
        self.assertEqual(config.database_url, "postgres://pm:secret@db.internal:5432/patch_manager")
        self.assertEqual(config.poll_interval, 10.0)
        self.assertEqual(config.client_cert_path, "/etc/patch-manager/certs/client.crt")
        self.assertEqual(config.log_format, "json")

    def test_manager_keys_warned_once_per_group(self) -> None:
        """The manager's own keys in the checked sections are accepted, named in one warning."""
        config = parse(MANAGER_FILE)
        manager = [w for w in config.warnings if "the manager's own" in w]
        self.assertEqual(len(manager), 1, config.warnings)
        for key in ("worker.health_poll_interval_secs", "worker.max_concurrent_agent_calls",
                    "security.ip_whitelist", "security.jwt_signing_key_path",
                    "database.max_connections"):
            self.assertIn(key, manager[0])
        self.assertEqual(config.log_level, "info")  # read, not merely accepted
        self.assertFalse(any("logging.level" in w for w in config.warnings))
        self.assertFalse(any("server" in w or "rate_limit" in w for w in config.warnings))

    def test_defaults(self) -> None:
        """Only database.url is required; everything else has the documented default."""
        config = parse('[database]\nurl = "postgresql:///patch_manager"\n')
        self.assertEqual((config.source, config.warnings), ("config.toml", ()))
        self.assertEqual(
            attr.asdict(config, filter=lambda field, _: field.name not in ("source", "warnings")),
            {
                "database_url": "postgresql:///patch_manager",
                "poll_interval": 10.0,
                "scan_interval": 10.0,
                "handshake_timeout": 10.0,
                "max_handshakes_in_flight": 32,
                "reconnect_initial_delay": 1.0,
                "reconnect_max_delay": 60.0,
                "unreachable_deadline": 900.0,
                "max_pending_events": 10000,
                "relay_id": "",
                "heartbeat_interval": 2.0,
                "lease_ttl": 8.0,
                "client_cert_path": "/etc/patch-manager/certs/client.crt",
                "client_key_path": "/etc/patch-manager/certs/client.key",
                "ca_cert_path": "/etc/patch-manager/ca/ca.crt",
                "log_format": "json",
                "log_level": "info",
                "ops_enabled": True,
                "ops_bind": "127.0.0.1",
                "ops_port": 12480,
                "ops_tls_cert_path": None,
                "ops_tls_key_path": None,
                "ops_client_ca_path": None,
            },
        )

    def test_relay_keys(self) -> None:
        """Every relay key in [worker] is read, fractional seconds allowed."""
        config = parse(
            '[database]\nurl = "postgresql:///pm"\n[worker]\n'
            "ws_relay_poll_interval_secs = 2.5\nws_relay_scan_interval_secs = 3\n"
            "ws_relay_handshake_timeout_secs = 4\nws_relay_max_handshakes = 5\n"
            "ws_relay_reconnect_initial_delay_secs = 0.5\nws_relay_reconnect_max_delay_secs = 30\n"
            "ws_relay_unreachable_deadline_secs = 120\nws_relay_max_pending_events = 50\n"
            '[logging]\nformat = "TEXT"\n'
        )
        self.assertEqual(
            (config.poll_interval, config.scan_interval, config.handshake_timeout,
             config.max_handshakes_in_flight, config.reconnect_initial_delay,
             config.reconnect_max_delay, config.unreachable_deadline, config.max_pending_events,
             config.log_format),
            (2.5, 3.0, 4.0, 5, 0.5, 30.0, 120.0, 50, "text"),
        )

    def test_log_level(self) -> None:
        """[logging] level is read: a level name, or the bare level of the manager's filter form
        ("debug,sqlx=warn"); anything else is an error naming the key."""
        def level(value: str) -> str:
            return parse(f'[database]\nurl = "postgresql:///pm"\n[logging]\nlevel = "{value}"\n'
                         ).log_level

        self.assertEqual([level(v) for v in ("WARN", "debug,sqlx=warn", "pm_worker=debug")],
                         ["warn", "debug", "info"])
        error = self.assertRaises(ConfigError, level, "loud")
        self.assertIn("logging.level", str(error))

    def test_env_overrides(self) -> None:
        """PATCH_MANAGER__SECTION__KEY overrides the file, parsed as the key's type."""
        config = parse(
            MANAGER_FILE,
            {
                "PATCH_MANAGER__DATABASE__URL": "postgresql:///other",
                "PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKES": "8",
                "PATCH_MANAGER__WORKER__WS_RELAY_POLL_INTERVAL_SECS": "1.5",
            },
        )
        self.assertEqual(
            (config.database_url, config.max_handshakes_in_flight, config.poll_interval),
            ("postgresql:///other", 8, 1.5),
        )

    def test_url_from_env_alone(self) -> None:
        """An empty file is fine when the database URL comes from the environment."""
        config = parse("", {"PATCH_MANAGER__DATABASE__URL": "postgresql:///pm"})
        self.assertEqual(config.database_url, "postgresql:///pm")


class BadConfigTests(SynchronousTestCase):
    def assert_bad(self, text: str, *words: str, environ: dict[str, str] | None = None) -> None:
        error = self.assertRaises(ConfigError, parse, text, environ)
        message = str(error)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)

    def test_missing_url(self) -> None:
        """No database URL anywhere: an error naming database.url (never a silent default)."""
        self.assert_bad("[worker]\nws_relay_poll_interval_secs = 10\n", "database.url", "required")

    def test_bad_values_name_the_key(self) -> None:
        """Each bad value is one line naming its key."""
        url = '[database]\nurl = "postgresql:///pm"\n'
        cases = [
            ("[worker]\nws_relay_poll_interval_secs = 0\n", "worker.ws_relay_poll_interval_secs"),
            ("[worker]\nws_relay_scan_interval_secs = -1\n", "worker.ws_relay_scan_interval_secs"),
            ('[worker]\nws_relay_handshake_timeout_secs = "10"\n',
             "ws_relay_handshake_timeout_secs"),
            ("[worker]\nws_relay_max_handshakes = 1.5\n", "worker.ws_relay_max_handshakes"),
            ("[worker]\nws_relay_max_pending_events = true\n", "ws_relay_max_pending_events"),
            ("[worker]\nws_relay_unreachable_deadline_secs = 0\n",
             "ws_relay_unreachable_deadline_secs"),
            ('[security]\nca_cert_path = ""\n', "security.ca_cert_path"),
            ("[security]\nagent_client_key_path = 3\n", "security.agent_client_key_path"),
            ('[logging]\nformat = "xml"\n', "logging.format"),
            ("[worker]\nws_relay_reconnect_initial_delay_secs = 90\n",
             "ws_relay_reconnect_initial_delay_secs"),
            ('worker = "x"\n', "[worker] must be a table"),
        ]
        for body, key in cases:
            self.assert_bad(url + body if not body.startswith("worker =") else body + url, key)

    def test_bad_url(self) -> None:
        """A database URL that is not postgres:// is refused."""
        self.assert_bad('[database]\nurl = "mysql://x/y"\n', "database.url", "postgres")

    def test_bad_toml(self) -> None:
        """A TOML syntax error names the file."""
        self.assert_bad("[database\nurl=1", "config.toml", "not valid TOML")

    def test_bad_env_value(self) -> None:
        """A non-numeric env override names the variable."""
        self.assert_bad(
            MANAGER_FILE, "PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKES",
            environ={"PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKES": "many"},
        )


class UnknownKeyTests(SynchronousTestCase):
    """A key the relay does not know in a section it checks stops start-up with a suggestion."""

    url = '[database]\nurl = "postgresql:///pm"\n'

    def assert_unknown(self, text: str, expected: str,
                       environ: dict[str, str] | None = None) -> None:
        error = self.assertRaises(ConfigError, parse, text, environ)
        self.assertEqual(str(error), f"config.toml: {expected}")

    def test_misspelt_relay_key(self) -> None:
        """A misspelt ws_relay_* key in [worker] is refused, naming the key it resembles."""
        self.assert_unknown(
            self.url + "[worker]\nws_relay_pol_interval_secs = 10\n",
            "unknown key worker.ws_relay_pol_interval_secs "
            "(did you mean worker.ws_relay_poll_interval_secs?)")

    def test_unknown_keys_in_every_checked_section(self) -> None:
        """[security], [database] and [logging] are checked key by key too."""
        self.assert_unknown(self.url + '[security]\nagent_client_cert = "/x"\n',
                            "unknown key security.agent_client_cert "
                            "(did you mean security.agent_client_cert_path?)")
        self.assert_unknown('[database]\nurl = "postgresql:///pm"\nmax_conections = 3\n',
                            "unknown key database.max_conections "
                            "(did you mean database.max_connections?)")
        self.assert_unknown(self.url + '[logging]\ncolour = "red"\n',
                            "unknown key logging.colour")

    def test_sections(self) -> None:
        """A section named like a known one is an error; others are a warning; the manager's
        [server], [rate_limit] and [repo] are not looked into."""
        self.assert_unknown(self.url + "[wroker]\nws_relay_poll_interval_secs = 1\n",
                            "unknown section wroker (did you mean worker?)")
        config = parse(self.url + "[sso]\nissuer = 'x'\n[server]\nanything = 1\n"
                       "[rate_limit]\nx = 1\n[repo]\ndir = '/r'\n")
        self.assertEqual(config.warnings, ("section sso is not one lpa knows; ignored",))

    def test_misspelt_environment_override(self) -> None:
        """A PATCH_MANAGER__ variable naming an unknown key of a checked section is refused;
        the manager's own variables and other sections' are left alone."""
        self.assert_unknown(
            self.url, "PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKE: unknown key "
            "worker.ws_relay_max_handshake (did you mean "
            "PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKES?)",
            {"PATCH_MANAGER__WORKER__WS_RELAY_MAX_HANDSHAKE": "3"})
        config = parse(self.url, {"PATCH_MANAGER__WORKER__JOB_TIMEOUT_SECS": "5",
                                  "PATCH_MANAGER__SERVER__PORT": "443",
                                  "PATCH_MANAGER__SOMETHING": "x"})
        self.assertEqual(config.warnings, ())


class LoadTests(SynchronousTestCase):
    def test_load_file(self) -> None:
        """load_relay_config reads a file by path."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(MANAGER_FILE)
        self.assertEqual(load_relay_config(path, {}).poll_interval, 10.0)

    def test_missing_file(self) -> None:
        """A missing file is a one-line error naming it, worded as the agent's."""
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_relay_config, path, {})
        self.assertEqual(str(error), f"config file {path}: not found")

    def test_unreadable_file(self) -> None:
        """A directory in place of the file is 'cannot read', naming it."""
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_relay_config, path, {})
        self.assertIn(f"config file {path}: cannot read", str(error))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused with its name."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b'[database]\nurl = "\xff"\n')
        self.assertIn("not UTF-8", str(self.assertRaises(ConfigError, load_relay_config, path, {})))

    def test_default_path(self) -> None:
        """$PATCH_MANAGER_CONFIG, else /etc/patch-manager/config.toml, as the manager does."""
        self.assertEqual(default_config_path({}), DEFAULT_CONFIG_PATH)
        self.assertEqual(default_config_path({"PATCH_MANAGER_CONFIG": "/x.toml"}), "/x.toml")
