"""twistd lpa-agent and lpa-relay started as an operator starts them: a bad config or a taken
port stops start-up with one line and the documented exit status, never a traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpa.agent.listening import EX_TEMPFAIL
from tests.certs import make_test_pki
from tests.logcheck import problems_in_text
from tests.system import CHECKOUT
from tests.test_agent_service import _config_text
from tests.test_configkit import _write, agent_yaml, relay_toml


class AgentTapTests(TestCase):
    def _twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            raise self.skipTest("twistd not installed beside this interpreter")
        top = CHECKOUT
        env = dict(os.environ, PYTHONPATH=top)
        with tempfile.TemporaryDirectory() as cwd:
            return subprocess.run(
                [twistd, "-n", "--pidfile=", "lpa-agent", *args],
                check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
            )

    def test_missing_config_file_one_line(self) -> None:
        """A missing config file stops start-up with one line and a non-zero exit."""
        done = self._twistd("--config", "/nonexistent/agent.yaml")
        self.assertNotEqual(done.returncode, 0)
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertIn("/nonexistent/agent.yaml", lines[0])
        self.assertNotIn("Traceback", done.stderr + done.stdout)

    def test_typo_key_one_line(self) -> None:
        """A misspelt key names the key, with no traceback."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            handle.write("jobs:\n  max_concurent: 3\n")
        self.addCleanup(os.unlink, handle.name)
        done = self._twistd("--config", handle.name)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("max_concurent", done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr + done.stdout)


class AgentTapPortTests(TestCase):
    def test_port_in_use_under_twistd(self) -> None:
        """twistd with the port taken: one error line naming it, exit 75, no traceback.

        The agent process exits at listen, before its reactor runs a job or accepts a request,
        so it needs no stand-in package manager."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            raise self.skipTest("twistd not installed beside this interpreter")
        tmp = tempfile.mkdtemp(prefix="lpa-port-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = make_test_pki(os.path.join(tmp, "pki"))
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = os.path.join(tmp, "agent.yaml")
        with open(path, "w") as handle:
            handle.write(_config_text(pki, os.path.join(tmp, "state"), port=port))
        top = CHECKOUT
        done = subprocess.run(
            [twistd, "-n", "--pidfile=", "lpa-agent", "--config", path],
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=top),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(done.returncode, EX_TEMPFAIL, done.stdout + done.stderr)
        output = done.stdout + done.stderr
        self.assertEqual(problems_in_text(output), [])
        mentions = [line for line in output.splitlines() if str(port) in line]
        self.assertEqual(len(mentions), 1, output)
        self.assertIn(
            f"#error] cannot listen on 127.0.0.1:{port}: address already in use", mentions[0]
        )


class TwistdExitTests(SynchronousTestCase):
    """A real `twistd lpa-…` with a bad config: exit 78 and one line naming the key."""

    def twistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory() as cwd:
            return subprocess.run(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                 *argv], check=False, cwd=cwd, capture_output=True, text=True, timeout=120,
                env=dict(os.environ, PYTHONPATH=CHECKOUT))

    def test_relay_bad_key_and_missing_cert(self) -> None:
        """lpa-relay: a misspelt key, a missing certificate, a missing file: 78, one line each."""
        pki = make_test_pki(os.path.abspath(self.mktemp()))
        cases = [
            (relay_toml(pki) + "[worker]\nws_relay_scan_intervall_secs = 3\n",
             ("unknown key worker.ws_relay_scan_intervall_secs (did you mean "
             "worker.ws_relay_scan_interval_secs?)")),
            (relay_toml(pki, ca_cert_path="/nope/ca.crt"),
             "security.ca_cert_path: /nope/ca.crt: no such file"),
        ]
        for text, problem in cases:
            path = _write(os.path.abspath(self.mktemp()), text)
            done = self.twistd("lpa-relay", "--config", path)
            self.assertEqual(
                (done.returncode, done.stderr),
                (78, f"lpa-relay: configuration error: {path}: {problem}\n"), done.stdout)
        done = self.twistd("lpa-relay", "--config", "/nope/relay.toml")
        self.assertEqual((done.returncode, done.stderr), (
            78, "lpa-relay: configuration error: config file /nope/relay.toml: not found\n"))

    def test_agent_missing_cert(self) -> None:
        """lpa-agent: a missing certificate is named by its key, exit 78."""
        pki = make_test_pki(os.path.abspath(self.mktemp()))
        path = _write(os.path.abspath(self.mktemp()),
                      agent_yaml(pki, server_cert="/nope/server.crt"))
        done = self.twistd("lpa-agent", "--config", path)
        self.assertEqual((done.returncode, done.stderr), (
            78, (f"lpa-agent: configuration error: {path}: tls.server_cert: /nope/server.crt: "
                "no such file\n")))
