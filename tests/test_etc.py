"""The files under etc/ parse with the real loaders and say what the docs promise."""

from __future__ import annotations

import configparser
import os
import tomllib

import attr
import yaml

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def etc(name: str) -> str:
    return os.path.join(ROOT, "etc", name)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(read(etc(name)))
    return parser


HARDENING = ("ProtectHome", "PrivateTmp", "ProtectHostname", "ProtectClock",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
             "RestrictNamespaces", "LockPersonality", "RestrictRealtime", "SystemCallFilter")


class RelayExampleTests(SynchronousTestCase):
    def test_loads_with_defaults(self) -> None:
        """etc/relay.toml loads with the relay's loader and states every default."""
        from lpa.relay.config import RelayConfig, load_relay_config

        config = load_relay_config(etc("relay.toml"), environ={})
        self.assertEqual(config, RelayConfig(database_url=config.database_url))

    def test_every_key(self) -> None:
        """Every key the relay reads appears in the example."""
        from lpa.relay import config as relay_config

        document = tomllib.loads(read(etc("relay.toml")))
        for section, key, _, _ in relay_config._KEYS.values():
            self.assertIn(key, document.get(section, {}), f"{section}.{key} missing")


class AgentExampleTests(SynchronousTestCase):
    def loader(self):  # type: ignore[no-untyped-def]
        try:
            from lpa import config
        except ImportError:
            raise SkipTest("lpa/config.py (the agent config loader) is not in the tree yet")
        return config

    def test_loads_with_defaults(self) -> None:
        """etc/agent.yaml loads without warnings and states exactly the embedded defaults."""
        config = self.loader()
        loaded = config.load_agent_config(etc("agent.yaml"))
        defaults = config.parse_agent_config("")
        self.assertEqual(tuple(loaded.warnings), ())
        self.assertEqual(attr.evolve(loaded, source=defaults.source), defaults)

    def test_every_key(self) -> None:
        """Every key of the agent's config tree appears in the example."""
        config = self.loader()
        document = yaml.safe_load(read(etc("agent.yaml")))

        def walk(node: object, tree: dict, prefix: str) -> None:
            for field in attr.fields(type(node)):
                if field.name in ("source", "warnings"):
                    continue
                value = getattr(node, field.name)
                self.assertIn(field.name, tree, f"{prefix}{field.name} missing")
                if attr.has(type(value)):
                    walk(value, tree[field.name], f"{prefix}{field.name}.")

        walk(config.parse_agent_config(""), document, "")


class SchemaCopyTests(SynchronousTestCase):
    def test_same_sql(self) -> None:
        """etc/schema.sql is lpa/sql/001_relay.sql under a three-line header."""
        copy = read(etc("schema.sql")).split("\n", 3)[3]
        self.assertEqual(copy, read(os.path.join(ROOT, "lpa", "sql", "001_relay.sql")))


class UnitTests(SynchronousTestCase):
    def test_agent_unit(self) -> None:
        """The agent unit restarts on failure, has the original's hardening, no strict /usr."""
        service = unit("lpa-agent.service")["Service"]
        self.assertEqual(service["Restart"], "on-failure")
        for key in HARDENING:
            self.assertIn(key, service)
        self.assertNotIn("ProtectSystem", service)
        self.assertNotIn("NoNewPrivileges", service)
        self.assertIn("lpa-agent --config", service["ExecStart"])

    def test_relay_unit(self) -> None:
        """The relay unit restarts on failure, runs unprivileged and read-only."""
        service = unit("lpa-relay.service")["Service"]
        self.assertEqual(service["Restart"], "on-failure")
        for key in HARDENING:
            self.assertIn(key, service)
        self.assertEqual(service["ProtectSystem"], "strict")
        self.assertNotEqual(service["User"], "root")
        self.assertIn("lpa-relay --config", service["ExecStart"])
