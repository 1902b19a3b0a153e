"""The config kit both daemons share: file checks naming the key, `lpa config check` for both
kinds of file, and each daemon's own pid file (exit 78 and one line from both twistd plugins:
tests/system/test_twistd.py)."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from lpa import configkit as kit
from lpa.agent.config import check_agent_files, parse_agent_config
from lpa.errors import ConfigError
from lpa.relay.config import check_relay_files, parse_relay_config
from lpa.tools import cli
from tests.certs import TestPki, make_test_pki

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path: str, data: str | bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return path


def agent_yaml(pki: TestPki, **paths: str) -> str:
    files = {"ca_cert": pki.ca_cert, "server_cert": pki.server_cert,
             "server_key": pki.server_key, "crl_path": pki.crl, **paths}
    return "tls:\n" + "".join(f"  {key}: {value}\n" for key, value in files.items())


def relay_toml(pki: TestPki, dsn: str = "postgresql:///pm", **paths: str) -> str:
    files = {"agent_client_cert_path": pki.good.cert, "agent_client_key_path": pki.good.key,
             "ca_cert_path": pki.ca_cert, **paths}
    return (f'[database]\nurl = "{dsn}"\n[security]\n'
            + "".join(f'{key} = "{value}"\n' for key, value in files.items()))


class FileCheckTests(SynchronousTestCase):
    """check_file / check_key_pair: every problem is one line naming the key and the path."""

    def setUp(self) -> None:
        self.pki = make_test_pki(self.mktemp())
        self.dir = os.path.dirname(self.pki.ca_cert)

    def assertProblem(self, call: object, *args: object, expected: str) -> None:
        error = self.assertRaises(ConfigError, call, *args)
        self.assertEqual(str(error), expected)

    def test_missing_unreadable_empty(self) -> None:
        """No such file, a directory, and an empty file, each named with its key."""
        missing = os.path.join(self.dir, "nope.pem")
        self.assertProblem(kit.check_file, "tls.ca_cert", missing, kit.Pem.CERTIFICATES,
                           expected=f"tls.ca_cert: {missing}: no such file")
        self.assertProblem(kit.check_file, "tls.ca_cert", self.dir, kit.Pem.CERTIFICATES,
                           expected=f"tls.ca_cert: {self.dir}: is a directory, not a file")
        empty = _write(os.path.join(self.dir, "empty.pem"), "")
        self.assertProblem(kit.check_file, "tls.crl_path", empty, kit.Pem.CRL,
                           expected=f"tls.crl_path: {empty}: the file is empty")

    def test_wrong_content(self) -> None:
        """A key where a certificate belongs, a certificate where a CRL belongs, garbage."""
        self.assertProblem(kit.check_file, "k", self.pki.server_key, kit.Pem.CERTIFICATE,
                           expected=f"k: {self.pki.server_key}: not a PEM or DER certificate")
        self.assertProblem(
            kit.check_file, "k", self.pki.ca_cert, kit.Pem.CRL,
            expected=f"k: {self.pki.ca_cert}: not a PEM or DER certificate revocation list")
        junk = _write(os.path.join(self.dir, "junk"), b"\x00\x01junk")
        self.assertProblem(kit.check_file, "k", junk, kit.Pem.PRIVATE_KEY,
                           expected=f"k: {junk}: not a PEM or DER private key")

    def test_encrypted_key(self) -> None:
        """An encrypted private key is refused with the reason."""
        key = serialization.load_pem_private_key(Path(self.pki.server_key).read_bytes(), None)
        encrypted = _write(os.path.join(self.dir, "enc.key"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        self.assertProblem(kit.check_file, "k", encrypted, kit.Pem.PRIVATE_KEY,
                           expected=f"k: {encrypted}: encrypted keys are not supported")

    def test_key_pair(self) -> None:
        """A key that belongs to another certificate names both keys; a good pair passes."""
        self.assertEqual(kit.check_key_pair("c", self.pki.server_cert, "k", self.pki.server_key),
                         [])
        self.assertProblem(
            kit.check_key_pair, "tls.server_cert", self.pki.server_cert, "tls.server_key",
            self.pki.good.key,
            expected=f"tls.server_key: {self.pki.good.key}: does not match the certificate of "
                     f"tls.server_cert ({self.pki.server_cert})")

    def test_expired_certificate_warns(self) -> None:
        """An expired certificate is a warning naming the key and the date."""
        warnings = kit.check_key_pair("c", self.pki.expired.cert, "k", self.pki.expired.key)
        self.assertEqual(len(warnings), 1)
        self.assertTrue(warnings[0].startswith(f"c: {self.pki.expired.cert}: certificate "
                                               "CN=expired-client expired on "), warnings)
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3650)
        cert = kit.check_file("c", self.pki.ca_cert, kit.Pem.CERTIFICATE)
        self.assertIn("is not valid before", kit.validity_warnings("c", "f", [cert], long_ago)[0])


class DaemonFileTests(SynchronousTestCase):
    """check_agent_files / check_relay_files: the errors name the config, the key and the file."""

    def setUp(self) -> None:
        self.pki = make_test_pki(self.mktemp())

    def test_agent_good(self) -> None:
        """The test PKI passes; tls.enabled false checks no file."""
        self.assertEqual(check_agent_files(parse_agent_config(agent_yaml(self.pki), "a.yaml")), [])
        config = parse_agent_config("tls:\n  enabled: false\n  ca_cert: /nope\n", "a.yaml")
        self.assertEqual(check_agent_files(config), [])

    def test_agent_missing_certificate_names_key(self) -> None:
        """A missing server certificate: source, key and path in one line."""
        config = parse_agent_config(agent_yaml(self.pki, server_cert="/nope/server.crt"), "a.yaml")
        error = self.assertRaises(ConfigError, check_agent_files, config)
        self.assertEqual(str(error), "a.yaml: tls.server_cert: /nope/server.crt: no such file")

    def test_agent_mismatch_and_bad_crl(self) -> None:
        """A key of another certificate, and a CRL that is not one, are errors."""
        config = parse_agent_config(agent_yaml(self.pki, server_key=self.pki.good.key), "a.yaml")
        self.assertIn("tls.server_key", str(self.assertRaises(ConfigError, check_agent_files,
                                                              config)))
        config = parse_agent_config(agent_yaml(self.pki, crl_path=self.pki.ca_cert), "a.yaml")
        error = self.assertRaises(ConfigError, check_agent_files, config)
        self.assertEqual(str(error), f"a.yaml: tls.crl_path: {self.pki.ca_cert}: not a PEM or DER "
                                     "certificate revocation list")

    def test_agent_missing_crl_and_whitelist_warn(self) -> None:
        """A missing CRL or whitelist file is a warning, as the agent starts without them."""
        config = parse_agent_config(
            agent_yaml(self.pki, crl_path="/nope/crl.pem") + "whitelist:\n  path: /nope/w.yaml\n")
        warnings = check_agent_files(config)
        self.assertEqual([w.split(":")[0] for w in warnings], ["tls.crl_path", "whitelist.path"])

    def test_relay(self) -> None:
        """The relay's [security] files: good passes; missing and mismatched name the key."""
        config = parse_relay_config(relay_toml(self.pki), "r.toml", {})
        self.assertEqual(check_relay_files(config), [])
        config = parse_relay_config(
            relay_toml(self.pki, agent_client_cert_path="/nope/c.crt"), "r.toml", {})
        error = self.assertRaises(ConfigError, check_relay_files, config)
        self.assertEqual(str(error),
                         "r.toml: security.agent_client_cert_path: /nope/c.crt: no such file")
        config = parse_relay_config(
            relay_toml(self.pki, agent_client_key_path=self.pki.server_key), "r.toml", {})
        error = self.assertRaises(ConfigError, check_relay_files, config)
        self.assertIn("security.agent_client_key_path", str(error))
        self.assertIn("does not match", str(error))


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = int(exit.code or 0)
    return code, out.getvalue(), err.getvalue()


class ConfigCheckCommandTests(SynchronousTestCase):
    """`lpa config check FILE` for both daemons' files."""

    def setUp(self) -> None:
        self.pki = make_test_pki(self.mktemp())
        self.dir = os.path.dirname(self.pki.ca_cert)

    def test_agent_missing_cert_is_not_ok(self) -> None:
        """An agent config naming a missing certificate fails the check, naming the key."""
        path = _write(os.path.join(self.dir, "agent.yaml"),
                      agent_yaml(self.pki, server_cert="/nope/server.crt"))
        code, out, err = _run_cli(["config", "check", path])
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err, f"lpa: error: {path}: tls.server_cert: /nope/server.crt: no such file\n")
        code, out, err = _run_cli(["config", "check", "--no-files", path])
        self.assertEqual((code, out, err), (0, f"{path}: OK (agent config, files not checked)\n",
                                           ""))

    def test_relay_by_extension_and_flag(self) -> None:
        """A .toml file is checked as a relay config; --relay forces it for another name."""
        text = relay_toml(self.pki) + "[worker]\nhealth_poll_interval_secs = 300\n"
        toml = _write(os.path.join(self.dir, "config.toml"), text)
        code, out, err = _run_cli(["config", "check", toml])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("warning: worker.health_poll_interval_secs is accepted but not used", out)
        self.assertTrue(out.endswith(f"{toml}: OK (relay config)\n"), out)
        other = _write(os.path.join(self.dir, "relay.conf"),
                       text + "ws_relay_pol_interval_secs = 1\n")
        code, out, err = _run_cli(["config", "check", "--relay", other])
        self.assertEqual(code, 2)
        self.assertEqual(err, f"lpa: error: {other}: unknown key worker.ws_relay_pol_interval_secs "
                              "(did you mean worker.ws_relay_poll_interval_secs?)\n")
        code, _, err = _run_cli(["config", "check", other])  # not .toml: read as YAML
        self.assertEqual(code, 2)
        self.assertIn("invalid YAML", err)


class OwnPidfileTests(SynchronousTestCase):
    """Each daemon's default pid file is its own, so both start from one directory."""

    def options(self, argv: list[str]) -> dict[str, Any]:
        from twisted.scripts._twistd_unix import ServerOptions

        options = ServerOptions()
        options.parseOptions(argv)
        return options

    def test_defaults_differ(self) -> None:
        """Without --pidfile, lpa-agent uses lpa-agent.pid and lpa-relay lpa-relay.pid."""
        pki = make_test_pki(self.mktemp())
        agent = _write(os.path.abspath(self.mktemp()), agent_yaml(pki))
        relay = _write(os.path.abspath(self.mktemp()), relay_toml(pki))
        self.assertEqual(self.options(["-n", "lpa-agent", "--config", agent])["pidfile"],
                         os.path.abspath("lpa-agent.pid"))
        self.assertEqual(self.options(["-n", "lpa-relay", "--config", relay])["pidfile"],
                         os.path.abspath("lpa-relay.pid"))
        self.assertEqual(
            self.options(["-n", "--pidfile=", "lpa-relay", "--config", relay])["pidfile"], "")
        self.assertEqual(
            self.options(["-n", "--pidfile=x.pid", "lpa-agent", "--config", agent])["pidfile"],
            os.path.abspath("x.pid"))


