"""The files under etc/ parse with the real loaders and say what the docs promise."""

from __future__ import annotations

import configparser
import importlib.util
import os
import signal
import socket
import subprocess
import time
import tomllib

import attr
import yaml

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lpa.tools.client import ClientError

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
        from lpa.agent import config

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
        """etc/schema.sql is what lpa db migrate applies (a link, so the two cannot drift)."""
        self.assertEqual(
            os.path.realpath(etc("schema.sql")),
            os.path.realpath(os.path.join(ROOT, "lpa", "sql", "001_relay.sql")),
        )


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


def _wait_exit(process: "subprocess.Popen[bytes]", timeout: float = 20) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


class DaemonsStartTests(SynchronousTestCase):
    """The examples start the real daemons after only their paths are edited."""

    def start(self, tapname: str, config_text: str) -> tuple["subprocess.Popen[bytes]", str]:
        from lpa.tools.demo import daemon_env, twistd_argv

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        config = os.path.join(directory, tapname + ".conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        log = os.path.join(directory, tapname + ".log")
        process = subprocess.Popen(
            twistd_argv(tapname, config, directory), env=daemon_env(), cwd=directory,
            stdin=subprocess.DEVNULL, stdout=open(log + ".stdout", "wb"), stderr=subprocess.STDOUT)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        return process, log

    def test_agent(self) -> None:
        """etc/agent.yaml with its certificate paths and state_dir edited serves /api/v1/health."""
        if importlib.util.find_spec("lpa.agent.tap") is None:
            raise SkipTest("lpa/agent/tap.py is not in the tree yet")
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", 12443))
            except OSError:
                raise SkipTest("port 12443 (the example's) is in use here")
        from lpa.tools.client import AgentClient, AgentUrl, Credentials, http_transport
        from tests.certs import make_test_pki

        pki = make_test_pki(os.path.abspath(self.mktemp()))
        text = read(etc("agent.yaml"))
        for old, new in (("/etc/linux_patch_api/certs/ca.pem", pki.ca_cert),
                         ("/etc/linux_patch_api/certs/server.pem", pki.server_cert),
                         ("/etc/linux_patch_api/certs/server.key.pem", pki.server_key),
                         ("/etc/linux_patch_api/certs/crl.pem", pki.crl),
                         ('"/var/lib/lpa"', f'"{os.path.abspath(self.mktemp())}"')):
            self.assertIn(old, text)
            text = text.replace(old, new)
        process, log = self.start("lpa-agent", text)
        context = Credentials(pki.good.cert, pki.good.key, pki.ca_cert).ssl_context()
        client = AgentClient(http_transport(AgentUrl("localhost", 12443), context, 5))
        deadline = time.monotonic() + 30
        while True:
            self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:])
            try:
                health = client.health()
                break
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(health["status"], "healthy")
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal

    def test_relay(self) -> None:
        """etc/relay.toml with its database URL and certificate paths edited runs the relay."""
        if importlib.util.find_spec("lpa.relay.tap") is None:
            raise SkipTest("lpa/relay/tap.py is not in the tree yet")
        from tests import pg
        from tests.certs import make_test_pki

        dsn = pg.database(self, migrated=True)
        pki = make_test_pki(os.path.abspath(self.mktemp()))
        text = read(etc("relay.toml"))
        for old, new in (
                ("postgresql://patch_manager:CHANGE-ME@localhost:5432/patch_manager", dsn),
                ("/etc/patch-manager/certs/client.crt", pki.good.cert),
                ("/etc/patch-manager/certs/client.key", pki.good.key),
                ("/etc/patch-manager/ca/ca.crt", pki.ca_cert)):
            self.assertIn(old, text)
            text = text.replace(old, new)
        process, log = self.start("lpa-relay", text)
        time.sleep(3)
        self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:] + read(log)[-2000:])
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal
        self.assertNotIn("Traceback", read(log))
