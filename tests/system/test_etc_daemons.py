"""The example configs of etc/ start the daemons as an operator starts them (twistd, real TLS)."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.logcheck import assert_no_unhandled
from tests.test_etc import etc, read


def _wait_exit(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _get_data(context: ssl.SSLContext, host: str, port: int, path: str) -> Any:
    """GET one path over TLS with the stdlib; the envelope's data."""
    connection = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())["data"]
    finally:
        connection.close()


class DaemonsStartTests(SynchronousTestCase):
    """The examples start the real daemons after only their paths are edited."""

    def start(self, tapname: str, config_text: str, *, own_pidfile: bool = False
              ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``twistd -n TAP --config FILE`` in a fresh directory; ``own_pidfile`` leaves
        out ``--pidfile`` so the daemon's default applies, with a live ``twistd.pid`` (this
        process's) in that directory, as another twistd daemon started there would leave."""
        from lpa.tools.demo_processes import daemon_env, twistd_argv

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        config = os.path.join(directory, tapname + ".conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        log = os.path.join(directory, tapname + ".log")
        argv = twistd_argv(tapname, config, directory)
        if own_pidfile:
            argv = [arg for arg in argv if not arg.startswith("--pidfile=")]
            with open(os.path.join(directory, "twistd.pid"), "w") as handle:
                handle.write(str(os.getpid()))
        with open(log + ".stdout", "wb") as stdout:  # the child keeps its own copy
            process = subprocess.Popen(
                argv, env=daemon_env(), cwd=directory,
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT)

        def stop() -> None:
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)
        return process, log

    def wait_for(self, process: subprocess.Popen[bytes], log: str, text: str) -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(log) or text not in read(log):
            self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:])
            self.assertLess(time.monotonic(), deadline, f"no {text!r} in {log}")
            time.sleep(0.1)

    def test_agent(self) -> None:
        """etc/agent.yaml with its certificate paths and state_dir edited serves /api/v1/health."""
        if importlib.util.find_spec("lpa.agent.tap") is None:
            raise SkipTest("lpa/agent/tap.py is not in the tree yet")
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", 12443))
            except OSError:
                raise SkipTest("port 12443 (the example's) is in use here") from None
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
        process, log = self.start("lpa-agent", text, own_pidfile=True)
        context = ssl.create_default_context(cafile=pki.ca_cert)  # an independent client
        context.load_cert_chain(pki.good.cert, pki.good.key)
        deadline = time.monotonic() + 30
        while True:
            self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:])
            try:
                health = _get_data(context, "localhost", 12443, "/api/v1/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(health["status"], "healthy")
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal
        assert_no_unhandled(log, log + ".stdout")

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
        text = text.replace("[worker]\n", "[worker]\nhealth_poll_interval_secs = 300\n")
        process, log = self.start("lpa-relay", text, own_pidfile=True)
        self.wait_for(process, log, "lpa-relay started")
        self.assertIn("worker.health_poll_interval_secs is accepted but not used", read(log))
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(log), "lpa-relay.pid")))
        process.send_signal(signal.SIGHUP)  # systemctl reload lpa-relay
        self.wait_for(process, log, "SIGHUP: nothing to reload")
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal
        assert_no_unhandled(log, log + ".stdout")
